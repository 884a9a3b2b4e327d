//! Usage alerts (CONTRACT "Soft limits, overage and usage alerts"): a
//! feature's thresholds, as fractions of the limit (flux_alert), and the
//! row and `NOTIFY flux_usage` that the first consume taking a tenant to or
//! past one in a period writes, in the consume's own transaction: a
//! rolled-back consume leaves neither, and nothing is lost between the
//! usage and its alert.
//!
//! - Cost: the thresholds are part of the cached catalogue
//!   (`FeatureFacts::alerts`), so a consume that crosses none compares a few
//!   integers; one that crosses runs one INSERT, whose inserted rows are
//!   notified by the same statement.
//! - Exactly once per tenant, feature, period and threshold: the consume
//!   holds its counter's row lock, so concurrent consumes cross in turn and
//!   only one sees `before < threshold <= after`; the primary key (ON
//!   CONFLICT DO NOTHING, and a NOTIFY only for a row inserted) covers a
//!   second crossing in the period (after a release, or a raised limit).
//! - Only the tenant's counter of a limit or metered feature, against the
//!   limit it has (plan, addons, override; under a soft grant, the limit,
//!   not the cap). A hold counts as use, as it does for the limit.

use super::counters::Counter;
use crate::entitle::Decided;
use crate::error::{shown, FluxError, FluxResult, OrRaise};
use crate::model::Kind;
use crate::store;
use crate::validate::need;
use pgrx::datum::AnyNumeric;
use pgrx::prelude::*;
use pgrx::{PgBuiltInOids, PgOid};

/// Thresholds are kept in ten-thousandths of the limit (0.8 = 8,000): four
/// decimals, compared exactly with integers.
pub const SCALE: i64 = 10_000;
/// The largest threshold: ten times the limit (soft limits go past it).
const MAX: i64 = 10 * SCALE;

/// The thresholds (ten-thousandths, ascending) that going from `before` to
/// `after` units of `limit` reaches: `before < t x limit <= after`.
pub fn crossed(thresholds: &[i64], limit: i64, before: i64, after: i64) -> Vec<i64> {
    if limit <= 0 || after <= before {
        return Vec::new();
    }
    let at = |t: i64| t as i128 * limit as i128;
    let (before, after) = (
        before as i128 * SCALE as i128,
        after as i128 * SCALE as i128,
    );
    thresholds
        .iter()
        .copied()
        .filter(|&t| before < at(t) && at(t) <= after)
        .collect()
}

/// A threshold as given, in ten-thousandths, if it is in (0, 10] with at
/// most four decimals.
pub fn scaled(threshold: &AnyNumeric) -> FluxResult<i64> {
    let bad = |why: &str| {
        FluxError::InvalidValue(format!(
            "threshold {threshold} {why} (a fraction of the limit: 0.8 is 80%, 1 the limit, at most 10)"
        ))
    };
    let mut x = threshold.clone();
    x *= SCALE;
    let whole: AnyNumeric = x.floor();
    if whole != x {
        return Err(bad("has more than four decimals"));
    }
    let n = i64::try_from(whole).map_err(|_| bad("must be in (0, 10]"))?;
    if n <= 0 || n > MAX {
        return Err(bad("must be in (0, 10]"));
    }
    Ok(n)
}

const TSTZ: PgOid = PgOid::BuiltIn(PgBuiltInOids::TIMESTAMPTZOID);
const TEXT: PgOid = PgOid::BuiltIn(PgBuiltInOids::TEXTOID);
const INT8: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT8OID);
const INT8_ARRAY: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT8ARRAYOID);

/// Writes the alert rows; nothing when they exist (the same crossing
/// again in the period).
macro_rules! insert_alerts {
    () => {
        "INSERT INTO flux.usage_alerts AS a (tenant, feature, period_start, threshold, used, \"limit\", at) \
     SELECT $1, $2, $3, pg_catalog.trim_scale(t::pg_catalog.numeric OPERATOR(pg_catalog./) 10000), $5, $6, $7 \
       FROM pg_catalog.unnest($4::pg_catalog.int8[]) t \
     ON CONFLICT DO NOTHING"
    };
}

/// The rows alone (flux.alert_notify off).
const WRITE: &str = insert_alerts!();

/// One statement: the rows, and a notification for each row inserted
/// (queued now, sent at commit, dropped on rollback). The period's start
/// is written in UTC, whatever the consuming session's TimeZone (a limit
/// feature's: "-infinity").
const FIRE: &str = concat!(
    "WITH ins AS (",
    insert_alerts!(),
    " RETURNING a.tenant, a.feature, a.period_start, a.threshold, a.used, a.\"limit\") \
   SELECT pg_catalog.pg_notify('flux_usage', pg_catalog.json_build_object( \
            'tenant', tenant, 'feature', feature, \
            'period_start', COALESCE(pg_catalog.to_char(pg_catalog.timezone('UTC', period_start), \
                                                         'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
                                     period_start::pg_catalog.text), \
            'threshold', threshold, 'used', used, 'limit', \"limit\")::pg_catalog.text) \
     FROM ins"
);

/// After `amount` was recorded on the tenant's counter `c`, now at `used`
/// of `limit`: write the alerts of the thresholds it crossed.
pub fn on_recorded(
    x: &Decided,
    c: &Counter,
    limit: Option<i64>,
    used: i64,
    amount: i64,
) -> FluxResult<()> {
    let Some(f) = x.feature() else {
        return Ok(());
    };
    if f.alerts.is_empty() || c.caller.is_some() || amount <= 0 {
        return Ok(());
    }
    let Some(limit) = limit else {
        return Ok(());
    };
    let hit = crossed(&f.alerts, limit, used.saturating_sub(amount), used);
    if hit.is_empty() {
        return Ok(());
    }
    let start = TimestampWithTimeZone::try_from(c.start)
        .unwrap_or_else(|_| TimestampWithTimeZone::negative_infinity());
    let at = store::ts_datum(Some(x.ctx.now));
    // Under flux_consume's unpinned owner switch (privilege.rs).
    let _path = crate::privilege::Pinned::enter();
    Spi::connect_mut(|client| {
        let sql = if crate::gucs::ALERT_NOTIFY.get() {
            FIRE
        } else {
            WRITE
        };
        let p = crate::prepared::kept(
            client,
            sql,
            &[TEXT, TEXT, TSTZ, INT8_ARRAY, INT8, INT8, TSTZ],
            true,
        )?;
        client.update(
            &*p,
            None,
            &[
                c.tenant.into(),
                c.feature.into(),
                start.into(),
                hit.into(),
                used.into(),
                limit.into(),
                at.into(),
            ],
        )?;
        Ok(())
    })
}

/// The feature, if alerts can be set on it: a limit or metered feature.
fn alertable(feature: &str) -> FluxResult<()> {
    match crate::validate::feature_kind(feature)? {
        Kind::Limit | Kind::Metered => Ok(()),
        k => Err(FluxError::InvalidValue(format!(
            "feature {} is a {} feature: alerts are for limit and metered features",
            shown(feature),
            k.as_str()
        ))),
    }
}

/// Alert when a tenant's use of `feature` in a period reaches `threshold`
/// of its limit (0.8 = 80%, 1 = the limit, above 1 past it under a soft
/// grant; at most 10, four decimals). Setting it again does nothing. Admin
/// only (EXECUTE); audited as a row of flux.alerts.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_alert(feature: Option<&str>, threshold: Option<AnyNumeric>) {
    (|| {
        let feature = need(feature, "feature")?;
        let threshold = need(threshold, "threshold")?;
        scaled(&threshold)?;
        alertable(feature)?;
        store::exec(
            "INSERT INTO flux.alerts (feature, threshold) \
             VALUES ($1, pg_catalog.trim_scale($2)) ON CONFLICT DO NOTHING",
            &[feature.into(), threshold.into()],
        )
    })()
    .or_raise()
}

/// Stop alerting at `threshold` of `feature` (alerts already written stay).
/// Clearing one that is not set does nothing. Admin only.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_alert_clear(feature: Option<&str>, threshold: Option<AnyNumeric>) {
    (|| {
        let feature = need(feature, "feature")?;
        let threshold = need(threshold, "threshold")?;
        scaled(&threshold)?;
        crate::validate::feature_kind(feature)?;
        store::exec(
            "DELETE FROM flux.alerts WHERE feature OPERATOR(pg_catalog.=) $1 \
               AND threshold OPERATOR(pg_catalog.=) $2",
            &[feature.into(), threshold.into()],
        )
    })()
    .or_raise()
}

/// The check of flux.alerts' trigger (psql DML too): a limit or metered
/// feature, a threshold in (0, 10] with at most four decimals.
#[pg_extern(schema = "flux", stable, parallel_safe)]
fn _check_alert(feature: Option<&str>, threshold: Option<AnyNumeric>) {
    (|| {
        let feature = need(feature, "feature")?;
        scaled(&need(threshold, "threshold")?)?;
        alertable(feature)
    })()
    .or_raise()
}

#[cfg(test)]
mod tests {
    use super::crossed;

    #[test]
    fn a_threshold_is_crossed_once_going_up() {
        let t = [8_000, 10_000, 15_000];
        assert_eq!(crossed(&t, 1000, 700, 799), Vec::<i64>::new());
        assert_eq!(crossed(&t, 1000, 799, 800), vec![8_000]);
        assert_eq!(crossed(&t, 1000, 800, 900), Vec::<i64>::new());
        // Two at once.
        assert_eq!(crossed(&t, 1000, 700, 1200), vec![8_000, 10_000]);
        assert_eq!(crossed(&t, 1000, 1400, 1500), vec![15_000]);
        // Exact with fractions of a unit: 80% of 3 is 2.4, reached at 3.
        assert_eq!(crossed(&t, 3, 2, 3), vec![8_000, 10_000]);
        assert_eq!(crossed(&t, 3, 1, 2), Vec::<i64>::new());
        // Nothing on the way down, or with no limit to speak of.
        assert_eq!(crossed(&t, 1000, 900, 700), Vec::<i64>::new());
        assert_eq!(crossed(&t, 0, 0, 5), Vec::<i64>::new());
        // No overflow at the extremes.
        assert_eq!(
            crossed(&[100_000], i64::MAX, 0, i64::MAX),
            Vec::<i64>::new()
        );
        assert_eq!(crossed(&[1], i64::MAX, 0, i64::MAX), vec![1]);
    }
}
