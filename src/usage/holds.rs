//! Holds (CONTRACT "Credits and holds"): units reserved for work that
//! outlives a transaction (an LLM stream, a long export), then settled at
//! what was really used, released, or left to expire.
//!
//! - On a feature's counters (limit, metered, the current API key's) a hold
//!   is recorded as a consume is, under the same row locks: every check and
//!   consume sees it, and none can pass the limit. Each counter it counts on
//!   gets a flux.hold_charges row, open until the hold is settled or
//!   released. Past its ttl a charge stops counting: the readers of a
//!   feature that has had holds (flux.held_features) subtract the
//!   expired charges, and the next writer of the counter gives them back
//!   (under the counter's lock, so no job is needed and nothing is counted
//!   twice). A session whose catalogue has not yet seen that row counts
//!   an expired hold a little longer: never less than is used.
//! - On a credits pool (the pool held, or a priced feature's pool) a hold is
//!   a reservation: the balance subtracts open charges whose ttl has not
//!   passed (credits.rs locks the pool before reading them), so it stops
//!   counting by the clock alone; settling draws what was used, in one
//!   ledger row.
//!
//! Lock order, as consumes: the hold's row, the pool's row and top-ups, the
//! counters, then the charges.

use super::counters::Counter;
use super::credits::{self, PoolLock};
use super::rules::{fits, Meter};
use super::{allowances, record, sql};
use crate::entitle::{entitle, to_composite, Decided};
use crate::error::{shown, FluxError, FluxResult, OrRaise};
use crate::model::{Decision, Kind, Reason};
use crate::store::{self, ts_datum};
use crate::timeutil::{add_span, format_minute, Span};
use pgrx::prelude::*;
use pgrx::{PgBuiltInOids, PgOid};

const TEXT: PgOid = PgOid::BuiltIn(PgBuiltInOids::TEXTOID);
/// The longest ttl a hold may have.
const MAX_TTL: Span = Span {
    months: 0,
    days: 7,
    micros: 0,
};
const TSTZ: PgOid = PgOid::BuiltIn(PgBuiltInOids::TIMESTAMPTZOID);

/// Whether counter `c` of `x`'s feature may carry holds: the feature has
/// had one; a hold counts on the tenant's and the API key's counters, never
/// a subject's.
pub fn may_carry(x: &Decided, c: &Counter) -> bool {
    x.holds && !c.caller.is_some_and(|k| k.starts_with("subject:"))
}

// Sums are numeric: clamped before the cast, they cannot overflow.
const EXPIRED: &str =
    "SELECT LEAST(COALESCE(pg_catalog.sum(amount), 0), 9223372036854775807)::pg_catalog.int8 FROM flux.hold_charges \
     WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
       AND period_start OPERATOR(pg_catalog.=) $3 AND caller OPERATOR(pg_catalog.=) $4 \
       AND open AND expires_at OPERATOR(pg_catalog.<=) $5";
const GIVE_BACK: &str = "UPDATE flux.hold_charges SET open = false \
     WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
       AND period_start OPERATOR(pg_catalog.=) $3 AND caller OPERATOR(pg_catalog.=) $4 \
       AND open AND expires_at OPERATOR(pg_catalog.<=) $5 RETURNING amount";

fn counter_args(c: &Counter, now: i64) -> Vec<pgrx::datum::DatumWithOid<'static>> {
    vec![
        c.tenant.to_string().into(),
        c.feature.to_string().into(),
        pgrx::datum::TimestampWithTimeZone::try_from(c.start)
            .unwrap_or_else(|_| pgrx::datum::TimestampWithTimeZone::negative_infinity())
            .into(),
        c.caller.unwrap_or("").to_string().into(),
        ts_datum(Some(now)).into(),
    ]
}

const COUNTER_TYPES: [PgOid; 5] = [TEXT, TEXT, TSTZ, TEXT, TSTZ];
const INT8: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT8OID);

/// Run a statement kept for the backend (prepared.rs: a hold and its
/// settle run a dozen statements; planning each anew cost more than
/// running them), as the owner; `f` reads the rows.
fn kept<R>(
    sql: &'static str,
    types: &[PgOid],
    args: &[pgrx::datum::DatumWithOid],
    f: impl FnOnce(pgrx::spi::SpiTupleTable) -> FluxResult<R>,
) -> FluxResult<R> {
    let _owner = crate::privilege::AsOwner::enter()?;
    Spi::connect_mut(|c| {
        let p = crate::prepared::kept(c, sql, types, true)?;
        let t = c.update(&*p, None, args)?;
        f(t)
    })
}

fn nothing(_: pgrx::spi::SpiTupleTable) -> FluxResult<()> {
    Ok(())
}

/// Units of holds past their ttl still recorded on `c`. Reads only.
pub fn expired(c: &Counter, now: i64) -> FluxResult<i64> {
    let _owner = crate::privilege::AsOwner::enter()?;
    Spi::connect(|client| {
        let p = crate::prepared::kept(client, EXPIRED, &COUNTER_TYPES, false)?;
        let t = client.select(&*p, Some(1), &counter_args(c, now))?;
        Ok(t.first().get_one::<i64>()?.unwrap_or(0))
    })
}

/// Record `amount` on a counter that may carry holds, if it fits. Tried on
/// the heap path first (counters.rs), counting every charge as used: once
/// it has written the row, and so holds its lock, one query asks whether
/// any charge is past its ttl (seeing every writer that committed before
/// the lock). None (the common case): done, exactly. Some: they are given
/// back. When the heap path refuses, or stands aside, the SQL path below
/// decides with the expired charges given back first.
pub fn record_counter(
    c: &Counter,
    amount: i64,
    limit: Option<i64>,
    now: i64,
) -> FluxResult<(bool, i64)> {
    if fits(limit, 0, amount) {
        let cat = crate::cache::catalogue()?;
        if let super::counters::Added::Total(n) =
            super::counters::add(cat.namespace, c, amount, limit)?
        {
            if expired(c, now)? == 0 {
                return Ok((true, n));
            }
            let back = give_back(c, now)?;
            let _owner = crate::privilege::AsOwner::enter()?;
            let total = n.saturating_sub(back).max(0);
            sql::set_counter(c, total)?;
            return Ok((true, total));
        }
    }
    add(c, amount, limit, now)
}

/// Close the charges on `c` past their ttl; the units they held. Under the
/// counter's row lock.
fn give_back(c: &Counter, now: i64) -> FluxResult<i64> {
    let _owner = crate::privilege::AsOwner::enter()?;
    Spi::connect_mut(|client| {
        let p = crate::prepared::kept(client, GIVE_BACK, &COUNTER_TYPES, true)?;
        let mut n = 0i64;
        for r in client.update(&*p, None, &counter_args(c, now))? {
            n = n.saturating_add(r.get::<i64>(1)?.unwrap_or(0));
        }
        Ok::<_, FluxError>(n)
    })
}

const LIVE_HELD: &str = "SELECT LEAST(COALESCE(pg_catalog.sum(amount), 0), 9223372036854775807)::pg_catalog.int8 FROM flux.hold_charges \
     WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
       AND period_start OPERATOR(pg_catalog.=) $3 AND caller OPERATOR(pg_catalog.=) $4 \
       AND open AND expires_at OPERATOR(pg_catalog.>) $5";

/// flux_release on a counter that may carry holds: give back the expired
/// ones, then `amount` units, but never those live holds count (a release
/// frees consumed units, not held ones). The new used.
pub fn release_units(c: &Counter, amount: i64, now: i64) -> FluxResult<i64> {
    let _owner = crate::privilege::AsOwner::enter()?;
    let locked = sql::lock_counter(c)?;
    let back = give_back(c, now)?;
    let held = kept(LIVE_HELD, &COUNTER_TYPES, &counter_args(c, now), |t| {
        Ok(t.first().get_one::<i64>()?.unwrap_or(0))
    })?;
    let used = locked
        .saturating_sub(back)
        .saturating_sub(amount)
        .max(held)
        .max(0);
    if used != locked {
        sql::set_counter(c, used)?;
    }
    Ok(used)
}

/// Record `amount` on a counter that may carry holds, through SQL: lock its
/// row, give back the holds past their ttl, decide, write. Returns whether
/// it was recorded and the total (as it stands, when it was not).
pub fn add(c: &Counter, amount: i64, limit: Option<i64>, now: i64) -> FluxResult<(bool, i64)> {
    let _owner = crate::privilege::AsOwner::enter()?;
    let locked = sql::lock_counter(c)?;
    let back = give_back(c, now)?;
    let used = locked.saturating_sub(back).max(0);
    if !fits(limit, used, amount) {
        if used != locked {
            sql::set_counter(c, used)?;
        }
        return Ok((false, used));
    }
    let total = sql::total(used, amount)?.max(0);
    sql::set_counter(c, total)?;
    Ok((true, total))
}

/// A hold's row.
struct Hold {
    id: String,
    tenant: String,
    feature: String,
    amount: i64,
    pool: Option<String>,
    credits: Option<i64>,
    expires_at: i64,
    settled_at: Option<i64>,
    actual: Option<i64>,
    released: bool,
}

fn hold_of(r: &pgrx::spi::SpiHeapTupleData) -> FluxResult<Hold> {
    let ts = |i: usize| -> FluxResult<Option<i64>> {
        Ok(r.get::<pgrx::datum::TimestampWithTimeZone>(i)?
            .map(|t| t.into_inner()))
    };
    Ok(Hold {
        id: r.get::<String>(1)?.unwrap_or_default(),
        tenant: r.get::<String>(2)?.unwrap_or_default(),
        feature: r.get::<String>(3)?.unwrap_or_default(),
        amount: r.get::<i64>(4)?.unwrap_or(0),
        pool: r.get::<String>(5)?,
        credits: r.get::<i64>(6)?,
        expires_at: ts(7)?.unwrap_or(i64::MIN),
        settled_at: ts(8)?,
        actual: r.get::<i64>(9)?,
        released: r.get::<bool>(10)?.unwrap_or(false),
    })
}

/// The hold `id`, for `function`: unknown, or a hold of a tenant the caller
/// may not act for, is an error. With `lock`, its row is locked (FOR
/// UPDATE) after the caller is known to be allowed.
fn find(function: &str, id: &str, lock: bool) -> FluxResult<Hold> {
    const READ: &str = concat!(
        "SELECT id, tenant, feature, amount, pool, credits, expires_at, settled_at, actual, released_at IS NOT NULL ",
        "FROM flux.holds WHERE id OPERATOR(pg_catalog.=) $1"
    );
    const LOCK: &str = concat!(
        "SELECT id, tenant, feature, amount, pool, credits, expires_at, settled_at, actual, released_at IS NOT NULL ",
        "FROM flux.holds WHERE id OPERATOR(pg_catalog.=) $1 FOR UPDATE"
    );
    let read = |sql: &'static str| -> FluxResult<Option<Hold>> {
        kept(sql, &[TEXT], &[id.into()], |t| match t.into_iter().next() {
            Some(r) => Ok(Some(hold_of(&r)?)),
            None => Ok(None),
        })
    };
    let Some(h) = read(READ)? else {
        return Err(FluxError::UnknownReference(format!(
            "{function}: no hold with id {} (flux_hold returns it in hold_id)",
            shown(id)
        )));
    };
    if !crate::access::may_act_for(&h.tenant) {
        return Err(FluxError::Forbidden(format!(
            "{function}: hold {} is not a hold of a tenant this role may act for (flux.tenant, flux_authenticate() or flux_service)",
            shown(id)
        )));
    }
    if !lock {
        return Ok(h);
    }
    read(LOCK)?.ok_or_else(|| {
        FluxError::UnknownReference(format!(
            "{function}: hold {} was deleted meanwhile (its tenant or feature was)",
            shown(id)
        ))
    })
}

/// The clock a settle decides expiry by: flux.now when set, else the later
/// of the transaction's time and the wall clock. A transaction left open
/// must not settle a hold that everyone else already stopped counting
/// (whose credits they may have drawn since).
fn settle_clock(now: i64) -> i64 {
    if crate::gucs::clock_is_set() {
        return now;
    }
    // SAFETY: reads the system clock.
    now.max(unsafe { pg_sys::GetCurrentTimestamp() })
}

/// A hold that is no longer open: an error for `function`, else None.
fn closed(function: &str, h: &Hold, now: i64) -> Option<FluxError> {
    if let (Some(at), Some(actual)) = (h.settled_at, h.actual) {
        return Some(FluxError::NotReady(format!(
            "{function}: hold {} was already settled at {} ({actual} of {} used)",
            shown(&h.id),
            format_minute(at),
            h.amount
        )));
    }
    if h.released {
        return Some(FluxError::NotReady(format!(
            "{function}: hold {} was released",
            shown(&h.id)
        )));
    }
    if h.expires_at <= now {
        return Some(FluxError::NotReady(format!(
            "{function}: hold {} expired at {} and its {} units no longer count: record what was used with flux_consume",
            shown(&h.id),
            format_minute(h.expires_at),
            h.amount
        )));
    }
    None
}

/// A hold's charges: (caller, period key, amount, open), in the order
/// consumes lock counters (the key's before the tenant's).
fn charges(id: &str) -> FluxResult<Vec<(String, i64, i64, bool)>> {
    const CHARGES: &str = "SELECT caller, period_start, amount, open FROM flux.hold_charges \
             WHERE hold_id OPERATOR(pg_catalog.=) $1 \
             ORDER BY caller OPERATOR(pg_catalog.=) '', caller";
    kept(CHARGES, &[TEXT], &[id.into()], |t| {
        let mut v = Vec::new();
        for r in t {
            v.push((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<pgrx::datum::TimestampWithTimeZone>(2)?
                    .map_or(i64::MIN, |t| t.into_inner()),
                r.get::<i64>(3)?.unwrap_or(0),
                r.get::<bool>(4)?.unwrap_or(false),
            ));
        }
        Ok(v)
    })
}

/// Close the hold's open charges on `caller` (all but the pool's when
/// None); the callers closed.
fn close_charges(id: &str, caller: Option<&str>) -> FluxResult<Vec<String>> {
    const CLOSE: &str = "UPDATE flux.hold_charges SET open = false \
             WHERE hold_id OPERATOR(pg_catalog.=) $1 AND open \
               AND CASE WHEN $2 IS NULL THEN caller OPERATOR(pg_catalog.<>) 'pool' \
                        ELSE caller OPERATOR(pg_catalog.=) $2 END \
             RETURNING caller";
    kept(CLOSE, &[TEXT, TEXT], &[id.into(), caller.into()], |t| {
        let mut v = Vec::new();
        for r in t {
            v.push(r.get::<String>(1)?.unwrap_or_default());
        }
        Ok(v)
    })
}

fn counter_of<'a>(h: &'a Hold, caller: &'a str, start: i64) -> Counter<'a> {
    Counter {
        tenant: &h.tenant,
        feature: &h.feature,
        start,
        caller: (!caller.is_empty()).then_some(caller),
    }
}

fn validate_key(key: Option<&str>) -> FluxResult<()> {
    if let Some(k) = key {
        if k.is_empty() || k.chars().count() > 200 {
            return Err(FluxError::InvalidValue(format!(
                "idempotency_key {} must be 1 to 200 characters",
                shown(k)
            )));
        }
    }
    Ok(())
}

/// flux_hold: reserve `amount` units of `feature` for `ttl`.
pub fn hold(
    tenant: &str,
    feature: &str,
    amount: i64,
    ttl: Span,
    key: Option<&str>,
) -> FluxResult<Decision> {
    store::ensure_writable("flux_hold")?;
    crate::access::require_act_for("flux_hold", tenant)?;
    let _owner = crate::privilege::AsOwnerUnpinned::enter()?;
    if amount <= 0 {
        return Err(FluxError::InvalidValue(format!(
            "amount {amount} must be > 0"
        )));
    }
    validate_key(key)?;
    let mut x = entitle(tenant, feature, None)?;
    if matches!(x.d.reason, Reason::UnknownFeature | Reason::UnknownTenant) {
        return Ok(x.d);
    }
    let now = x.ctx.now;
    let expires_at = add_span(now, ttl);
    if expires_at <= now {
        return Err(FluxError::InvalidValue(
            "ttl must be a positive interval (e.g. '15 minutes')".into(),
        ));
    }
    if expires_at > add_span(now, MAX_TTL) {
        return Err(FluxError::InvalidValue(
            "ttl must be at most 7 days: a hold is for work that outlives a transaction (a stream, an export), and its units count in the period it was made".into(),
        ));
    }
    let kind = x.feature().map_or(Kind::Boolean, |f| f.kind);
    let price = credits::price_of(&x)?;
    match kind {
        Kind::Rate => {
            return Err(FluxError::InvalidValue(format!(
                "\"{feature}\" is a rate feature: a rate limit counts calls as they happen (flux_consume); holds reserve units of limit, metered and credits features and of priced features"
            )))
        }
        Kind::Boolean if price.is_none() => {
            return Err(FluxError::InvalidValue(format!(
                "\"{feature}\" is a boolean feature with no price: there is nothing to hold (holds reserve units of limit, metered and credits features, and of features priced with flux_set_cost)"
            )))
        }
        _ => {}
    }
    let is_pool = kind == Kind::Credits;
    let open = x.d.allowed || (is_pool && x.d.reason == Reason::NotInPlan);
    if !open {
        return Ok(x.d);
    }
    // The hold's row first: a concurrent call with the same key waits on it
    // and then finds the first.
    let Some(id) = insert_hold(tenant, feature, amount, now, expires_at, key)? else {
        return repeated(x, key.unwrap_or_default(), amount);
    };
    if !x.holds {
        // Once per feature (or a few times, when first holds race: no key,
        // so none waits on another): every backend's catalogue then knows
        // that its counters may carry holds.
        kept(
            "INSERT INTO flux.held_features (feature) VALUES ($1)",
            &[TEXT],
            &[feature.into()],
            nothing,
        )?;
        crate::cache::invalidation::send_catalogue();
        x.holds = true;
    }
    let mut reservation = None;
    if let Some((pool, credits)) = &price {
        let need = credits::cost(amount, *credits, feature)?;
        let px = credits::pool_decision(&x, pool)?;
        let lock = PoolLock::take(px.as_ref().unwrap_or(&x), "")?;
        if !lock.covers(need) {
            x.d.balance = lock.balance();
            credits::refuse_for(&mut x, pool, lock.balance().unwrap_or(0), need);
            delete_hold(&id)?;
            return Ok(x.d);
        }
        lock.touch()?;
        reservation = Some((pool.clone(), need, lock.balance().map(|b| b - need)));
    }
    // The counters it counts on, before record() reports on them.
    let counted: Vec<(String, i64)> = if is_pool {
        Vec::new()
    } else {
        allowances(&x)?
            .iter()
            .filter(|a| !matches!(a.meter, Meter::Rate { .. }))
            .map(|a| {
                let c = a.counter(&x);
                (c.caller.unwrap_or("").to_string(), c.start)
            })
            .collect()
    };
    if !is_pool {
        record(&mut x, amount)?;
        if !x.d.allowed {
            delete_hold(&id)?;
            return Ok(x.d);
        }
    }
    for (caller, start) in &counted {
        insert_charge(&id, caller, tenant, feature, *start, amount, expires_at)?;
    }
    let until = format_minute(expires_at);
    if let Some((pool, need, after)) = reservation {
        insert_charge(
            &id,
            "pool",
            tenant,
            &pool,
            sql::period_key(None),
            need,
            expires_at,
        )?;
        kept(
            "UPDATE flux.holds SET pool = $2, credits = $3 WHERE id OPERATOR(pg_catalog.=) $1",
            &[TEXT, TEXT, INT8],
            &[id.as_str().into(), pool.as_str().into(), need.into()],
            nothing,
        )?;
        x.d.balance = after;
        if is_pool {
            x.d.allowed = true;
            x.d.reason = Reason::Ok;
            x.d.upgrade_plans = None;
            x.d.remaining = after;
            x.d.message = match after {
                Some(b) => format!("{pool}: {need} held until {until}, {b} left"),
                None => format!("{pool}: {need} held until {until} (unlimited)"),
            };
        } else {
            x.d.message = format!("{amount} held until {until}; {}", x.d.message);
            credits::with_balance(&mut x, &pool);
        }
    } else {
        x.d.message = format!("{amount} held until {until}; {}", x.d.message);
    }
    x.d.hold_id = Some(id);
    Ok(x.d)
}

fn insert_hold(
    tenant: &str,
    feature: &str,
    amount: i64,
    now: i64,
    expires_at: i64,
    key: Option<&str>,
) -> FluxResult<Option<String>> {
    kept(
        "INSERT INTO flux.holds (tenant, feature, amount, created_at, expires_at, idempotency_key) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (tenant, feature, idempotency_key) WHERE idempotency_key IS NOT NULL \
         DO NOTHING RETURNING id",
        &[TEXT, TEXT, INT8, TSTZ, TSTZ, TEXT],
        &[
            tenant.into(),
            feature.into(),
            amount.into(),
            ts_datum(Some(now)).into(),
            ts_datum(Some(expires_at)).into(),
            key.into(),
        ],
        |t| match t.into_iter().next() {
            Some(r) => Ok(r.get::<String>(1)?),
            None => Ok(None),
        },
    )
}

/// A hold refused after its row was written: our own uncommitted row.
fn delete_hold(id: &str) -> FluxResult<()> {
    let _owner = crate::privilege::AsOwner::enter()?;
    store::exec(
        "DELETE FROM flux.holds WHERE id OPERATOR(pg_catalog.=) $1",
        &[id.into()],
    )
}

fn insert_charge(
    id: &str,
    caller: &str,
    tenant: &str,
    feature: &str,
    start: i64,
    amount: i64,
    expires_at: i64,
) -> FluxResult<()> {
    let start = pgrx::datum::TimestampWithTimeZone::try_from(start)
        .unwrap_or_else(|_| pgrx::datum::TimestampWithTimeZone::negative_infinity());
    kept(
        "INSERT INTO flux.hold_charges (hold_id, caller, tenant, feature, period_start, amount, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[TEXT, TEXT, TEXT, TEXT, TSTZ, INT8, TSTZ],
        &[
            id.into(),
            caller.into(),
            tenant.into(),
            feature.into(),
            start.into(),
            amount.into(),
            ts_datum(Some(expires_at)).into(),
        ],
        nothing,
    )
}

/// A repeated idempotency key: the first hold, as it stands now.
fn repeated(mut x: Decided, key: &str, amount: i64) -> FluxResult<Decision> {
    let first = {
        let _owner = crate::privilege::AsOwner::enter()?;
        store::one::<pgrx::JsonB>(
            "SELECT pg_catalog.jsonb_build_object('id', id, 'amount', amount, 'state', \
                    CASE WHEN settled_at IS NOT NULL THEN 'settled' WHEN released_at IS NOT NULL THEN 'released' \
                         WHEN expires_at OPERATOR(pg_catalog.<=) $4 THEN 'expired' ELSE 'open' END) \
               FROM flux.holds \
             WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
               AND idempotency_key OPERATOR(pg_catalog.=) $3",
            &[
                x.d.tenant.as_str().into(),
                x.d.feature.as_str().into(),
                key.into(),
                ts_datum(Some(x.ctx.now)).into(),
            ],
        )?
    };
    let Some(pgrx::JsonB(first)) = first else {
        return Err(FluxError::Internal(format!(
            "the hold with idempotency_key {} vanished",
            shown(key)
        )));
    };
    let held = first["amount"].as_i64().unwrap_or(0);
    if held != amount {
        return Err(FluxError::InvalidValue(format!(
            "idempotency_key {} was first used for a hold of {held}, not {amount}: it is not the same request",
            shown(key)
        )));
    }
    x.holds = true;
    super::observe(&mut x, 0)?;
    x.d.allowed = true;
    x.d.reason = Reason::Ok;
    x.d.upgrade_plans = None;
    let state = first["state"].as_str().unwrap_or("open");
    let id = first["id"].as_str().unwrap_or_default().to_string();
    if state != "open" {
        // Work must not start on a hold that no longer reserves anything.
        return Err(FluxError::NotReady(format!(
            "flux_hold: the hold {} made with idempotency_key {} is {state}: a new request needs a new key",
            shown(&id),
            shown(key)
        )));
    }
    x.d.message = format!(
        "hold {} was made with this idempotency key ({state}); {}",
        shown(&id),
        x.d.message
    );
    x.d.hold_id = Some(id);
    Ok(x.d)
}

/// flux_settle: the hold becomes `actual` units of usage.
pub fn settle(id: &str, actual: i64) -> FluxResult<Decision> {
    store::ensure_writable("flux_settle")?;
    if actual < 0 {
        return Err(FluxError::InvalidValue(format!(
            "actual {actual} must be >= 0 (flux_release_hold gives a hold back whole)"
        )));
    }
    let h = find("flux_settle", id, true)?;
    let _owner = crate::privilege::AsOwnerUnpinned::enter()?;
    let mut x = entitle(&h.tenant, &h.feature, None)?;
    x.holds = true;
    let now = x.ctx.now;
    if let Some(e) = closed("flux_settle", &h, settle_clock(now)) {
        return Err(e);
    }
    let charged = charges(id)?;
    let gone = || {
        FluxError::NotReady(format!(
            "flux_settle: hold {} expired at {} and its units no longer count: record what was used with flux_consume",
            shown(id),
            format_minute(h.expires_at)
        ))
    };
    if charged.iter().any(|c| !c.3) {
        // A writer whose clock was later gave it back.
        return Err(gone());
    }
    // Units past the hold go to the hold's API key (and its allowance), not
    // to whichever key the settling session has.
    x.key = match charged.iter().find_map(|c| c.0.strip_prefix("key:")) {
        Some(key_id) => crate::identity::key_facts(key_id)?,
        None => None,
    };
    let refused = |mut x: Decided, why: String| -> Decision {
        x.d.message = format!("{why}: {}", x.d.message);
        x.d.hold_id = Some(h.id.clone());
        x.d
    };
    // The pool: what `actual` costs at the price the hold was made at; more
    // than was held only if the balance (without this hold) covers it.
    let mut draw = None;
    if let (Some(pool), Some(credits)) = (&h.pool, h.credits) {
        let unit = credits / h.amount;
        let need = credits::cost(actual, unit, &h.feature)?;
        let px = credits::pool_decision(&x, pool)?;
        let lock = PoolLock::take(px.as_ref().unwrap_or(&x), id)?;
        // Waiting for the pool may have taken it past its ttl, and draws
        // since then no longer counted its reservation.
        if h.expires_at <= settle_clock(now) {
            return Err(gone());
        }
        if need > credits && !lock.covers(need) {
            let with_hold = lock.balance().unwrap_or(0);
            credits::refuse_for(&mut x, pool, with_hold, need);
            x.d.balance = Some((with_hold - credits).max(0));
            x.d.message = format!(
                "settling {actual} needs more than the {} held: {actual} of {} cost {need} and {pool} has {with_hold} with the hold",
                h.amount, h.feature
            );
            x.d.hold_id = Some(h.id.clone());
            return Ok(x.d);
        }
        if need > 0 {
            let mut d = lock.draw(&h.feature, need);
            d.reason = Some(format!("settles hold {}", h.id));
            draw = Some(d);
        }
    }
    let counted: Vec<_> = charged.iter().filter(|c| c.0 != "pool").collect();
    // Units past the hold: a consume, decided as one (with this hold still
    // counted).
    if actual > h.amount && !counted.is_empty() {
        record(&mut x, actual - h.amount)?;
        if !x.d.allowed {
            return Ok(refused(
                x,
                format!("settling {actual} needs more than the {} held", h.amount),
            ));
        }
    }
    // The counters: locked first, then the charges closed; units held and
    // not used go back. A charge a writer gave back meanwhile (its clock
    // was past the ttl) gets what was used recorded instead.
    let mut locked = Vec::with_capacity(counted.len());
    for (caller, start, _, _) in &counted {
        let c = counter_of(&h, caller, *start);
        let _o = crate::privilege::AsOwner::enter()?;
        locked.push((c, sql::lock_counter(&c)?));
    }
    let closed_now = close_charges(id, None)?;
    if closed_now.len() != locked.len() || h.expires_at <= settle_clock(now) {
        // Given back by a writer whose clock passed the ttl while this
        // settle waited for the counter (the error undoes this call).
        return Err(gone());
    }
    let unused = (h.amount - actual).max(0);
    if unused > 0 {
        let _o = crate::privilege::AsOwner::enter()?;
        for (c, used) in locked {
            sql::set_counter(&c, used.saturating_sub(unused).max(0))?;
        }
    }
    if let Some(d) = &draw {
        credits::write(d, None)?;
    }
    close_charges(id, Some("pool"))?;
    kept(
        "UPDATE flux.holds SET settled_at = $2, actual = $3 WHERE id OPERATOR(pg_catalog.=) $1",
        &[TEXT, TSTZ, INT8],
        &[id.into(), ts_datum(Some(now)).into(), actual.into()],
        nothing,
    )?;
    // The decision as it stands after: read under a snapshot that sees
    // this call's writes (the statement's does not).
    let mut y = entitle(&h.tenant, &h.feature, None)?;
    y.holds = true;
    // SAFETY: GetLatestSnapshot's static snapshot is copied by
    // PushActiveSnapshot and popped below; on error, abort processing pops it.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot()) };
    let seen = super::observe(&mut y, 0);
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    seen?;
    y.d.allowed = true;
    y.d.reason = Reason::Ok;
    y.d.upgrade_plans = None;
    y.d.message = format!(
        "hold settled: {actual} of {} used; {}",
        h.amount, y.d.message
    );
    y.d.hold_id = Some(h.id);
    Ok(y.d)
}

/// flux_release_hold: give the hold back whole. Releasing it again, or
/// after it expired, does nothing more.
pub fn release(id: &str) -> FluxResult<()> {
    store::ensure_writable("flux_release_hold")?;
    let h = find("flux_release_hold", id, true)?;
    let _owner = crate::privilege::AsOwner::enter()?;
    if let (Some(at), Some(actual)) = (h.settled_at, h.actual) {
        return Err(FluxError::NotReady(format!(
            "flux_release_hold: hold {} was settled at {} ({actual} of {} used): there is nothing to release",
            shown(&h.id),
            format_minute(at),
            h.amount
        )));
    }
    if h.released {
        return Ok(());
    }
    for (caller, start, amount, open) in charges(id)? {
        if !open || caller == "pool" {
            continue;
        }
        let c = counter_of(&h, &caller, start);
        let used = sql::lock_counter(&c)?;
        if !close_charges(id, Some(&caller))?.is_empty() {
            sql::set_counter(&c, (used - amount).max(0))?;
        }
    }
    close_charges(id, Some("pool"))?;
    kept(
        "UPDATE flux.holds SET released_at = pg_catalog.now() WHERE id OPERATOR(pg_catalog.=) $1",
        &[TEXT],
        &[id.into()],
        nothing,
    )
}

fn span_of(ttl: pgrx::datum::Interval) -> Span {
    Span {
        months: ttl.months(),
        days: ttl.days(),
        micros: ttl.micros(),
    }
}

/// Reserve `amount` units of `feature` (counted as used, or reserved in
/// its credits pool) until settled, released or `ttl` has passed; the
/// decision carries the hold's id in `hold_id`. A repeated
/// idempotency_key returns the first hold.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_hold(
    tenant: Option<&str>,
    feature: Option<&str>,
    amount: Option<i64>,
    ttl: default!(Option<pgrx::datum::Interval>, "'15 minutes'"),
    idempotency_key: default!(Option<&str>, "NULL"),
) -> Option<pgrx::composite_type!('static, "flux.decision")> {
    let (tenant, feature) = (tenant?, feature?);
    Some(to_composite(
        (|| {
            let amount = crate::validate::need(amount, "amount")?;
            let ttl = crate::validate::need(ttl, "ttl")?;
            hold(tenant, feature, amount, span_of(ttl), idempotency_key)
        })()
        .or_raise(),
    ))
}

/// Turn a hold into `actual` units of usage (more than was held only if it
/// fits) and free the rest.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_settle(
    hold_id: Option<&str>,
    actual: Option<i64>,
) -> Option<pgrx::composite_type!('static, "flux.decision")> {
    Some(to_composite(
        (|| {
            let id = crate::validate::need(hold_id, "hold_id")?;
            let actual = crate::validate::need(actual, "actual")?;
            settle(id, actual)
        })()
        .or_raise(),
    ))
}

/// Give a hold back whole.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_release_hold(hold_id: Option<&str>) {
    (|| release(crate::validate::need(hold_id, "hold_id")?))().or_raise()
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn one(sql: &str) -> Option<i64> {
        Spi::get_one::<i64>(sql).unwrap()
    }

    /// A hold counts as used; past its ttl it stops counting for readers
    /// at once and the next writer gives it back, closing its charge.
    #[pg_test]
    fn an_expired_hold_is_counted_out_then_given_back() {
        Spi::run(
            "SET flux.now = '2026-11-18 10:00+00';
             SELECT flux_define_feature('api', 'metered');
             SELECT flux_define_plan('pro');
             SELECT flux_grant('pro', 'api', 10, 'day');
             SELECT flux_subscribe('acme', 'pro');
             SELECT flux_consume('acme', 'api', 2);
             SELECT flux_hold('acme', 'api', 7, '5 minutes');",
        )
        .unwrap();
        assert_eq!(one("SELECT flux_usage('acme', 'api')"), Some(9));
        assert_eq!(
            Spi::get_one::<bool>("SELECT allowed FROM flux_consume('acme', 'api', 2)").unwrap(),
            Some(false)
        );
        Spi::run("SET flux.now = '2026-11-18 10:06+00'").unwrap();
        assert_eq!(one("SELECT flux_usage('acme', 'api')"), Some(2));
        assert_eq!(one("SELECT used FROM flux.usage"), Some(9));
        assert_eq!(
            one("SELECT used FROM flux_consume('acme', 'api', 8)"),
            Some(10)
        );
        assert_eq!(one("SELECT used FROM flux.usage"), Some(10));
        assert_eq!(
            Spi::get_one::<bool>("SELECT bool_or(open) FROM flux.hold_charges").unwrap(),
            Some(false)
        );
        Spi::run("RESET flux.now").unwrap();
    }
}
