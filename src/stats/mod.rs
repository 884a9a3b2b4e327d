//! Decision statistics: flux_decision_stats, flux_denials, flux_stats_reset,
//! flux_stats_info. "Log access denials: they are pricing data."
//!
//! Counted in shared memory, the pg_stat_statements way, so no row is
//! written on the hot path and standbys count their own decisions too:
//! - `shared`: the fixed-size table (`flux.stats_max` entries, set at
//!   server start), its eviction of the least used, and the file a clean
//!   shutdown leaves for the next start;
//! - `local`: this backend's counts, added to the table once at the end of
//!   each transaction (one shared-lock pass, atomics on found entries), and
//!   the rule that a check counts once per statement;
//! - `key`: what is counted.
//!
//! What counts: every decision of flux_check, flux_decide (a check: once
//! per statement for each tenant and feature, so a policy or a flux_check
//! over many rows of one tenant is one decision) and flux_consume (each
//! call; an idempotent repeat is not a new decision). flux_entitlements
//! lists decisions and is not counted.
//!
//! Shared memory can only be had from shared_preload_libraries: without it
//! nothing is counted (one load of a null pointer per decision) and the
//! functions raise 55000 naming the line to add.

mod key;
mod local;
mod shared;

use crate::error::{FluxError, FluxResult, OrRaise};
use crate::model::Decision;
use crate::{backend, gucs, pgver};
use key::{reason_word, Kind};
pub use local::Mark;
use local::{Local, Statement};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};

static mut PREV_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP: pg_sys::shmem_startup_hook_type = None;
static mut PREV_ANALYZE: pg_sys::post_parse_analyze_hook_type = None;

/// Statements parsed in this process: with the statement's start time, it
/// tells apart the statements of one query string (which share the time;
/// the extended protocol gives each Execute a time of its own).
static PARSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// From _PG_init: when preloaded, define flux.stats_max and ask for the
/// shared table.
pub fn init() {
    // SAFETY: a flag PostgreSQL sets around the preload; the hooks are
    // chained once, from the postmaster's _PG_init.
    unsafe {
        if !pg_sys::process_shared_preload_libraries_in_progress {
            return;
        }
        gucs::init_stats();
        PREV_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(on_shmem_request);
        PREV_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(on_shmem_startup);
        PREV_ANALYZE = pg_sys::post_parse_analyze_hook;
        pg_sys::post_parse_analyze_hook = Some(on_parsed);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_parsed(
    pstate: *mut pg_sys::ParseState,
    query: *mut pg_sys::Query,
    jstate: *mut pg_sys::JumbleState,
) {
    PARSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // SAFETY: the hook chain set up in init(), with its own arguments.
    unsafe {
        if let Some(prev) = PREV_ANALYZE {
            prev(pstate, query, jstate);
        }
    }
}

fn max_entries() -> u32 {
    gucs::STATS_MAX.get().max(100) as u32
}

#[pg_guard]
unsafe extern "C-unwind" fn on_shmem_request() {
    // SAFETY: the hook chain set up in init().
    unsafe {
        if let Some(prev) = PREV_REQUEST {
            prev();
        }
    }
    shared::request(max_entries());
}

#[pg_guard]
unsafe extern "C-unwind" fn on_shmem_startup() {
    // SAFETY: the hook chain set up in init().
    unsafe {
        if let Some(prev) = PREV_STARTUP {
            prev();
        }
    }
    let created = shared::startup(max_entries());
    // SAFETY: a flag; the exit callback is registered in the postmaster
    // only (its children reset the list they inherit).
    unsafe {
        if !pg_sys::IsUnderPostmaster {
            if created {
                match shared::load() {
                    Ok(0) => {}
                    Ok(n) => {
                        pgrx::log!("flux_entitlements: {n} decision statistics entries read back")
                    }
                    Err(e) => pgrx::log!(
                        "flux_entitlements: the saved decision statistics were not read: {e}"
                    ),
                }
            }
            pg_sys::on_shmem_exit(Some(on_shmem_exit), pg_sys::Datum::from(0));
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_shmem_exit(code: std::ffi::c_int, _arg: pg_sys::Datum) {
    // After a crash the counts are dropped, as pg_stat_statements does.
    if code != 0 {
        return;
    }
    if let Err(e) = shared::dump() {
        pgrx::log!("flux_entitlements: the decision statistics were not saved: {e}");
    }
}

/// Whether decisions are counted (the library was preloaded).
#[inline]
pub fn enabled() -> bool {
    shared::attached()
}

thread_local! {
    static LOCAL: RefCell<Local> = RefCell::new(Local::default());
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

fn database() -> u32 {
    // SAFETY: set before any function runs.
    unsafe { pg_sys::MyDatabaseId.to_u32() }
}

/// The statement a decision is made in: the transaction, the client
/// command's start and the statements parsed so far. (A statement that
/// parses others as it runs, such as dynamic SQL in a function, counts a
/// check again after each.)
#[inline]
fn statement() -> Statement {
    (
        pgver::local_transaction(),
        backend::statement_start(),
        PARSED.load(std::sync::atomic::Ordering::Relaxed),
    )
}

/// Flush at every transaction's end (this process's first count registers
/// the callback; PostgreSQL keeps it in TopMemoryContext).
fn register() {
    if !REGISTERED.get() {
        // SAFETY: a plain function, registered once per process.
        unsafe { pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut()) };
        REGISTERED.set(true);
    }
}

/// Not guarded: most events of most transactions have nothing to add, and
/// pgrx's guard (a sigsetjmp) cost more than the check. Plain Rust that
/// cannot raise or panic decides; the guarded `flush` adds.
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    // Aborted transactions' decisions were made too: they count.
    let ends = matches!(
        event,
        XACT_EVENT_COMMIT
            | XACT_EVENT_ABORT
            | XACT_EVENT_PARALLEL_COMMIT
            | XACT_EVENT_PARALLEL_ABORT
            | XACT_EVENT_PREPARE
    );
    let pending = || {
        LOCAL
            .try_with(|l| l.try_borrow().is_ok_and(|l| l.has_pending()))
            .unwrap_or(false)
    };
    if ends && pending() {
        flush_guarded();
    }
}

#[pg_guard]
extern "C-unwind" fn flush_guarded() {
    flush();
}

/// Add this backend's counts to the shared table.
fn flush() {
    let _ = LOCAL.try_with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            // At the last statement's start: no clock read per transaction.
            l.drain(|batch| shared::add(batch, backend::statement_start()));
        }
    });
}

/// A check's decision (flux_check, flux_decide, policies): counted once per
/// statement for its tenant and feature. `alone`: the tenant's decision
/// alone, which flux_check may keep as an answer; the mark returned goes
/// with that answer (cache::remember) for `rechecked`.
pub fn checked(d: &Decision, alone: bool) -> Mark {
    if !enabled() {
        return 0;
    }
    register();
    let stmt = statement();
    LOCAL.with(|l| match l.try_borrow_mut() {
        Ok(mut l) => {
            l.db = database();
            let mark = l.checked(
                d.tenant.as_bytes(),
                d.feature.as_bytes(),
                d.plan.as_deref(),
                d.reason,
                d.allowed,
                alone,
                stmt,
            );
            if l.must_flush() {
                l.drain(|batch| shared::add(batch, backend::statement_start()));
            }
            mark
        }
        Err(_) => 0,
    })
}

/// flux_check's kept answer, counted as the decision its mark refers to.
/// False when there is none (the answer was kept before statistics knew
/// it): the caller decides anew, and `checked` counts it. Never raises.
#[inline]
pub fn rechecked(mark: Mark) -> bool {
    if mark == 0 {
        return false;
    }
    let stmt = statement();
    LOCAL
        .try_with(|l| match l.try_borrow_mut() {
            Ok(mut l) => l.rechecked(mark, stmt),
            Err(_) => false,
        })
        .unwrap_or(false)
}

/// A consume's decision: each one counts.
pub fn consumed(d: &Decision) {
    if !enabled() {
        return;
    }
    register();
    LOCAL.with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            l.db = database();
            l.consumed(
                d.tenant.as_bytes(),
                d.feature.as_bytes(),
                d.plan.as_deref(),
                d.reason,
                d.allowed,
            );
            if l.must_flush() {
                l.drain(|batch| shared::add(batch, backend::statement_start()));
            }
        }
    });
}

fn require() -> FluxResult<()> {
    if enabled() {
        return Ok(());
    }
    Err(FluxError::NotReady(
        "decision statistics are not being collected: add flux_entitlements to shared_preload_libraries in postgresql.conf (shared_preload_libraries = 'flux_entitlements') and restart the server"
            .into(),
    ))
}

fn tstz(t: i64) -> Option<TimestampWithTimeZone> {
    TimestampWithTimeZone::try_from(t).ok()
}

/// Decisions by feature, plan and reason, most frequent first (this
/// backend's own decisions included).
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn flux_decision_stats() -> TableIterator<
    'static,
    (
        name!(feature, String),
        name!(plan, Option<String>),
        name!(reason, String),
        name!(decisions, i64),
        name!(first_at, Option<TimestampWithTimeZone>),
        name!(last_at, Option<TimestampWithTimeZone>),
    ),
> {
    require().or_raise();
    flush();
    let rows = shared::rows(database(), Kind::Decision, None).unwrap_or_default();
    TableIterator::new(rows.into_iter().map(|r| {
        (
            r.feature,
            r.other,
            reason_word(r.reason).to_string(),
            r.count as i64,
            tstz(r.first_at),
            tstz(r.last_at),
        )
    }))
}

/// Denials by tenant, feature and reason, the tenants denied most first;
/// only `feature`'s when given.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_denials(
    feature: default!(Option<&str>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(tenant, String),
        name!(feature, String),
        name!(reason, String),
        name!(denials, i64),
        name!(last_at, Option<TimestampWithTimeZone>),
    ),
> {
    require().or_raise();
    flush();
    let mut rows =
        shared::rows(database(), Kind::Denial, feature.map(str::as_bytes)).unwrap_or_default();
    rows.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.other.cmp(&b.other)));
    TableIterator::new(rows.into_iter().map(|r| {
        (
            r.other.unwrap_or_default(),
            r.feature,
            reason_word(r.reason).to_string(),
            r.count as i64,
            tstz(r.last_at),
        )
    }))
}

/// Forget every count, of every database (admin; the table is the
/// server's, as pg_stat_statements' is).
#[pg_extern(volatile, parallel_unsafe)]
fn flux_stats_reset() {
    require().or_raise();
    let _ = LOCAL.try_with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            l.discard();
        }
    });
    // SAFETY: reads the clock.
    shared::reset(unsafe { pg_sys::GetCurrentTimestamp() });
}

/// The table itself: entries in use, the most it keeps (flux.stats_max),
/// entries evicted to make room, and when it was last reset.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_stats_info() -> TableIterator<
    'static,
    (
        name!(entries, i64),
        name!(max, i32),
        name!(evictions, i64),
        name!(reset_at, Option<TimestampWithTimeZone>),
    ),
> {
    require().or_raise();
    flush();
    let (live, max, evictions, reset_at) = shared::info().unwrap_or_default();
    TableIterator::once((live as i64, max as i32, evictions as i64, tstz(reset_at)))
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    // The test server runs without the preload: every function says how to
    // turn statistics on, and decisions go on as before.
    #[pg_test]
    fn without_the_preload_the_functions_name_the_setting() {
        Spi::run(
            "CREATE FUNCTION pg_temp.refused(q text) RETURNS text LANGUAGE plpgsql AS $$
             DECLARE msg text;
             BEGIN
               EXECUTE q;
               RETURN 'ran';
             EXCEPTION WHEN object_not_in_prerequisite_state THEN
               GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT;
               RETURN msg;
             END $$",
        )
        .unwrap();
        for f in [
            "SELECT * FROM flux_decision_stats()",
            "SELECT * FROM flux_denials()",
            "SELECT * FROM flux_denials('export')",
            "SELECT * FROM flux_stats_info()",
            "SELECT flux_stats_reset()",
        ] {
            let msg = Spi::get_one_with_args::<String>("SELECT pg_temp.refused($1)", &[f.into()])
                .unwrap()
                .unwrap();
            assert!(
                msg.contains("shared_preload_libraries = 'flux_entitlements'"),
                "{f}: {msg}"
            );
        }
        assert!(!super::enabled());
        // flux.stats_max exists only with the preload.
        assert_eq!(
            Spi::get_one::<String>("SELECT current_setting('flux.stats_max', true)").unwrap(),
            None
        );
    }
}
