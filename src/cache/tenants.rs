//! Level 2 of the cache: tenants (subscription, addons, overrides), in a
//! bounded LRU, each entry stamped with its invalidation bucket's
//! generation when it was loaded. An invalidation of the bucket bumps the
//! generation (invalidation.rs), so the entry is loaded again when next
//! asked for, and the other tenants stay.

use super::invalidation::BUCKETS;
use super::loads::TenantEntry;
use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;

/// Per bucket: bumped by every invalidation of its tenants.
pub type Generations = [Cell<u32>; BUCKETS];

/// A cached tenant: None when it does not exist (a flood of checks for an
/// unknown id costs one probe, until a tenant change says otherwise).
struct Held {
    entry: Option<Rc<TenantEntry>>,
    bucket: u16,
    generation: u32,
}

/// Two generations approximate LRU in O(1). Lookups promote an entry from
/// the old generation to the young; when the young one holds half the
/// capacity, the old is dropped and the young becomes old, so at most
/// `flux.cache_tenants` tenants are held and the recently used stay.
#[derive(Default)]
pub struct TenantLru {
    young: HashMap<Box<str>, Held>,
    old: HashMap<Box<str>, Held>,
}

impl TenantLru {
    pub fn clear(&mut self) {
        self.young.clear();
        self.old.clear();
    }

    /// The entry for `id` when it is held and its bucket has not been
    /// invalidated since it was loaded.
    pub fn get(
        &mut self,
        id: &str,
        capacity: usize,
        generations: &Generations,
    ) -> Option<Option<Rc<TenantEntry>>> {
        let current = |h: &Held| generations[h.bucket as usize].get() == h.generation;
        if let Some(h) = self.young.get(id) {
            if current(h) {
                return Some(h.entry.clone());
            }
            self.young.remove(id);
            return None;
        }
        let h = self.old.remove(id)?;
        if !current(&h) {
            return None;
        }
        let e = h.entry.clone();
        self.insert(id.into(), h, capacity);
        Some(e)
    }

    /// Keep `entry`, loaded when its bucket (`bucket(id)`) had generation
    /// `generation` (read before the load's snapshot was taken: an
    /// invalidation read after it makes the entry stale at its next lookup).
    pub fn put(
        &mut self,
        id: &str,
        entry: Option<Rc<TenantEntry>>,
        (bucket, generation): (usize, u32),
        capacity: usize,
    ) {
        let h = Held {
            entry,
            bucket: bucket as u16,
            generation,
        };
        self.insert(id.into(), h, capacity);
    }

    fn insert(&mut self, id: Box<str>, h: Held, capacity: usize) {
        let half = (capacity / 2).max(1);
        if self.young.len() >= half {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(id, h);
    }

    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::invalidation::bucket;
    use super::*;

    fn generations() -> Generations {
        [const { Cell::new(0) }; BUCKETS]
    }

    #[test]
    fn an_invalidated_bucket_forgets_only_its_tenants() {
        let g = generations();
        let mut lru = TenantLru::default();
        let ids: Vec<String> = (0..500).map(|i| format!("tenant-{i}")).collect();
        for id in &ids {
            lru.put(id, None, (bucket(id.as_bytes()), 0), 10_000);
        }
        let changed = bucket(ids[7].as_bytes());
        g[changed].set(1);
        for id in &ids {
            let held = lru.get(id, 10_000, &g).is_some();
            assert_eq!(held, bucket(id.as_bytes()) != changed, "{id}");
        }
        // Loaded again under the new generation, it is held again.
        lru.put(&ids[7], None, (changed, 1), 10_000);
        assert!(lru.get(&ids[7], 10_000, &g).is_some());
        // An entry loaded before an invalidation read during its load is
        // stale at once.
        lru.put(&ids[7], None, (changed, 0), 10_000);
        assert!(lru.get(&ids[7], 10_000, &g).is_none());
    }

    #[test]
    fn the_lru_holds_at_most_its_capacity_and_keeps_the_recently_used() {
        let g = generations();
        let mut lru = TenantLru::default();
        for i in 0..10_000 {
            let id = format!("t{i}");
            lru.put(&id, None, (bucket(id.as_bytes()), 0), 1_000);
            // t0 is asked for all along.
            assert!(lru.get("t0", 1_000, &g).is_some());
            assert!(lru.len() <= 1_000);
        }
        assert!(lru.get("t9999", 1_000, &g).is_some());
        assert!(lru.get("t5", 1_000, &g).is_none());
    }
}
