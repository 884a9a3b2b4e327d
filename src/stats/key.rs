//! What is counted: a decision by (feature, plan, reason), a denial by
//! (tenant, feature, reason). Plain Rust.

use crate::model::Reason;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Decision = 1,
    Denial = 2,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Decision),
            2 => Some(Kind::Denial),
            _ => None,
        }
    }
}

/// `olen` of an entry without a plan.
pub const OTHER_NULL: u8 = u8::MAX;

/// A counted key: `other` is the plan of a decision (None: an unknown
/// tenant's) or the tenant of a denial. Names are kept to their first
/// shared::NAME bytes (what the shared table keeps); `hash` covers them
/// whole, so two long names with the same start stay apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// The database the decision was made in (each database has its own
    /// catalogue of features and plans).
    pub db: u32,
    pub kind: Kind,
    pub reason: u8,
    pub feature: Box<[u8]>,
    pub other: Option<Box<[u8]>>,
    /// Bit 0: the feature was cut; bit 1: the plan or tenant was.
    pub cut: u8,
    pub hash: u64,
}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash)
    }
}

pub fn reason_index(r: Reason) -> u8 {
    Reason::ALL.iter().position(|x| *x == r).unwrap_or(0) as u8
}

pub fn reason_word(i: u8) -> &'static str {
    Reason::WORDS.get(usize::from(i)).copied().unwrap_or("?")
}

impl Key {
    pub fn new(db: u32, kind: Kind, reason: Reason, feature: &[u8], other: Option<&[u8]>) -> Key {
        let reason = reason_index(reason);
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&db.to_le_bytes());
        h.update(&[kind as u8, reason]);
        h.update(&(feature.len() as u64).to_le_bytes());
        h.update(feature);
        match other {
            Some(o) => {
                h.update(&[1]);
                h.update(o);
            }
            None => h.update(&[0]),
        }
        // 0 marks an empty slot.
        let hash = h.digest().max(1);
        let (f, fcut) = super::shared::kept(feature);
        let o = other.map(super::shared::kept);
        Key {
            db,
            kind,
            reason,
            feature: f.into(),
            other: o.map(|(o, _)| o.into()),
            cut: u8::from(fcut) | u8::from(o.is_some_and(|(_, c)| c)) << 1,
            hash,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_by_every_part() {
        let base = Key::new(5, Kind::Decision, Reason::Ok, b"export", Some(b"pro"));
        for other in [
            Key::new(5, Kind::Denial, Reason::Ok, b"export", Some(b"pro")),
            Key::new(
                5,
                Kind::Decision,
                Reason::NotInPlan,
                b"export",
                Some(b"pro"),
            ),
            Key::new(5, Kind::Decision, Reason::Ok, b"exporter", Some(b"pro")),
            Key::new(5, Kind::Decision, Reason::Ok, b"export", Some(b"pr")),
            Key::new(5, Kind::Decision, Reason::Ok, b"export", None),
            Key::new(5, Kind::Decision, Reason::Ok, b"export", Some(b"")),
            Key::new(6, Kind::Decision, Reason::Ok, b"export", Some(b"pro")),
            // The boundary between the two names is part of the hash.
            Key::new(5, Kind::Decision, Reason::Ok, b"expor", Some(b"tpro")),
        ] {
            assert_ne!(base, other);
            assert_ne!(base.hash, other.hash, "{other:?}");
        }
        assert_eq!(
            base,
            Key::new(5, Kind::Decision, Reason::Ok, b"export", Some(b"pro"))
        );
    }

    #[test]
    fn reasons_round_trip() {
        for r in Reason::ALL {
            assert_eq!(reason_word(reason_index(*r)), r.as_str());
        }
    }
}
