//! The audit log and change events: one row trigger on every flux table
//! that people edit, written in Rust so that it can record the role that
//! made the change (a SECURITY DEFINER trigger would only see its owner)
//! while the insert into flux.audit_log runs as the tables' owner (no role
//! gets a privilege to write the log itself).
//!
//! The trigger function is not executable by PUBLIC (so no role can attach
//! it to a table of its own, whose column types could run the role's code
//! as the owner while the row is turned into json), and it refuses to run on
//! a table outside schema flux. `role` records the real role; `actor` is
//! `flux.actor` when set, which only superusers and flux_admin may set.
//!
//! pg_restore loads the tables (and the log itself) with COPY FROM, and
//! those rows are not logged a second time. Whether this row comes from
//! such a COPY is read from the statement being executed (the active
//! portal's parse tree: a COPY FROM into this very table), never from the
//! client's query text, which a client could shape at will.

use crate::error::FluxError;
use crate::privilege::AsOwner;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::{AllocatedByPostgres, PgTrigger, PgTriggerError};
use std::ffi::CStr;

/// The role running the statement (after SET ROLE), by name: the caller
/// when flux writes as the owner on its behalf (privilege::caller).
fn current_role() -> String {
    // SAFETY: GetUserNameFromId with noerr = true returns NULL rather than
    // raising for a dropped role.
    unsafe {
        let name = pg_sys::GetUserNameFromId(crate::privilege::caller(), true);
        if name.is_null() {
            String::new()
        } else {
            CStr::from_ptr(name).to_string_lossy().into_owned()
        }
    }
}

const AUDIT: &str = "WITH r AS (
        SELECT pg_catalog.to_jsonb($5::pg_catalog.record) OPERATOR(pg_catalog.-) 'secret_hash'::pg_catalog.text AS old,
               pg_catalog.to_jsonb($6::pg_catalog.record) OPERATOR(pg_catalog.-) 'secret_hash'::pg_catalog.text AS new
    ), k AS (
        SELECT old, new, COALESCE(new, old) AS row FROM r
         WHERE old IS NULL OR new IS NULL OR NOT (old OPERATOR(pg_catalog.=) new)
    ), a AS (
        INSERT INTO flux.audit_log (actor, role, action, entity, key, tenant, old, new)
        SELECT $1, $7, $2, $3,
               (SELECT pg_catalog.string_agg(row OPERATOR(pg_catalog.->>) col, '/' ORDER BY n)
                  FROM pg_catalog.unnest($4::pg_catalog.text[]) WITH ORDINALITY u(col, n)),
               CASE WHEN $3 OPERATOR(pg_catalog.=) ANY ('{tenants,flag_lists}'::pg_catalog.text[])
                    THEN row OPERATOR(pg_catalog.->>) 'id'
                    -- A key's allowance is its tenant's.
                    WHEN $3 OPERATOR(pg_catalog.=) 'key_limits'
                    THEN (SELECT ak.tenant FROM flux.api_keys ak
                           WHERE ak.id OPERATOR(pg_catalog.=) (row OPERATOR(pg_catalog.->>) 'key_id'))
                    ELSE row OPERATOR(pg_catalog.->>) 'tenant' END,
               old, new
          FROM k
        RETURNING action, entity, key, tenant
    )
    SELECT pg_catalog.pg_notify('flux_changes',
               pg_catalog.json_build_object('entity', entity, 'key', key, 'tenant', tenant, 'action', action)::pg_catalog.text)
      FROM a";

/// Whether flux.audit_log has the column role (added in 0.2.0).
fn audit_log_has_role() -> bool {
    // SAFETY: syscache lookups by name inside a transaction.
    unsafe {
        let ns = pg_sys::get_namespace_oid(c"flux".as_ptr(), true);
        let rel = pg_sys::get_relname_relid(c"audit_log".as_ptr(), ns);
        rel != pg_sys::InvalidOid && pg_sys::get_attnum(rel, c"role".as_ptr()) > 0
    }
}

/// Whether the statement running is a COPY FROM into flux.`table` (a
/// restore: validators that look at other rows of the same table let it
/// load in any order, its constraints checking what they can).
pub fn copying_into_flux(table: &CStr) -> bool {
    // SAFETY: syscache lookups by name inside a transaction.
    let relid = unsafe {
        let ns = pg_sys::get_namespace_oid(c"flux".as_ptr(), true);
        pg_sys::get_relname_relid(table.as_ptr(), ns)
    };
    relid != pg_sys::InvalidOid && copying_into(relid)
}

/// Whether the statement running is a COPY FROM into the table `relid`
/// (how pg_restore loads data), read from the active portal's statement.
fn copying_into(relid: pg_sys::Oid) -> bool {
    // SAFETY: ActivePortal is the portal being run (NULL outside one); its
    // statement list and the nodes in it live as long as the portal, which
    // outlives this trigger call. Only tags and plain fields are read.
    unsafe {
        let portal = pg_sys::ActivePortal;
        if portal.is_null() || (*portal).stmts.is_null() {
            return false;
        }
        let stmts = &*(*portal).stmts;
        if stmts.length != 1 {
            return false;
        }
        let first = (*stmts.elements).ptr_value as *mut pg_sys::Node;
        if first.is_null() || (*first).type_ != pg_sys::NodeTag::T_PlannedStmt {
            return false;
        }
        let utility = (*(first as *mut pg_sys::PlannedStmt)).utilityStmt;
        if utility.is_null() || (*utility).type_ != pg_sys::NodeTag::T_CopyStmt {
            return false;
        }
        let copy = &*(utility as *mut pg_sys::CopyStmt);
        if !copy.is_from || copy.relation.is_null() || (*copy.relation).relname.is_null() {
            return false;
        }
        // The table it names now (COPY resolved it the same way, and holds
        // its lock).
        let target = pg_sys::RangeVarGetRelidExtended(
            copy.relation,
            pg_sys::NoLock as pg_sys::LOCKMODE,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        );
        target == relid
    }
}

#[pg_schema]
mod flux {
    use super::*;

    /// Trigger: append the change to flux.audit_log and announce it with
    /// NOTIFY flux_changes at commit. Arguments: the key columns. A COPY
    /// FROM into the table (how pg_restore loads it) is not recorded again.
    #[pg_trigger]
    fn _audit<'a>(
        trigger: &'a PgTrigger<'a>,
    ) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
        let actor = crate::gucs::string_setting(&crate::gucs::ACTOR).unwrap_or_else(current_role);
        let action = match trigger.op()? {
            pgrx::PgTriggerOperation::Insert => "insert",
            pgrx::PgTriggerOperation::Update => "update",
            pgrx::PgTriggerOperation::Delete => "delete",
            pgrx::PgTriggerOperation::Truncate => return Ok(None),
        };
        let entity = trigger.table_name()?;
        let keys = trigger.extra_args()?;
        let (rowtype, namespace, relid) = {
            let rel = trigger.relation()?;
            // SAFETY: rd_rel is valid while the trigger's relation is open.
            unsafe { ((*rel.rd_rel).reltype, (*rel.rd_rel).relnamespace, rel.oid()) }
        };
        // SAFETY: a syscache lookup by name.
        let flux = unsafe { pg_sys::get_namespace_oid(c"flux".as_ptr(), true) };
        if namespace != flux {
            FluxError::Forbidden(format!(
                "flux._audit is the audit trigger of the flux tables, not of {entity}"
            ))
            .raise();
        }
        if copying_into(relid) {
            return Ok(None);
        }
        let role = current_role();
        let row = |t: Option<PgHeapTuple<'_, AllocatedByPostgres>>| match t {
            // SAFETY: the datum is the row of the trigger's relation, typed
            // by that relation's row type.
            Some(t) => unsafe { DatumWithOid::new(t, rowtype) },
            None => DatumWithOid::null_oid(rowtype),
        };
        let (old, new) = (row(trigger.old()), row(trigger.new()));
        let result = (|| -> Result<(), FluxError> {
            let _owner = AsOwner::enter()?;
            // A 0.1.0 database on this library, before ALTER EXTENSION
            // UPDATE adds the role column: log without it.
            let sql = if audit_log_has_role() {
                std::borrow::Cow::Borrowed(AUDIT)
            } else {
                std::borrow::Cow::Owned(
                    AUDIT
                        .replace("actor, role,", "actor,")
                        .replace("$1, $7,", "$1,"),
                )
            };
            Spi::connect_mut(|c| {
                c.update(
                    sql.as_ref(),
                    None,
                    &[
                        actor.as_str().into(),
                        action.into(),
                        entity.as_str().into(),
                        keys.into(),
                        old,
                        new,
                        role.as_str().into(),
                    ],
                )
                .map(|_| ())
            })?;
            Ok(())
        })();
        if let Err(e) = result {
            e.raise();
        }
        Ok(None)
    }
}
