//! Credits (CONTRACT "Credits and holds"): a feature of kind `credits` is a
//! pool; `flux_grant(plan, pool, "limit", period)` gives an allowance each
//! period (counted in flux.usage like a metered quota, no rollover), and
//! `flux_add_credits` adds top-ups (rows of flux.credit_ledger with what is
//! left of them). A feature priced with `flux_set_cost` draws
//! `amount x credits` from its pool when consumed; consuming the pool
//! itself draws `amount`.
//!
//! A draw takes the allowance first, then top-ups by earliest expiry
//! (never-expiring last), and writes one ledger row. Exact under
//! concurrency: the pool's counter row (its allowance this period) is
//! locked first, then its live top-ups in draw order, so concurrent draws
//! queue and none can take the balance below zero; everything is written in
//! the caller's transaction and rolls back with it. A priced feature's own
//! limits are recorded after the pool's rows are locked and before the
//! draw is written: when either refuses, nothing is written (no undo).

use super::counters::Counter;
use super::rules::Meter;
use super::sql;
use crate::entitle::{entitle, Decided};
use crate::error::{FluxError, FluxResult};
use crate::model::{Kind, Reason};
use crate::store::ts_datum;
use pgrx::prelude::*;
use pgrx::{PgBuiltInOids, PgOid};

const TEXT: PgOid = PgOid::BuiltIn(PgBuiltInOids::TEXTOID);
const TSTZ: PgOid = PgOid::BuiltIn(PgBuiltInOids::TIMESTAMPTZOID);
const INT8: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT8OID);

/// Live top-ups, and the credits open holds reserve (their ttl not past).
const LIVE: &str = "SELECT (SELECT COALESCE(pg_catalog.sum(remaining), 0)::pg_catalog.int8 \
      FROM flux.credit_ledger \
     WHERE tenant OPERATOR(pg_catalog.=) $1 AND pool OPERATOR(pg_catalog.=) $2 \
       AND remaining OPERATOR(pg_catalog.>) 0 \
       AND (expires_at IS NULL OR expires_at OPERATOR(pg_catalog.>) $3)), \
     (SELECT LEAST(COALESCE(pg_catalog.sum(amount), 0), 9223372036854775807)::pg_catalog.int8 FROM flux.hold_charges \
     WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
       AND period_start OPERATOR(pg_catalog.=) '-infinity'::pg_catalog.timestamptz \
       AND caller OPERATOR(pg_catalog.=) 'pool' AND open \
       AND expires_at OPERATOR(pg_catalog.>) $3)";
/// Live top-ups in draw order, locked (k = 0), then one row (k = 1) with
/// the credits reserved by open holds other than hold $4: one statement,
/// as a priced consume runs it on every call.
const LOCK_LIVE: &str = "WITH lots AS (SELECT id, remaining, expires_at FROM flux.credit_ledger \
     WHERE tenant OPERATOR(pg_catalog.=) $1 AND pool OPERATOR(pg_catalog.=) $2 \
       AND remaining OPERATOR(pg_catalog.>) 0 \
       AND (expires_at IS NULL OR expires_at OPERATOR(pg_catalog.>) $3) FOR UPDATE) \
     SELECT 0 AS k, id, remaining, expires_at FROM lots \
     UNION ALL \
     SELECT 1, NULL::pg_catalog.int8, LEAST(COALESCE(pg_catalog.sum(amount), 0), 9223372036854775807)::pg_catalog.int8, \
            NULL::pg_catalog.timestamptz \
       FROM flux.hold_charges \
      WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
        AND period_start OPERATOR(pg_catalog.=) '-infinity'::pg_catalog.timestamptz \
        AND caller OPERATOR(pg_catalog.=) 'pool' AND open \
        AND expires_at OPERATOR(pg_catalog.>) $3 AND hold_id OPERATOR(pg_catalog.<>) $4 \
     ORDER BY k, expires_at ASC NULLS LAST, id";
const TAKE: &str = "UPDATE flux.credit_ledger SET remaining = remaining OPERATOR(pg_catalog.-) $2 \
     WHERE id OPERATOR(pg_catalog.=) $1";
const DRAWN: &str = "INSERT INTO flux.credit_ledger \
        (tenant, pool, amount, balance_after, feature, at, idempotency_key, reason) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// The pool a feature draws from and the credits one unit costs; for the
/// pool itself, (itself, 1).
pub fn price_of(x: &Decided) -> FluxResult<Option<(String, i64)>> {
    let Some(f) = x.feature() else {
        return Ok(None);
    };
    if f.kind == Kind::Credits {
        return Ok(Some((f.key.clone(), 1)));
    }
    let cat = crate::cache::catalogue()?;
    // A price whose pool is not (or no longer) of kind credits, which only
    // a COPY could store, prices nothing.
    Ok(cat
        .costs
        .get(&f.key)
        .filter(|(pool, _)| {
            cat.features
                .get(pool)
                .is_some_and(|p| p.kind == Kind::Credits)
        })
        .cloned())
}

/// A pool's allowance for a tenant now: the limit (None: unlimited) and
/// its counter's period key, or none (not granted: top-ups only).
struct Allowance {
    limit: Option<i64>,
    start: i64,
    meter: Meter,
}

fn allowance(pool: &Decided) -> FluxResult<Option<Allowance>> {
    if !pool.d.allowed {
        return Ok(None);
    }
    let Some(meter) = super::meter(pool)? else {
        return Ok(None);
    };
    let start = match meter {
        Meter::Quota { start, .. } => Some(start),
        _ => None,
    };
    Ok(Some(Allowance {
        limit: pool.d.limit,
        start: sql::period_key(start),
        meter,
    }))
}

/// A locked allowance counter: (period key, used).
type Locked = (i64, i64);

/// Lock the pool's row in flux.usage: its allowance's counter this period
/// (or, with no allowance, the row of period -infinity, kept at 0). Every
/// draw and top-up of the tenant's pool queues here first, then on the
/// top-ups in draw order, so each sees the balance the one before left.
/// Returns the allowance left (None: unlimited) and, with an allowance,
/// its counter's (period key, used). As the owner.
fn lock_pool(p: &Decided) -> FluxResult<(Option<i64>, Option<Locked>)> {
    let a = allowance(p)?;
    let start = a.as_ref().map_or(sql::period_key(None), |a| a.start);
    let used = sql::lock_counter(&Counter {
        tenant: &p.d.tenant,
        feature: &p.d.feature,
        start,
        caller: None,
    })?;
    Ok(match a {
        Some(a) => (a.limit.map(|l| (l - used).max(0)), Some((a.start, used))),
        None => (Some(0), None),
    })
}

fn counter<'a>(pool: &'a Decided, a: &Allowance) -> Counter<'a> {
    Counter {
        tenant: &pool.d.tenant,
        feature: &pool.d.feature,
        start: a.start,
        caller: None,
    }
}

fn checked_mul(amount: i64, credits: i64, feature: &str) -> FluxResult<i64> {
    amount.checked_mul(credits).ok_or_else(|| {
        FluxError::InvalidValue(format!(
            "amount {amount} of \"{feature}\" at {credits} credits each is out of range for bigint"
        ))
    })
}

/// What a pool holds for a tenant.
struct Holdings {
    /// The allowance left this period (None: unlimited).
    left: Option<i64>,
    /// The allowance's used.
    used: i64,
    /// Live top-ups.
    live: i64,
    /// Credits open holds reserve.
    reserved: i64,
}

impl Holdings {
    fn balance(&self) -> Option<i64> {
        balance(self.left, self.live, self.reserved)
    }
}

/// What `pool` holds for its tenant now. Reads only.
fn holdings(pool: &Decided) -> FluxResult<Holdings> {
    let (left, used) = match allowance(pool)? {
        Some(a) => {
            let used = sql::load_used(&counter(pool, &a))?;
            (a.limit.map(|l| (l - used).max(0)), used)
        }
        None => (Some(0), 0),
    };
    let (live, reserved) = live_top_ups(&pool.d.tenant, &pool.d.feature, pool.ctx.now)?;
    Ok(Holdings {
        left,
        used,
        live,
        reserved,
    })
}

/// (live top-ups, credits reserved by holds).
fn live_top_ups(tenant: &str, pool: &str, now: i64) -> FluxResult<(i64, i64)> {
    let _owner = crate::privilege::AsOwner::enter()?;
    Spi::connect(|c| {
        let p = crate::prepared::kept(c, LIVE, &[TEXT, TEXT, TSTZ], false)?;
        let t = c.select(
            &*p,
            Some(1),
            &[tenant.into(), pool.into(), ts_datum(Some(now)).into()],
        )?;
        let r = t.first();
        Ok((r.get::<i64>(1)?.unwrap_or(0), r.get::<i64>(2)?.unwrap_or(0)))
    })
}

/// The balance: allowance left plus live top-ups, less what holds reserve
/// (None: unlimited). Never below 0: a top-up that expired under a hold
/// leaves the hold's reservation larger than what is there.
fn balance(left: Option<i64>, live: i64, reserved: i64) -> Option<i64> {
    left.map(|l| l.saturating_add(live).saturating_sub(reserved).max(0))
}

/// flux_balance: what is left of `pool` for `tenant` now.
pub fn balance_of(tenant: &str, pool: &str) -> FluxResult<Option<i64>> {
    let x = entitle(tenant, pool, None)?;
    match x.feature().map(|f| f.kind) {
        Some(Kind::Credits) => {}
        Some(k) => {
            return Err(FluxError::InvalidValue(format!(
                "\"{pool}\" is a {} feature, not a credits pool",
                k.as_str()
            )))
        }
        None => {
            return Err(FluxError::UnknownReference(format!(
                "unknown feature \"{pool}\": define the pool with flux_define_feature('{pool}', 'credits')"
            )))
        }
    }
    if matches!(x.d.reason, Reason::UnknownTenant) {
        return Ok(Some(0));
    }
    Ok(holdings(&x)?.balance())
}

/// The read path's figures (flux_decide, flux_check): for a pool, its
/// balance as what remains (allowed while `amount` is left, top-ups
/// counting where the plan grants no allowance); for a priced feature,
/// whether its pool covers `amount` units. Returns whether it applied.
pub fn observe(x: &mut Decided, amount: i64) -> FluxResult<bool> {
    let Some((pool, credits)) = price_of(x)? else {
        return Ok(false);
    };
    let is_pool = pool == x.d.feature;
    // Denials before the allowance stand (an unknown tenant, a flag, the
    // subscription); a pool not in the plan may still have top-ups.
    let open = x.d.allowed || (is_pool && x.d.reason == Reason::NotInPlan);
    if !open {
        return Ok(true);
    }
    let need = checked_mul(amount, credits, &x.d.feature)?;
    if is_pool {
        let h = holdings(x)?;
        // Not in the plan and nothing bought: not_in_plan, as before.
        if !x.d.allowed && h.live == 0 {
            return Ok(true);
        }
        let bal = h.balance();
        x.d.balance = bal;
        x.d.remaining = bal;
        x.d.used = Some(h.used);
        if !x.d.allowed {
            x.d.limit = Some(0);
        }
        if let Some(Allowance {
            meter: Meter::Quota { end, .. },
            ..
        }) = allowance(x)?
        {
            x.d.resets_at = Some(end);
        }
        let covered = bal.is_none_or(|b| b >= need);
        x.d.allowed = covered;
        x.d.reason = if covered {
            Reason::Ok
        } else {
            Reason::LimitReached
        };
        x.d.message = pool_message(&x.d.feature, bal, &h);
        if covered {
            x.d.upgrade_plans = None;
        }
        return Ok(true);
    }
    let px = entitle(&x.d.tenant, &pool, None)?;
    let bal = holdings(&px)?.balance();
    x.d.balance = bal;
    if bal.is_some_and(|b| b < need) {
        refuse(x, &pool, bal.unwrap_or(0), need);
    } else {
        with_balance(x, &pool);
    }
    Ok(true)
}

/// "...; ai_credits: 40 left" after a priced feature's own message.
pub fn with_balance(x: &mut Decided, pool: &str) {
    if let Some(b) = x.d.balance {
        let sep = if x.d.message.is_empty() { "" } else { "; " };
        x.d.message = format!("{}{sep}{pool}: {b} left", x.d.message);
    }
}

fn pool_message(pool: &str, bal: Option<i64>, h: &Holdings) -> String {
    let held = if h.reserved > 0 {
        format!(", {} held", h.reserved)
    } else {
        String::new()
    };
    match (bal, h.left) {
        (None, _) => format!("{pool}: unlimited"),
        (Some(b), Some(l)) if h.live > 0 => format!(
            "{pool}: {b} left ({l} of this period's allowance, {} purchased{held})",
            h.live
        ),
        (Some(b), _) if h.reserved > 0 => format!("{pool}: {b} left ({} held)", h.reserved),
        (Some(b), _) => format!("{pool}: {b} left"),
    }
}

fn refuse(x: &mut Decided, pool: &str, left: i64, need: i64) {
    x.d.allowed = false;
    x.d.reason = Reason::LimitReached;
    x.d.message = if pool == x.d.feature {
        format!("{pool}: {left} left; {need} asked")
    } else {
        format!("{pool}: {left} left; {} costs {need}", x.d.feature)
    };
}

/// A draw decided under the pool's locks, not yet written.
pub struct Draw {
    pub pool: String,
    tenant: String,
    feature: String,
    need: i64,
    from_allowance: i64,
    /// (ledger id, credits taken) in draw order.
    from_top_ups: Vec<(i64, i64)>,
    counter: Option<Locked>,
    pub balance_after: Option<i64>,
    at: i64,
    /// The ledger row's reason (a settled hold says which).
    pub reason: Option<String>,
}

/// A tenant's pool, locked: its counter row, then its live top-ups in
/// draw order; with what holds other than the one being settled reserve.
pub struct PoolLock {
    pub pool: String,
    tenant: String,
    now: i64,
    left: Option<i64>,
    counter: Option<Locked>,
    lots: Vec<(i64, i64)>,
    reserved: i64,
    /// The row locked: its period key and used.
    row: Locked,
}

impl PoolLock {
    /// Write the locked row again, unchanged but for updated_at: a hold's
    /// reservation writes no other row a draw locks, and a REPEATABLE READ
    /// or SERIALIZABLE draw whose snapshot cannot see it must then fail to
    /// serialize rather than spend it.
    pub fn touch(&self) -> FluxResult<()> {
        let _owner = crate::privilege::AsOwner::enter()?;
        sql::set_counter(
            &Counter {
                tenant: &self.tenant,
                feature: &self.pool,
                start: self.row.0,
                caller: None,
            },
            self.row.1,
        )
    }

    /// Lock `p`'s pool (`p` is the pool's own decision); `except` is a
    /// hold whose reservation is not counted (the one being settled).
    pub fn take(p: &Decided, except: &str) -> FluxResult<PoolLock> {
        let (tenant, now) = (p.d.tenant.clone(), p.ctx.now);
        let pool = p.d.feature.clone();
        let _owner = crate::privilege::AsOwner::enter()?;
        let (left, counter) = lock_pool(p)?;
        let row = counter.unwrap_or((sql::period_key(None), 0));
        let (lots, reserved) = Spi::connect_mut(|c| {
            let q = crate::prepared::kept(c, LOCK_LIVE, &[TEXT, TEXT, TSTZ, TEXT], true)?;
            let t = c.update(
                &*q,
                None,
                &[
                    tenant.as_str().into(),
                    pool.as_str().into(),
                    ts_datum(Some(now)).into(),
                    except.into(),
                ],
            )?;
            let (mut lots, mut reserved) = (Vec::new(), 0);
            for r in t {
                match (r.get::<i32>(1)?, r.get::<i64>(2)?, r.get::<i64>(3)?) {
                    (Some(0), Some(id), Some(rem)) => lots.push((id, rem)),
                    (Some(1), _, Some(n)) => reserved = n,
                    _ => {}
                }
            }
            Ok::<_, FluxError>((lots, reserved))
        })?;
        Ok(PoolLock {
            pool,
            tenant,
            now,
            left,
            counter,
            lots,
            reserved,
            row,
        })
    }

    /// The balance as locked: allowance left plus live top-ups, less what
    /// the other holds reserve (None: unlimited).
    pub fn balance(&self) -> Option<i64> {
        balance(
            self.left,
            self.lots.iter().map(|l| l.1).sum(),
            self.reserved,
        )
    }

    /// Whether `need` credits are there.
    pub fn covers(&self, need: i64) -> bool {
        self.balance().is_none_or(|b| b >= need)
    }

    /// Take `need` credits for `feature`: the allowance first, then top-ups
    /// by earliest expiry. Never more than is there: a settled hold whose
    /// top-up expired under it (`covers` false) takes what is left.
    pub fn draw(self, feature: &str, need: i64) -> Draw {
        let bal = self.balance();
        let need = bal.map_or(need, |b| need.min(b));
        let from_allowance = self.left.map_or(need, |l| l.min(need));
        let mut rest = need - from_allowance;
        let mut from_top_ups = Vec::new();
        for (id, rem) in self.lots {
            if rest == 0 {
                break;
            }
            let take = rem.min(rest);
            from_top_ups.push((id, take));
            rest -= take;
        }
        Draw {
            pool: self.pool,
            tenant: self.tenant,
            feature: feature.to_string(),
            need,
            from_allowance,
            from_top_ups,
            counter: self.counter,
            balance_after: bal.map(|b| b - need),
            at: self.now,
            reason: None,
        }
    }
}

/// The pool's own decision for `x` (a priced feature's or the pool's).
/// Its message is not built: only its figures are used.
pub fn pool_decision(x: &Decided, pool: &str) -> FluxResult<Option<Decided>> {
    Ok(if pool == x.d.feature {
        None
    } else {
        Some(crate::entitle::entitle_with(
            &x.d.tenant,
            pool,
            None,
            false,
        )?)
    })
}

/// Lock `x`'s pool (its counter row, then its live top-ups) and decide
/// whether it covers `amount` units: Some(draw) to write with `write`,
/// None when it does not (`x` then says so). `x` is the decision of the
/// priced feature or of the pool itself.
pub fn reserve(x: &mut Decided, amount: i64) -> FluxResult<Option<Draw>> {
    let Some((pool, credits)) = price_of(x)? else {
        return Ok(None);
    };
    let need = checked_mul(amount, credits, &x.d.feature)?;
    let px = pool_decision(x, &pool)?;
    let lock = PoolLock::take(px.as_ref().unwrap_or(x), "")?;
    if !lock.covers(need) {
        x.d.balance = lock.balance();
        refuse(x, &pool, lock.balance().unwrap_or(0), need);
        return Ok(None);
    }
    let feature = x.d.feature.clone();
    Ok(Some(lock.draw(&feature, need)))
}

/// `amount x credits`, or an error naming the feature.
pub fn cost(amount: i64, credits: i64, feature: &str) -> FluxResult<i64> {
    checked_mul(amount, credits, feature)
}

/// Refuse `x`: the pool has `left` and `need` is asked.
pub fn refuse_for(x: &mut Decided, pool: &str, left: i64, need: i64) {
    refuse(x, pool, left, need)
}

/// Write a reserved draw: the allowance's counter, the top-ups taken, one
/// ledger row.
pub fn write(d: &Draw, key: Option<&str>) -> FluxResult<()> {
    // Nothing to take (a settled hold whose top-up expired under it).
    if d.need == 0 {
        return Ok(());
    }
    let _owner = crate::privilege::AsOwner::enter()?;
    if let (Some((start, used)), true) = (d.counter, d.from_allowance > 0) {
        let c = Counter {
            tenant: &d.tenant,
            feature: &d.pool,
            start,
            caller: None,
        };
        sql::set_counter(&c, sql::total(used, d.from_allowance)?)?;
    }
    Spi::connect_mut(|c| {
        let take = crate::prepared::kept(c, TAKE, &[INT8, INT8], true)?;
        for &(id, n) in &d.from_top_ups {
            c.update(&*take, None, &[id.into(), n.into()])?;
        }
        let ins = crate::prepared::kept(
            c,
            DRAWN,
            &[TEXT, TEXT, INT8, INT8, TEXT, TSTZ, TEXT, TEXT],
            true,
        )?;
        c.update(
            &*ins,
            None,
            &[
                d.tenant.as_str().into(),
                d.pool.as_str().into(),
                (-d.need).into(),
                d.balance_after.into(),
                d.feature.as_str().into(),
                ts_datum(Some(d.at)).into(),
                key.into(),
                d.reason.as_deref().into(),
            ],
        )?;
        Ok::<_, FluxError>(())
    })
}

/// A draw the allowance covered, written on the fast path.
pub struct Fast {
    pub pool: String,
    need: i64,
    used: i64,
    pub balance_after: Option<i64>,
}

/// The ledger row of a draw the allowance covered, written only if the
/// balance after it (the allowance left, plus live top-ups, less what holds
/// reserve, all read now, under the pool counter's lock) is not negative.
const DRAWN_IF_COVERED: &str = "WITH b AS (SELECT $4::pg_catalog.int8 \
        OPERATOR(pg_catalog.+) (SELECT COALESCE(pg_catalog.sum(remaining), 0)::pg_catalog.int8 \
             FROM flux.credit_ledger \
            WHERE tenant OPERATOR(pg_catalog.=) $1 AND pool OPERATOR(pg_catalog.=) $2 \
              AND remaining OPERATOR(pg_catalog.>) 0 \
              AND (expires_at IS NULL OR expires_at OPERATOR(pg_catalog.>) $6)) \
        OPERATOR(pg_catalog.-) (SELECT LEAST(COALESCE(pg_catalog.sum(amount), 0), 9223372036854775807)::pg_catalog.int8 \
             FROM flux.hold_charges \
            WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
              AND period_start OPERATOR(pg_catalog.=) '-infinity'::pg_catalog.timestamptz \
              AND caller OPERATOR(pg_catalog.=) 'pool' AND open \
              AND expires_at OPERATOR(pg_catalog.>) $6) AS after) \
     INSERT INTO flux.credit_ledger (tenant, pool, amount, balance_after, feature, at, idempotency_key) \
     SELECT $1, $2, $3 OPERATOR(pg_catalog.*) -1, b.after, $5, $6, $7 FROM b \
      WHERE $4 IS NULL OR b.after OPERATOR(pg_catalog.>=) 0 \
     RETURNING balance_after";

/// The common draw, without SPI but for its ledger row: the period's
/// allowance covers it. The pool's counter row is updated in place
/// (counters.rs: it waits for, and follows, a concurrent draw, as the SQL
/// lock does), then the ledger row is written if the balance after it,
/// read under that lock, is not negative (holds may reserve part of the
/// allowance). None when the allowance does not cover it, the counter row
/// does not exist yet or the balance would go negative: nothing is left
/// written, and `reserve` decides through SQL.
pub fn draw_fast(x: &Decided, amount: i64, key: Option<&str>) -> FluxResult<Option<Fast>> {
    let Some((pool, credits)) = price_of(x)? else {
        return Ok(None);
    };
    let need = checked_mul(amount, credits, &x.d.feature)?;
    let px = pool_decision(x, &pool)?;
    let p = px.as_ref().unwrap_or(x);
    let Some(a) = allowance(p)? else {
        return Ok(None);
    };
    let _owner = crate::privilege::AsOwner::enter()?;
    let c = counter(p, &a);
    let cat = crate::cache::catalogue()?;
    let used = match super::counters::add(cat.namespace, &c, need, a.limit)? {
        super::counters::Added::Total(n) => n,
        _ => return Ok(None),
    };
    let left = a.limit.map(|l| l - used);
    let written = Spi::connect_mut(|sc| {
        let q = crate::prepared::kept(
            sc,
            DRAWN_IF_COVERED,
            &[TEXT, TEXT, INT8, INT8, TEXT, TSTZ, TEXT],
            true,
        )?;
        let t = sc.update(
            &*q,
            Some(1),
            &[
                p.d.tenant.as_str().into(),
                pool.as_str().into(),
                need.into(),
                left.into(),
                x.d.feature.as_str().into(),
                ts_datum(Some(p.ctx.now)).into(),
                key.into(),
            ],
        )?;
        Ok::<_, FluxError>(match t.into_iter().next() {
            Some(r) => Some(r.get::<i64>(1)?),
            None => None,
        })
    })?;
    let Some(balance_after) = written else {
        // Holds reserve what the allowance would give: undo our own
        // update, under the lock we hold, and let SQL decide (which
        // refuses; the row keeps its used, with a new updated_at).
        super::counters::add(cat.namespace, &c, -need, None)?;
        return Ok(None);
    };
    Ok(Some(Fast {
        pool,
        need,
        used,
        balance_after,
    }))
}

/// The decision after a fast draw of a pool consumed directly.
pub fn drawn_fast(x: &mut Decided, f: &Fast) {
    x.d.allowed = true;
    x.d.reason = Reason::Ok;
    x.d.upgrade_plans = None;
    x.d.balance = f.balance_after;
    x.d.remaining = f.balance_after;
    x.d.used = Some(f.used);
    x.d.message = match f.balance_after {
        Some(b) => format!("{}: {} drawn, {b} left", f.pool, f.need),
        None => format!("{}: {} drawn (unlimited)", f.pool, f.need),
    };
}

/// The decision after a draw of a pool consumed directly.
pub fn drawn_from_pool(x: &mut Decided, d: &Draw) {
    x.d.allowed = true;
    x.d.reason = Reason::Ok;
    x.d.upgrade_plans = None;
    x.d.balance = d.balance_after;
    x.d.remaining = d.balance_after;
    x.d.used = d.counter.map(|(_, used)| used + d.from_allowance);
    if x.d.limit.is_none() && d.counter.is_none() {
        x.d.limit = Some(0);
    }
    x.d.message = match d.balance_after {
        Some(b) => format!("{}: {} drawn, {b} left", d.pool, d.need),
        None => format!("{}: {} drawn (unlimited)", d.pool, d.need),
    };
}

const TOP_UP: &str = "INSERT INTO flux.credit_ledger \
        (tenant, pool, amount, remaining, balance_after, at, expires_at, idempotency_key, reason) \
     VALUES ($1, $2, $3, $3, $4, $5, $6, $7, $8) \
     ON CONFLICT (tenant, pool, idempotency_key) WHERE amount > 0 AND idempotency_key IS NOT NULL \
     DO NOTHING RETURNING id";

/// flux_add_credits: a purchased top-up, once per idempotency key.
fn add_top_up(
    tenant: &str,
    pool: &str,
    amount: i64,
    expires_at: Option<i64>,
    key: Option<&str>,
    reason: Option<&str>,
) -> FluxResult<Option<i64>> {
    crate::store::ensure_writable("flux_add_credits")?;
    if amount <= 0 {
        return Err(FluxError::InvalidValue(format!(
            "amount {amount} must be > 0 (a draw is a consume of the pool or of a priced feature)"
        )));
    }
    if let Some(k) = key {
        if k.is_empty() || k.chars().count() > 200 {
            return Err(FluxError::InvalidValue(format!(
                "idempotency_key {} must be 1 to 200 characters",
                crate::error::shown(k)
            )));
        }
    }
    crate::validate::require_tenant(tenant)?;
    // A pool, or the error saying what it is.
    balance_of(tenant, pool)?;
    let x = entitle(tenant, pool, None)?;
    if expires_at.is_some_and(|e| e <= x.ctx.now) {
        return Err(FluxError::InvalidValue(format!(
            "expires_at {} is already past: a top-up must expire later than now ({})",
            crate::timeutil::format_minute(expires_at.unwrap_or_default()),
            crate::timeutil::format_minute(x.ctx.now)
        )));
    }
    let _owner = crate::privilege::AsOwner::enter()?;
    // Under the pool's lock, as draws: balance_after follows the one before.
    let (left, _) = lock_pool(&x)?;
    let (live, reserved) = live_top_ups(tenant, pool, x.ctx.now)?;
    let before = balance(left, live, reserved);
    let after = balance(left, live.saturating_add(amount), reserved);
    let added = Spi::connect_mut(|c| {
        let p = crate::prepared::kept(
            c,
            TOP_UP,
            &[TEXT, TEXT, INT8, INT8, TSTZ, TSTZ, TEXT, TEXT],
            true,
        )?;
        let t = c.update(
            &*p,
            Some(1),
            &[
                tenant.into(),
                pool.into(),
                amount.into(),
                after.into(),
                ts_datum(Some(x.ctx.now)).into(),
                expires_at.map(|e| ts_datum(Some(e))).into(),
                key.into(),
                reason.into(),
            ],
        )?;
        Ok::<_, FluxError>(!t.is_empty())
    })?;
    // A repeated key added nothing: the balance as it stands.
    Ok(if added { after } else { before })
}

#[pg_extern(volatile, parallel_unsafe)]
fn flux_add_credits(
    tenant: Option<&str>,
    pool: Option<&str>,
    amount: Option<i64>,
    expires_at: default!(Option<pgrx::datum::TimestampWithTimeZone>, "NULL"),
    idempotency_key: default!(Option<&str>, "NULL"),
    reason: default!(Option<&str>, "NULL"),
) -> Option<i64> {
    use crate::error::OrRaise;
    (|| {
        let tenant = crate::validate::need(tenant, "tenant")?;
        let pool = crate::validate::need(pool, "pool")?;
        let amount = crate::validate::need(amount, "amount")?;
        add_top_up(
            tenant,
            pool,
            amount,
            expires_at.map(|t| t.into_inner()),
            idempotency_key,
            reason,
        )
    })()
    .or_raise()
}

/// What is left of `pool` for `tenant` now: the period's allowance left
/// plus live top-ups; NULL when the allowance is unlimited.
#[pg_extern(stable, parallel_safe)]
fn flux_balance(tenant: Option<&str>, pool: Option<&str>) -> Option<i64> {
    use crate::error::OrRaise;
    let (tenant, pool) = (tenant?, pool?);
    (|| {
        crate::access::require_act_for("flux_balance", tenant)?;
        balance_of(tenant, pool)
    })()
    .or_raise()
}
