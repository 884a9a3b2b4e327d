//! flux_protect: row-level security that gates an application table by
//! tenant and by entitlement, for every client (PostgREST, BI tools, psql).
//!
//! Policies made on `tbl`:
//! - `flux_tenant_select / _insert / _update / _delete` (permissive): the
//!   row's tenant column equals `flux_current_tenant()`;
//! - `flux_feature_<feature>` (restrictive, all commands): `flux_check(feature)`
//!   (a name past 63 bytes is cut and ends with a hash of the key).
//!
//! The feature condition does not depend on the row and is written as a
//! scalar subquery, so the planner runs it once per statement (an InitPlan;
//! each row only reads its result); the tenant condition is an index qual
//! on the tenant column, also read once per statement. The
//! functions they call read through the decision cache as the tables' owner,
//! so they work for roles with no grant on the `flux` tables.
//!
//! The tenant column is compared with the current tenant as text: a
//! `varchar(8)` column compared after casting the tenant to `varchar(8)`
//! truncated `org-0001-attacker` to `org-0001` and let it read, update and
//! insert org-0001's rows, and casting it to an integer column's type
//! raised for every tenant that is not a number. The policies
//! are written with every function and operator qualified, and created
//! under a pinned search_path (privilege.rs).

use crate::error::{FluxResult, OrRaise};
use crate::store;
use crate::validate::{feature_kind, need};
use pgrx::prelude::*;

/// SQL that is true when the tenant column `col` (of type `coltype`, as
/// format_type prints it) holds the tenant `value` (a text expression),
/// compared as text: never a cast of the tenant to the column's type, which
/// truncates (`varchar(8)`) or raises (`integer`, `uuid`). A text or
/// varchar column keeps its index (varchar to text is a relabelling); for
/// other types an expression index on `(col::text)` serves it.
pub fn tenant_equals(col: &str, coltype: &str, value: &str) -> String {
    if coltype == "text" {
        format!("{col} OPERATOR(pg_catalog.=) {value}")
    } else {
        format!("{col}::pg_catalog.text OPERATOR(pg_catalog.=) {value}")
    }
}

/// `prefix` + `feature` as an object name that fits PostgreSQL's 63 bytes:
/// a longer one (feature keys may have 200 characters) is cut at a
/// character boundary and ends with a hash of the whole key, so two keys
/// that share their first bytes never share a trigger or a policy.
pub fn object_name(prefix: &str, feature: &str) -> String {
    const MAX: usize = 63;
    let full = format!("{prefix}{feature}");
    if full.len() <= MAX {
        return full;
    }
    let hash = format!(
        "_{:08x}",
        xxhash_rust::xxh3::xxh3_64(feature.as_bytes()) as u32
    );
    let mut cut = MAX - hash.len();
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{hash}", &full[..cut])
}

#[pg_schema]
mod flux {
    use super::*;

    /// The body of flux_protect (a SQL wrapper taking regclass and name).
    #[pg_extern(volatile, parallel_unsafe)]
    fn _protect_setup(
        tbl: Option<pg_sys::Oid>,
        feature: Option<&str>,
        tenant_column: Option<&str>,
        force: Option<bool>,
    ) {
        (|| -> FluxResult<()> {
            let _path = crate::privilege::Pinned::enter();
            let tbl = need(tbl, "tbl")?;
            let feature = need(feature, "feature")?;
            let column = need(tenant_column, "tenant_column")?;
            feature_kind(feature)?;
            let (table, coltype) = store::table_and_column(tbl, column)?;
            // Qualify our functions so a caller's search_path cannot swap them.
            let schema = store::one::<String>(
                "SELECT n.nspname::pg_catalog.text FROM pg_catalog.pg_extension e \
                 JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace \
                 WHERE e.extname OPERATOR(pg_catalog.=) 'flux_entitlements'",
                &[],
            )?
            .unwrap_or_else(|| "public".into());
            let schema = spi::quote_identifier(schema);
            let col = spi::quote_identifier(column);
            // Also a scalar subquery: the tenant is read once per statement
            // and each row is compared with a parameter, as with a constant
            // (an index qual either way).
            let current = format!("(SELECT {schema}.flux_current_tenant())");
            let tenant_match = tenant_equals(&col, &coltype, &current);
            // A scalar subquery: the planner runs it once per statement as an
            // InitPlan and each row only reads its result (a plain call in a
            // policy is evaluated per row: RLS quals are not turned into
            // one-time filters).
            let entitled = format!(
                "(SELECT {schema}.flux_check({}))",
                spi::quote_literal(feature)
            );
            let policy_name = object_name("flux_feature_", feature);
            let feature_policy = spi::quote_identifier(&policy_name);

            Spi::run(&format!("ALTER TABLE {table} ENABLE ROW LEVEL SECURITY"))?;
            if force.unwrap_or(false) {
                Spi::run(&format!("ALTER TABLE {table} FORCE ROW LEVEL SECURITY"))?;
            }
            let existing: Vec<String> = Spi::connect(|c| {
                let mut v = Vec::new();
                for r in c.select(
                    "SELECT polname::pg_catalog.text FROM pg_catalog.pg_policy \
                     WHERE polrelid OPERATOR(pg_catalog.=) $1",
                    None,
                    &[tbl.into()],
                )? {
                    v.push(r.get::<String>(1)?.unwrap_or_default());
                }
                Ok::<_, pgrx::spi::SpiError>(v)
            })?;
            let policies = [
                (
                    "flux_tenant_select",
                    format!("FOR SELECT USING ({tenant_match})"),
                ),
                (
                    "flux_tenant_insert",
                    format!("FOR INSERT WITH CHECK ({tenant_match})"),
                ),
                (
                    "flux_tenant_update",
                    format!("FOR UPDATE USING ({tenant_match}) WITH CHECK ({tenant_match})"),
                ),
                (
                    "flux_tenant_delete",
                    format!("FOR DELETE USING ({tenant_match})"),
                ),
            ];
            for (name, body) in policies {
                if existing.iter().any(|e| e == name) {
                    Spi::run(&format!("DROP POLICY {name} ON {table}"))?;
                }
                Spi::run(&format!(
                    "CREATE POLICY {name} ON {table} AS PERMISSIVE {body}"
                ))?;
            }
            if existing.contains(&policy_name) {
                Spi::run(&format!("DROP POLICY {feature_policy} ON {table}"))?;
            }
            Spi::run(&format!(
                "CREATE POLICY {feature_policy} ON {table} AS RESTRICTIVE FOR ALL \
                 USING ({entitled}) WITH CHECK ({entitled})"
            ))?;
            Ok(())
        })()
        .or_raise()
    }
}
