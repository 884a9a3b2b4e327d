//! Recording usage: flux_consume, flux_release, flux_usage.
//!
//! Exact under concurrency without read-then-write: a counter's row is
//! updated in place when it exists (counters.rs, under the row lock, with
//! the limit re-checked on the latest version), else by one `UPDATE` or
//! `INSERT ... ON CONFLICT DO UPDATE ... WHERE used + amount <= limit`; the
//! rate limiter is one conditional upsert of its timestamp. Concurrent
//! callers queue on the row and none can pass the limit. Every write is in
//! the caller's transaction and rolls back with it.
//!
//! Each function acts only for a tenant the caller may act for (access.rs).
//! An idempotency key is claimed only once the tenant and feature are known,
//! and binds the amount: a replay with another amount is refused.

use crate::error::{shown, FluxError, FluxResult, OrRaise};
use crate::gucs;
use crate::metering::{apply_counter, apply_rate, gcra, meter_for, Meter, RateOutcome};
use crate::model::{Decision, Kind, Reason};
use crate::reads::{entitle, to_composite, Decided};
use crate::store::{self, ts_datum};
use crate::timeutil::Span;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use pgrx::{PgBuiltInOids, PgOid};
const TEXT: PgOid = PgOid::BuiltIn(PgBuiltInOids::TEXTOID);
const TSTZ: PgOid = PgOid::BuiltIn(PgBuiltInOids::TIMESTAMPTZOID);
const INT8: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT8OID);
const INTERVAL: PgOid = PgOid::BuiltIn(PgBuiltInOids::INTERVALOID);

fn window_micros(text: &str) -> Option<i64> {
    gucs::parse_span(text).map(|s| (s.days as i64) * 86_400_000_000 + s.micros)
}

fn meter(x: &Decided) -> FluxResult<Option<Meter>> {
    let (Some(f), Some(t)) = (x.feature(), x.tenant()) else {
        return Ok(None);
    };
    meter_for(
        f.kind,
        x.d.period.as_deref(),
        x.ctx.now,
        t.current_period_start,
        t.current_period_end,
        window_micros,
    )
}

/// Read path: fill in used / remaining / resets_at and decide whether
/// `amount` more would pass. Writes nothing. Returns whether usage was read
/// (the answer then depends on more than the cached rows and the clock).
pub fn observe(x: &mut Decided, amount: i64) -> FluxResult<bool> {
    if !x.d.allowed {
        return Ok(false);
    }
    let Some(m) = meter(x)? else {
        return Ok(false);
    };
    let (tenant, feature) = (x.d.tenant.clone(), x.d.feature.clone());
    match m {
        Meter::Allowance | Meter::Quota { .. } => {
            let start = match m {
                Meter::Quota { start, .. } => Some(start),
                _ => None,
            };
            let used = store::load_used(&tenant, &feature, start)?;
            let fits = fits(x.d.limit, used, amount);
            apply_counter(&mut x.d, m, used, fits);
        }
        Meter::Rate { window } => {
            if let Some(limit) = x.d.limit {
                let tat = store::load_tat(&tenant, &feature)?;
                // Would `amount` more pass? Report what is counted now.
                let mut o = gcra(tat, x.ctx.now, limit, window, amount);
                let current = gcra(tat, x.ctx.now, limit, window, 0);
                (o.used, o.resets_at) = (current.used, current.resets_at);
                let text = x.d.period.clone().unwrap_or_default();
                apply_rate(&mut x.d, &text, o, x.ctx.now);
            }
        }
    }
    Ok(true)
}

fn fits(limit: Option<i64>, used: i64, amount: i64) -> bool {
    limit.is_none_or(|l| used.saturating_add(amount) <= l)
}

/// Record `amount` against a counter if it fits. Returns whether it did and
/// the total after (when it did not fit, the total as it stands).
fn record_counter(
    tenant: &str,
    feature: &str,
    start: Option<i64>,
    amount: i64,
    limit: Option<i64>,
) -> FluxResult<(bool, i64)> {
    if limit.is_some_and(|l| amount > l) {
        return Ok((false, store::load_used(tenant, feature, start)?));
    }
    // The common case, without SQL (counters.rs): the row exists.
    let cat = crate::cache::catalogue()?;
    let key = ts_datum(start).into_inner();
    match crate::counters::add(cat.namespace, tenant, feature, key, amount, limit)? {
        crate::counters::Added::Total(n) => return Ok((true, n)),
        crate::counters::Added::Full(used) => return Ok((false, used)),
        crate::counters::Added::Fallback => {}
    }
    // Otherwise SQL. The common case first: the period's row exists and the amount fits.
    // A plain UPDATE is cheaper than INSERT ... ON CONFLICT (no speculative
    // insertion); under READ COMMITTED it locks the row and rechecks the
    // condition against the latest committed version, so it stays exact.
    const UPDATE: &str = "UPDATE flux.usage \
            SET used = used OPERATOR(pg_catalog.+) $4, updated_at = pg_catalog.now() \
         WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
           AND period_start OPERATOR(pg_catalog.=) $3 \
           AND ($5::pg_catalog.int8 IS NULL \
                OR used OPERATOR(pg_catalog.+) $4 OPERATOR(pg_catalog.<=) $5::pg_catalog.int8) \
         RETURNING used";
    // No row yet for this period, or the amount does not fit: the upsert
    // creates the row, or updates it under the same condition.
    const UPSERT: &str =
        "INSERT INTO flux.usage AS u (tenant, feature, period_start, used, updated_at) \
         VALUES ($1, $2, $3, $4, pg_catalog.now()) \
         ON CONFLICT (tenant, feature, period_start) DO UPDATE \
             SET used = u.used OPERATOR(pg_catalog.+) EXCLUDED.used, updated_at = pg_catalog.now() \
             WHERE $5::pg_catalog.int8 IS NULL \
                OR u.used OPERATOR(pg_catalog.+) EXCLUDED.used OPERATOR(pg_catalog.<=) $5::pg_catalog.int8 \
         RETURNING used";
    // Under flux_consume's unpinned owner switch (privilege.rs).
    let _path = crate::privilege::Pinned::enter();
    let total = Spi::connect_mut(|c| {
        let args = [
            tenant.into(),
            feature.into(),
            ts_datum(start).into(),
            amount.into(),
            limit.into(),
        ];
        for sql in [UPDATE, UPSERT] {
            let p = crate::prepared::kept(c, sql, &[TEXT, TEXT, TSTZ, INT8, INT8], true)?;
            let t = c.update(&*p, Some(1), &args)?;
            if !t.is_empty() {
                return Ok::<_, FluxError>(t.first().get_one::<i64>()?);
            }
        }
        Ok(None)
    })?;
    match total {
        Some(n) => Ok((true, n)),
        None => Ok((false, store::load_used(tenant, feature, start)?)),
    }
}

/// Advance the rate limiter by `amount` calls if they pass; returns the new
/// theoretical arrival time, or None when rate limited (nothing recorded).
fn record_rate(
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

/// Write path: record `amount` if the decision allows it.
fn record(x: &mut Decided, amount: i64) -> FluxResult<()> {
    if !x.d.allowed {
        return Ok(());
    }
    let Some(m) = meter(x)? else { return Ok(()) };
    let (tenant, feature, limit, now) = (
        x.d.tenant.clone(),
        x.d.feature.clone(),
        x.d.limit,
        x.ctx.now,
    );
    match m {
        Meter::Allowance | Meter::Quota { .. } => {
            let start = match m {
                Meter::Quota { start, .. } => Some(start),
                _ => None,
            };
            let (fits, used) = record_counter(&tenant, &feature, start, amount, limit)?;
            apply_counter(&mut x.d, m, used, fits);
        }
        Meter::Rate { window } => {
            let Some(limit) = limit else { return Ok(()) };
            let text = x.d.period.clone().unwrap_or_default();
            let o = match record_rate(&tenant, &feature, now, limit, window, amount)? {
                Some(new_tat) => {
                    let t = (window / limit.max(1)).max(1);
                    let used = ((new_tat - now).max(0) as u64).div_ceil(t as u64) as i64;
                    RateOutcome {
                        allowed: true,
                        new_tat,
                        used,
                        retry_after: None,
                        resets_at: new_tat,
                    }
                }
                None => gcra(
                    store::load_tat(&tenant, &feature)?,
                    now,
                    limit,
                    window,
                    amount,
                ),
            };
            apply_rate(&mut x.d, &text, o, now);
        }
    }
    Ok(())
}

// ---- idempotency ------------------------------------------------------------

/// The decision remembered for an idempotency key, with the amount the key
/// was first used with.
fn decision_to_json(d: &Decision, amount: i64) -> Value {
    json!({
        "amount": amount,
        "allowed": d.allowed, "reason": d.reason.as_str(), "message": d.message,
        "tenant": d.tenant, "feature": d.feature, "plan": d.plan, "limit": d.limit,
        "used": d.used, "remaining": d.remaining, "resets_at": d.resets_at,
        "retry_after": d.retry_after.map(|s| s.micros), "upgrade_plans": d.upgrade_plans,
        "kind": d.kind.map(|k| k.as_str()), "subject": d.subject,
    })
}

fn decision_from_json(v: &Value) -> Decision {
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let n = |k: &str| v.get(k).and_then(Value::as_i64);
    let reason = match s("reason").as_deref() {
        Some("unknown_feature") => Reason::UnknownFeature,
        Some("unknown_tenant") => Reason::UnknownTenant,
        Some("feature_disabled") => Reason::FeatureDisabled,
        Some("not_in_rollout") => Reason::NotInRollout,
        Some("subscription_inactive") => Reason::SubscriptionInactive,
        Some("not_in_plan") => Reason::NotInPlan,
        Some("limit_reached") => Reason::LimitReached,
        Some("rate_limited") => Reason::RateLimited,
        _ => Reason::Ok,
    };
    Decision {
        allowed: v.get("allowed").and_then(Value::as_bool).unwrap_or(false),
        reason,
        message: s("message").unwrap_or_default(),
        tenant: s("tenant").unwrap_or_default(),
        feature: s("feature").unwrap_or_default(),
        plan: s("plan"),
        limit: n("limit"),
        used: n("used"),
        remaining: n("remaining"),
        resets_at: n("resets_at"),
        retry_after: n("retry_after").map(|us| Span {
            months: 0,
            days: 0,
            micros: us,
        }),
        upgrade_plans: v.get("upgrade_plans").and_then(Value::as_array).map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        }),
        kind: s("kind").and_then(|k| Kind::parse(&k).ok()),
        subject: s("subject"),
        value: None,
        period: None,
        source: None,
    }
}

/// Claim an idempotency key. Returns the first decision when the key was
/// used before (within flux.idempotency_ttl), None when this call owns it.
/// A concurrent caller with the same key waits on the unique index until the
/// first commits, then sees its decision. A replay with another amount is
/// refused (22023): it is not the same request.
fn claim_key(tenant: &str, feature: &str, key: &str, amount: i64) -> FluxResult<Option<Decision>> {
    let ttl = gucs::idempotency_ttl()?;
    let ttl = Interval::new(ttl.months, ttl.days, ttl.micros)
        .map_err(|e| FluxError::Internal(e.to_string()))?;
    let claim = JsonB(json!({ "amount": amount }));
    let claimed = store::one_mut::<i32>(
        "INSERT INTO flux.usage_keys AS k (tenant, feature, idempotency_key, decision, created_at) \
         VALUES ($1, $2, $3, $5, pg_catalog.now()) \
         ON CONFLICT (tenant, feature, idempotency_key) DO UPDATE \
             SET decision = EXCLUDED.decision, created_at = pg_catalog.now() \
             WHERE k.created_at OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) $4) \
         RETURNING 1",
        &[tenant.into(), feature.into(), key.into(), ttl.into(), claim.into()],
    )?
    .is_some();
    if claimed {
        return Ok(None);
    }
    let first = store::one::<JsonB>(
        "SELECT decision FROM flux.usage_keys \
         WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
           AND idempotency_key OPERATOR(pg_catalog.=) $3",
        &[tenant.into(), feature.into(), key.into()],
    )?;
    let Some(first) = first else { return Ok(None) };
    // Keys stored by 0.1.0 carry no amount: they replay as before.
    if let Some(was) = first.0.get("amount").and_then(Value::as_i64) {
        if was != amount {
            return Err(FluxError::InvalidValue(format!(
                "idempotency_key {} was used with amount {was} for {feature}; this call has amount {amount}: \
                 a replay must repeat the first request, a new request needs a new key",
                shown(key)
            )));
        }
    }
    Ok(Some(decision_from_json(&first.0)))
}

fn store_key(tenant: &str, feature: &str, key: &str, d: &Decision, amount: i64) -> FluxResult<()> {
    store::exec(
        "UPDATE flux.usage_keys SET decision = $4 \
         WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
           AND idempotency_key OPERATOR(pg_catalog.=) $3",
        &[
            tenant.into(),
            feature.into(),
            key.into(),
            JsonB(decision_to_json(d, amount)).into(),
        ],
    )
}

pub fn consume(
    tenant: &str,
    feature: &str,
    amount: i64,
    key: Option<&str>,
) -> FluxResult<Decision> {
    store::ensure_writable("flux_consume")?;
    crate::access::require_act_for("flux_consume", tenant)?;
    let _owner = crate::privilege::AsOwnerUnpinned::enter()?;
    if amount <= 0 {
        return Err(FluxError::InvalidValue(format!(
            "amount {amount} must be > 0 (flux_release gives units of a limit feature back)"
        )));
    }
    if let Some(k) = key {
        if k.is_empty() || k.chars().count() > 200 {
            return Err(FluxError::InvalidValue(format!(
                "idempotency_key {} must be 1 to 200 characters",
                shown(k)
            )));
        }
    }
    let mut x = entitle(tenant, feature, None)?;
    // An unknown tenant or feature records nothing, and so stores no key
    // (2,000 calls with junk keys stored 6.5 MB).
    let known = !matches!(x.d.reason, Reason::UnknownFeature | Reason::UnknownTenant);
    if let (Some(k), true) = (key, known) {
        if let Some(first) = claim_key(tenant, feature, k, amount)? {
            return Ok(first);
        }
    }
    record(&mut x, amount)?;
    if let (Some(k), true) = (key, known) {
        store_key(tenant, feature, k, &x.d, amount)?;
    }
    Ok(x.d)
}

/// Atomically check and record usage. Allowed: records `amount` and returns
/// the new used / remaining. Denied: records nothing. A boolean feature
/// records nothing and answers whether the tenant is entitled.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_consume(
    tenant: Option<&str>,
    feature: Option<&str>,
    amount: default!(Option<i64>, "1"),
    idempotency_key: default!(Option<&str>, "NULL"),
) -> Option<pgrx::composite_type!('static, "flux.decision")> {
    let (tenant, feature) = (tenant?, feature?);
    let amount = amount.unwrap_or(1);
    Some(to_composite(
        consume(tenant, feature, amount, idempotency_key).or_raise(),
    ))
}

/// Give units of a limit feature back (a seat freed); returns the new used.
/// Releasing more than is used stops at 0.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_release(
    tenant: Option<&str>,
    feature: Option<&str>,
    amount: default!(Option<i64>, "1"),
) -> Option<i64> {
    let (tenant, feature) = (tenant?, feature?);
    let amount = amount.unwrap_or(1);
    (|| -> FluxResult<i64> {
        store::ensure_writable("flux_release")?;
        crate::access::require_act_for("flux_release", tenant)?;
        // The feature and tenant are looked up as the owner too: the caller
        // needs no grant on the flux tables.
        let _owner = crate::privilege::AsOwner::enter()?;
        if amount <= 0 {
            return Err(FluxError::InvalidValue(format!(
                "amount {amount} must be > 0"
            )));
        }
        let kind = crate::validate::feature_kind(feature)?;
        if kind != Kind::Limit {
            return Err(FluxError::InvalidValue(format!(
                "flux_release gives back units of limit features; \"{feature}\" is {}",
                kind.as_str()
            )));
        }
        crate::validate::require_tenant(tenant)?;
        Ok(store::one_mut::<i64>(
            "UPDATE flux.usage \
                SET used = GREATEST(used OPERATOR(pg_catalog.-) $3, 0), updated_at = pg_catalog.now() \
              WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
                AND period_start OPERATOR(pg_catalog.=) '-infinity'::pg_catalog.timestamptz \
             RETURNING used",
            &[tenant.into(), feature.into(), amount.into()],
        )?
        .unwrap_or(0))
    })()
    .or_raise()
    .into()
}

/// Units used in the current period (limit: held now; rate: calls in the
/// current window). NULL for unknown tenants or features and for boolean
/// features.
#[pg_extern(stable, strict, parallel_safe)]
fn flux_usage(tenant: &str, feature: &str) -> Option<i64> {
    (|| -> FluxResult<Option<i64>> {
        crate::access::require_act_for("flux_usage", tenant)?;
        let mut x = entitle(tenant, feature, None)?;
        let (Some(f), Some(_)) = (x.facts.feature.clone(), x.tenant()) else {
            return Ok(None);
        };
        if !f.kind.has_limit() {
            return Ok(None);
        }
        // Usage exists whether or not the tenant is entitled now.
        if x.d.period.is_none() {
            let plan = x.d.plan.clone();
            x.d.period = plan
                .and_then(|p| f.grant_of(&p).and_then(|g| g.period.clone()))
                .or_else(|| f.grants.iter().rev().find_map(|g| g.period.clone()));
        }
        let now = x.ctx.now;
        Ok(match meter(&x)? {
            Some(Meter::Allowance) => Some(store::load_used(tenant, feature, None)?),
            Some(Meter::Quota { start, .. }) => {
                Some(store::load_used(tenant, feature, Some(start))?)
            }
            Some(Meter::Rate { window }) => {
                let tat = store::load_tat(tenant, feature)?;
                let limit = x.d.limit.unwrap_or(1).max(1);
                Some(gcra(tat, now, limit, window, 0).used)
            }
            None => None,
        })
    })()
    .or_raise()
}

/// Delete idempotency keys older than flux.idempotency_ttl; returns how many.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_prune_usage_keys() -> i64 {
    (|| -> FluxResult<i64> {
        let ttl = gucs::idempotency_ttl()?;
        let ttl = Interval::new(ttl.months, ttl.days, ttl.micros).map_err(|e| FluxError::Internal(e.to_string()))?;
        Ok(store::one_mut::<i64>(
            "WITH d AS (DELETE FROM flux.usage_keys \
                         WHERE created_at OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) $1) \
                         RETURNING 1) \
             SELECT pg_catalog.count(*) FROM d",
            &[ttl.into()],
        )?
        .unwrap_or(0))
    })()
    .or_raise()
}
