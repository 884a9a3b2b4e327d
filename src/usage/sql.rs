//! Usage through SQL: the counter write where the heap path
//! (`counters.rs`) stands aside, the rate limiter's state, and the probes
//! a decision reads usage with. Run as the tables' owner under a pinned
//! search_path.

use super::counters::Counter;
use super::rules::{fits, gcra};
use crate::error::{FluxError, FluxResult};
use crate::store::ts_datum;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{PgBuiltInOids, PgOid};

const TEXT: PgOid = PgOid::BuiltIn(PgBuiltInOids::TEXTOID);
const TSTZ: PgOid = PgOid::BuiltIn(PgBuiltInOids::TIMESTAMPTZOID);
const INT8: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT8OID);
const INTERVAL: PgOid = PgOid::BuiltIn(PgBuiltInOids::INTERVALOID);

/// Units recorded on a counter (a tenant's, or a caller's in it) in its
/// period: one primary-key probe.
pub fn load_used(c: &Counter) -> FluxResult<i64> {
    let cat = crate::cache::catalogue()?;
    super::counters::read_used(cat.namespace, c)
}

/// A timestamp datum's microseconds: the key of a counter's period
/// (None: -infinity, the one period of a limit feature).
pub fn period_key(start: Option<i64>) -> i64 {
    ts_datum(start).into_inner()
}

/// The statements of one counter table.
struct Statements {
    read: &'static str,
    lock: &'static str,
    update: &'static str,
    insert: &'static str,
}

const USAGE: Statements = Statements {
    read: concat!(
        "SELECT used FROM flux.usage WHERE ",
        "tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 ",
        "AND period_start OPERATOR(pg_catalog.=) $3"
    ),
    lock: concat!(
        "SELECT used FROM flux.usage WHERE ",
        "tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 ",
        "AND period_start OPERATOR(pg_catalog.=) $3 FOR NO KEY UPDATE"
    ),
    update: concat!(
        "UPDATE flux.usage SET used = $4, updated_at = pg_catalog.now() WHERE ",
        "tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 ",
        "AND period_start OPERATOR(pg_catalog.=) $3 RETURNING used"
    ),
    insert: "INSERT INTO flux.usage (tenant, feature, period_start, used, updated_at) \
             VALUES ($1, $2, $3, $4, pg_catalog.now()) \
             ON CONFLICT (tenant, feature, period_start) DO NOTHING RETURNING used",
};

const CALLERS: Statements = Statements {
    read: concat!(
        "SELECT used FROM flux.caller_usage WHERE ",
        "tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 ",
        "AND period_start OPERATOR(pg_catalog.=) $3 AND caller OPERATOR(pg_catalog.=) $4"
    ),
    lock: concat!(
        "SELECT used FROM flux.caller_usage WHERE ",
        "tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 ",
        "AND period_start OPERATOR(pg_catalog.=) $3 AND caller OPERATOR(pg_catalog.=) $4 ",
        "FOR NO KEY UPDATE"
    ),
    update: concat!(
        "UPDATE flux.caller_usage SET used = $5, updated_at = pg_catalog.now() WHERE ",
        "tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 ",
        "AND period_start OPERATOR(pg_catalog.=) $3 AND caller OPERATOR(pg_catalog.=) $4 ",
        "RETURNING used"
    ),
    insert:
        "INSERT INTO flux.caller_usage (tenant, feature, period_start, caller, used, updated_at) \
             VALUES ($1, $2, $3, $4, $5, pg_catalog.now()) \
             ON CONFLICT (tenant, feature, period_start, caller) DO NOTHING RETURNING used",
};

fn statements(c: &Counter) -> &'static Statements {
    if c.caller.is_some() {
        &CALLERS
    } else {
        &USAGE
    }
}

/// The key's types and values, the caller's after the period's.
fn key_args(c: &Counter) -> (Vec<PgOid>, Vec<pgrx::datum::DatumWithOid<'static>>) {
    let start = TimestampWithTimeZone::try_from(c.start)
        .unwrap_or_else(|_| TimestampWithTimeZone::negative_infinity());
    let mut types = vec![TEXT, TEXT, TSTZ];
    let mut args: Vec<pgrx::datum::DatumWithOid<'static>> = vec![
        c.tenant.to_string().into(),
        c.feature.to_string().into(),
        start.into(),
    ];
    if let Some(caller) = c.caller {
        types.push(TEXT);
        args.push(caller.to_string().into());
    }
    (types, args)
}

/// read_used through SQL, as the table's owner (the direct read needs no
/// privilege): for a table counters.rs leaves to SQL.
pub fn read_used(c: &Counter) -> FluxResult<i64> {
    let _owner = crate::privilege::AsOwner::enter()?;
    let (types, args) = key_args(c);
    Spi::connect(|client| {
        let p = crate::prepared::kept(client, statements(c).read, &types, false)?;
        let t = client.select(&*p, Some(1), &args)?;
        Ok(if t.is_empty() {
            0
        } else {
            t.first().get_one::<i64>()?.unwrap_or(0)
        })
    })
}

/// A rate limiter's theoretical arrival time, if any: the tenant's, or a
/// caller's.
pub fn load_tat(tenant: &str, feature: &str, caller: Option<&str>) -> FluxResult<Option<i64>> {
    const TENANT: &str = "SELECT tat FROM flux.rate_state \
         WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2";
    const CALLER: &str = "SELECT tat FROM flux.caller_rate_state \
         WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
           AND caller OPERATOR(pg_catalog.=) $3";
    let _owner = crate::privilege::AsOwner::enter()?;
    Spi::connect(|c| {
        let t = match caller {
            None => {
                let p = crate::prepared::kept(c, TENANT, &[TEXT, TEXT], false)?;
                c.select(&*p, Some(1), &[tenant.into(), feature.into()])?
            }
            Some(who) => {
                let p = crate::prepared::kept(c, CALLER, &[TEXT, TEXT, TEXT], false)?;
                c.select(&*p, Some(1), &[tenant.into(), feature.into(), who.into()])?
            }
        };
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

/// Lock a counter's row (`FOR NO KEY UPDATE`); its used, or None when
/// there is no row.
fn lock_row(client: &mut SpiClient<'_>, c: &Counter, st: &Statements) -> FluxResult<Option<i64>> {
    let (types, args) = key_args(c);
    let p = crate::prepared::kept(client, st.lock, &types, true)?;
    let found = client.update(&*p, Some(1), &args)?;
    Ok(if found.is_empty() {
        None
    } else {
        Some(found.first().get_one::<i64>()?.unwrap_or(0))
    })
}

/// Set a locked row's used (`exists`), or insert the row with it; the value
/// written, or None when a concurrent insert won (lock it and decide again).
fn write_row(
    client: &mut SpiClient<'_>,
    c: &Counter,
    st: &Statements,
    exists: bool,
    used: i64,
) -> FluxResult<Option<i64>> {
    let (mut types, mut args) = key_args(c);
    types.push(INT8);
    args.push(used.into());
    let sql = if exists { st.update } else { st.insert };
    let p = crate::prepared::kept(client, sql, &types, true)?;
    let written = client.update(&*p, Some(1), &args)?;
    Ok(if written.is_empty() {
        None
    } else {
        Some(written.first().get_one::<i64>()?.unwrap_or(used))
    })
}

/// Record `amount` against a counter through SQL if it fits (the limit
/// rule is `rules::fits`, as on the heap path): lock the row (`FOR NO KEY
/// UPDATE` follows a concurrent writer to the version it committed, under
/// READ COMMITTED; raises a serialization failure under REPEATABLE READ, as
/// an UPDATE would), decide, write. No row yet: insert it; a concurrent
/// insert that won makes us lock and decide again. Returns whether it was
/// recorded and the total (as it stands, when it did not fit). A negative
/// amount undoes this transaction's own addition.
pub fn add(c: &Counter, amount: i64, limit: Option<i64>) -> FluxResult<(bool, i64)> {
    let st = statements(c);
    // Under flux_consume's unpinned owner switch (privilege.rs).
    let _path = crate::privilege::Pinned::enter();
    Spi::connect_mut(|client| {
        // Each turn sees a row inserted or deleted by a transaction that
        // committed during the previous one; a row that keeps appearing and
        // vanishing is not worth waiting on forever.
        for _ in 0..16 {
            let used = lock_row(client, c, st)?;
            if !fits(limit, used.unwrap_or(0), amount) {
                return Ok((false, used.unwrap_or(0)));
            }
            let next = total(used.unwrap_or(0), amount)?;
            if let Some(n) = write_row(client, c, st, used.is_some(), next)? {
                return Ok((true, n));
            }
        }
        Err(FluxError::Internal(format!(
            "the usage row of {} and {} kept changing under flux_consume: try again",
            c.tenant, c.feature
        )))
    })
}

/// Lock a counter's row, made at 0 when there is none (a credits pool's
/// allowance: every draw queues on it, credits.rs); returns its used.
pub fn lock_counter(c: &Counter) -> FluxResult<i64> {
    let st = statements(c);
    let _path = crate::privilege::Pinned::enter();
    Spi::connect_mut(|client| {
        for _ in 0..16 {
            if let Some(used) = lock_row(client, c, st)? {
                return Ok(used);
            }
            // Ours until commit: others wait on its key.
            if write_row(client, c, st, false, 0)?.is_some() {
                return Ok(0);
            }
        }
        Err(FluxError::Internal(format!(
            "the usage row of {} and {} kept changing: try again",
            c.tenant, c.feature
        )))
    })
}

/// Set a counter this transaction holds locked (lock_counter) to `used`.
pub fn set_counter(c: &Counter, used: i64) -> FluxResult<()> {
    let _path = crate::privilege::Pinned::enter();
    let (mut types, mut args) = key_args(c);
    types.push(INT8);
    args.push(used.into());
    Spi::connect_mut(|client| {
        let p = crate::prepared::kept(client, statements(c).update, &types, true)?;
        client.update(&*p, Some(1), &args)?;
        Ok(())
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
    caller: Option<&str>,
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
    const TENANT: &str =
        "INSERT INTO flux.rate_state AS r (tenant, feature, tat) \
         VALUES ($1, $2, $3 OPERATOR(pg_catalog.+) $4) \
         ON CONFLICT (tenant, feature) DO UPDATE SET tat = GREATEST(r.tat, $3) OPERATOR(pg_catalog.+) $4 \
             WHERE GREATEST(r.tat, $3) OPERATOR(pg_catalog.+) $4 OPERATOR(pg_catalog.-) $5 \
                   OPERATOR(pg_catalog.<=) $3 \
         RETURNING tat";
    const CALLER: &str =
        "INSERT INTO flux.caller_rate_state AS r (tenant, feature, caller, tat) \
         VALUES ($1, $2, $6, $3 OPERATOR(pg_catalog.+) $4) \
         ON CONFLICT (tenant, feature, caller) DO UPDATE SET tat = GREATEST(r.tat, $3) OPERATOR(pg_catalog.+) $4 \
             WHERE GREATEST(r.tat, $3) OPERATOR(pg_catalog.+) $4 OPERATOR(pg_catalog.-) $5 \
                   OPERATOR(pg_catalog.<=) $3 \
         RETURNING tat";
    // Under flux_consume's unpinned owner switch (privilege.rs).
    let _path = crate::privilege::Pinned::enter();
    let tat: Option<TimestampWithTimeZone> = Spi::connect_mut(|c| {
        let mut types = vec![TEXT, TEXT, TSTZ, INTERVAL, INTERVAL];
        let mut args: Vec<pgrx::datum::DatumWithOid> = vec![
            tenant.into(),
            feature.into(),
            now_ts.into(),
            inc.into(),
            win.into(),
        ];
        let sql = match caller {
            None => TENANT,
            Some(who) => {
                types.push(TEXT);
                args.push(who.into());
                CALLER
            }
        };
        let p = crate::prepared::kept(c, sql, &types, true)?;
        let r = c.update(&*p, Some(1), &args)?;
        Ok::<_, FluxError>(if r.is_empty() {
            None
        } else {
            r.first().get_one::<TimestampWithTimeZone>()?
        })
    })?;
    Ok(tat.map(|t| t.into_inner()))
}

/// Take back `amount` calls this transaction's record_rate just counted
/// (another allowance refused the request): the state moves back by what
/// it moved. Where it had fallen behind the clock it lands on the clock,
/// which GCRA reads the same.
pub fn undo_rate(
    tenant: &str,
    feature: &str,
    caller: Option<&str>,
    limit: i64,
    window: i64,
    amount: i64,
) -> FluxResult<()> {
    let t = (window / limit.max(1)).max(1);
    let inc = Interval::new(0, 0, t.saturating_mul(amount))
        .map_err(|e| FluxError::Internal(e.to_string()))?;
    const TENANT: &str = "UPDATE flux.rate_state SET tat = tat OPERATOR(pg_catalog.-) $3 \
         WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2";
    const CALLER: &str = "UPDATE flux.caller_rate_state SET tat = tat OPERATOR(pg_catalog.-) $3 \
         WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
           AND caller OPERATOR(pg_catalog.=) $4";
    let _path = crate::privilege::Pinned::enter();
    Spi::connect_mut(|c| {
        let mut types = vec![TEXT, TEXT, INTERVAL];
        let mut args: Vec<pgrx::datum::DatumWithOid> =
            vec![tenant.into(), feature.into(), inc.into()];
        let sql = match caller {
            None => TENANT,
            Some(who) => {
                types.push(TEXT);
                args.push(who.into());
                CALLER
            }
        };
        let p = crate::prepared::kept(c, sql, &types, true)?;
        c.update(&*p, Some(1), &args)?;
        Ok(())
    })
}
