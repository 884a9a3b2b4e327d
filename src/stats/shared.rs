//! The shared table: `flux.stats_max` entries in one block of shared memory,
//! sized at server start (the pg_stat_statements way). Open addressing with
//! linear probing over twice as many slots as entries (a probe reads one or
//! two slots), under LWLocks: one of PARTITIONS shared (chosen by process
//! id) to add to entries that exist (their counts are atomics), all of them
//! exclusive to insert, evict, reset or load. With a single lock every
//! backend's commit wrote its one cache line: 2.3% of the CPU of flux_check
//! at two clients went to LWLockAttemptLock, against 1.5% without
//! statistics.
//!
//! Names longer than `NAME` bytes are kept cut at a character boundary; the
//! hash of the whole name tells two long names with the same start apart.

use super::key::{Key, Kind, OTHER_NULL};
use pgrx::pg_sys;
use std::sync::atomic::{AtomicI64, AtomicPtr, AtomicU64, Ordering::Relaxed};

/// Bytes kept of a feature, plan or tenant name.
pub const NAME: usize = 64;

/// One counted key. `hash == 0` marks an empty slot.
#[repr(C)]
pub struct Entry {
    pub hash: u64,
    pub db: u32,
    pub kind: u8,
    pub reason: u8,
    pub flen: u8,
    /// OTHER_NULL: no plan (an unknown tenant's decision).
    pub olen: u8,
    /// Bit 0: the feature was cut; bit 1: the plan or tenant was.
    pub cut: u8,
    _pad: [u8; 7],
    pub feature: [u8; NAME],
    pub other: [u8; NAME],
    pub count: AtomicU64,
    pub first_at: AtomicI64,
    pub last_at: AtomicI64,
}

/// Shared-lock partitions (each LWLock is padded to its own cache line).
const PARTITIONS: usize = 16;

#[repr(C)]
struct Header {
    locks: *mut pg_sys::LWLockPadded,
    /// Entries kept (flux.stats_max at start), and slots (a power of two).
    max: u32,
    nslots: u32,
    /// Entries in use; written under the exclusive lock.
    live: AtomicU64,
    evictions: AtomicU64,
    reset_at: AtomicI64,
}

/// Set once, in the postmaster's shmem_startup_hook (inherited by every
/// backend it forks); null without the preload.
static TABLE: AtomicPtr<Header> = AtomicPtr::new(std::ptr::null_mut());

const TRANCHE: &std::ffi::CStr = c"flux_entitlements";
const SEGMENT: &std::ffi::CStr = c"flux_entitlements decision statistics";

fn entries_at() -> usize {
    std::mem::size_of::<Header>().next_multiple_of(64)
}

fn nslots(max: u32) -> u32 {
    (max.saturating_mul(2)).next_power_of_two()
}

/// Bytes of shared memory for `max` entries.
pub fn size(max: u32) -> usize {
    entries_at() + nslots(max) as usize * std::mem::size_of::<Entry>()
}

pub fn attached() -> bool {
    !TABLE.load(Relaxed).is_null()
}

/// From shmem_request_hook.
pub fn request(max: u32) {
    // SAFETY: called from shmem_request_hook, where these requests belong.
    unsafe {
        pg_sys::RequestAddinShmemSpace(size(max));
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), PARTITIONS as i32);
    }
}

/// From shmem_startup_hook: attach (and, the first time, initialise) the
/// table. Returns whether it was created now (and so may be loaded).
pub fn startup(max: u32) -> bool {
    // SAFETY: the startup protocol of shared memory: AddinShmemInitLock
    // (MainLWLockArray[21] in 15, 16 and 18) serialises ShmemInitStruct of
    // the same name; the block is ours, sized by `size(max)`, and zeroed
    // before anything reads it.
    unsafe {
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let h = pg_sys::ShmemInitStruct(SEGMENT.as_ptr(), size(max), &mut found).cast::<Header>();
        if !found {
            std::ptr::write_bytes(h.cast::<u8>(), 0, size(max));
            (*h).locks = pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr());
            (*h).max = max;
            (*h).nslots = nslots(max);
            (*h).reset_at.store(pg_sys::GetCurrentTimestamp(), Relaxed);
        }
        pg_sys::LWLockRelease(init_lock);
        TABLE.store(h, Relaxed);
        !found
    }
}

/// The table and its slots, with its locks held until dropped: one
/// partition shared, or all of them exclusive.
struct Locked {
    h: *mut Header,
    exclusive: bool,
}

impl Locked {
    /// In the postmaster (which has no PGPROC and so cannot wait): take
    /// the locks only if they are free (a backend killed by an immediate
    /// shutdown may have left one held).
    fn try_take_all() -> Option<Locked> {
        let h = TABLE.load(Relaxed);
        if h.is_null() {
            return None;
        }
        // SAFETY: as in take(); on failure what was taken is released.
        unsafe {
            for i in 0..PARTITIONS {
                if !pg_sys::LWLockConditionalAcquire(
                    Self::lock(h, i),
                    pg_sys::LWLockMode::LW_EXCLUSIVE,
                ) {
                    for j in (0..i).rev() {
                        pg_sys::LWLockRelease(Self::lock(h, j));
                    }
                    return None;
                }
            }
        }
        Some(Locked { h, exclusive: true })
    }

    fn take(exclusive: bool) -> Option<Locked> {
        let h = TABLE.load(Relaxed);
        if h.is_null() {
            return None;
        }
        // SAFETY: PARTITIONS locks were set up with the table, taken in
        // index order by exclusive holders (so never a deadlock);
        // LWLockAcquire only errors on too many LWLocks held (a backend
        // holds none of ours when it asks).
        unsafe {
            if exclusive {
                for i in 0..PARTITIONS {
                    pg_sys::LWLockAcquire(Self::lock(h, i), pg_sys::LWLockMode::LW_EXCLUSIVE);
                }
            } else {
                pg_sys::LWLockAcquire(Self::lock(h, Self::mine()), pg_sys::LWLockMode::LW_SHARED);
            }
        }
        Some(Locked { h, exclusive })
    }

    /// This process's shared partition.
    fn mine() -> usize {
        // SAFETY: set at process start.
        unsafe { pg_sys::MyProcPid as usize % PARTITIONS }
    }

    /// # Safety
    /// `h` is the attached table.
    unsafe fn lock(h: *mut Header, i: usize) -> *mut pg_sys::LWLock {
        // SAFETY: i < PARTITIONS locks of the tranche.
        unsafe { &raw mut (*(*h).locks.add(i)).lock }
    }

    fn header(&self) -> &Header {
        // SAFETY: the table lives as long as the server.
        unsafe { &*self.h }
    }

    fn slots(&self) -> &[Entry] {
        // SAFETY: nslots entries follow the header (see size()); shared
        // readers touch only atomics and what the exclusive holder wrote.
        unsafe {
            let at = self.h.cast::<u8>().add(entries_at()).cast::<Entry>();
            std::slice::from_raw_parts(at, (*self.h).nslots as usize)
        }
    }

    fn slots_mut(&mut self) -> &mut [Entry] {
        debug_assert!(self.exclusive);
        // SAFETY: as in slots(), with the lock held exclusively.
        unsafe {
            let at = self.h.cast::<u8>().add(entries_at()).cast::<Entry>();
            std::slice::from_raw_parts_mut(at, (*self.h).nslots as usize)
        }
    }

    /// Where `k` is (Ok) or the empty slot where it would go (Err).
    fn probe(&self, k: &Key) -> Result<usize, usize> {
        let slots = self.slots();
        let mask = slots.len() - 1;
        let mut i = k.hash as usize & mask;
        loop {
            let e = &slots[i];
            if e.hash == 0 {
                return Err(i);
            }
            if matches(e, k) {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    fn insert(&mut self, k: &Key, n: u64, now: i64) {
        if self.header().live.load(Relaxed) >= u64::from(self.header().max) {
            self.evict();
        }
        let Err(i) = self.probe(k) else {
            return;
        };
        let e = &mut self.slots_mut()[i];
        let feature = &k.feature[..];
        let other = k.other.as_deref().unwrap_or_default();
        e.db = k.db;
        e.kind = k.kind as u8;
        e.reason = k.reason;
        e.flen = feature.len() as u8;
        e.feature[..feature.len()].copy_from_slice(feature);
        e.olen = if k.other.is_some() {
            other.len() as u8
        } else {
            OTHER_NULL
        };
        e.other[..other.len()].copy_from_slice(other);
        e.cut = k.cut;
        e.count.store(n, Relaxed);
        e.first_at.store(now, Relaxed);
        e.last_at.store(now, Relaxed);
        e.hash = k.hash;
        self.header().live.fetch_add(1, Relaxed);
    }

    /// Drop the least used 5% (at least one), as pg_stat_statements does,
    /// and put the rest back in their slots.
    fn evict(&mut self) {
        let mut live: Vec<(u64, i64, usize)> = self
            .slots()
            .iter()
            .enumerate()
            .filter(|(_, e)| e.hash != 0)
            .map(|(i, e)| (e.count.load(Relaxed), e.last_at.load(Relaxed), i))
            .collect();
        live.sort_unstable();
        let victims = (live.len() * 5 / 100).max(1).min(live.len());
        let keep: Vec<usize> = live[victims..].iter().map(|&(_, _, i)| i).collect();
        self.rebuild(&keep);
        self.header().evictions.fetch_add(victims as u64, Relaxed);
    }

    /// Keep only the entries at `keep`, each in the first empty slot from
    /// its hash.
    fn rebuild(&mut self, keep: &[usize]) {
        let mask = self.slots().len() - 1;
        let slots = self.slots_mut();
        // SAFETY: a bitwise copy of plain fields and atomics (no drop glue),
        // written back below with the lock held exclusively.
        let kept: Vec<Entry> = keep
            .iter()
            .map(|&i| unsafe { std::ptr::read(&slots[i]) })
            .collect();
        // SAFETY: all-zero is an empty slot.
        unsafe { std::ptr::write_bytes(slots.as_mut_ptr(), 0, slots.len()) };
        for e in kept {
            let mut i = e.hash as usize & mask;
            while slots[i].hash != 0 {
                i = (i + 1) & mask;
            }
            // SAFETY: an empty slot, overwritten whole.
            unsafe { std::ptr::write(&mut slots[i], e) };
        }
        self.header().live.store(keep.len() as u64, Relaxed);
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: taken in take(), released in the reverse order.
        unsafe {
            if self.exclusive {
                for i in (0..PARTITIONS).rev() {
                    pg_sys::LWLockRelease(Self::lock(self.h, i));
                }
            } else {
                pg_sys::LWLockRelease(Self::lock(self.h, Self::mine()));
            }
        }
    }
}

/// The bytes kept of a name, and whether it was cut.
pub fn kept(s: &[u8]) -> (&[u8], bool) {
    if s.len() <= NAME {
        return (s, false);
    }
    // Cut before a UTF-8 continuation byte, never inside a character.
    let mut n = NAME;
    while n > 0 && s[n] & 0xc0 == 0x80 {
        n -= 1;
    }
    (&s[..n], true)
}

fn matches(e: &Entry, k: &Key) -> bool {
    if e.hash != k.hash || e.db != k.db || e.kind != k.kind as u8 || e.reason != k.reason {
        return false;
    }
    // Names as kept (Key::new cut them).
    if e.cut != k.cut || e.feature.get(..usize::from(e.flen)) != Some(&k.feature[..]) {
        return false;
    }
    match &k.other {
        None => e.olen == OTHER_NULL,
        Some(o) => e.olen != OTHER_NULL && e.other.get(..usize::from(e.olen)) == Some(&o[..]),
    }
}

/// Add counts, at `now`: under the shared lock for the keys that have an
/// entry (atomics: several backends add at once), then under the exclusive
/// lock for the rest.
pub fn add<'a>(counts: impl Iterator<Item = (&'a Key, u64)>, now: i64) {
    let mut missing = Vec::new();
    {
        let Some(t) = Locked::take(false) else {
            return;
        };
        for (k, n) in counts {
            match t.probe(k) {
                Ok(i) => bump(&t.slots()[i], n, now),
                Err(_) => missing.push((k, n)),
            }
        }
    }
    if missing.is_empty() {
        return;
    }
    // A few at a time: other backends' transactions end between chunks.
    for chunk in missing.chunks(32) {
        let Some(mut t) = Locked::take(true) else {
            return;
        };
        for &(k, n) in chunk {
            match t.probe(k) {
                Ok(i) => bump(&t.slots()[i], n, now),
                Err(_) => t.insert(k, n, now),
            }
        }
    }
}

fn bump(e: &Entry, n: u64, now: i64) {
    e.count.fetch_add(n, Relaxed);
    // A plain store when later (no compare-and-swap loop): two backends
    // racing may leave the earlier of two near instants.
    if e.last_at.load(Relaxed) < now {
        e.last_at.store(now, Relaxed);
    }
}

/// One entry as read out.
pub struct Row {
    pub reason: u8,
    pub feature: String,
    pub other: Option<String>,
    pub count: u64,
    pub first_at: i64,
    pub last_at: i64,
}

fn shown(bytes: &[u8], cut: bool) -> String {
    let mut s = String::from_utf8_lossy(bytes).into_owned();
    if cut {
        s.push('…');
    }
    s
}

/// Every entry of `kind` in database `db` (only `feature`'s when given:
/// a name cut to NAME bytes matches by what was kept), most counted first.
pub fn rows(db: u32, kind: Kind, feature: Option<&[u8]>) -> Option<Vec<Row>> {
    let want = feature.map(kept);
    let t = Locked::take(false)?;
    let mut out: Vec<Row> = t
        .slots()
        .iter()
        .filter(|e| e.hash != 0 && e.db == db && e.kind == kind as u8)
        .filter(|e| {
            want.is_none_or(|(f, cut)| {
                e.feature.get(..usize::from(e.flen)) == Some(f) && (e.cut & 1 != 0) == cut
            })
        })
        .map(|e| Row {
            reason: e.reason,
            feature: shown(&e.feature[..usize::from(e.flen)], e.cut & 1 != 0),
            other: (e.olen != OTHER_NULL)
                .then(|| shown(&e.other[..usize::from(e.olen)], e.cut & 2 != 0)),
            count: e.count.load(Relaxed),
            first_at: e.first_at.load(Relaxed),
            last_at: e.last_at.load(Relaxed),
        })
        .collect();
    drop(t);
    out.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.feature.cmp(&b.feature))
            .then_with(|| a.other.cmp(&b.other))
            .then_with(|| a.reason.cmp(&b.reason))
    });
    Some(out)
}

/// Entries in use (all databases), entries kept at most, entries evicted,
/// last reset.
pub fn info() -> Option<(u64, u32, u64, i64)> {
    let t = Locked::take(false)?;
    let h = t.header();
    Some((
        h.live.load(Relaxed),
        h.max,
        h.evictions.load(Relaxed),
        h.reset_at.load(Relaxed),
    ))
}

/// Forget every entry (of every database, as pg_stat_statements_reset()
/// does: the table, its eviction count and its reset time are the
/// server's), and the eviction count.
pub fn reset(now: i64) -> bool {
    let Some(mut t) = Locked::take(true) else {
        return false;
    };
    t.rebuild(&[]);
    t.header().evictions.store(0, Relaxed);
    t.header().reset_at.store(now, Relaxed);
    true
}

// The file a clean shutdown leaves (pg_stat/, beside pg_stat_statements'),
// read back and removed at the next start; a crash leaves none, so its
// counts are dropped. A file written by a build whose entry layout or
// reason list differs is ignored.
const FILE: &str = "pg_stat/flux_entitlements.stat";
const MAGIC: &[u8; 8] = b"FLXSTAT1";

fn fingerprint() -> u64 {
    let words = crate::model::Reason::WORDS.join(",");
    xxhash_rust::xxh3::xxh3_64(
        format!("{words}/{}/{NAME}", std::mem::size_of::<Entry>()).as_bytes(),
    )
}

/// Write every entry (from the postmaster's on_shmem_exit, after a clean
/// shutdown: no backend is left to change them).
pub fn dump() -> std::io::Result<()> {
    let Some(t) = Locked::try_take_all() else {
        return Err(std::io::Error::other(
            "the table was locked by a backend that did not finish",
        ));
    };
    let h = t.header();
    let mut buf = Vec::new();
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&fingerprint().to_le_bytes());
    buf.extend_from_slice(&h.evictions.load(Relaxed).to_le_bytes());
    buf.extend_from_slice(&h.reset_at.load(Relaxed).to_le_bytes());
    // Most used first: a smaller flux.stats_max at the next start keeps those.
    let mut live: Vec<&Entry> = t.slots().iter().filter(|e| e.hash != 0).collect();
    live.sort_unstable_by_key(|e| std::cmp::Reverse(e.count.load(Relaxed)));
    buf.extend_from_slice(&(live.len() as u64).to_le_bytes());
    for e in live {
        // SAFETY: an Entry is plain bytes (integers, arrays, atomics).
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (e as *const Entry).cast::<u8>(),
                std::mem::size_of::<Entry>(),
            )
        };
        buf.extend_from_slice(bytes);
    }
    drop(t);
    let tmp = format!("{FILE}.tmp");
    std::fs::write(&tmp, &buf)?;
    std::fs::rename(&tmp, FILE)
}

/// Read back what the last clean shutdown wrote, then remove the file.
/// Returns how many entries were loaded.
pub fn load() -> std::io::Result<usize> {
    let buf = match std::fs::read(FILE) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    std::fs::remove_file(FILE)?;
    let word = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(buf.get(at..at + 8)?.try_into().ok()?))
    };
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a statistics file of this build",
        )
    };
    if buf.get(..8) != Some(&MAGIC[..]) || word(8) != Some(fingerprint()) {
        return Err(bad());
    }
    let (evictions, reset_at, n) = (
        word(16).ok_or_else(bad)?,
        word(24).ok_or_else(bad)? as i64,
        word(32).ok_or_else(bad)? as usize,
    );
    let size = std::mem::size_of::<Entry>();
    if buf.len() != 40 + n.checked_mul(size).ok_or_else(bad)? {
        return Err(bad());
    }
    let Some(mut t) = Locked::try_take_all() else {
        return Ok(0);
    };
    let (max, mask) = (u64::from(t.header().max), t.slots().len() - 1);
    let (mut loaded, mut skipped) = (0, 0);
    for chunk in buf[40..].chunks_exact(size) {
        // SAFETY: `size` bytes written by dump() from an Entry of this
        // layout (the fingerprint says so); read unaligned from the buffer.
        let e: Entry = unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<Entry>()) };
        let valid = e.hash != 0
            && Kind::from_u8(e.kind).is_some()
            && usize::from(e.reason) < crate::model::Reason::WORDS.len()
            && usize::from(e.flen) <= NAME
            && (e.olen == OTHER_NULL || usize::from(e.olen) <= NAME);
        if !valid || t.header().live.load(Relaxed) >= max {
            skipped += 1;
            continue;
        }
        let slots = t.slots_mut();
        let mut i = e.hash as usize & mask;
        while slots[i].hash != 0 {
            i = (i + 1) & mask;
        }
        // SAFETY: an empty slot, overwritten whole, under the exclusive lock.
        unsafe { std::ptr::write(&mut slots[i], e) };
        t.header().live.fetch_add(1, Relaxed);
        loaded += 1;
    }
    t.header().evictions.store(evictions, Relaxed);
    t.header().reset_at.store(reset_at, Relaxed);
    if skipped > 0 {
        pgrx::log!("flux_entitlements: {skipped} saved decision statistics entries were invalid or over flux.stats_max, and dropped");
    }
    Ok(loaded)
}
