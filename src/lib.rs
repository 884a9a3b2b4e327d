//! flux_entitlements: can this tenant use this feature, at this rate, right now?
//!
//! Where things are (each module's `//!` says more):
//! - `decision/`: the decision and the order of its reasons (pure Rust);
//! - `model`: the facts a decision is made from, and the words of the
//!   enums the tables store;
//! - `cache/`: the per-backend decision cache, its loads and its
//!   invalidation (and the list of every per-backend cache);
//! - `entitle`: a tenant and feature's facts and decision, and the
//!   decision as a `flux.decision` row;
//! - `usage/`: recording and reading usage (flux_consume, flux_release,
//!   flux_usage): periods, the limit rule and GCRA, the counters, the SQL
//!   fallbacks, idempotency keys, credits pools and holds;
//! - `reads`: flux_check / flux_decide / flux_entitlements / flux_value;
//! - `admin`: the define / grant / subscribe / override / addon upserts;
//! - `validate`: the rules every row must meet (admin functions and psql DML);
//! - `identity`: flux_current_tenant and API keys;
//! - `access`: who may act for a tenant (flux_service, the current tenant);
//! - `rls`: flux_protect (row-level security policies);
//! - `row_limits`: flux_enforce_limit (rows of an application table
//!   counted against a limit);
//! - `privilege`: flux's SQL under a pinned search_path, and table access
//!   as the flux tables' owner (why nothing a caller creates runs with it);
//! - `store`: small SQL reads and writes through SPI;
//! - `prepared`: SQL statements prepared once per backend;
//! - `backend`: text arguments read in place, the transaction's start;
//! - `pgver`: what differs between PostgreSQL 15, 16 and 18;
//! - `rollout`: the flag bucketing formula;
//! - `audit`: the audit log and NOTIFY flux_changes;
//! - `billing`: Stripe events and signatures;
//! - `reports`: flux_limit_report (who is pushing their limit) and the
//!   billable usage view;
//! - `pricing`: pricing changes (scheduled moves, previews, impact,
//!   grandfathering, the pricing table);
//! - `stats/`: decision statistics in shared memory (flux_decision_stats,
//!   flux_denials), with shared_preload_libraries;
//! - `gucs`: the flux.* settings and the clock;
//! - `error`: the error type and its SQLSTATEs;
//! - `timeutil`: calendar arithmetic in UTC;
//! - `removed`: entry points older install scripts declare.
//!
//! Layers, lowest first: a module uses only its own layer (without a cycle)
//! and the ones below. `scripts/check_layers.py` (run by `make test`) reads
//! this list and fails otherwise.
//! 1. pure rules: `error`, `timeutil`, `model`, `rollout`, `decision`
//! 2. PostgreSQL plumbing: `backend`, `pgver`, `privilege`, `prepared`,
//!    `gucs`, `store`, `validate`, `identity`, `access`, `audit`, `stats`
//! 3. the cache: `cache`
//! 4. the entitle step: `entitle`
//! 5. usage: `usage`
//! 6. SQL functions: `reads`, `admin`, `rls`, `row_limits`, `billing`, `reports`,
//!    `pricing`, `removed`

use pgrx::prelude::*;

pub mod access;
pub mod admin;
pub mod audit;
pub mod backend;
pub mod billing;
pub mod cache;
pub mod decision;
pub mod entitle;
pub mod error;
pub mod gucs;
pub mod identity;
pub mod model;
pub mod pgver;
pub mod prepared;
pub mod pricing;
pub mod privilege;
pub mod reads;
pub mod removed;
pub mod reports;
pub mod rls;
pub mod rollout;
pub mod row_limits;
pub mod stats;
pub mod store;
pub mod timeutil;
pub mod usage;
pub mod validate;

::pgrx::pg_module_magic!();

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // Every ERROR raised from Rust unwinds through pgrx's panic hook, which
    // appends a Rust backtrace to the error's DETAIL when RUST_BACKTRACE is
    // set in the server's environment. Users must see our message, never
    // stack frames: RUST_LIB_BACKTRACE=0 takes precedence for captures.
    // SAFETY: a backend runs one thread, and _PG_init runs before any
    // backtrace is captured in it, so nothing reads the environment concurrently.
    unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    gucs::init();
    gucs::init_metering();
    cache::init();
    privilege::init();
    access::init();
    stats::init();
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn setup() {
        Spi::run(
            "SELECT flux_define_feature('export');
             SELECT flux_define_feature('seats', 'limit');
             SELECT flux_define_plan('free', rank => 0, is_default => true);
             SELECT flux_define_plan('starter', rank => 1);
             SELECT flux_define_plan('pro', rank => 2);
             SELECT flux_define_plan('enterprise', rank => 3);
             SELECT flux_grant('pro', 'export');
             SELECT flux_grant('enterprise', 'export');
             SELECT flux_grant('free', 'seats', 1);
             SELECT flux_grant('pro', 'seats', 10);
             SELECT flux_subscribe('acme', 'starter');
             SELECT flux_subscribe('globex', 'pro');",
        )
        .unwrap();
    }

    #[pg_test]
    fn starter_is_told_which_plans_have_export() {
        setup();
        let (reason, message) = Spi::get_two::<String, String>(
            "SELECT reason, message FROM flux_decide('acme', 'export')",
        )
        .unwrap();
        assert_eq!(reason.as_deref(), Some("not_in_plan"));
        assert_eq!(
            message.as_deref(),
            Some("export requires the pro or enterprise plan")
        );
        assert_eq!(
            Spi::get_one::<bool>("SELECT flux_check('globex', 'export')").unwrap(),
            Some(true)
        );
        assert_eq!(
            Spi::get_one::<bool>("SELECT flux_check('nobody', 'export')").unwrap(),
            Some(false)
        );
        assert_eq!(
            Spi::get_one::<bool>("SELECT flux_check(NULL, 'export')").unwrap(),
            None
        );
    }

    #[pg_test]
    fn plain_update_upgrades_at_once() {
        setup();
        Spi::run("UPDATE flux.tenants SET plan = 'pro' WHERE id = 'acme'").unwrap();
        assert_eq!(
            Spi::get_one::<bool>("SELECT flux_check('acme', 'export')").unwrap(),
            Some(true)
        );
    }

    #[pg_test]
    fn past_due_since_follows_the_clock() {
        setup();
        Spi::run("SET flux.now = '2026-11-01 00:00+00'").unwrap();
        Spi::run("UPDATE flux.tenants SET status = 'past_due' WHERE id = 'globex'").unwrap();
        let since = Spi::get_one::<String>(
            "SELECT to_char(past_due_since AT TIME ZONE 'UTC', 'YYYY-MM-DD') FROM flux.tenants WHERE id = 'globex'",
        )
        .unwrap();
        assert_eq!(since.as_deref(), Some("2026-11-01"));
        Spi::run("SET flux.now = '2026-11-09 00:00+00'").unwrap();
        assert_eq!(
            Spi::get_one::<bool>("SELECT flux_check('globex', 'export')").unwrap(),
            Some(false)
        );
        Spi::run("UPDATE flux.tenants SET status = 'active' WHERE id = 'globex'").unwrap();
        assert_eq!(
            Spi::get_one::<bool>(
                "SELECT past_due_since IS NULL FROM flux.tenants WHERE id = 'globex'"
            )
            .unwrap(),
            Some(true)
        );
        Spi::run("RESET flux.now").unwrap();
    }

    #[pg_test(
        error = "unknown period \"fortnight\" for metered feature \"api\": expected minute, hour, day, week, month or billing_period"
    )]
    fn bad_period_is_named() {
        setup();
        Spi::run("SELECT flux_define_feature('api', 'metered')").unwrap();
        Spi::run("SELECT flux_grant('pro', 'api', 10, 'fortnight')").unwrap();
    }

    #[pg_test]
    fn decision_has_every_field() {
        setup();
        let limit =
            Spi::get_one::<i64>("SELECT \"limit\" FROM flux_decide('globex', 'seats')").unwrap();
        assert_eq!(limit, Some(10));
        let n = Spi::get_one::<i64>("SELECT count(*) FROM flux_entitlements('globex')").unwrap();
        assert_eq!(n, Some(2));
    }
}

/// Used by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
