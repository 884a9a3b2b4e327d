//! Row-count limits, flux_enforce_limit: a tenant's rows in an application
//! table counted against a `limit` feature (seats as rows of a members
//! table). Counters recorded by flux_consume are usage/'s.
//!
//! The trigger (`flux._enforce_limit`, in Rust) reads the row's tenant as
//! text, locks the tenant's row of `flux.limit_locks` for (table, feature,
//! tenant), decides, counts the tenant's rows (as the table's owner with row
//! security off, as a foreign key check does; the tenant column compared as
//! text, every operator qualified, under a pinned search_path) and refuses
//! the row past the limit. Safe under concurrent inserts: two inserts at
//! limit - 1 queue on the lock row and the second counts the first once it
//! commits (each SPI query of a volatile function takes a fresh snapshot
//! under READ COMMITTED). The lock is a row lock in a table only flux_owner
//! can touch, not an advisory lock, whose keys every role can see in
//! pg_locks and take: no role can hold another tenant's insert lock unless
//! it is inserting that tenant's rows itself. Downgrade-safe: it only ever
//! refuses new rows.

use crate::entitle::entitle;
use crate::error::{FluxError, FluxResult, OrRaise};
use crate::privilege::{AsOwner, Pinned};
use crate::rls::object_name;
use crate::store;
use crate::validate::{feature_kind, need};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::{AllocatedByPostgres, PgTrigger, PgTriggerError};

/// The prefix of the triggers flux_enforce_limit makes: the trigger
/// function refuses to run under any other name.
const TRIGGER_PREFIX: &str = "flux_limit_";

/// The tenant (as text) of the `new` and `old` rows.
fn tenants_of(
    column: &str,
    new: DatumWithOid<'_>,
    old: DatumWithOid<'_>,
) -> FluxResult<(Option<String>, Option<String>)> {
    let col = spi::quote_identifier(column);
    let sql = format!("SELECT ($1).{col}::pg_catalog.text, ($2).{col}::pg_catalog.text");
    Ok(Spi::connect(|c| {
        let t = c.select(&sql, Some(1), &[new, old])?;
        let t = t.first();
        Ok::<_, pgrx::spi::SpiError>((t.get::<String>(1)?, t.get::<String>(2)?))
    })?)
}

/// Refuse one more row for `tenant` in `rel` when it would pass the
/// tenant's limit of `feature`.
fn check_row_limit(rel: pg_sys::Oid, feature: &str, column: &str, tenant: &str) -> FluxResult<()> {
    // A row for a tenant is a write for it: refused (42501, telling nothing
    // about that tenant's plan or count) unless the caller may act for it.
    if !crate::access::may_act_for(tenant) {
        return Err(FluxError::Forbidden(format!(
            "cannot add a row for tenant {}: this session may not act for it (flux_current_tenant() is another \
             tenant or none; a backend that writes for any tenant needs GRANT flux_service)",
            crate::error::shown(tenant)
        )));
    }
    // A partition's rows count with its siblings': lock and count on the
    // partitioned table at the root.
    let rel = store::one::<pg_sys::Oid>(
        "SELECT COALESCE(pg_catalog.pg_partition_root($1)::pg_catalog.oid, $1)",
        &[rel.into()],
    )?
    .unwrap_or(rel);
    let table = store::one::<String>(
        "SELECT $1::pg_catalog.regclass::pg_catalog.text",
        &[rel.into()],
    )?
    .unwrap_or_default();
    {
        let _owner = AsOwner::enter()?;
        store::exec(
            "INSERT INTO flux.limit_locks (tbl, feature, tenant) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[rel.into(), feature.into(), tenant.into()],
        )?;
        store::one::<i32>(
            "SELECT 1 FROM flux.limit_locks \
              WHERE tbl OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
                AND tenant OPERATOR(pg_catalog.=) $3 \
             FOR UPDATE",
            &[rel.into(), feature.into(), tenant.into()],
        )?;
    }
    let x = entitle(tenant, feature, None)?;
    if !x.d.allowed {
        return Err(FluxError::LimitExceeded(format!(
            "cannot add to {table} for tenant {}: {}",
            crate::error::shown(tenant),
            x.d.message
        )));
    }
    let Some(limit) = x.d.limit else {
        return Ok(());
    };
    let coltype = store::table_and_column(rel, column)?.1;
    let matches = crate::rls::tenant_equals(&spi::quote_identifier(column), &coltype, "$1");
    // Every row of the tenant counts, also those the inserting role's row
    // security hides from it: counted as the table's owner, as a foreign
    // key check would look.
    let count = {
        let _owner = crate::privilege::AsTableOwner::enter(rel)?;
        store::one::<i64>(
            &format!("SELECT pg_catalog.count(*) FROM {table} WHERE {matches}"),
            &[tenant.into()],
        )?
        .unwrap_or(0)
    };
    if count + 1 > limit {
        let on =
            x.d.plan
                .map(|p| format!(" on plan {p}"))
                .unwrap_or_default();
        return Err(FluxError::LimitExceeded(format!(
            "{feature}: {count} of {limit} used{on}; remove {} before adding more",
            count + 1 - limit
        )));
    }
    Ok(())
}

#[pg_schema]
mod flux {
    use super::*;

    /// flux_enforce_limit (a SQL wrapper taking regclass and name): attach the row-count check for `feature` to `tbl`, keyed by `tenant_column`.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _enforce_limit_setup(
        tbl: Option<pg_sys::Oid>,
        feature: Option<&str>,
        tenant_column: Option<&str>,
    ) {
        (|| -> FluxResult<()> {
            let _path = Pinned::enter();
            let tbl = need(tbl, "tbl")?;
            let feature = need(feature, "feature")?;
            let column = need(tenant_column, "tenant_column")?;
            let kind = feature_kind(feature)?;
            if kind != crate::model::Kind::Limit {
                return Err(FluxError::InvalidValue(format!(
                    "flux_enforce_limit counts rows against a limit feature; \"{feature}\" is {}",
                    kind.as_str()
                )));
            }
            let (table, _) = store::table_and_column(tbl, column)?;
            let name = object_name(TRIGGER_PREFIX, feature);
            let trigger = spi::quote_identifier(&name);
            let args = format!(
                "{}, {}",
                spi::quote_literal(feature),
                spi::quote_literal(column)
            );
            let exists = store::one::<i32>(
                "SELECT 1 FROM pg_catalog.pg_trigger \
                 WHERE tgrelid OPERATOR(pg_catalog.=) $1 AND tgname OPERATOR(pg_catalog.=) $2",
                &[tbl.into(), name.as_str().into()],
            )?
            .is_some();
            if exists {
                Spi::run(&format!("DROP TRIGGER {trigger} ON {table}"))?;
            }
            Spi::run(&format!(
                "CREATE TRIGGER {trigger} BEFORE INSERT OR UPDATE OF {col} ON {table} \
                 FOR EACH ROW EXECUTE FUNCTION flux._enforce_limit({args})",
                col = spi::quote_identifier(column)
            ))?;
            Ok(())
        })()
        .or_raise()
    }

    /// Trigger made by flux_enforce_limit (arguments: feature, tenant
    /// column): refuses a row that would take its tenant past the limit.
    #[pg_trigger]
    fn _enforce_limit<'a>(
        trigger: &'a PgTrigger<'a>,
    ) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
        let args = trigger.extra_args()?;
        let name = trigger.name()?;
        let (rel, rowtype) = {
            let rel = trigger.relation()?;
            // SAFETY: rd_rel is valid while the trigger's relation is open.
            (rel.oid(), unsafe { (*rel.rd_rel).reltype })
        };
        let row = |t: Option<PgHeapTuple<'_, AllocatedByPostgres>>| match t {
            // SAFETY: the datum is a row of the trigger's relation, typed by
            // that relation's row type.
            Some(t) => unsafe { DatumWithOid::new(t, rowtype) },
            None => DatumWithOid::null_oid(rowtype),
        };
        (|| -> FluxResult<()> {
            let _path = Pinned::enter();
            let [feature, column] = args.as_slice() else {
                return Err(FluxError::Forbidden(format!(
                    "flux._enforce_limit runs only as a trigger made by flux_enforce_limit, not as {name}"
                )));
            };
            if name != object_name(TRIGGER_PREFIX, feature) {
                return Err(FluxError::Forbidden(format!(
                    "flux._enforce_limit runs only as a trigger made by flux_enforce_limit, not as {name}"
                )));
            }
            let (new_tenant, old_tenant) =
                tenants_of(column, row(trigger.new()), row(trigger.old()))?;
            let Some(tenant) = new_tenant else { return Ok(()) };
            if old_tenant.as_deref() == Some(tenant.as_str()) {
                return Ok(());
            }
            check_row_limit(rel, feature, column, &tenant)
        })()
        .or_raise();
        Ok(trigger.new())
    }
}
