//! The per-backend cache of the catalogue and of tenants, kept fresh by
//! relcache invalidation that follows transactions (the pg_cron pattern).
//!
//! - Every flux table that decisions read has a statement-level trigger
//!   (`flux._cache_invalidate`) that calls `CacheInvalidateRelcacheByRelid`
//!   on that table. PostgreSQL delivers the message to this backend at the
//!   end of the command (so its next statement sees its own change), to
//!   other backends when the transaction commits (each lookup reads pending
//!   invalidations first, so their next statement sees it), and re-delivers
//!   it locally on rollback (so a rolled-back state never stays cached).
//! - One relcache callback, registered in `_PG_init`, only marks the cache
//!   stale: no SPI and no catalog access in it.
//! - Loads run under the latest snapshot (store.rs), so a load can never
//!   miss a commit whose invalidation this backend has already consumed.
//!   Inside a parallel query the snapshot cannot change: what is loaded
//!   there is provisional and reloaded by the first lookup after it.
//! - Time-dependent rules (trials, grace, override windows, flux.now) are
//!   evaluated at decision time: the cache holds rows, never answers.
//!
//! Costs that justify the two levels (benches/run.sh on the 2-core bench
//! machine): through SPI, with every query parsed and planned, a decision
//! cost about 550 us (3,500 checks/s on 2 clients); from the cache a warm
//! check costs about 1 us (0.8 us with 1,000 tenants, 1.2 us with 200,000),
//! and pgbench sees 0.94 of a `SELECT` of a constant. A tenant load is 3
//! prepared queries, paid once per tenant until its rows change; the
//! catalogue is a handful of queries, paid once per change.

use crate::error::FluxResult;
use crate::model::{FeatureFacts, FlagFacts, TenantFacts};
use crate::store::{self, Catalogue, TenantEntry};
use pgrx::pg_sys;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// At most this many watched tables are remembered for the callback.
const MAX_WATCHED: usize = 32;

thread_local! {
    /// Set by the relcache callback; the next lookup reloads.
    static STALE: Cell<bool> = const { Cell::new(true) };
    /// Something was loaded during a parallel query, under the statement's
    /// snapshot rather than the latest: good for that statement only.
    static PROVISIONAL: Cell<bool> = const { Cell::new(false) };
    /// OIDs of the flux tables, copied out of the catalogue for the callback
    /// (a Cell of a plain array: the callback must not borrow a RefCell that
    /// a load in progress may hold).
    static WATCHED: Cell<[u32; MAX_WATCHED]> = const { Cell::new([0; MAX_WATCHED]) };
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
    if relid == 0 || WATCHED.with(|w| w.get().contains(&relid)) {
        STALE.with(|s| s.set(true));
    }
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

fn refresh_if_stale() -> FluxResult<Rc<Catalogue>> {
    // Read invalidations that other backends committed since our last look,
    // so even a statement inside an open transaction sees a committed
    // change. Cheap when there are none (a flag check in shared memory),
    // and safe because loads use the latest snapshot: a transaction is
    // visible to new snapshots before its invalidation is sent.
    // SAFETY: PostgreSQL calls this itself at every lock acquisition.
    unsafe { pg_sys::AcceptInvalidationMessages() };
    let parallel = store::in_parallel_mode();
    if PROVISIONAL.with(|p| p.get()) && !parallel {
        STALE.with(|s| s.set(true));
    }
    if !STALE.with(|s| s.get()) {
        if let Some(c) = CATALOGUE.with(|c| c.borrow().clone()) {
            return Ok(c);
        }
    }
    // Clear the flag before loading: an invalidation that arrives while we
    // load sets it again and the next call reloads.
    STALE.with(|s| s.set(false));
    PROVISIONAL.with(|p| p.set(parallel));
    TENANTS.with(|t| t.borrow_mut().clear());
    CATALOGUE.with(|c| *c.borrow_mut() = None);
    store::forget_plans();
    let cat = match store::load_catalogue() {
        Ok(c) => Rc::new(c),
        Err(e) => {
            STALE.with(|s| s.set(true));
            return Err(e);
        }
    };
    let mut watched = [0u32; MAX_WATCHED];
    for (slot, oid) in watched.iter_mut().zip(cat.watched.iter()) {
        *slot = u32::from(*oid);
    }
    WATCHED.with(|w| w.set(watched));
    CATALOGUE.with(|c| *c.borrow_mut() = Some(cat.clone()));
    Ok(cat)
}

/// The catalogue, loaded when stale.
pub fn catalogue() -> FluxResult<Rc<Catalogue>> {
    refresh_if_stale()
}

/// The tenant's cache entry, and whether it was loaded just now.
fn tenant_entry(id: &str) -> FluxResult<(Option<Rc<TenantEntry>>, bool)> {
    let capacity = crate::gucs::cache_tenants();
    if let Some(e) = TENANTS.with(|t| t.borrow_mut().get(id, capacity)) {
        return Ok((e, false));
    }
    let cat = catalogue()?;
    let loaded = store::load_tenant(id)?.map(|mut e| {
        e.base.plan_grace = e
            .base
            .plan
            .as_ref()
            .and_then(|p| cat.plan_grace.get(p).copied().flatten());
        Rc::new(e)
    });
    if store::in_parallel_mode() {
        PROVISIONAL.with(|p| p.set(true));
    }
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
