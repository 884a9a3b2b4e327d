//! Level 3 of the cache: flux_check's answers, in a compact table per
//! feature (see Answers).

use crate::backend;

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
pub(super) struct Answers {
    pub(super) stamp: Stamp,
    /// The clock when flux.now is set (fixed until the settings change);
    /// None: the transaction's start.
    pub(super) clock: Option<i64>,
    /// Every kept answer holds for clocks in [from, until) (the
    /// intersection of their steady windows, see decision::steady_window).
    pub(super) from: i64,
    pub(super) until: i64,
    pub(super) len: usize,
    /// By feature; a statement usually asks about one, so the last one used
    /// is tried first.
    pub(super) by_feature: Vec<(Box<[u8]>, TenantAnswers)>,
    pub(super) last: usize,
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
pub(super) struct TenantAnswers {
    slots: SlotArray,
    len: usize,
    ids: Vec<u8>,
    /// Beside each slot, the decision statistics' mark of its answer
    /// (stats::Mark: what a kept answer counts as); empty until one is set,
    /// so without statistics the table is as small as before.
    marks: Vec<u64>,
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

    /// The answer kept for `id`, and its mark (0: none).
    #[inline]
    pub(super) fn get(&self, id: &[u8]) -> Option<(bool, u64)> {
        if self.slots.is_empty() {
            return None;
        }
        let i = self.probe(id, xxhash_rust::xxh3::xxh3_64(id));
        let s = self.slots[i];
        (s != 0).then(|| (s & ANSWER == 2, self.marks.get(i).copied().unwrap_or(0)))
    }

    fn set_mark(&mut self, i: usize, mark: u64) {
        if mark != 0 && self.marks.is_empty() {
            self.marks = vec![0; self.slots.len()];
        }
        if let Some(m) = self.marks.get_mut(i) {
            *m = mark;
        }
    }

    /// Insert; false when it was there (its mark is then replaced) or the
    /// id is too long to keep.
    pub(super) fn insert(&mut self, id: &[u8], allowed: bool, mark: u64) -> bool {
        let (Ok(at), Ok(_)) = (u32::try_from(self.ids.len()), u8::try_from(id.len())) else {
            return false;
        };
        if (self.len + 1) * 8 > self.slots.len() * 7 {
            self.grow();
        }
        let hash = xxhash_rust::xxh3::xxh3_64(id);
        let i = self.probe(id, hash);
        if self.slots[i] != 0 {
            self.set_mark(i, mark);
            return false;
        }
        let mut s = key_bits(id, hash) | if allowed { 2 } else { 1 };
        if id.len() > INLINE_MAX {
            s |= u64::from(at) << 32;
            self.ids.extend_from_slice(id);
        }
        self.slots[i] = s;
        self.set_mark(i, mark);
        self.len += 1;
        true
    }

    fn grow(&mut self) {
        let n = (self.slots.len() * 2).max(64);
        let old = std::mem::replace(&mut self.slots, SlotArray::new(n));
        let old_marks = std::mem::take(&mut self.marks);
        if !old_marks.is_empty() {
            self.marks = vec![0; n];
        }
        // The ids are distinct: each goes to the first empty slot from its
        // hash, without comparing ids.
        let mask = n - 1;
        for (j, &s) in old.iter().enumerate().filter(|&(_, &s)| s != 0) {
            let mut i = self.hash_of(s) as usize & mask;
            while self.slots[i] != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = s;
            if let Some(&m) = old_marks.get(j) {
                self.marks[i] = m;
            }
        }
    }

    pub(super) fn clear(&mut self) {
        self.slots = SlotArray::empty();
        self.len = 0;
        self.ids.clear();
        self.marks = Vec::new();
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
    const fn empty() -> Self {
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
    pub(super) const fn empty() -> Answers {
        Answers {
            stamp: Stamp {
                epoch: 0,
                settings: 0,
            },
            clock: None,
            from: 0,
            until: 0,
            len: 0,
            by_feature: Vec::new(),
            last: 0,
        }
    }

    #[inline]
    pub(super) fn feature(&mut self, feature: &[u8]) -> Option<usize> {
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
pub(super) const ANSWERS_PER_TENANT: usize = 8;

/// What an answer was decided from, besides the clock: the cache's
/// contents and the settings it depends on (flux.now,
/// flux.default_grace_period).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Stamp {
    pub(super) epoch: u64,
    pub(super) settings: u64,
}

impl Answers {
    /// Whether the kept answers hold now.
    pub(super) fn hold(&self, stamp: Stamp) -> bool {
        self.hold_at(stamp, backend::transaction_start())
    }

    /// `hold`, given the transaction's start.
    #[inline]
    pub(super) fn hold_at(&self, stamp: Stamp, xact_start: i64) -> bool {
        let now = self.clock.unwrap_or(xact_start);
        self.stamp == stamp && self.from <= now && now < self.until
    }
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

    impl TenantAnswers {
        fn get0(&self, id: &[u8]) -> Option<bool> {
            self.get(id).map(|a| a.0)
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
            assert_eq!(t.get(id.as_bytes()).map(|a| a.0), None);
            assert!(t.insert(id.as_bytes(), i % 3 == 0, i as u64 + 1));
            assert!(
                !t.insert(id.as_bytes(), i % 3 != 0, i as u64 + 1),
                "kept twice: {id}"
            );
        }
        // Every answer kept its mark through the table's growth.
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(
                t.get(id.as_bytes()),
                Some((i % 3 == 0, i as u64 + 1)),
                "{id}"
            );
        }
        assert_eq!(t.get0(b"tenant-20000"), None);
        assert_eq!(t.get0(b"20000"), None);
        assert_eq!(t.get0(b"tenant-1"), None);
        assert_eq!(t.get0(b""), None);
        assert!(t.insert(b"", true, 0));
        assert_eq!(t.get0(b""), Some(true));
        // Ids too long to keep are refused, not truncated.
        let long = vec![b'x'; 300];
        assert!(!t.insert(&long, true, 0));
        assert_eq!(t.get0(&long), None);
        t.clear();
        assert_eq!(t.get0(b"tenant-1"), None);
        assert!(t.insert(b"tenant-1", false, 0));
        assert_eq!(t.get0(b"tenant-1"), Some(false));
    }
}
