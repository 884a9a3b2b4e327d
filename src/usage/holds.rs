//! Holds (CONTRACT "Credits and holds"): units reserved for work that
//! outlives a transaction (an LLM stream, a long export), then settled at
//! what was really used, released, or left to expire.
//!
//! - On a feature's counters (limit, metered, the current API key's) a hold
//!   is recorded as a consume is, under the same row locks: every check and
//!   consume sees it, and none can pass the limit. Each counter it counts on
//!   gets a flux.hold_charges row, open until the hold is settled or
//!   released. Past its ttl a charge stops counting: the readers of a
//!   feature that has had holds (flux.features.has_holds) subtract the
//!   expired charges, and the next writer of the counter gives them back
//!   (under the counter's lock, so no job is needed and nothing is counted
//!   twice). A session whose catalogue has not yet seen has_holds counts
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
const TSTZ: PgOid = PgOid::BuiltIn(PgBuiltInOids::TIMESTAMPTZOID);

/// Whether counter `c` of `x`'s feature may carry holds: the feature has
/// had one; a hold counts on the tenant's and the API key's counters, never
/// a subject's.
pub fn may_carry(x: &Decided, c: &Counter) -> bool {
    x.holds && !c.caller.is_some_and(|k| k.starts_with("subject:"))
}

const EXPIRED: &str =
    "SELECT COALESCE(pg_catalog.sum(amount), 0)::pg_catalog.int8 FROM flux.hold_charges \
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

/// Units of holds past their ttl still recorded on `c`. Reads only.
pub fn expired(c: &Counter, now: i64) -> FluxResult<i64> {
    let _owner = crate::privilege::AsOwner::enter()?;
    Spi::connect(|client| {
        let p = crate::prepared::kept(client, EXPIRED, &COUNTER_TYPES, false)?;
        let t = client.select(&*p, Some(1), &counter_args(c, now))?;
        Ok(t.first().get_one::<i64>()?.unwrap_or(0))
    })
}

/// Record `amount` on a counter that may carry holds, if it fits: lock its
/// row, give back the holds past their ttl, decide, write. Returns whether
/// it was recorded and the total (as it stands, when it was not).
pub fn add(c: &Counter, amount: i64, limit: Option<i64>, now: i64) -> FluxResult<(bool, i64)> {
    let _owner = crate::privilege::AsOwner::enter()?;
    let locked = sql::lock_counter(c)?;
    let back: i64 = Spi::connect_mut(|client| {
        let p = crate::prepared::kept(client, GIVE_BACK, &COUNTER_TYPES, true)?;
        let mut n = 0i64;
        for r in client.update(&*p, None, &counter_args(c, now))? {
            n = n.saturating_add(r.get::<i64>(1)?.unwrap_or(0));
        }
        Ok::<_, FluxError>(n)
    })?;
    let used = (locked - back).max(0);
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

const HOLD_COLUMNS: &str = "id, tenant, feature, amount, pool, credits, expires_at, settled_at, actual, released_at IS NOT NULL";

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
    let read = |suffix: &str| -> FluxResult<Option<Hold>> {
        let _owner = crate::privilege::AsOwner::enter()?;
        let sql = format!(
            "SELECT {HOLD_COLUMNS} FROM flux.holds WHERE id OPERATOR(pg_catalog.=) $1{suffix}"
        );
        Spi::connect_mut(|c| {
            let t = c.update(&sql, Some(1), &[id.into()])?;
            match t.into_iter().next() {
                Some(r) => Ok(Some(hold_of(&r)?)),
                None => Ok(None),
            }
        })
    };
    let Some(h) = read("")? else {
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
    read(" FOR UPDATE")?.ok_or_else(|| {
        FluxError::UnknownReference(format!(
            "{function}: hold {} was deleted meanwhile (its tenant or feature was)",
            shown(id)
        ))
    })
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

/// A hold's charges: (caller, period key, amount, open).
fn charges(id: &str) -> FluxResult<Vec<(String, i64, i64, bool)>> {
    let _owner = crate::privilege::AsOwner::enter()?;
    Spi::connect(|c| {
        let t = c.select(
            "SELECT caller, period_start, amount, open FROM flux.hold_charges \
             WHERE hold_id OPERATOR(pg_catalog.=) $1 ORDER BY caller",
            None,
            &[id.into()],
        )?;
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
    let _owner = crate::privilege::AsOwner::enter()?;
    Spi::connect_mut(|c| {
        let t = c.update(
            "UPDATE flux.hold_charges SET open = false \
             WHERE hold_id OPERATOR(pg_catalog.=) $1 AND open \
               AND CASE WHEN $2 IS NULL THEN caller OPERATOR(pg_catalog.<>) 'pool' \
                        ELSE caller OPERATOR(pg_catalog.=) $2 END \
             RETURNING caller",
            None,
            &[id.into(), caller.into()],
        )?;
        let mut v = Vec::new();
        for r in t {
            v.push(r.get::<String>(1)?.unwrap_or_default());
        }
        Ok::<_, FluxError>(v)
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
        // Once per feature: every backend's catalogue then knows that its
        // counters may carry holds.
        store::exec(
            "UPDATE flux.features SET has_holds = true \
             WHERE key OPERATOR(pg_catalog.=) $1 AND NOT has_holds",
            &[feature.into()],
        )?;
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
        store::exec(
            "UPDATE flux.holds SET pool = $2, credits = $3 WHERE id OPERATOR(pg_catalog.=) $1",
            &[id.as_str().into(), pool.as_str().into(), need.into()],
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
    let _owner = crate::privilege::AsOwner::enter()?;
    store::one_mut::<String>(
        "INSERT INTO flux.holds (tenant, feature, amount, created_at, expires_at, idempotency_key) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (tenant, feature, idempotency_key) WHERE idempotency_key IS NOT NULL \
         DO NOTHING RETURNING id",
        &[
            tenant.into(),
            feature.into(),
            amount.into(),
            ts_datum(Some(now)).into(),
            ts_datum(Some(expires_at)).into(),
            key.into(),
        ],
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
    let _owner = crate::privilege::AsOwner::enter()?;
    let start = pgrx::datum::TimestampWithTimeZone::try_from(start)
        .unwrap_or_else(|_| pgrx::datum::TimestampWithTimeZone::negative_infinity());
    store::exec(
        "INSERT INTO flux.hold_charges (hold_id, caller, tenant, feature, period_start, amount, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            id.into(),
            caller.into(),
            tenant.into(),
            feature.into(),
            start.into(),
            amount.into(),
            ts_datum(Some(expires_at)).into(),
        ],
    )
}

/// A repeated idempotency key: the first hold, as it stands now.
fn repeated(mut x: Decided, key: &str, amount: i64) -> FluxResult<Decision> {
    let first = {
        let _owner = crate::privilege::AsOwner::enter()?;
        store::one::<pgrx::JsonB>(
            "SELECT pg_catalog.jsonb_build_object('id', id, 'amount', amount) FROM flux.holds \
             WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
               AND idempotency_key OPERATOR(pg_catalog.=) $3",
            &[
                x.d.tenant.as_str().into(),
                x.d.feature.as_str().into(),
                key.into(),
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
    let id = first["id"].as_str().unwrap_or_default().to_string();
    x.d.allowed = true;
    x.d.reason = Reason::Ok;
    x.d.upgrade_plans = None;
    x.d.message = format!(
        "hold {} was made with this idempotency key; {}",
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
    if let Some(e) = closed("flux_settle", &h, now) {
        return Err(e);
    }
    let charged = charges(id)?;
    if charged.iter().any(|c| !c.3) {
        // A writer whose clock was later gave it back.
        return Err(FluxError::NotReady(format!(
            "flux_settle: hold {} expired and its units no longer count: record what was used with flux_consume",
            shown(id)
        )));
    }
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
    for (c, used) in locked {
        let caller = c.caller.unwrap_or("");
        let next = if closed_now.iter().any(|k| k == caller) {
            used - (h.amount - actual).max(0)
        } else {
            used + actual.min(h.amount)
        };
        if next != used {
            let _o = crate::privilege::AsOwner::enter()?;
            sql::set_counter(&c, next.max(0))?;
        }
    }
    if let Some(d) = &draw {
        credits::write(d, None)?;
    }
    close_charges(id, Some("pool"))?;
    store::exec(
        "UPDATE flux.holds SET settled_at = $2, actual = $3 WHERE id OPERATOR(pg_catalog.=) $1",
        &[id.into(), ts_datum(Some(now)).into(), actual.into()],
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
    store::exec(
        "UPDATE flux.holds SET released_at = pg_catalog.now() WHERE id OPERATOR(pg_catalog.=) $1",
        &[id.into()],
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
