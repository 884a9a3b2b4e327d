//! flux_enforce_limit: a tenant's rows in an application table counted
//! against a `limit` feature (seats as rows of a members table).
//!
//! Safe under concurrent inserts: the check takes a transaction-scoped
//! advisory lock per (table, feature, tenant) before counting, so two inserts
//! at limit - 1 queue and the second counts the first once it commits (each
//! SPI query of a volatile function takes a fresh snapshot under READ
//! COMMITTED). Downgrade-safe: it only ever refuses new rows.

use crate::error::{FluxError, FluxResult, OrRaise};
use crate::reads::entitle;
use crate::store;
use crate::validate::{feature_kind, need};
use pgrx::prelude::*;

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
            let trigger = spi::quote_identifier(format!("flux_limit_{feature}"));
            let args = format!(
                "{}, {}",
                spi::quote_literal(feature),
                spi::quote_literal(column)
            );
            let exists = store::one::<i32>(
                "SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = $1 AND tgname = $2",
                &[tbl.into(), format!("flux_limit_{feature}").into()],
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

    /// Refuse one more row for `tenant` in `rel` when it would pass the
    /// tenant's limit of `feature`.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _check_row_limit(rel: pg_sys::Oid, feature: &str, column: &str, tenant: &str) {
        (|| -> FluxResult<()> {
            let table =
                store::one::<String>("SELECT $1::pg_catalog.regclass::text", &[rel.into()])?
                    .unwrap_or_default();
            Spi::run_with_args(
                "SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended($1, 0))",
                &[format!("flux_limit:{}:{feature}:{tenant}", u32::from(rel)).into()],
            )?;
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
            let count = store::one::<i64>(
                &format!(
                    "SELECT count(*) FROM {table} WHERE {} = {}",
                    spi::quote_identifier(column),
                    spi::quote_literal(tenant)
                ),
                &[],
            )?
            .unwrap_or(0);
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
        })()
        .or_raise()
    }
}
