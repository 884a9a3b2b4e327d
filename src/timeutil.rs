//! Calendar arithmetic on PostgreSQL timestamps (microseconds since
//! 2000-01-01 00:00 UTC), in plain Rust so decision rules can be unit-tested
//! without a backend. All calendar rules here are in UTC.

pub const USECS_PER_SEC: i64 = 1_000_000;
pub const USECS_PER_DAY: i64 = 86_400 * USECS_PER_SEC;

/// A PostgreSQL interval: months, days and microseconds kept apart, as
/// PostgreSQL keeps them ('1 month' is not a fixed number of days).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub months: i32,
    pub days: i32,
    pub micros: i64,
}

impl Span {
    pub const fn days(days: i32) -> Self {
        Span {
            months: 0,
            days,
            micros: 0,
        }
    }
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Days between 1970-01-01 and 2000-01-01, the PostgreSQL epoch.
const PG_EPOCH_DAYS: i64 = 10_957;

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Split a timestamp into (year, month, day, microseconds into the day), UTC.
pub fn to_civil(ts: i64) -> (i64, u32, u32, i64) {
    let days = ts.div_euclid(USECS_PER_DAY);
    let rem = ts.rem_euclid(USECS_PER_DAY);
    let (y, m, d) = civil_from_days(days + PG_EPOCH_DAYS);
    (y, m, d, rem)
}

pub fn from_civil(y: i64, m: u32, d: u32, micros_of_day: i64) -> i64 {
    (days_from_civil(y, m, d) - PG_EPOCH_DAYS) * USECS_PER_DAY + micros_of_day
}

/// `ts + span` as PostgreSQL computes it in UTC: months first (clamping the
/// day to the month's length), then days, then microseconds. Saturates
/// instead of overflowing.
pub fn add_span(ts: i64, span: Span) -> i64 {
    let mut t = ts;
    if span.months != 0 {
        let (y, m, d, rem) = to_civil(t);
        let total = y * 12 + (m as i64 - 1) + span.months as i64;
        let (ny, nm) = (total.div_euclid(12), (total.rem_euclid(12) + 1) as u32);
        let nd = d.min(days_in_month(ny, nm));
        // In i128: a month past the last timestamp (infinity is i64::MAX)
        // saturates instead of wrapping.
        let days = (days_from_civil(ny, nm, nd) - PG_EPOCH_DAYS) as i128;
        let v = days * USECS_PER_DAY as i128 + rem as i128;
        t = v.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
    }
    t.saturating_add((span.days as i64).saturating_mul(USECS_PER_DAY))
        .saturating_add(span.micros)
}

/// Format a timestamp as `YYYY-MM-DD` (UTC), for messages.
pub fn format_date(ts: i64) -> String {
    let (y, m, d, _) = to_civil(ts);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Format a timestamp as `YYYY-MM-DD HH:MM UTC`, for messages.
pub fn format_minute(ts: i64) -> String {
    let (y, m, d, rem) = to_civil(ts);
    let mins = rem / (60 * USECS_PER_SEC);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", mins / 60, mins % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_past_the_last_timestamp_saturate() {
        let month = |months| Span {
            months,
            days: 0,
            micros: 0,
        };
        assert_eq!(add_span(i64::MAX, month(1)), i64::MAX);
        assert_eq!(add_span(i64::MIN, month(-1)), i64::MIN);
        assert_eq!(add_span(0, month(i32::MAX)), i64::MAX);
        assert_eq!(add_span(0, month(i32::MIN)), i64::MIN);
    }

    #[test]
    fn epoch_round_trip() {
        assert_eq!(from_civil(2000, 1, 1, 0), 0);
        assert_eq!(to_civil(0), (2000, 1, 1, 0));
        let t = from_civil(2026, 11, 22, 3_600 * USECS_PER_SEC);
        assert_eq!(to_civil(t), (2026, 11, 22, 3_600 * USECS_PER_SEC));
        assert_eq!(to_civil(-1), (1999, 12, 31, USECS_PER_DAY - 1));
    }

    #[test]
    fn month_addition_clamps_like_postgres() {
        let jan31 = from_civil(2026, 1, 31, 0);
        let span = Span {
            months: 1,
            days: 0,
            micros: 0,
        };
        assert_eq!(to_civil(add_span(jan31, span)), (2026, 2, 28, 0));
        let leap = from_civil(2028, 1, 31, 0);
        assert_eq!(to_civil(add_span(leap, span)), (2028, 2, 29, 0));
        assert_eq!(add_span(jan31, Span::days(7)), from_civil(2026, 2, 7, 0));
    }

    #[test]
    fn formats() {
        let t = from_civil(2026, 12, 1, 90 * 60 * USECS_PER_SEC);
        assert_eq!(format_date(t), "2026-12-01");
        assert_eq!(format_minute(t), "2026-12-01 01:30 UTC");
    }
}
