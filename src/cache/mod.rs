//! The per-backend decision cache, kept fresh by relcache invalidation
//! that follows transactions (the pg_cron pattern). Its stages, one file
//! each:
//! - `invalidation`: the triggers that announce a change, the messages they
//!   send (per table for the catalogue, per tenant bucket for tenants) and
//!   the callback that marks what is stale;
//! - `loads`: reading the catalogue (SPI, plans kept) and one tenant (an
//!   index probe from Rust) under the latest snapshot;
//! - `tenants`: level 2, the tenant LRU;
//! - `answers`: level 3, flux_check's remembered answers;
//! - this file: the levels put together (`catalogue`, `facts`, `answer`,
//!   `remember`) and the rules of freshness.
//!
//! Freshness. Pending invalidations are read at the first lookup of each
//! statement (`poll`), so a statement sees one state, as it sees one
//! snapshot, and the next one (even inside an open transaction) sees every
//! change committed before it started; this backend's own changes and
//! rollbacks reach the callback at the end of each command. Loads use the
//! latest snapshot, which includes every commit whose invalidation was sent
//! before it was taken (a transaction is visible before its invalidation is
//! sent); an entry is stamped with its bucket's generation read before the
//! load, so an invalidation read during the load makes it stale at its next
//! lookup. Inside a parallel query the snapshot cannot change: what is
//! loaded there is provisional and reloaded by the first lookup after it.
//! Time rules (trials, grace, override windows, flux.now) are evaluated at
//! decision time: levels 1 and 2 hold rows; level 3 holds answers only while
//! the settings and the clock's steady window they were decided in last.
//!
//! Every per-backend cache of the extension, what it holds, its bound, and
//! what makes it forget:
//!
//! | cache | holds | bound | forgotten on |
//! |---|---|---|---|
//! | `cache` level 1 (`CATALOGUE`) | features, plans, grants, addons, flags | the catalogue | a change to a catalogue table; queue overflow |
//! | `cache` level 2 (`tenants::TenantLru`) | tenants' rows, absent tenants too | `flux.cache_tenants` | a change to the tenant's rows (its bucket); TRUNCATE; overflow; a catalogue reload |
//! | `cache` level 3 (`answers::Answers`) | flux_check answers that read no usage | 8 x `flux.cache_tenants` | any tenant or catalogue change; flux.now / flux.default_grace_period; the clock leaving the steady window |
//! | `prepared::KEPT` | SPI plans (loads, metering SQL) | the statements in the code | never: PostgreSQL's plan cache re-plans them |
//! | `usage::counters::PLACES` | where each usage row (tenants' and callers') was last found | 65,536, then starts over | never: a hint, checked on use |
//! | `usage::counters::CHECKED_KEY` | the key index of flux.usage and of flux.caller_usage last checked | one OID each | a new index (new OID) |
//! | `identity::CURRENT_KEY` | the current API key's name, scopes and allowances | one key | another key, or another (local) transaction |
//! | `access::TRUSTED` | whether the role is flux_service / flux_admin | one role | role or membership change (syscache callback) |
//! | `privilege::OWNER` | flux's schema owner | one | schema or role change (syscache callback) |
//! | `gucs` memos | the parsed flux.now / grace setting | one each | the setting's text changing |
//!
//! Costs that justify the three levels (benches/run.sh on the 2-core bench
//! machine): through SPI, with every query parsed and planned, a decision
//! cost about 550 us (3,500 checks/s on 2 clients). Level 1 (catalogue,
//! whole) and level 2 (tenants, a bounded LRU) bring a warm decision to
//! about 1 us, and pgbench sees 0.94 of a `SELECT` of a constant. Level 3
//! (flux_check's answers, with flux_check's own entry point in reads.rs)
//! brings a repeated check to about 22 ns: in a scan, 1.4x-1.5x a trivial
//! predicate instead of 6x.

mod answers;
pub mod invalidation;
pub mod loads;
mod tenants;

pub use loads::{Catalogue, FlagEntry, TenantEntry};

use crate::backend;
use crate::error::FluxResult;
use crate::model::{FeatureFacts, FlagFacts, TenantFacts};
use answers::{Answers, Stamp, TenantAnswers, ANSWERS_PER_TENANT};
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use tenants::{Generations, TenantLru};

/// At most this many watched tables are remembered for the callback.
const MAX_WATCHED: usize = 32;

/// The flags of the hot path, in one thread-local (each access to one is a
/// call to __tls_get_addr in a shared library).
struct State {
    /// Set by the relcache callback; the next lookup reloads.
    stale: Cell<bool>,
    /// Set by the callback for a TRUNCATE of a tenant table: the next
    /// lookup forgets every tenant (and answer) but keeps the catalogue.
    tenants_stale: Cell<bool>,
    /// Something was loaded during a parallel query, under the statement's
    /// snapshot rather than the latest: good for that statement only.
    provisional: Cell<bool>,
    /// Bumped by every reload and every invalidation of tenants: answers
    /// remembered under another epoch are forgotten.
    epoch: Cell<u64>,
    /// (statement start, transaction start) when pending invalidations were
    /// last read.
    polled: Cell<(i64, i64)>,
    /// Per tenant bucket: bumped by each invalidation of its tenants.
    buckets: Generations,
    /// OIDs of the flux tables, copied out of the catalogue for the callback
    /// (a Cell of a plain array: the callback must not borrow a RefCell that
    /// a load in progress may hold).
    watched: Cell<[u32; MAX_WATCHED]>,
    /// What `_cache_stats` reports.
    catalogue_loads: Cell<u64>,
    tenant_loads: Cell<u64>,
    full_forgets: Cell<u64>,
    /// Level 3 (see Answers); here so that a check reaches everything it
    /// needs through one thread-local.
    answers: RefCell<Answers>,
}

thread_local! {
    static STATE: State = const {
        State {
            stale: Cell::new(true),
            tenants_stale: Cell::new(false),
            provisional: Cell::new(false),
            epoch: Cell::new(0),
            polled: Cell::new((i64::MIN, i64::MIN)),
            buckets: [const { Cell::new(0) }; invalidation::BUCKETS],
            watched: Cell::new([0; MAX_WATCHED]),
            catalogue_loads: Cell::new(0),
            tenant_loads: Cell::new(0),
            full_forgets: Cell::new(0),
            answers: RefCell::new(Answers::empty()),
        }
    };
    static CATALOGUE: RefCell<Option<Rc<Catalogue>>> = const { RefCell::new(None) };
    static TENANTS: RefCell<TenantLru> = RefCell::new(TenantLru::default());
}

pub fn init() {
    invalidation::init();
}

/// Read invalidations that other backends committed, once per statement
/// (see the module comment).
fn poll(st: &State) {
    let now = (backend::statement_start(), backend::transaction_start());
    if st.polled.get() != now {
        // SAFETY: PostgreSQL calls this itself at every lock acquisition.
        unsafe { pg_sys::AcceptInvalidationMessages() };
        st.polled.set(now);
    }
}

/// Whether pending invalidations were read in this statement and nothing
/// is left to do before a lookup (no reload, no tenants to forget).
#[inline]
fn settled(st: &State, now: (i64, i64)) -> bool {
    st.polled.get() == now
        && !st.stale.get()
        && !st.tenants_stale.get()
        && (!st.provisional.get() || backend::in_parallel_mode())
}

/// Whether the cache must be reloaded before its next use.
fn must_reload(st: &State) -> bool {
    if settled(
        st,
        (backend::statement_start(), backend::transaction_start()),
    ) {
        return false;
    }
    poll(st);
    if st.provisional.get() && !backend::in_parallel_mode() {
        st.stale.set(true);
    }
    if st.tenants_stale.get() && !st.stale.get() {
        forget_tenants(st);
    }
    st.stale.get()
}

/// A tenant table was truncated: forget every tenant and answer (they are
/// reloaded as asked for), keep the catalogue.
fn forget_tenants(st: &State) {
    st.tenants_stale.set(false);
    st.epoch.set(st.epoch.get().wrapping_add(1));
    st.full_forgets.set(st.full_forgets.get() + 1);
    TENANTS.with(|t| t.borrow_mut().clear());
}

fn refresh_if_stale() -> FluxResult<Rc<Catalogue>> {
    if !STATE.with(must_reload) {
        if let Some(c) = CATALOGUE.with(|c| c.borrow().clone()) {
            return Ok(c);
        }
    }
    reload()
}

fn reload() -> FluxResult<Rc<Catalogue>> {
    let parallel = backend::in_parallel_mode();
    // Clear the flag before loading: an invalidation that arrives while we
    // load sets it again and the next call reloads.
    STATE.with(|st| {
        st.stale.set(false);
        st.tenants_stale.set(false);
        st.epoch.set(st.epoch.get().wrapping_add(1));
        st.provisional.set(parallel);
        st.catalogue_loads.set(st.catalogue_loads.get() + 1);
        st.full_forgets.set(st.full_forgets.get() + 1);
    });
    TENANTS.with(|t| t.borrow_mut().clear());
    CATALOGUE.with(|c| *c.borrow_mut() = None);
    let cat = match loads::load_catalogue() {
        Ok(c) => Rc::new(c),
        Err(e) => {
            STATE.with(|st| st.stale.set(true));
            return Err(e);
        }
    };
    let mut watched = [0u32; MAX_WATCHED];
    for (slot, oid) in watched.iter_mut().zip(cat.watched.iter()) {
        *slot = u32::from(*oid);
    }
    STATE.with(|st| st.watched.set(watched));
    CATALOGUE.with(|c| *c.borrow_mut() = Some(cat.clone()));
    Ok(cat)
}

/// The catalogue, loaded when stale.
pub fn catalogue() -> FluxResult<Rc<Catalogue>> {
    refresh_if_stale()
}

/// The tenant's cache entry, and whether it was loaded just now.
/// Fill in what a tenant's rows take from its plans: the plan's grace
/// period, and a scheduled change's new grace and direction (by rank).
pub fn with_plan_terms(cat: &Catalogue, t: &mut TenantFacts) {
    let terms = |p: Option<&str>| p.and_then(|p| cat.plan_grace.get(p)).copied();
    let now = terms(t.plan.as_deref());
    t.plan_grace = now.and_then(|g| g.0);
    if let Some(s) = t.scheduled.as_mut() {
        let after = terms(Some(&s.plan));
        s.grace = after.and_then(|g| g.0);
        s.direction = after.map(|g| g.1).cmp(&now.map(|g| g.1));
    }
}

fn tenant_entry(id: &str, cat: &Catalogue) -> FluxResult<(Option<Rc<TenantEntry>>, bool)> {
    let capacity = crate::gucs::cache_tenants();
    let held = STATE.with(|st| TENANTS.with(|t| t.borrow_mut().get(id, capacity, &st.buckets)));
    if let Some(e) = held {
        return Ok((e, false));
    }
    if backend::in_parallel_mode() {
        STATE.with(|st| st.provisional.set(true));
    }
    // Read before the load's snapshot is taken (see the module comment).
    let bucket = invalidation::bucket(id.as_bytes());
    let generation = STATE.with(|st| {
        st.tenant_loads.set(st.tenant_loads.get() + 1);
        st.buckets[bucket].get()
    });
    let loaded = loads::load_tenant(cat.namespace, id)?.map(|mut e| {
        with_plan_terms(cat, &mut e.base);
        Rc::new(e)
    });
    TENANTS.with(|t| {
        t.borrow_mut()
            .put(id, loaded.clone(), (bucket, generation), capacity)
    });
    Ok((loaded, true))
}

/// Everything a decision about (tenant, feature, subject) reads.
pub struct Facts {
    pub feature: Option<Rc<FeatureFacts>>,
    /// The cached tenant, and its facts for this feature when they differ
    /// from the entry's base (addons or an override concern the feature).
    pub entry: Option<Rc<TenantEntry>>,
    pub specific: Option<TenantFacts>,
    pub flag: Option<FlagFacts>,
    /// What the cache held when these were read: an answer decided from
    /// them is remembered only if nothing was invalidated since.
    stamp: Stamp,
}

impl Facts {
    pub fn tenant(&self) -> Option<&TenantFacts> {
        self.specific
            .as_ref()
            .or_else(|| self.entry.as_deref().map(|e| &e.base))
    }
}

fn stamp(st: &State) -> Stamp {
    Stamp {
        epoch: st.epoch.get(),
        settings: crate::gucs::settings_generation(),
    }
}

pub fn facts(tenant: &str, feature: &str, subject: Option<&str>) -> FluxResult<Facts> {
    let cat = catalogue()?;
    let stamp = STATE.with(stamp);
    let Some(f) = cat.features.get(feature).cloned() else {
        return Ok(Facts {
            feature: None,
            entry: None,
            specific: None,
            flag: None,
            stamp,
        });
    };
    let (entry, loaded) = tenant_entry(tenant, &cat)?;
    let Some(entry) = entry else {
        return Ok(Facts {
            feature: Some(f),
            entry: None,
            specific: None,
            flag: None,
            stamp,
        });
    };
    // A tenant load may have read an invalidation of the catalogue: reload
    // if so (the stamp then no longer matches, and the answer is not kept).
    let cat = if loaded { catalogue()? } else { cat };
    let specific = entry.facts_for(feature, &cat);
    let flag = cat.flags.get(feature).map(|fl| {
        let listed = |set: &std::collections::HashSet<String>| {
            set.contains(tenant) || subject.is_some_and(|s| set.contains(s))
        };
        FlagFacts {
            enabled: fl.enabled,
            threshold: fl.threshold,
            salt: fl.salt.clone(),
            allowed: listed(&fl.allow),
            denied: listed(&fl.deny),
        }
    });
    Ok(Facts {
        feature: Some(f),
        entry: Some(entry),
        specific,
        flag,
        stamp,
    })
}

/// How many tenants are cached now (for tests and monitoring).
pub fn cached_tenants() -> usize {
    TENANTS.with(|t| t.borrow().len())
}

/// The remembered answer for (tenant, feature) at this instant, if any,
/// with its statistics mark (stats::Mark; 0: none). Reads pending
/// invalidations first, like every lookup. Takes bytes: ids are compared,
/// not decoded, on this path.
pub fn answer(tenant: &[u8], feature: &[u8]) -> FluxResult<Option<(bool, u64)>> {
    let found = STATE.with(|st| {
        if must_reload(st) {
            return Err(());
        }
        let mut a = st.answers.borrow_mut();
        if !a.hold(stamp(st)) {
            return Ok(None);
        }
        let Some(i) = a.feature(feature) else {
            return Ok(None);
        };
        Ok(a.by_feature[i].1.get(tenant))
    });
    match found {
        Ok(a) => Ok(a),
        Err(()) => reload().map(|_| None),
    }
}

/// The remembered answer, when it can be had without calling into
/// PostgreSQL: invalidations already read in this statement, nothing
/// pending. Never raises; None sends the caller to `answer` (flux_check's
/// entry point, reads.rs).
#[inline]
pub fn answer_ready(tenant: &[u8], feature: &[u8]) -> Option<(bool, u64)> {
    STATE
        .try_with(|st| {
            let now = (backend::statement_start(), backend::transaction_start());
            if !settled(st, now) {
                return None;
            }
            let mut a = st.answers.try_borrow_mut().ok()?;
            if !a.hold_at(stamp(st), now.1) {
                return None;
            }
            let i = a.feature(feature)?;
            a.by_feature[i].1.get(tenant)
        })
        .ok()
        .flatten()
}

/// Remember an answer that read no usage (see Answers), decided from
/// `facts` at clock `now` (`fixed`: from flux.now), steady in `window`,
/// with its statistics mark.
#[allow(clippy::too_many_arguments)]
pub fn remember(
    facts: &Facts,
    tenant: &str,
    feature: &str,
    allowed: bool,
    mark: u64,
    now: i64,
    fixed: bool,
    window: (i64, i64),
) {
    // Bounded with the tenant cache: up to ANSWERS_PER_TENANT answers (an
    // 8-byte slot each, at most 7/8 full, and the id when over 7 bytes) per
    // tenant it may hold, then it starts over.
    let capacity = crate::gucs::cache_tenants().saturating_mul(ANSWERS_PER_TENANT);
    STATE.with(|st| {
        // With an invalidation pending or read since the facts were, they
        // may be older than the cache now says.
        let stamp = stamp(st);
        if st.stale.get() || st.tenants_stale.get() || facts.stamp != stamp {
            return;
        }
        let mut a = st.answers.borrow_mut();
        if !a.hold(stamp) || a.len >= capacity {
            // Start over. The first answer is not kept: a backend that
            // checks once per transaction under changing settings then costs
            // no insertion.
            if a.len > 256 {
                a.by_feature.clear();
            } else if a.len > 0 {
                a.by_feature.iter_mut().for_each(|(_, m)| m.clear());
            }
            a.stamp = stamp;
            a.clock = fixed.then_some(now);
            (a.from, a.until) = (i64::MIN, i64::MAX);
            a.len = 0;
            return;
        }
        a.from = a.from.max(window.0);
        a.until = a.until.min(window.1);
        let i = match a.feature(feature.as_bytes()) {
            Some(i) => i,
            None => {
                a.by_feature
                    .push((feature.as_bytes().into(), TenantAnswers::default()));
                a.by_feature.len() - 1
            }
        };
        if a.by_feature[i].1.insert(tenant.as_bytes(), allowed, mark) {
            a.len += 1;
        }
    });
}

#[pg_schema]
mod flux {
    use super::*;

    /// This backend's decision cache counters (internal: for tests and
    /// monitoring; flux_admin only).
    #[pg_extern(volatile, parallel_unsafe)]
    fn _cache_stats() -> TableIterator<
        'static,
        (
            name!(catalogue_loads, i64),
            name!(tenant_loads, i64),
            name!(tenants_cached, i32),
            name!(full_forgets, i64),
        ),
    > {
        let row = STATE.with(|st| {
            (
                st.catalogue_loads.get() as i64,
                st.tenant_loads.get() as i64,
                cached_tenants() as i32,
                st.full_forgets.get() as i64,
            )
        });
        TableIterator::once(row)
    }
}
