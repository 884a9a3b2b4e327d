//! This backend's counts not yet in the shared table, added at the end of
//! each transaction (one shared-lock pass per transaction, not a lock per
//! decision), and what each (tenant, feature) was last decided as: a check
//! counts once per statement, and flux_check's kept answers (which hold
//! only allowed / denied) are counted from it without deciding again.

use super::key::{Key, Kind};
use crate::model::Reason;
use std::collections::HashMap;

/// A (tenant, feature) as last decided in this backend.
struct Seen {
    /// The cache's answers generation it was decided under (cache.rs), so
    /// that a kept answer of that generation is this decision; NO_GEN: a
    /// decision that is not the tenant's alone (a key or subject applied).
    generation: u64,
    decision: u32,
    denial: Option<u32>,
    /// The statement it was last counted in.
    counted: (u32, i64),
}

pub const NO_GEN: u64 = u64::MAX;

/// Past these, the maps start over after a flush (memory stays bounded).
const MAX_KEYS: usize = 10_000;
const MAX_SEEN: usize = 100_000;

#[derive(Default)]
pub struct Local {
    /// This backend's database (set before each use).
    pub db: u32,
    keys: Vec<(Key, u64)>,
    index: HashMap<Key, u32>,
    dirty: Vec<u32>,
    seen: HashMap<Box<[u8]>, Seen, xxhash_rust::xxh3::Xxh3Builder>,
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

    fn seen_key(&mut self, tenant: &[u8], feature: &[u8]) {
        // 0xff never occurs in UTF-8: the boundary is unambiguous.
        self.scratch.clear();
        self.scratch.extend_from_slice(feature);
        self.scratch.push(0xff);
        self.scratch.extend_from_slice(tenant);
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
        let n =
            (!allowed).then(|| self.intern(Key::new(self.db, Kind::Denial, reason, feature, Some(tenant))));
        (d, n)
    }

    /// A check's decision in statement `stmt`: counted unless this
    /// (tenant, feature) was already counted in it.
    #[allow(clippy::too_many_arguments)]
    pub fn checked(
        &mut self,
        tenant: &[u8],
        feature: &[u8],
        plan: Option<&str>,
        reason: Reason,
        allowed: bool,
        generation: u64,
        stmt: (u32, i64),
    ) {
        let (decision, denial) = self.keys_of(tenant, feature, plan, reason, allowed);
        self.seen_key(tenant, feature);
        let counted = match self.seen.get_mut(&self.scratch[..]) {
            Some(s) => {
                let again = s.counted == stmt;
                *s = Seen {
                    generation,
                    decision,
                    denial,
                    counted: stmt,
                };
                again
            }
            None => {
                if self.seen.len() >= MAX_SEEN {
                    self.seen.clear();
                }
                let k: Box<[u8]> = self.scratch[..].into();
                self.seen.insert(
                    k,
                    Seen {
                        generation,
                        decision,
                        denial,
                        counted: stmt,
                    },
                );
                false
            }
        };
        if !counted {
            self.count(decision, denial);
        }
    }

    fn count(&mut self, decision: u32, denial: Option<u32>) {
        self.bump(decision);
        if let Some(n) = denial {
            self.bump(n);
        }
    }

    /// A kept answer of `generation`: counted from the decision behind it.
    /// False when this backend does not have that decision (decide anew).
    pub fn rechecked(
        &mut self,
        tenant: &[u8],
        feature: &[u8],
        generation: u64,
        stmt: (u32, i64),
    ) -> bool {
        self.seen_key(tenant, feature);
        let Some(s) = self.seen.get_mut(&self.scratch[..]) else {
            return false;
        };
        if s.generation != generation || generation == NO_GEN {
            return false;
        }
        if s.counted != stmt {
            s.counted = stmt;
            let (d, n) = (s.decision, s.denial);
            self.count(d, n);
        }
        true
    }

    /// A consume's decision: every one counts.
    pub fn consumed(
        &mut self,
        tenant: &[u8],
        feature: &[u8],
        plan: Option<&str>,
        reason: Reason,
        allowed: bool,
    ) {
        let (d, n) = self.keys_of(tenant, feature, plan, reason, allowed);
        self.count(d, n);
    }

    /// The counts not yet added, and a reset of them.
    pub fn drain(&mut self, mut add: impl FnMut(&[(&Key, u64)])) {
        if self.dirty.is_empty() {
            return;
        }
        let batch: Vec<(&Key, u64)> = self
            .dirty
            .iter()
            .map(|&i| {
                let (k, n) = &self.keys[i as usize];
                (k, *n)
            })
            .collect();
        add(&batch);
        for &i in &self.dirty {
            self.keys[i as usize].1 = 0;
        }
        self.dirty.clear();
        if self.keys.len() > MAX_KEYS {
            // Seen entries point into keys.
            self.keys.clear();
            self.index.clear();
            self.seen.clear();
        }
    }

    /// Forget the counts not yet added (flux_stats_reset).
    pub fn discard(&mut self) {
        self.drain(|_| {});
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
                    *n,
                ));
            }
        });
        out.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
        out
    }

    #[test]
    fn a_check_counts_once_per_statement() {
        let mut l = Local::default();
        for _ in 0..3 {
            l.checked(
                b"acme",
                b"export",
                Some("starter"),
                Reason::NotInPlan,
                false,
                7,
                (1, 10),
            );
        }
        assert!(l.rechecked(b"acme", b"export", 7, (1, 10)));
        // The next statement counts again, from the kept answer.
        assert!(l.rechecked(b"acme", b"export", 7, (1, 11)));
        assert!(l.rechecked(b"acme", b"export", 7, (1, 11)));
        // Another generation of answers: this decision may be stale.
        assert!(!l.rechecked(b"acme", b"export", 8, (1, 12)));
        assert!(!l.rechecked(b"globex", b"export", 7, (1, 12)));
        assert_eq!(
            pending(&mut l),
            vec![
                (Kind::Decision, "export".into(), Some("starter".into()), 2),
                (Kind::Denial, "export".into(), Some("acme".into()), 2),
            ]
        );
        assert!(pending(&mut l).is_empty());
    }

    #[test]
    fn consumes_count_each_and_keyed_checks_are_not_reused() {
        let mut l = Local::default();
        for _ in 0..4 {
            l.consumed(b"acme", b"api", Some("pro"), Reason::Ok, true);
        }
        l.consumed(b"acme", b"api", Some("pro"), Reason::LimitReached, false);
        l.checked(
            b"acme",
            b"api",
            Some("pro"),
            Reason::NotPermitted,
            false,
            NO_GEN,
            (2, 1),
        );
        assert!(!l.rechecked(b"acme", b"api", NO_GEN, (2, 2)));
        let p = pending(&mut l);
        assert_eq!(p.len(), 5, "{p:?}");
        assert!(p.contains(&(Kind::Decision, "api".into(), Some("pro".into()), 4)));
        assert!(p.contains(&(Kind::Denial, "api".into(), Some("acme".into()), 1)));
    }

    #[test]
    fn tenant_and_feature_boundary_is_kept() {
        let mut l = Local::default();
        l.checked(b"ab", b"c", None, Reason::UnknownTenant, false, 1, (1, 1));
        assert!(!l.rechecked(b"b", b"ca", 1, (1, 2)));
        assert!(l.rechecked(b"ab", b"c", 1, (1, 2)));
    }
}
