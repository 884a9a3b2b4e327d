//! Usage through SQL: the counter write where the heap path
//! (`counters.rs`) stands aside, the rate limiter's state, and the probes
//! a decision reads usage with. Run as the tables' owner under a pinned
//! search_path.

use super::rules::{fits, gcra};
use crate::error::{FluxError, FluxResult};
use crate::store::ts_datum;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::{PgBuiltInOids, PgOid};

const TEXT: PgOid = PgOid::BuiltIn(PgBuiltInOids::TEXTOID);
const TSTZ: PgOid = PgOid::BuiltIn(PgBuiltInOids::TIMESTAMPTZOID);
const INT8: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT8OID);
const INTERVAL: PgOid = PgOid::BuiltIn(PgBuiltInOids::INTERVALOID);

/// Units recorded for a counter in the period starting at `period_start`
/// (-infinity for limit features): one primary-key probe.
pub fn load_used(tenant: &str, feature: &str, period_start: Option<i64>) -> FluxResult<i64> {
    let cat = crate::cache::catalogue()?;
    let start = ts_datum(period_start).into_inner();
    super::counters::read_used(cat.namespace, tenant, feature, start)
}

/// read_used through SQL, as the table's owner (the direct read needs no
/// privilege): for a table counters.rs leaves to SQL.
pub fn read_used(tenant: &str, feature: &str, start: i64) -> FluxResult<i64> {
    const SQL: &str = "SELECT used FROM flux.usage \
         WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
           AND period_start OPERATOR(pg_catalog.=) $3";
    let _owner = crate::privilege::AsOwner::enter()?;
    let start = ts_datum(Some(start));
    Spi::connect(|c| {
        let p = crate::prepared::kept(c, SQL, &[TEXT, TEXT, TSTZ], false)?;
        let t = c.select(&*p, Some(1), &[tenant.into(), feature.into(), start.into()])?;
        Ok(if t.is_empty() {
            0
        } else {
            t.first().get_one::<i64>()?.unwrap_or(0)
        })
    })
}

/// The rate limiter's theoretical arrival time, if any.
pub fn load_tat(tenant: &str, feature: &str) -> FluxResult<Option<i64>> {
    let _owner = crate::privilege::AsOwner::enter()?;
    Spi::connect(|c| {
        let tat = crate::prepared::kept(
            c,
            "SELECT tat FROM flux.rate_state \
             WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2",
            &[TEXT, TEXT],
            false,
        )?;
        let t = c.select(&*tat, Some(1), &[tenant.into(), feature.into()])?;
        Ok(if t.is_empty() {
            None
        } else {
            t.first()
                .get_one::<TimestampWithTimeZone>()?
                .map(|t| t.into_inner())
        })
    })
}

/// `total = used + amount`, or the error both write paths give.
pub fn total(used: i64, amount: i64) -> FluxResult<i64> {
    used.checked_add(amount).ok_or_else(|| {
        FluxError::InvalidValue(format!(
            "usage would overflow: {used} + {amount} is out of range for bigint"
        ))
    })
}

/// Record `amount` against a counter through SQL if it fits (the limit
/// rule is `rules::fits`, as on the heap path): lock the row (`FOR UPDATE`
/// follows a concurrent writer to the version it committed, under READ
/// COMMITTED; raises a serialization failure under REPEATABLE READ, as an
/// UPDATE would), decide, write. No row yet: insert it; a concurrent
/// insert that won makes us lock and decide again. Returns whether it was
/// recorded and the total (as it stands, when it did not fit).
pub fn add(
    tenant: &str,
    feature: &str,
    start: Option<i64>,
    amount: i64,
    limit: Option<i64>,
) -> FluxResult<(bool, i64)> {
    const LOCK: &str = "SELECT used FROM flux.usage \
         WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
           AND period_start OPERATOR(pg_catalog.=) $3 FOR NO KEY UPDATE";
    const UPDATE: &str = "UPDATE flux.usage SET used = $4, updated_at = pg_catalog.now() \
         WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
           AND period_start OPERATOR(pg_catalog.=) $3 RETURNING used";
    const INSERT: &str =
        "INSERT INTO flux.usage (tenant, feature, period_start, used, updated_at) \
         VALUES ($1, $2, $3, $4, pg_catalog.now()) \
         ON CONFLICT (tenant, feature, period_start) DO NOTHING RETURNING used";
    // Under flux_consume's unpinned owner switch (privilege.rs).
    let _path = crate::privilege::Pinned::enter();
    let key = ts_datum(start);
    Spi::connect_mut(|c| {
        // Each turn sees a row inserted or deleted by a transaction that
        // committed during the previous one; a row that keeps appearing and
        // vanishing is not worth waiting on forever.
        for _ in 0..16 {
            let lock = crate::prepared::kept(c, LOCK, &[TEXT, TEXT, TSTZ], true)?;
            let found = c.update(
                &*lock,
                Some(1),
                &[tenant.into(), feature.into(), key.into()],
            )?;
            let used = if found.is_empty() {
                None
            } else {
                Some(found.first().get_one::<i64>()?.unwrap_or(0))
            };
            if !fits(limit, used.unwrap_or(0), amount) {
                return Ok((false, used.unwrap_or(0)));
            }
            let next = total(used.unwrap_or(0), amount)?;
            let sql = if used.is_some() { UPDATE } else { INSERT };
            let p = crate::prepared::kept(c, sql, &[TEXT, TEXT, TSTZ, INT8], true)?;
            let args = [tenant.into(), feature.into(), key.into(), next.into()];
            let written = c.update(&*p, Some(1), &args)?;
            if !written.is_empty() {
                return Ok((true, written.first().get_one::<i64>()?.unwrap_or(next)));
            }
        }
        Err(FluxError::Internal(format!(
            "the usage row of {tenant} and {feature} kept changing under flux_consume: try again"
        )))
    })
}

/// Advance the rate limiter by `amount` calls if they pass; returns the new
/// theoretical arrival time, or None when rate limited (nothing recorded).
/// GCRA as one conditional upsert (the row lock orders concurrent calls;
/// reading the state first would take a second statement on every call):
/// the same rule as `rules::gcra`, which a pg_test (tests below) proves
/// over a random sequence of calls.
pub fn record_rate(
    tenant: &str,
    feature: &str,
    now: i64,
    limit: i64,
    window: i64,
    amount: i64,
) -> FluxResult<Option<i64>> {
    if !gcra(None, now, limit, window, amount).allowed {
        return Ok(None);
    }
    let t = (window / limit.max(1)).max(1);
    let inc = Interval::new(0, 0, t.saturating_mul(amount))
        .map_err(|e| FluxError::Internal(e.to_string()))?;
    let win = Interval::new(0, 0, window).map_err(|e| FluxError::Internal(e.to_string()))?;
    let now_ts = ts_datum(Some(now));
    const SQL: &str =
        "INSERT INTO flux.rate_state AS r (tenant, feature, tat) \
         VALUES ($1, $2, $3 OPERATOR(pg_catalog.+) $4) \
         ON CONFLICT (tenant, feature) DO UPDATE SET tat = GREATEST(r.tat, $3) OPERATOR(pg_catalog.+) $4 \
             WHERE GREATEST(r.tat, $3) OPERATOR(pg_catalog.+) $4 OPERATOR(pg_catalog.-) $5 \
                   OPERATOR(pg_catalog.<=) $3 \
         RETURNING tat";
    // Under flux_consume's unpinned owner switch (privilege.rs).
    let _path = crate::privilege::Pinned::enter();
    let tat: Option<TimestampWithTimeZone> = Spi::connect_mut(|c| {
        let p = crate::prepared::kept(c, SQL, &[TEXT, TEXT, TSTZ, INTERVAL, INTERVAL], true)?;
        let args = [
            tenant.into(),
            feature.into(),
            now_ts.into(),
            inc.into(),
            win.into(),
        ];
        let r = c.update(&*p, Some(1), &args)?;
        Ok::<_, FluxError>(if r.is_empty() {
            None
        } else {
            r.first().get_one::<TimestampWithTimeZone>()?
        })
    })?;
    Ok(tat.map(|t| t.into_inner()))
}
