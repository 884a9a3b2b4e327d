//! Deterministic percentage rollouts.
//!
//! The formula is a compatibility promise (README, "Rollouts"): changing it
//! would silently move users in or out of every rollout, so the tests pin
//! known ids to known buckets.
//!
//!   bucket(salt, id) = xxh3_64(utf8(salt) || 0x00 || utf8(id)) mod 1_000_000
//!   in rollout       = bucket < rollout_percent x 10_000
//!
//! 1,000,000 buckets give a resolution of 0.0001 percent; the NUL separator
//! cannot occur in PostgreSQL text, so (salt, id) pairs never collide by
//! concatenation. Raising the percentage only raises the threshold, so it
//! only adds ids (monotonic).

use crate::error::{FluxError, FluxResult};
use xxhash_rust::xxh3::xxh3_64;

pub const BUCKETS: u64 = 1_000_000;

pub fn bucket(salt: &str, id: &str) -> u32 {
    let mut input = Vec::with_capacity(salt.len() + id.len() + 1);
    input.extend_from_slice(salt.as_bytes());
    input.push(0);
    input.extend_from_slice(id.as_bytes());
    (xxh3_64(&input) % BUCKETS) as u32
}

/// The bucket threshold for a percentage given as decimal text (as
/// PostgreSQL prints a numeric): 0..=100 with at most 4 decimal places.
pub fn threshold(percent: &str) -> FluxResult<u32> {
    let bad = |why: &str| {
        FluxError::InvalidValue(format!(
            "rollout_percent {percent} {why}: expected a number from 0 to 100 with at most 4 decimal places (e.g. 0.5 or 12.25)"
        ))
    };
    let p = percent.trim();
    let (int, frac) = p.split_once('.').unwrap_or((p, ""));
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad("is out of range"));
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > 4 {
        return Err(bad("is too precise"));
    }
    let int: u64 = int.parse().map_err(|_| bad("is out of range"))?;
    let frac_units: u64 = format!("{frac:0<4}").parse().unwrap_or(0);
    let units = int.saturating_mul(10_000).saturating_add(frac_units);
    if units > BUCKETS {
        return Err(bad("is out of range"));
    }
    Ok(units as u32)
}

pub fn in_rollout(salt: &str, id: &str, threshold: u32) -> bool {
    bucket(salt, id) < threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned: if this fails, the change re-buckets every user of every
    /// rollout. Do not update these numbers; keep the formula.
    #[test]
    fn pinned_buckets() {
        let got: Vec<u32> = [
            ("export", "acme"),
            ("export", "globex"),
            ("analytics", "acme"),
            ("analytics", "user-1"),
            ("", ""),
        ]
        .iter()
        .map(|(s, i)| bucket(s, i))
        .collect();
        assert_eq!(got, PINNED);
    }
    // Computed independently with Python's xxhash package:
    // xxhash.xxh3_64_intdigest(salt + b'\x00' + id) % 1_000_000
    const PINNED: [u32; 5] = [730_021, 134_325, 616_601, 704_720, 801_883];

    #[test]
    fn thresholds() {
        assert_eq!(threshold("0").unwrap(), 0);
        assert_eq!(threshold("100").unwrap(), 1_000_000);
        assert_eq!(threshold("100.0000").unwrap(), 1_000_000);
        assert_eq!(threshold("0.5").unwrap(), 5_000);
        assert_eq!(threshold("12.25").unwrap(), 122_500);
        assert_eq!(threshold("0.0001").unwrap(), 1);
        assert!(threshold("100.0001").is_err());
        assert!(threshold("-1").is_err());
        assert!(threshold("0.00001").is_err());
        assert!(threshold("NaN").is_err());
        assert!(threshold("1e3").is_err());
        assert!(threshold("150")
            .unwrap_err()
            .to_string()
            .contains("rollout_percent 150"));
    }

    fn ids(n: usize) -> impl Iterator<Item = String> {
        (0..n).map(|i| format!("tenant-{i}"))
    }

    #[test]
    fn distribution_is_uniform_chi_square() {
        // 100k ids into 100 buckets of 1%: chi-square with 99 degrees of
        // freedom; 148.2 is the 0.999 quantile, so a fair hash fails 1 in 1000
        // runs at most, and this input is fixed, so never flakes.
        let mut counts = [0u32; 100];
        for id in ids(100_000) {
            counts[(bucket("export", &id) / 10_000) as usize] += 1;
        }
        let expected = 1_000.0;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 148.2, "chi-square {chi2}");
    }

    #[test]
    fn monotonic_in_the_percentage() {
        let percents = ["0", "0.5", "1", "12.25", "20", "40", "50", "99.9999", "100"];
        for id in ids(20_000) {
            let mut was_in = false;
            for p in percents {
                let now_in = in_rollout("salt", &id, threshold(p).unwrap());
                assert!(
                    now_in || !was_in,
                    "{id} left the rollout when it grew to {p}%"
                );
                was_in = now_in;
            }
            assert!(was_in, "everyone is in at 100%");
        }
    }

    #[test]
    fn rollout_fractions_and_salt_independence() {
        let n = 100_000;
        let half = threshold("50").unwrap();
        let (mut a, mut b, mut both) = (0, 0, 0);
        for id in ids(n) {
            let in_a = in_rollout("export", &id, half);
            let in_b = in_rollout("analytics", &id, half);
            a += in_a as u32;
            b += in_b as u32;
            both += (in_a && in_b) as u32;
        }
        let frac = |x: u32| x as f64 / n as f64;
        assert!((frac(a) - 0.5).abs() < 0.01 && (frac(b) - 0.5).abs() < 0.01);
        assert!(
            (frac(both) - 0.25).abs() < 0.01,
            "two salts at 50% must be independent: {}",
            frac(both)
        );
        let p = threshold("0.5").unwrap();
        let few = ids(n).filter(|id| in_rollout("export", id, p)).count();
        assert!((300..=700).contains(&few), "0.5% of 100k: {few}");
    }
}
