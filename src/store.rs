//! SQL that flux runs through SPI, pinned to a safe search_path: writes
//! (`exec`, `one_mut`) and small reads (`one`), read under the statement's
//! snapshot. The decision cache's own loads are in cache/loads.rs, usage's
//! probes in usage/sql.rs.

use crate::error::{FluxError, FluxResult};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

/// Refuse a write on a read-only connection with 25006 before touching any
/// table (on a hot standby, asking for a transaction id would fail with an
/// internal error instead).
pub fn ensure_writable(what: &str) -> FluxResult<()> {
    // SAFETY: reads backend-local state.
    let read_only = unsafe { pg_sys::XactReadOnly || pg_sys::RecoveryInProgress() };
    if read_only {
        return Err(FluxError::ReadOnly(format!(
            "{what} writes, and this is a read-only transaction (a hot standby, or SET TRANSACTION READ ONLY): call it on the primary"
        )));
    }
    Ok(())
}

/// A timestamp for SPI; None is -infinity (the period of limit features).
pub fn ts_datum(t: Option<i64>) -> TimestampWithTimeZone {
    match t {
        Some(v) => TimestampWithTimeZone::try_from(v)
            .unwrap_or_else(|_| TimestampWithTimeZone::negative_infinity()),
        None => TimestampWithTimeZone::negative_infinity(),
    }
}

/// Run a statement that writes (refused on a read-only connection).
pub fn exec(sql: &str, args: &[pgrx::datum::DatumWithOid]) -> FluxResult<()> {
    ensure_writable("this function")?;
    let _path = crate::privilege::Pinned::enter();
    Spi::connect_mut(|c| c.update(sql, None, args).map(|_| ()))?;
    Ok(())
}

/// The first column of the first row of a read-only query, or None.
pub fn one<T: FromDatum + IntoDatum>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> FluxResult<Option<T>> {
    let _path = crate::privilege::Pinned::enter();
    Spi::connect(|c| {
        let t = c.select(sql, Some(1), args)?;
        Ok(if t.is_empty() {
            None
        } else {
            t.first().get_one::<T>()?
        })
    })
}

/// The same for a statement that writes (UPDATE ... RETURNING).
pub fn one_mut<T: FromDatum + IntoDatum>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> FluxResult<Option<T>> {
    let _path = crate::privilege::Pinned::enter();
    Spi::connect_mut(|c| {
        let t = c.update(sql, Some(1), args)?;
        Ok(if t.is_empty() {
            None
        } else {
            t.first().get_one::<T>()?
        })
    })
}

/// An application table's name as SQL (schema-qualified when needed) and
/// the type of its tenant column; a missing column is an error that says
/// what to pass instead.
pub fn table_and_column(tbl: pg_sys::Oid, column: &str) -> FluxResult<(String, String)> {
    let table = one::<String>(
        "SELECT $1::pg_catalog.regclass::pg_catalog.text",
        &[tbl.into()],
    )?
    .unwrap_or_default();
    let coltype = one::<String>(
        "SELECT pg_catalog.format_type(atttypid, atttypmod) FROM pg_catalog.pg_attribute \
         WHERE attrelid OPERATOR(pg_catalog.=) $1 AND attname OPERATOR(pg_catalog.=) $2 \
           AND attnum OPERATOR(pg_catalog.>) 0 AND NOT attisdropped",
        &[tbl.into(), column.into()],
    )?
    .ok_or_else(|| {
        FluxError::InvalidValue(format!(
            "table {table} has no column \"{column}\": pass the tenant column as tenant_column"
        ))
    })?;
    Ok((table, coltype))
}

/// Whether flux.`table` has `column` (columns added by an upgrade are
/// missing from a database still on an older install script).
pub fn flux_has_column(table: &std::ffi::CStr, column: &std::ffi::CStr) -> bool {
    // SAFETY: syscache lookups by name inside a transaction.
    unsafe {
        let ns = pgrx::pg_sys::get_namespace_oid(c"flux".as_ptr(), true);
        let rel = pgrx::pg_sys::get_relname_relid(table.as_ptr(), ns);
        rel != pgrx::pg_sys::InvalidOid && pgrx::pg_sys::get_attnum(rel, column.as_ptr()) > 0
    }
}
