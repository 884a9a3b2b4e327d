//! This backend's counts not yet in the shared table, added at the end of
//! each transaction (one shared-lock pass per transaction, not a lock per
//! decision), and what each (tenant, feature) was last decided as: a check
//! counts once per statement, and flux_check's kept answers (which hold
//! only allowed / denied) are counted from it without deciding again.

use super::key::{Key, Kind};
use crate::model::Reason;
use std::collections::HashMap;

/// Which statement: (local transaction, client command start, statements
/// parsed), see stats::statement.
pub type Statement = (u32, i64, u64);

/// A (tenant, feature) as last decided in this backend.
struct Seen {
    decision: u32,
    denial: Option<u32>,
    /// The statement it was last counted in.
    counted: Statement,
}

/// The keys of a (tenant, feature)'s last consume.
struct Consumed {
    reason: Reason,
    plan: Option<Box<str>>,
    decision: u32,
    denial: Option<u32>,
}

/// Keys pending before a flush mid-transaction (see must_flush).
const FLUSH_AT: usize = 512;

/// Past these, the maps start over after a flush (memory stays bounded).
const MAX_KEYS: usize = 10_000;
const MAX_SEEN: usize = 100_000;

/// A kept answer's reference to its Seen record (see `Local::checked`):
/// the epoch of the records in the high 32 bits, the record + 1 in the low.
/// 0: none.
pub type Mark = u64;

#[derive(Default)]
pub struct Local {
    /// This backend's database (set before each use).
    pub db: u32,
    keys: Vec<(Key, u64)>,
    index: HashMap<Key, u32>,
    dirty: Vec<u32>,
    seen: Vec<Seen>,
    /// By a 128-bit hash of (which, feature, tenant): names are not kept
    /// whole here (a 1 MB name would be, once per map).
    seen_index: HashMap<u128, u32>,
    consumes: HashMap<u128, Consumed>,
    /// Bumped when `seen` starts over: older marks no longer apply.
    epoch: u32,
    scratch: Vec<u8>,
}

impl Local {
    fn intern(&mut self, k: Key) -> u32 {
        if let Some(&i) = self.index.get(&k) {
            return i;
        }
        let i = self.keys.len() as u32;
        self.keys.push((k.clone(), 0));
        self.index.insert(k, i);
        i
    }

    fn bump(&mut self, i: u32) {
        let n = &mut self.keys[i as usize].1;
        if *n == 0 {
            self.dirty.push(i);
        }
        *n += 1;
    }

    fn keys_of(
        &mut self,
        tenant: &[u8],
        feature: &[u8],
        plan: Option<&str>,
        reason: Reason,
        allowed: bool,
    ) -> (u32, Option<u32>) {
        let d = self.intern(Key::new(
            self.db,
            Kind::Decision,
            reason,
            feature,
            plan.map(str::as_bytes),
        ));
        let n = (!allowed).then(|| {
            self.intern(Key::new(
                self.db,
                Kind::Denial,
                reason,
                feature,
                Some(tenant),
            ))
        });
        (d, n)
    }

    fn count(&mut self, decision: u32, denial: Option<u32>) {
        self.bump(decision);
        if let Some(n) = denial {
            self.bump(n);
        }
    }

    /// A check's decision in statement `stmt`: counted unless this
    /// (tenant, feature) was already counted in it. `alone`: the tenant's
    /// decision alone (no key or subject applied; those are recorded
    /// apart, so a kept answer never counts as one). Returns the mark a
    /// kept answer of this decision holds, for `rechecked`.
    #[allow(clippy::too_many_arguments)]
    pub fn checked(
        &mut self,
        tenant: &[u8],
        feature: &[u8],
        plan: Option<&str>,
        reason: Reason,
        allowed: bool,
        alone: bool,
        stmt: Statement,
    ) -> Mark {
        let (decision, denial) = self.keys_of(tenant, feature, plan, reason, allowed);
        // 0xff never occurs in UTF-8: the boundary is unambiguous.
        self.scratch.clear();
        self.scratch.push(u8::from(alone));
        self.scratch.extend_from_slice(feature);
        self.scratch.push(0xff);
        self.scratch.extend_from_slice(tenant);
        let h = xxhash_rust::xxh3::xxh3_128(&self.scratch);
        let id = match self.seen_index.get(&h) {
            Some(&id) => id,
            None => {
                if self.seen.len() >= MAX_SEEN {
                    self.forget_seen();
                }
                let id = self.seen.len() as u32;
                self.seen.push(Seen {
                    decision,
                    denial,
                    counted: (0, i64::MIN, 0),
                });
                self.seen_index.insert(h, id);
                id
            }
        };
        let s = &mut self.seen[id as usize];
        let again = s.counted == stmt;
        (s.decision, s.denial, s.counted) = (decision, denial, stmt);
        if !again {
            self.count(decision, denial);
        }
        u64::from(self.epoch) << 32 | u64::from(id + 1)
    }

    fn forget_seen(&mut self) {
        self.seen.clear();
        self.seen_index.clear();
        self.consumes.clear();
        self.epoch = self.epoch.wrapping_add(1);
    }

    /// A kept answer, counted as the decision its mark refers to. False
    /// when the mark is none or out of date (decide anew).
    #[inline]
    pub fn rechecked(&mut self, mark: Mark, stmt: Statement) -> bool {
        if mark == 0 || (mark >> 32) as u32 != self.epoch {
            return false;
        }
        let Some(s) = self.seen.get_mut((mark as u32 as usize).wrapping_sub(1)) else {
            return false;
        };
        if s.counted != stmt {
            s.counted = stmt;
            let (d, n) = (s.decision, s.denial);
            self.count(d, n);
        }
        true
    }

    /// A consume's decision: every one counts. The keys of the last
    /// decision for this (tenant, feature) are reused when its reason and
    /// plan are the same (no key built or hashed on a repeat).
    pub fn consumed(
        &mut self,
        tenant: &[u8],
        feature: &[u8],
        plan: Option<&str>,
        reason: Reason,
        allowed: bool,
    ) {
        self.scratch.clear();
        self.scratch.push(2);
        self.scratch.extend_from_slice(feature);
        self.scratch.push(0xff);
        self.scratch.extend_from_slice(tenant);
        let h = xxhash_rust::xxh3::xxh3_128(&self.scratch);
        if let Some(m) = self.consumes.get(&h) {
            if m.reason == reason && m.plan.as_deref() == plan {
                let (d, n) = (m.decision, m.denial);
                self.count(d, n);
                return;
            }
        }
        let (decision, denial) = self.keys_of(tenant, feature, plan, reason, allowed);
        if self.consumes.len() >= MAX_SEEN {
            self.consumes.clear();
        }
        self.consumes.insert(
            h,
            Consumed {
                reason,
                plan: plan.map(Into::into),
                decision,
                denial,
            },
        );
        self.count(decision, denial);
    }

    pub fn has_pending(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// So many keys pending that they are added now, mid-transaction: one
    /// transaction's end never holds the shared table for long, and its
    /// keys' memory is bounded.
    pub fn must_flush(&self) -> bool {
        self.dirty.len() >= FLUSH_AT
    }

    /// The counts not yet added, passed to `add`, and a reset of them.
    pub fn drain(&mut self, add: impl FnOnce(&mut dyn Iterator<Item = (&Key, u64)>)) {
        if self.dirty.is_empty() {
            return;
        }
        let keys = &self.keys;
        add(&mut self.dirty.iter().map(|&i| {
            let (k, n) = &keys[i as usize];
            (k, *n)
        }));
        for &i in &self.dirty {
            self.keys[i as usize].1 = 0;
        }
        self.dirty.clear();
        if self.keys.len() > MAX_KEYS {
            // Seen records point into keys.
            self.keys.clear();
            self.index.clear();
            self.forget_seen();
        }
    }

    /// Forget the counts not yet added (flux_stats_reset).
    pub fn discard(&mut self) {
        self.drain(|_| ());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(l: &mut Local) -> Vec<(Kind, String, Option<String>, u64)> {
        let mut out = Vec::new();
        l.drain(|b| {
            for (k, n) in b {
                out.push((
                    k.kind,
                    String::from_utf8(k.feature.to_vec()).unwrap(),
                    k.other
                        .as_ref()
                        .map(|o| String::from_utf8(o.to_vec()).unwrap()),
                    n,
                ));
            }
        });
        out.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
        out
    }

    #[test]
    fn a_check_counts_once_per_statement() {
        let mut l = Local::default();
        let mut mark = 0;
        for _ in 0..3 {
            mark = l.checked(
                b"acme",
                b"export",
                Some("starter"),
                Reason::NotInPlan,
                false,
                true,
                (1, 10, 0),
            );
        }
        assert!(l.rechecked(mark, (1, 10, 0)));
        // The next statement counts again, from the kept answer.
        assert!(l.rechecked(mark, (1, 11, 0)));
        assert!(l.rechecked(mark, (1, 11, 0)));
        assert!(!l.rechecked(0, (1, 12, 0)));
        assert_eq!(
            pending(&mut l),
            vec![
                (Kind::Decision, "export".into(), Some("starter".into()), 2),
                (Kind::Denial, "export".into(), Some("acme".into()), 2),
            ]
        );
        assert!(pending(&mut l).is_empty());
        // A new decision for the same pair replaces what the mark counts.
        let again = l.checked(
            b"acme",
            b"export",
            Some("pro"),
            Reason::Ok,
            true,
            true,
            (1, 13, 0),
        );
        assert_eq!(again, mark);
        assert!(l.rechecked(mark, (1, 14, 0)));
        assert_eq!(
            pending(&mut l),
            vec![(Kind::Decision, "export".into(), Some("pro".into()), 2)]
        );
        // Once the records start over, old marks no longer count.
        l.forget_seen();
        assert!(!l.rechecked(mark, (1, 15, 0)));
    }

    #[test]
    fn consumes_count_each_and_keyed_checks_are_recorded_apart() {
        let mut l = Local::default();
        for _ in 0..4 {
            l.consumed(b"acme", b"api", Some("pro"), Reason::Ok, true);
        }
        l.consumed(b"acme", b"api", Some("pro"), Reason::LimitReached, false);
        let alone = l.checked(
            b"acme",
            b"api",
            Some("pro"),
            Reason::Ok,
            true,
            true,
            (2, 1, 0),
        );
        let keyed = l.checked(
            b"acme",
            b"api",
            Some("pro"),
            Reason::NotPermitted,
            false,
            false,
            (2, 1, 0),
        );
        assert_ne!(alone, keyed);
        // The tenant's kept answer still counts as the tenant's decision.
        assert!(l.rechecked(alone, (2, 2, 0)));
        let p = pending(&mut l);
        assert_eq!(p.len(), 5, "{p:?}");
        assert!(p.contains(&(Kind::Decision, "api".into(), Some("pro".into()), 4 + 2)));
        assert!(p.contains(&(Kind::Denial, "api".into(), Some("acme".into()), 1)));
    }

    #[test]
    fn tenant_and_feature_boundary_is_kept() {
        let mut l = Local::default();
        let a = l.checked(
            b"ab",
            b"c",
            None,
            Reason::UnknownTenant,
            false,
            true,
            (1, 1, 0),
        );
        let b = l.checked(
            b"b",
            b"ca",
            None,
            Reason::UnknownTenant,
            false,
            true,
            (1, 1, 0),
        );
        assert_ne!(a, b);
    }
}
