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
//!   stale: no SPI and no catalog access in it. A change to the catalogue's
//!   tables reloads everything; a change to the tenants' tables (tenants,
//!   tenant_addons, overrides) forgets the tenants and answers only.
//! - Loads run under the latest snapshot (store.rs), so a load can never
//!   miss a commit whose invalidation this backend has already consumed.
//!   Inside a parallel query the snapshot cannot change: what is loaded
//!   there is provisional and reloaded by the first lookup after it.
//! - Time-dependent rules (trials, grace, override windows, flux.now) are
//!   evaluated at decision time: levels 1 and 2 hold rows; level 3 holds
//!   answers only while the settings and the clock's steady window they
//!   were decided in last.
//!
//! Costs that justify the three levels (benches/run.sh on the 2-core bench
//! machine): through SPI, with every query parsed and planned, a decision
//! cost about 550 us (3,500 checks/s on 2 clients). Level 1 (catalogue,
//! whole) and level 2 (tenants, a bounded LRU) bring a warm decision to
//! about 1 us, and pgbench sees 0.94 of a `SELECT` of a constant; a tenant
//! load is 3 prepared queries, paid once per tenant until its rows change.
//! Level 3 (flux_check's answers, with flux_check's own entry point in
//! reads.rs) brings a repeated check to about 22 ns: in a scan, 1.4x-1.5x a
//! trivial predicate instead of 6x.

use crate::backend;
use crate::error::FluxResult;
use crate::model::{FeatureFacts, FlagFacts, TenantFacts};
use crate::store::{self, Catalogue, TenantEntry};
use pgrx::pg_sys;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// At most this many watched tables are remembered for the callback.
const MAX_WATCHED: usize = 32;

/// The flags of the hot path, in one thread-local (each access to one is a
/// call to __tls_get_addr in a shared library).
struct State {
    /// Set by the relcache callback; the next lookup reloads.
    stale: Cell<bool>,
    /// Set by the callback for a change to the tenants' tables only: the
    /// next lookup forgets the tenants (and answers) but keeps the catalogue.
    tenants_stale: Cell<bool>,
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
            tenants_stale: Cell::new(false),
            provisional: Cell::new(false),
            epoch: Cell::new(0),
            settings: Cell::new(0),
            polled: Cell::new((i64::MIN, i64::MIN)),
            bulk_tried: Cell::new(false),
            watched: Cell::new([0; MAX_WATCHED]),
            answers: RefCell::new(Answers {
                stamp: Stamp { epoch: 0, settings: 0 },
                clock: None,
                from: 0,
                until: 0,
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
        if relid == 0 {
            st.stale.set(true);
        } else if let Some(i) = st.watched.get().iter().position(|&w| w == relid) {
            if i < store::CATALOGUE_TABLES {
                st.stale.set(true);
            } else {
                st.tenants_stale.set(true);
            }
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

/// A tenant's rows changed: forget every tenant and answer (they are
/// reloaded as asked for, under the latest snapshot), keep the catalogue.
/// Cheaper than a reload by the catalogue's queries; which tenant changed
/// is not known here (a relcache invalidation names only the table).
fn forget_tenants(st: &State) {
    st.tenants_stale.set(false);
    st.epoch.set(st.epoch.get().wrapping_add(1));
    st.bulk_tried.set(false);
    TENANTS.with(|t| t.borrow_mut().clear());
    // Re-plan the tenant loads too, as a reload does: the tables grow.
    store::forget_plans();
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

/// Level 3: flux_check's answers. A decision is a pure function of the
/// cached rows, the clock and flux.default_grace_period, so an answer that
/// read no usage can be given again until the next invalidation (a reload
/// bumps the epoch), the next change of those settings, or the clock leaving
/// the window in which every time rule answers the same (a trial ending, an
/// override starting or expiring: see decision::steady_window).
/// Measured on the bench machine: a check through levels 1 and 2 cost about
/// 225 ns above a trivial predicate per row (setting reads, two hash
/// lookups, the decision and its strings); an answer from here about 22 ns
/// (one probe of a compact index, the function call and the clock; through
/// pgrx's generated entry point it was 35 ns, see reads.rs).
struct Answers {
    stamp: Stamp,
    /// The clock when flux.now is set (fixed until the settings change);
    /// None: the transaction's start.
    clock: Option<i64>,
    /// Every kept answer holds for clocks in [from, until) (the
    /// intersection of their steady windows, see decision::steady_window).
    from: i64,
    until: i64,
    len: usize,
    /// By feature; a statement usually asks about one, so the last one used
    /// is tried first.
    by_feature: Vec<(Box<[u8]>, TenantAnswers)>,
    last: usize,
}

/// One feature's answers: an open-addressing table of 8-byte slots, at most
/// 7/8 full. An id of up to 7 bytes is kept in its slot, with its length
/// and the answer: a lookup reads one word. A longer id is kept in `ids`,
/// its slot holding where, its length, 16 bits of its hash and the answer:
/// a lookup reads the slot and the id. The id is always compared whole.
/// 200,000 tenants take 2 MB of slots. (hashbrown's 16-byte slots and
/// separate control bytes took three cache misses a lookup once the table
/// outgrew the CPU cache; 16-byte slots holding 8 bytes of the id measured
/// slower than this, being twice the size.)
#[derive(Default)]
struct TenantAnswers {
    slots: SlotArray,
    len: usize,
    ids: Vec<u8>,
}

/// A slot: 0 when empty. Bits 0-1: 1 denied, 2 allowed. Bit 2 set: the id
/// is inline (bits 3-5 its length, bits 8-63 its bytes, little-endian);
/// clear: bits 8-15 its length, 16-31 its tag, 32-63 where it is in `ids`.
type Slot = u64;

const ANSWER: u64 = 0b11;
const INLINE: u64 = 0b100;
const INLINE_MAX: usize = 7;

/// The bytes of an id of at most 8 bytes as a little-endian number (the
/// reads overlap to cover every byte without a call to memcpy).
#[inline(always)]
fn le(id: &[u8]) -> u64 {
    let n = id.len();
    let w4 = |at: usize| {
        u64::from(u32::from_le_bytes(
            id[at..at + 4].try_into().unwrap_or_default(),
        ))
    };
    match n {
        0 => 0,
        1..=3 => {
            u64::from(id[0])
                | u64::from(id[n / 2]) << (8 * (n / 2))
                | u64::from(id[n - 1]) << (8 * (n - 1))
        }
        4..=7 => w4(0) | (w4(n - 4) >> (8 * (8 - n))) << 32,
        _ => u64::from_le_bytes(id[..8].try_into().unwrap_or_default()),
    }
}

/// The slot bits that identify `id` (all but the answer): for a long id,
/// only the low 32 (the length and tag; where it is kept varies).
#[inline(always)]
fn key_bits(id: &[u8], hash: u64) -> u64 {
    if id.len() <= INLINE_MAX {
        le(id) << 8 | (id.len() as u64) << 3 | INLINE
    } else {
        u64::from(tag(hash)) << 16 | (id.len() as u64 & 0xff) << 8
    }
}

/// Byte equality for short ids without a call to memcmp (which was a
/// seventh of a warm check): lengths, then two overlapping words.
#[inline(always)]
fn same(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let w8 = |s: &[u8], at: usize| u64::from_ne_bytes(s[at..at + 8].try_into().unwrap_or_default());
    let w4 = |s: &[u8], at: usize| u32::from_ne_bytes(s[at..at + 4].try_into().unwrap_or_default());
    match n {
        0 => true,
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => w4(a, 0) == w4(b, 0) && w4(a, n - 4) == w4(b, n - 4),
        8..=16 => w8(a, 0) == w8(b, 0) && w8(a, n - 8) == w8(b, n - 8),
        _ => a == b,
    }
}

fn tag(hash: u64) -> u16 {
    (hash >> 48) as u16
}

impl TenantAnswers {
    /// The hash of the id a full slot holds.
    fn hash_of(&self, s: Slot) -> u64 {
        if s & INLINE != 0 {
            let n = ((s >> 3) & 0b111) as usize;
            xxhash_rust::xxh3::xxh3_64(&(s >> 8).to_le_bytes()[..n])
        } else {
            let (at, n) = ((s >> 32) as usize, ((s >> 8) & 0xff) as usize);
            xxhash_rust::xxh3::xxh3_64(self.ids.get(at..at + n).unwrap_or_default())
        }
    }

    /// The slot holding `id` (hashed to `hash`), or the empty one where it
    /// would go.
    #[inline]
    fn probe(&self, id: &[u8], hash: u64) -> usize {
        let mask = self.slots.len() - 1;
        let want = key_bits(id, hash);
        let inline = id.len() <= INLINE_MAX;
        let mut i = hash as usize & mask;
        loop {
            let s = self.slots[i];
            if s == 0 {
                return i;
            }
            if inline {
                if s & !ANSWER == want {
                    return i;
                }
            } else if s & 0xffff_ffff & !ANSWER == want {
                let at = (s >> 32) as usize;
                if same(self.ids.get(at..at + id.len()).unwrap_or_default(), id) {
                    return i;
                }
            }
            i = (i + 1) & mask;
        }
    }

    #[inline]
    fn get(&self, id: &[u8]) -> Option<bool> {
        if self.slots.is_empty() {
            return None;
        }
        let s = self.slots[self.probe(id, xxhash_rust::xxh3::xxh3_64(id))];
        (s != 0).then_some(s & ANSWER == 2)
    }

    /// Insert; false when it was there (or the id is too long to keep).
    fn insert(&mut self, id: &[u8], allowed: bool) -> bool {
        let (Ok(at), Ok(_)) = (u32::try_from(self.ids.len()), u8::try_from(id.len())) else {
            return false;
        };
        if (self.len + 1) * 8 > self.slots.len() * 7 {
            self.grow();
        }
        let hash = xxhash_rust::xxh3::xxh3_64(id);
        let i = self.probe(id, hash);
        if self.slots[i] != 0 {
            return false;
        }
        let mut s = key_bits(id, hash) | if allowed { 2 } else { 1 };
        if id.len() > INLINE_MAX {
            s |= u64::from(at) << 32;
            self.ids.extend_from_slice(id);
        }
        self.slots[i] = s;
        self.len += 1;
        true
    }

    fn grow(&mut self) {
        let n = (self.slots.len() * 2).max(64);
        let old = std::mem::replace(&mut self.slots, SlotArray::new(n));
        // The ids are distinct: each goes to the first empty slot from its
        // hash, without comparing ids.
        let mask = n - 1;
        for &s in old.iter().filter(|&&s| s != 0) {
            let mut i = self.hash_of(s) as usize & mask;
            while self.slots[i] != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = s;
        }
    }

    fn clear(&mut self) {
        self.slots = SlotArray::empty();
        self.len = 0;
        self.ids.clear();
    }
}

/// A table's slots in an allocation of their own: one of 2 MB or more is
/// aligned to 2 MB and advised onto transparent huge pages before it is
/// first written, so that every part of it is (a Vec's buffer is not
/// aligned: only its interior whole huge pages could be, half of a 4 MB
/// table). With 4 kB pages a lookup in a table of a few MB missed the TLB
/// as well as the cache (in a VM, a walk of two page tables).
struct SlotArray {
    ptr: std::ptr::NonNull<Slot>,
    len: usize,
}

const HUGE: usize = 2 << 20;

impl SlotArray {
    fn empty() -> Self {
        SlotArray {
            ptr: std::ptr::NonNull::dangling(),
            len: 0,
        }
    }

    fn layout(len: usize) -> std::alloc::Layout {
        let size = len * std::mem::size_of::<Slot>();
        let align = if size >= HUGE {
            HUGE
        } else {
            std::mem::align_of::<Slot>()
        };
        std::alloc::Layout::from_size_align(size, align)
            .unwrap_or_else(|_| std::alloc::handle_alloc_error(std::alloc::Layout::new::<Slot>()))
    }

    /// `len` empty slots (len > 0).
    fn new(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: a non-zero size; the memory is advised (a hint about its
        // backing, not its contents) and then every slot is written before
        // the array is read.
        unsafe {
            let ptr = std::alloc::alloc(layout).cast::<Slot>();
            let Some(ptr) = std::ptr::NonNull::new(ptr) else {
                std::alloc::handle_alloc_error(layout)
            };
            if layout.size() >= HUGE {
                libc::madvise(ptr.as_ptr().cast(), layout.size(), libc::MADV_HUGEPAGE);
            }
            for i in 0..len {
                ptr.as_ptr().add(i).write(0);
            }
            SlotArray { ptr, len }
        }
    }
}

impl std::ops::Deref for SlotArray {
    type Target = [Slot];
    fn deref(&self) -> &[Slot] {
        // SAFETY: len initialised slots (or none, over a dangling pointer).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for SlotArray {
    fn deref_mut(&mut self) -> &mut [Slot] {
        // SAFETY: as in deref, and borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for SlotArray {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated by new() with this layout (Slot has no
            // destructor).
            unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), Self::layout(self.len)) }
        }
    }
}

impl Default for SlotArray {
    fn default() -> Self {
        Self::empty()
    }
}

impl Answers {
    #[inline]
    fn feature(&mut self, feature: &[u8]) -> Option<usize> {
        if let Some((f, _)) = self.by_feature.get(self.last) {
            if same(f, feature) {
                return Some(self.last);
            }
        }
        let i = self.by_feature.iter().position(|(f, _)| &**f == feature)?;
        self.last = i;
        Some(i)
    }
}

/// How many remembered answers per cacheable tenant (features checked per
/// tenant, on average, before the table starts over).
const ANSWERS_PER_TENANT: usize = 8;

/// What an answer was decided from, besides the clock: the cache's
/// contents and the settings it depends on (flux.now,
/// flux.default_grace_period).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    epoch: u64,
    settings: u64,
}

fn stamp(st: &State) -> Stamp {
    Stamp {
        epoch: st.epoch.get(),
        settings: st.settings.get(),
    }
}

impl Answers {
    /// Whether the kept answers hold now.
    fn hold(&self, stamp: Stamp) -> bool {
        self.hold_at(stamp, backend::transaction_start())
    }

    /// `hold`, given the transaction's start.
    #[inline]
    fn hold_at(&self, stamp: Stamp, xact_start: i64) -> bool {
        let now = self.clock.unwrap_or(xact_start);
        self.stamp == stamp && self.from <= now && now < self.until
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
pub fn answer_ready(tenant: &[u8], feature: &[u8]) -> Option<bool> {
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

/// Remember an answer that read no usage (see Answers), decided just now
/// at clock `now` (`fixed`: from flux.now), steady in `window`.
pub fn remember(
    tenant: &str,
    feature: &str,
    allowed: bool,
    now: i64,
    fixed: bool,
    window: (i64, i64),
) {
    // Bounded with the tenant cache: up to ANSWERS_PER_TENANT answers (an
    // 8-byte slot each, at most 7/8 full, and the id when over 7 bytes) per
    // tenant it may hold, then it starts over.
    let capacity = crate::gucs::cache_tenants().saturating_mul(ANSWERS_PER_TENANT);
    STATE.with(|st| {
        // With an invalidation pending, the facts may be older than the epoch.
        if st.stale.get() {
            return;
        }
        let stamp = stamp(st);
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
        if a.by_feature[i].1.insert(tenant.as_bytes(), allowed) {
            a.len += 1;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::TenantAnswers;

    #[test]
    fn same_is_byte_equality_at_every_length() {
        let ids: Vec<Vec<u8>> = (0..40)
            .flat_map(|n| {
                let base: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
                // The same length, one byte different at each position.
                let mut v = vec![base.clone()];
                for at in 0..n {
                    let mut other = base.clone();
                    other[at] ^= 1;
                    v.push(other);
                }
                v
            })
            .collect();
        for a in &ids {
            for b in &ids {
                assert_eq!(super::same(a, b), a == b, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn le_is_the_bytes_of_a_short_id() {
        for n in 0..=8usize {
            for seed in 0..300u32 {
                let id: Vec<u8> = (0..n)
                    .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u32 * 7) % 251) as u8)
                    .collect();
                let mut padded = [0u8; 8];
                padded[..n].copy_from_slice(&id);
                assert_eq!(super::le(&id), u64::from_le_bytes(padded), "{id:?}");
            }
        }
    }

    #[test]
    fn answers_table_keeps_every_id_apart_through_growth() {
        let mut t = TenantAnswers::default();
        // Ids of every length from 1 to 12: in the slot (up to 7 bytes) or
        // not.
        let ids: Vec<String> = (0..20_000)
            .map(|i| match i % 4 {
                0 => format!("tenant-{i}"),
                1 => format!("{i}"),
                2 => format!("t{i}"),
                _ => format!("x{i:06}"),
            })
            .collect();
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(t.get(id.as_bytes()), None);
            assert!(t.insert(id.as_bytes(), i % 3 == 0));
            assert!(!t.insert(id.as_bytes(), i % 3 != 0), "kept twice: {id}");
        }
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(t.get(id.as_bytes()), Some(i % 3 == 0), "{id}");
        }
        assert_eq!(t.get(b"tenant-20000"), None);
        assert_eq!(t.get(b"20000"), None);
        assert_eq!(t.get(b"tenant-1"), None);
        assert_eq!(t.get(b""), None);
        assert!(t.insert(b"", true));
        assert_eq!(t.get(b""), Some(true));
        // Ids too long to keep are refused, not truncated.
        let long = vec![b'x'; 300];
        assert!(!t.insert(&long, true));
        assert_eq!(t.get(&long), None);
        t.clear();
        assert_eq!(t.get(b"tenant-1"), None);
        assert!(t.insert(b"tenant-1", false));
        assert_eq!(t.get(b"tenant-1"), Some(false));
    }
}
