//! Usage rules as plain Rust: which period a metered quota is in, when it
//! resets, whether an amount fits a limit, and the GCRA rate limiter. The
//! writes are in `counters.rs` (the heap) and `sql.rs` (SQL); both decide
//! with these rules. This module only computes.

use crate::error::{shown, FluxError, FluxResult};
use crate::model::{Decision, Kind, Period, Reason};
use crate::timeutil::{
    add_span, format_date, format_minute, from_civil, to_civil, Span, USECS_PER_DAY, USECS_PER_SEC,
};
use std::fmt::Write;

/// The limit rule, for every write path: `amount` more fits when the total
/// stays within `limit` (None: unlimited).
pub fn fits(limit: Option<i64>, used: i64, amount: i64) -> bool {
    limit.is_none_or(|l| used.saturating_add(amount) <= l)
}

/// The start of the period containing `now` and the start of the next one.
/// Calendar periods are in UTC, weeks start on Monday (ISO). A billing
/// period runs from the tenant's current_period_start to its
/// current_period_end when `now` is inside it, else monthly from that anchor;
/// with no anchor it is the calendar month.
pub fn period_bounds(
    period: Period,
    now: i64,
    anchor: Option<i64>,
    end: Option<i64>,
) -> (i64, i64) {
    let fixed = |len: i64| {
        let start = now - now.rem_euclid(len);
        (start, start + len)
    };
    match period {
        Period::Minute => fixed(60 * USECS_PER_SEC),
        Period::Hour => fixed(3_600 * USECS_PER_SEC),
        Period::Day => fixed(USECS_PER_DAY),
        Period::Week => {
            // 2000-01-01 was a Saturday: Mondays are 2 days later, mod 7.
            let week = 7 * USECS_PER_DAY;
            let monday0 = 2 * USECS_PER_DAY;
            let start = now - (now - monday0).rem_euclid(week);
            (start, start + week)
        }
        Period::Month => {
            let (y, m, _, _) = to_civil(now);
            let start = from_civil(y, m, 1, 0);
            (
                start,
                add_span(
                    start,
                    Span {
                        months: 1,
                        days: 0,
                        micros: 0,
                    },
                ),
            )
        }
        Period::BillingPeriod => match anchor {
            Some(a) if end.is_some_and(|e| a <= now && now < e) => (a, end.unwrap_or(a)),
            Some(a) => {
                // Whole months from the anchor; months are added to the
                // anchor each time so day-of-month clamping does not drift.
                let (ay, am, _, _) = to_civil(a);
                let (ny, nm, _, _) = to_civil(now);
                let mut k = (ny - ay) * 12 + (nm as i64 - am as i64);
                let at = |k: i64| {
                    add_span(
                        a,
                        Span {
                            months: k as i32,
                            days: 0,
                            micros: 0,
                        },
                    )
                };
                while k > i64::from(i32::MIN) && at(k) > now {
                    k -= 1;
                }
                while at(k + 1) <= now {
                    k += 1;
                }
                (at(k), at(k + 1))
            }
            None => period_bounds(Period::Month, now, None, None),
        },
    }
}

/// The outcome of asking the rate limiter for `amount` calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateOutcome {
    pub allowed: bool,
    /// The theoretical arrival time to store when allowed.
    pub new_tat: i64,
    /// Calls counted in the window after this request (before it when denied).
    pub used: i64,
    /// When one more call of this size would pass (denied only).
    pub retry_after: Option<i64>,
    /// When the window is empty again.
    pub resets_at: i64,
}

/// GCRA (the generic cell rate algorithm): `limit` calls per `window`
/// microseconds with a burst of `limit`. State is one timestamp per tenant
/// and feature, the theoretical arrival time (TAT). Each call advances it by
/// the emission interval T = window / limit; a request is allowed when the
/// advanced TAT is no more than one window ahead of now.
pub fn gcra(tat: Option<i64>, now: i64, limit: i64, window: i64, amount: i64) -> RateOutcome {
    let t = (window as i128) / (limit.max(1) as i128);
    let t = t.max(1) as i64;
    let base = tat.unwrap_or(now).max(now);
    let new_tat = base.saturating_add(t.saturating_mul(amount));
    let counted = |tat: i64| ((tat - now).max(0) as u64).div_ceil(t as u64) as i64;
    if limit > 0 && new_tat - now <= window {
        RateOutcome {
            allowed: true,
            new_tat,
            used: counted(new_tat),
            retry_after: None,
            resets_at: new_tat,
        }
    } else {
        let retry = if limit > 0 && amount <= limit {
            Some(new_tat - window - now)
        } else {
            None
        };
        RateOutcome {
            allowed: false,
            new_tat: base,
            used: counted(base),
            retry_after: retry,
            resets_at: base,
        }
    }
}

/// Where a decision's usage is counted: the row of `flux.usage` for a
/// counter, or the rate limiter's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meter {
    /// limit: one row forever (period_start = -infinity).
    Allowance,
    /// metered: one row per period.
    Quota {
        period: Period,
        start: i64,
        end: i64,
    },
    /// rate: GCRA state with this window (microseconds).
    Rate { window: i64 },
}

/// The meter of an allowed decision on a limited feature. `window_micros`
/// turns a rate grant's interval text into microseconds.
pub fn meter_for(
    kind: Kind,
    period: Option<&str>,
    now: i64,
    anchor: Option<i64>,
    end: Option<i64>,
    window_micros: impl Fn(&str) -> Option<i64>,
) -> FluxResult<Option<Meter>> {
    Ok(match kind {
        Kind::Boolean => None,
        Kind::Limit => Some(Meter::Allowance),
        // A pool's allowance is a quota of credits per period.
        Kind::Metered | Kind::Credits => {
            let p = Period::parse(period.unwrap_or("month"))?;
            let (start, end) = period_bounds(p, now, anchor, end);
            Some(Meter::Quota {
                period: p,
                start,
                end,
            })
        }
        Kind::Rate => {
            let text = period.unwrap_or("");
            match window_micros(text) {
                Some(w) if w > 0 => Some(Meter::Rate { window: w }),
                _ => {
                    return Err(FluxError::InvalidValue(format!(
                        "rate window {} of feature is not a positive interval",
                        shown(text)
                    )))
                }
            }
        }
    })
}

fn where_phrase(d: &Decision, meter: Meter) -> std::borrow::Cow<'static, str> {
    match (meter, d.source) {
        (Meter::Quota { period, .. }, _) => period.phrase().into(),
        (_, Some(s)) => s.phrase(d.plan.as_deref()),
        (_, None) => "in total".into(),
    }
}

/// Fill in a counter's figures. `used` is what is recorded now (after the
/// write when consuming); `fits` says whether the request fits the limit;
/// `by` names a caller whose own allowance this is ("the key ci").
pub fn apply_counter(d: &mut Decision, meter: Meter, used: i64, fits: bool, by: Option<&str>) {
    d.used = Some(used);
    d.remaining = d.limit.map(|l| l.saturating_sub(used).max(0));
    if !fits {
        d.allowed = false;
        d.reason = Reason::LimitReached;
    }
    let when = match (by, meter) {
        (Some(who), Meter::Allowance) => format!("by {who}").into(),
        (Some(who), _) => format!("{} by {who}", where_phrase(d, meter)).into(),
        (None, _) => where_phrase(d, meter),
    };
    if let Meter::Quota { end, .. } = meter {
        d.resets_at = Some(end);
    }
    // When it resets is said only to a refused caller (and formatted only
    // then: a calendar date on every call was 3% of flux_consume).
    let resets = || match meter {
        Meter::Quota { period, end, .. } => match period {
            Period::Minute | Period::Hour => format!(", resets {}", format_minute(end)),
            _ => format!(", resets {}", format_date(end)),
        },
        _ => String::new(),
    };
    // Sized once: growing it as format! does was a third of this function.
    let mut m = String::with_capacity(d.feature.len() + when.len() + 64);
    let f = &d.feature;
    let _ = match d.limit {
        None => write!(m, "{f}: {used} used {when} (unlimited)"),
        Some(l) if fits => write!(m, "{f}: {used} of {l} used {when}"),
        Some(l) => write!(m, "{f}: {used} of {l} used {when}{}", resets()),
    };
    d.message = m;
}

/// A soft limit's figures, after apply_counter: `overage` is the units past
/// the limit this period, `remaining` the room under the ceiling (limit +
/// cap; None: no cap), and the message says both.
pub fn apply_overage(d: &mut Decision, used: i64, ceiling: Option<i64>, fits: bool) {
    let Some(limit) = d.limit else {
        return;
    };
    let over = used.saturating_sub(limit).max(0);
    d.overage = Some(over);
    d.remaining = ceiling.map(|c| c.saturating_sub(used).max(0));
    let cap = ceiling.map(|c| c.saturating_sub(limit));
    match (fits, cap) {
        (true, _) if over > 0 => {
            let _ = write!(d.message, ", {over} over");
        }
        (false, Some(cap)) => {
            let _ = write!(
                d.message,
                "; {over} over, and at most {cap} over the limit is allowed"
            );
        }
        _ => {}
    }
}

/// Fill in the rate limiter's figures; `by` as for apply_counter.
pub fn apply_rate(d: &mut Decision, window_text: &str, o: RateOutcome, now: i64, by: Option<&str>) {
    d.used = Some(o.used);
    d.remaining = d.limit.map(|l| l.saturating_sub(o.used).max(0));
    d.resets_at = (o.resets_at > now).then_some(o.resets_at);
    let f = &d.feature;
    let per = match d.limit {
        Some(l) => format!("{l} per {window_text}"),
        None => "unlimited".to_string(),
    };
    let by = by.map(|who| format!(" by {who}")).unwrap_or_default();
    if o.allowed {
        d.message = format!("{f}: {} of {per} used{by}", o.used);
    } else {
        d.allowed = false;
        d.reason = Reason::RateLimited;
        d.retry_after = o.retry_after.map(|us| Span {
            months: 0,
            days: 0,
            micros: us,
        });
        d.message = match o.retry_after {
            Some(us) => format!(
                "{f}: rate limit of {per} reached{by}; retry in {:.1} s",
                us as f64 / 1e6
            ),
            None => format!("{f}: rate limit of {per} reached{by}"),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i64, m: u32, d: u32, h: i64) -> i64 {
        from_civil(y, m, d, h * 3_600 * USECS_PER_SEC)
    }

    #[test]
    fn calendar_periods_in_utc() {
        let now = at(2026, 11, 22, 15) + 17 * 60 * USECS_PER_SEC + 5;
        let (s, e) = period_bounds(Period::Day, now, None, None);
        assert_eq!((s, e), (at(2026, 11, 22, 0), at(2026, 11, 23, 0)));
        let (s, e) = period_bounds(Period::Hour, now, None, None);
        assert_eq!((s, e), (at(2026, 11, 22, 15), at(2026, 11, 22, 16)));
        let (s, _) = period_bounds(Period::Minute, now, None, None);
        assert_eq!(format_minute(s), "2026-11-22 15:17 UTC");
        // 2026-11-22 is a Sunday: the ISO week began Monday the 16th.
        let (s, e) = period_bounds(Period::Week, now, None, None);
        assert_eq!((s, e), (at(2026, 11, 16, 0), at(2026, 11, 23, 0)));
        let (s, e) = period_bounds(Period::Week, at(2026, 11, 23, 0), None, None);
        assert_eq!((s, e), (at(2026, 11, 23, 0), at(2026, 11, 30, 0)));
        let (s, e) = period_bounds(Period::Month, now, None, None);
        assert_eq!((s, e), (at(2026, 11, 1, 0), at(2026, 12, 1, 0)));
        let (s, e) = period_bounds(Period::Month, at(2026, 12, 31, 23), None, None);
        assert_eq!((s, e), (at(2026, 12, 1, 0), at(2027, 1, 1, 0)));
        // Before 2000 too.
        let (s, _) = period_bounds(Period::Day, at(1999, 12, 31, 5), None, None);
        assert_eq!(s, at(1999, 12, 31, 0));
    }

    #[test]
    fn billing_periods_follow_the_anchor() {
        let anchor = at(2026, 1, 31, 10);
        // Inside the current period when its end is known.
        let (s, e) = period_bounds(
            Period::BillingPeriod,
            at(2026, 2, 10, 0),
            Some(anchor),
            Some(at(2026, 2, 28, 10)),
        );
        assert_eq!((s, e), (anchor, at(2026, 2, 28, 10)));
        // Monthly from the anchor otherwise, clamped like PostgreSQL.
        let (s, e) = period_bounds(Period::BillingPeriod, at(2026, 3, 5, 0), Some(anchor), None);
        assert_eq!((s, e), (at(2026, 2, 28, 10), at(2026, 3, 31, 10)));
        let (s, e) = period_bounds(
            Period::BillingPeriod,
            at(2026, 3, 31, 10),
            Some(anchor),
            None,
        );
        assert_eq!((s, e), (at(2026, 3, 31, 10), at(2026, 4, 30, 10)));
        // No anchor: the calendar month.
        assert_eq!(
            period_bounds(Period::BillingPeriod, at(2026, 3, 5, 0), None, None).0,
            at(2026, 3, 1, 0)
        );
    }

    #[test]
    fn gcra_allows_a_burst_of_limit_then_one_per_interval() {
        let minute = 60 * USECS_PER_SEC;
        let now = at(2026, 11, 22, 0);
        let mut tat = None;
        for i in 1..=6 {
            let o = gcra(tat, now, 6, minute, 1);
            assert!(o.allowed, "call {i}");
            assert_eq!(o.used, i);
            tat = Some(o.new_tat);
        }
        let o = gcra(tat, now, 6, minute, 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Some(10 * USECS_PER_SEC));
        assert_eq!(o.used, 6);
        // Ten seconds later exactly one more passes.
        let later = now + 10 * USECS_PER_SEC;
        let o = gcra(tat, later, 6, minute, 1);
        assert!(o.allowed);
        assert!(!gcra(Some(o.new_tat), later, 6, minute, 1).allowed);
        // A full window later the burst is back.
        assert!(gcra(tat, now + minute, 6, minute, 6).allowed);
        // More than the burst can never pass; a zero limit never passes.
        assert_eq!(gcra(None, now, 6, minute, 7).retry_after, None);
        assert!(!gcra(None, now, 0, minute, 1).allowed);
    }
}
