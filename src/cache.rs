//! The per-backend cache of the catalogue and of tenants, kept fresh by
//! relcache invalidation that follows transactions (the pg_cron pattern).
//!
//! - Every flux table that decisions read has a statement-level trigger
//!   (`flux._cache_invalidate`) that calls `CacheInvalidateRelcacheByRelid`
//!   on that table. PostgreSQL delivers the message to this backend at the
//!   end of the command (so its next statement sees its own change), to
//!   other backends when the transaction commits (pending invalidations are
//!   read at the first lookup of each statement, so their next statement
//!   sees it, even inside an open transaction), and re-delivers it locally
//!   on rollback (so a rolled-back state never stays cached).
//! - One relcache callback, registered in `_PG_init`, only marks the cache
//!   stale: no SPI and no catalog access in it.
//! - Loads run under the latest snapshot (store.rs), so a load can never
//!   miss a commit whose invalidation this backend has already consumed.
//!   Inside a parallel query the snapshot cannot change: what is loaded
//!   there is provisional and reloaded by the first lookup after it.
//! - Time-dependent rules (trials, grace, override windows, flux.now) are
//!   evaluated at decision time: levels 1 and 2 hold rows; level 3 holds
//!   answers only for the instant (transaction and settings) they were
//!   decided at.
//!
//! Costs that justify the three levels (benches/run.sh on the 2-core bench
//! machine): through SPI, with every query parsed and planned, a decision
//! cost about 550 us (3,500 checks/s on 2 clients). Level 1 (catalogue,
//! whole) and level 2 (tenants, a bounded LRU) bring a warm decision to
//! about 1 us, and pgbench sees 0.94 of a `SELECT` of a constant; a tenant
//! load is 3 prepared queries, paid once per tenant until its rows change.
//! Level 3 (flux_check's answers for this instant) brings a repeated check
//! in a scan to about 35 ns, 1.6x a trivial predicate instead of 6x.

use crate::backend;
use crate::error::FluxResult;
use crate::model::{FeatureFacts, FlagFacts, TenantFacts};
use crate::store::{self, Catalogue, TenantEntry};
use pgrx::pg_sys;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::rc::Rc;

/// At most this many watched tables are remembered for the callback.
const MAX_WATCHED: usize = 32;

/// The flags of the hot path, in one thread-local (each access to one is a
/// call to __tls_get_addr in a shared library).
struct State {
    /// Set by the relcache callback; the next lookup reloads.
    stale: Cell<bool>,
    /// Something was loaded during a parallel query, under the statement's
    /// snapshot rather than the latest: good for that statement only.
    provisional: Cell<bool>,
    /// Bumped by every reload: answers remembered under another epoch are
    /// forgotten.
    epoch: Cell<u64>,
    /// Bumped by the assign hooks of flux.now and flux.default_grace_period.
    settings: Cell<u64>,
    /// (statement start, transaction start) when pending invalidations were
    /// last read.
    polled: Cell<(i64, i64)>,
    /// A parallel worker tried to load every tenant at once (this epoch).
    bulk_tried: Cell<bool>,
    /// OIDs of the flux tables, copied out of the catalogue for the callback
    /// (a Cell of a plain array: the callback must not borrow a RefCell that
    /// a load in progress may hold).
    watched: Cell<[u32; MAX_WATCHED]>,
    /// Level 3 (see Answers); here so that a check reaches everything it
    /// needs through one thread-local.
    answers: RefCell<Answers>,
}

thread_local! {
    static STATE: State = const {
        State {
            stale: Cell::new(true),
            provisional: Cell::new(false),
            epoch: Cell::new(0),
            settings: Cell::new(0),
            polled: Cell::new((i64::MIN, i64::MIN)),
            bulk_tried: Cell::new(false),
            watched: Cell::new([0; MAX_WATCHED]),
            answers: RefCell::new(Answers {
                stamp: Stamp { epoch: 0, settings: 0, xact: 0 },
                len: 0,
                by_feature: Vec::new(),
                last: 0,
            }),
        }
    };
    static CATALOGUE: RefCell<Option<Rc<Catalogue>>> = const { RefCell::new(None) };
    static TENANTS: RefCell<TenantLru> = RefCell::new(TenantLru::default());
}

/// The relcache callback: mark stale when one of our tables (or everything,
/// relid 0, after an invalidation queue overflow) is invalidated.
///
/// # Safety
/// Called by PostgreSQL's invalidation machinery; touches only thread-local cells.
unsafe extern "C-unwind" fn on_relcache_invalidate(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let relid = u32::from(relid);
    STATE.with(|st| {
        if relid == 0 || st.watched.get().contains(&relid) {
            st.stale.set(true);
        }
    });
}

pub fn init() {
    // SAFETY: registers a plain function once per backend, from _PG_init.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache_invalidate), pg_sys::Datum::from(0))
    };
}

/// Bounded tenant cache: two generations approximate LRU in O(1). Lookups
/// promote an entry from the old generation to the new; when the new one
/// holds half the capacity, the old is dropped and the new becomes old, so
/// at most `flux.cache_tenants` tenants are held and the recently used stay.
#[derive(Default)]
struct TenantLru {
    young: HashMap<String, Option<Rc<TenantEntry>>>,
    old: HashMap<String, Option<Rc<TenantEntry>>>,
}

impl TenantLru {
    fn clear(&mut self) {
        self.young.clear();
        self.old.clear();
    }

    fn get(&mut self, id: &str, capacity: usize) -> Option<Option<Rc<TenantEntry>>> {
        if let Some(e) = self.young.get(id) {
            return Some(e.clone());
        }
        let e = self.old.remove(id)?;
        self.put(id.to_string(), e.clone(), capacity);
        Some(e)
    }

    fn put(&mut self, id: String, e: Option<Rc<TenantEntry>>, capacity: usize) {
        let half = (capacity / 2).max(1);
        if self.young.len() >= half {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(id, e);
    }

    fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

/// Read invalidations that other backends committed, once per statement:
/// a statement sees one state, as it sees one snapshot, and the next one
/// (even inside an open transaction) sees every change committed before it
/// started. This backend's own changes and rollbacks reach the callback
/// directly, at the end of each command. Safe because loads use the latest
/// snapshot: a transaction is visible to new snapshots before its
/// invalidation is sent.
fn poll(st: &State) {
    let now = (backend::statement_start(), backend::transaction_start());
    if st.polled.get() != now {
        // SAFETY: PostgreSQL calls this itself at every lock acquisition.
        unsafe { pg_sys::AcceptInvalidationMessages() };
        st.polled.set(now);
    }
}

/// Whether the cache must be reloaded before its next use.
fn must_reload(st: &State) -> bool {
    poll(st);
    if st.provisional.get() && !backend::in_parallel_mode() {
        st.stale.set(true);
    }
    st.stale.get()
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
        st.epoch.set(st.epoch.get().wrapping_add(1));
        st.provisional.set(parallel);
        st.bulk_tried.set(false);
    });
    TENANTS.with(|t| t.borrow_mut().clear());
    CATALOGUE.with(|c| *c.borrow_mut() = None);
    store::forget_plans();
    let cat = match store::load_catalogue() {
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

/// A parallel worker loads every tenant at once when there are at most this
/// many (and they fit in half the cache).
const BULK_MAX: usize = 10_000;

/// The tenant's cache entry, and whether it was loaded just now.
fn tenant_entry(id: &str) -> FluxResult<(Option<Rc<TenantEntry>>, bool)> {
    let capacity = crate::gucs::cache_tenants();
    if let Some(e) = TENANTS.with(|t| t.borrow_mut().get(id, capacity)) {
        return Ok((e, false));
    }
    let cat = catalogue()?;
    let with_grace = |mut e: TenantEntry| {
        e.base.plan_grace = e
            .base
            .plan
            .as_ref()
            .and_then(|p| cat.plan_grace.get(p).copied().flatten());
        Rc::new(e)
    };
    if backend::in_parallel_mode() {
        STATE.with(|st| st.provisional.set(true));
    }
    if backend::is_parallel_worker() && !STATE.with(|st| st.bulk_tried.replace(true)) {
        let max = BULK_MAX.min(capacity / 2);
        if let Some(all) = store::load_all_tenants(max)? {
            let mut found = None;
            TENANTS.with(|t| {
                let mut t = t.borrow_mut();
                for e in all {
                    let e = with_grace(e);
                    if e.base.id == id {
                        found = Some(e.clone());
                    }
                    t.put(e.base.id.clone(), Some(e), capacity);
                }
                if found.is_none() {
                    t.put(id.to_string(), None, capacity);
                }
            });
            return Ok((found, true));
        }
    }
    let loaded = store::load_tenant(id)?.map(with_grace);
    // Unknown tenants are cached too: a flood of checks for an id that does
    // not exist must not cost a query each.
    TENANTS.with(|t| t.borrow_mut().put(id.to_string(), loaded.clone(), capacity));
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
}

impl Facts {
    pub fn tenant(&self) -> Option<&TenantFacts> {
        self.specific
            .as_ref()
            .or_else(|| self.entry.as_deref().map(|e| &e.base))
    }
}

pub fn facts(tenant: &str, feature: &str, subject: Option<&str>) -> FluxResult<Facts> {
    let cat = catalogue()?;
    let Some(f) = cat.features.get(feature).cloned() else {
        return Ok(Facts {
            feature: None,
            entry: None,
            specific: None,
            flag: None,
        });
    };
    let (entry, loaded) = tenant_entry(tenant)?;
    let Some(entry) = entry else {
        return Ok(Facts {
            feature: Some(f),
            entry: None,
            specific: None,
            flag: None,
        });
    };
    // A tenant load may have consumed an invalidation: reload if so.
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
    })
}

/// How many tenants are cached now (for tests and monitoring).
pub fn cached_tenants() -> usize {
    TENANTS.with(|t| t.borrow().len())
}

/// Level 3: flux_check's answers for one instant. A decision is a pure
/// function of the cached rows, the clock and flux.default_grace_period, so
/// an answer that read no usage can be given again while all three stay the
/// same: within a transaction (one clock), until the next invalidation (a
/// reload bumps the epoch) or the next change of those settings. Time rules
/// are still evaluated at decision time: the clock is part of the stamp.
/// Measured on the bench machine: a check through levels 1 and 2 cost about
/// 225 ns above a trivial predicate per row (setting reads, two hash
/// lookups, the decision and its strings); an answer from here about 35 ns
/// (one probe of a compact index; the rest is pgrx's call and the clock).
struct Answers {
    stamp: Stamp,
    len: usize,
    /// By feature; a statement usually asks about one, so the last one used
    /// is tried first.
    by_feature: Vec<(Box<[u8]>, TenantAnswers)>,
    last: usize,
}

/// One feature's answers: a compact index (hash to where the id is kept
/// and the answer: 16 bytes a slot, so it stays in the CPU cache while a
/// scan streams pages through) over the ids, stored one after the other.
/// The id is always compared: a hash collision only means the answer is not
/// kept.
#[derive(Default)]
struct TenantAnswers {
    index: HashMap<u64, Slot, BuildHasherDefault<Prehashed>>,
    ids: Vec<u8>,
}

#[derive(Clone, Copy)]
struct Slot {
    at: u32,
    len: u16,
    allowed: bool,
}

impl TenantAnswers {
    fn get(&self, id: &[u8]) -> Option<bool> {
        let slot = self.index.get(&xxhash_rust::xxh3::xxh3_64(id))?;
        let at = slot.at as usize;
        let kept = self.ids.get(at..at + usize::from(slot.len))?;
        (kept == id).then_some(slot.allowed)
    }

    /// Insert; false when it was there (or its hash is taken, or the id is
    /// too long to be worth keeping).
    fn insert(&mut self, id: &[u8], allowed: bool) -> bool {
        let (Ok(at), Ok(len)) = (u32::try_from(self.ids.len()), u16::try_from(id.len())) else {
            return false;
        };
        match self.index.entry(xxhash_rust::xxh3::xxh3_64(id)) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Slot { at, len, allowed });
                self.ids.extend_from_slice(id);
                true
            }
        }
    }

    fn clear(&mut self) {
        self.index.clear();
        self.ids.clear();
    }
}

impl Answers {
    fn feature(&mut self, feature: &[u8]) -> Option<usize> {
        if let Some((f, _)) = self.by_feature.get(self.last) {
            if &**f == feature {
                return Some(self.last);
            }
        }
        let i = self.by_feature.iter().position(|(f, _)| &**f == feature)?;
        self.last = i;
        Some(i)
    }
}

/// The identity hasher for keys that are already xxh3 hashes.
#[derive(Default)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, self.0);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// What an answer was decided under: the cache's contents, the settings
/// it depends on (flux.now, flux.default_grace_period) and the transaction
/// (whose start is the clock when flux.now is unset).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
struct Stamp {
    epoch: u64,
    settings: u64,
    xact: i64,
}

fn stamp(st: &State) -> Stamp {
    Stamp {
        epoch: st.epoch.get(),
        settings: st.settings.get(),
        xact: backend::transaction_start(),
    }
}

/// Called by the assign hooks of the settings a decision depends on.
pub fn settings_changed() {
    STATE.with(|st| st.settings.set(st.settings.get().wrapping_add(1)));
}

/// The remembered answer for (tenant, feature) at this instant, if any.
/// Reads pending invalidations first, like every lookup. Takes bytes: ids
/// are compared, not decoded, on this path.
pub fn answer(tenant: &[u8], feature: &[u8]) -> FluxResult<Option<bool>> {
    let found = STATE.with(|st| {
        if must_reload(st) {
            return Err(());
        }
        let now = stamp(st);
        let mut a = st.answers.borrow_mut();
        if a.stamp != now {
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

/// Remember an answer that read no usage (see Answers), decided just now.
pub fn remember(tenant: &str, feature: &str, allowed: bool) {
    // With an invalidation pending, the facts may be older than the epoch.
    let capacity = crate::gucs::cache_tenants();
    STATE.with(|st| {
        if st.stale.get() {
            return;
        }
        let now = stamp(st);
        let mut a = st.answers.borrow_mut();
        if a.stamp != now || a.len >= capacity {
            // A new instant. Its first answer is not kept: one check per
            // transaction (the common case) then costs no insertion, and a
            // statement that checks many rows starts keeping from the second.
            if a.len > 256 {
                a.by_feature.clear();
            } else if a.len > 0 {
                a.by_feature.iter_mut().for_each(|(_, m)| m.clear());
            }
            a.stamp = now;
            a.len = 0;
            return;
        }
        let i = match a.feature(feature.as_bytes()) {
            Some(i) => i,
            None => {
                a.by_feature
                    .push((feature.as_bytes().into(), TenantAnswers::default()));
                a.by_feature.len() - 1
            }
        };
        if a.by_feature[i].1.insert(tenant.as_bytes(), allowed) {
            a.len += 1;
        }
    });
}
