//! Usage: recording it (flux_consume, flux_release) and reading it
//! (flux_usage, and the figures of a decision).
//!
//! - `rules`: periods, the limit rule and GCRA, as plain Rust;
//! - `counters`: a counter's row read and updated through the heap (the
//!   common case of flux_consume, with no SQL);
//! - `sql`: the same through SQL where the heap path stands aside (the
//!   row does not exist yet, REPEATABLE READ, an altered table), the rate
//!   limiter's state and the usage probes;
//! - `keys`: idempotency keys;
//! - `credits`: pools other features draw from, and their top-ups;
//! - `holds`: reservations for work that outlives a transaction;
//! - `alerts`: thresholds of a limit, and the alert the consume crossing
//!   one writes.
//!
//! Exact under concurrency: a counter's row is locked before its limit is
//! checked (the heap path re-checks on the latest version when a concurrent
//! writer committed first; the SQL path reads it `FOR UPDATE`), so callers
//! queue on the row and none can pass the limit. Every write is in the
//! caller's transaction and rolls back with it.
//!
//! Each function acts only for a tenant the caller may act for (access.rs).
//! An idempotency key is claimed only once the tenant and feature are known,
//! and binds the amount: a replay with another amount is refused.

pub mod alerts;
pub mod counters;
pub mod credits;
pub mod holds;
pub mod keys;
pub mod rules;
pub mod sql;

use crate::entitle::{entitle, to_composite, Decided};
use crate::error::{shown, FluxError, FluxResult, OrRaise};
use crate::gucs;
use crate::model::{Decision, Kind, Reason};
use crate::store;
use counters::Counter;
use pgrx::prelude::*;
use rules::{apply_counter, apply_rate, fits, gcra, meter_for, Meter, RateOutcome};

fn window_micros(text: &str) -> Option<i64> {
    gucs::parse_span(text).map(|s| (s.days as i64) * 86_400_000_000 + s.micros)
}

/// The meter of `kind` with `period` for this decision's tenant and clock.
fn meter_of(x: &Decided, period: Option<&str>) -> FluxResult<Option<Meter>> {
    let (Some(f), Some(t)) = (x.feature(), x.tenant()) else {
        return Ok(None);
    };
    meter_for(
        f.kind,
        period,
        x.ctx.now,
        t.current_period_start,
        t.current_period_end,
        window_micros,
    )
}

fn meter(x: &Decided) -> FluxResult<Option<Meter>> {
    meter_of(x, x.d.period.as_deref())
}

/// One allowance a request must fit: the tenant's, or a caller's inside it
/// (the current API key's, the subject's).
struct Allowance {
    /// None: the tenant's (flux.usage, flux.rate_state); else `key:<id>` or
    /// `subject:<id>` (flux.caller_usage, flux.caller_rate_state).
    caller: Option<String>,
    /// Who it is, for messages: "the key ci pipeline", "user_42".
    who: Option<String>,
    limit: Option<i64>,
    meter: Meter,
    /// metered: the period; rate: the window, as granted.
    period: Option<String>,
    /// The tenant's, under a soft grant (flux_set_overage): how far past
    /// the limit it may go (None: no cap).
    overage: Option<Option<i64>>,
}

impl Allowance {
    /// What a consume must stay within: the limit, or under a soft grant
    /// the limit plus its cap (None: unlimited).
    fn ceiling(&self) -> Option<i64> {
        match (self.limit, self.overage) {
            (None, _) | (Some(_), Some(None)) => None,
            (Some(l), None) => Some(l),
            (Some(l), Some(Some(cap))) => Some(l.saturating_add(cap)),
        }
    }

    fn counter<'a>(&'a self, x: &'a Decided) -> Counter<'a> {
        let start = match self.meter {
            Meter::Quota { start, .. } => Some(start),
            _ => None,
        };
        Counter {
            tenant: &x.d.tenant,
            feature: &x.d.feature,
            start: sql::period_key(start),
            caller: self.caller.as_deref(),
        }
    }
}

/// The allowances of an allowed decision, in the order they are charged
/// (and so locked): the key's, the subject's, the tenant's last. The key
/// counts its usage (flux_key_usage) even with no allowance of its own, in
/// the tenant's period; the subject only with its grant's subject_limit.
fn allowances(x: &Decided) -> FluxResult<Vec<Allowance>> {
    let Some(tenant_meter) = meter(x)? else {
        return Ok(Vec::new());
    };
    let mut list = Vec::with_capacity(3);
    if let Some(k) = &x.key {
        let own = k.limit_of(&x.d.feature);
        let period = own
            .and_then(|l| l.period.clone())
            .or_else(|| x.d.period.clone());
        let meter = match own {
            Some(l) => meter_of(x, l.period.as_deref().or(x.d.period.as_deref()))?,
            None => Some(tenant_meter),
        };
        let counted = own.is_some() || !matches!(tenant_meter, Meter::Rate { .. });
        if let (Some(meter), true) = (meter, counted) {
            list.push(Allowance {
                caller: Some(format!("key:{}", k.id)),
                who: Some(format!("the key {}", k.name)),
                limit: own.map(|l| l.limit),
                meter,
                period,
                overage: None,
            });
        }
    }
    if let Some(s) = &x.subject {
        let grant =
            x.d.plan
                .as_deref()
                .and_then(|p| x.feature().and_then(|f| f.grant_of(p)));
        if let Some(l) = grant.and_then(|g| g.subject_limit) {
            list.push(Allowance {
                caller: Some(format!("subject:{s}")),
                who: Some(s.clone()),
                limit: Some(l),
                meter: tenant_meter,
                period: x.d.period.clone(),
                overage: None,
            });
        }
    }
    // A soft limit is the plan's grant's (of a limit or metered feature),
    // whatever made the limit (the plan, addons, an override).
    let overage = x
        .feature()
        .filter(|f| matches!(f.kind, Kind::Limit | Kind::Metered))
        .and_then(|f| x.d.plan.as_deref().and_then(|p| f.grant_of(p)))
        .and_then(|g| g.overage);
    list.push(Allowance {
        caller: None,
        who: None,
        limit: x.d.limit,
        meter: tenant_meter,
        period: x.d.period.clone(),
        overage,
    });
    Ok(list)
}

/// What one allowance says about a request.
enum Outcome {
    Counter { used: i64, fits: bool },
    Rate(RateOutcome),
}

impl Outcome {
    fn fits(&self) -> bool {
        match self {
            Outcome::Counter { fits, .. } => *fits,
            Outcome::Rate(o) => o.allowed,
        }
    }
}

/// Report the binding allowance: the first refusal, else the one with the
/// least left (the tenant's on a tie, so that a request no caller limits
/// reads as before).
fn report(x: &mut Decided, list: &[Allowance], outcomes: &[Outcome]) {
    let left = |a: &Allowance, o: &Outcome| -> i64 {
        let used = match o {
            Outcome::Counter { used, .. } => *used,
            Outcome::Rate(r) => r.used,
        };
        a.ceiling().map_or(i64::MAX, |l| l.saturating_sub(used))
    };
    let pick = outcomes.iter().position(|o| !o.fits()).unwrap_or_else(|| {
        let mut best = outcomes.len() - 1;
        for (i, (a, o)) in list.iter().zip(outcomes).enumerate() {
            if left(a, o) < left(&list[best], &outcomes[best]) {
                best = i;
            }
        }
        best
    });
    let a = &list[pick];
    x.d.limit = a.limit;
    x.d.period = a.period.clone();
    let now = x.ctx.now;
    match &outcomes[pick] {
        Outcome::Counter { used, fits } => {
            apply_counter(&mut x.d, a.meter, *used, *fits, a.who.as_deref());
            if a.overage.is_some() {
                rules::apply_overage(&mut x.d, *used, a.ceiling(), *fits);
            }
        }
        Outcome::Rate(o) => {
            let text = a.period.clone().unwrap_or_default();
            apply_rate(&mut x.d, &text, *o, now, a.who.as_deref());
        }
    }
}

/// Read path: fill in used / remaining / resets_at and decide whether
/// `amount` more would pass. Writes nothing. Returns whether usage was read
/// (the answer then depends on more than the cached rows and the clock).
pub fn observe(x: &mut Decided, amount: i64) -> FluxResult<bool> {
    let is_pool = x.feature().is_some_and(|f| f.kind == Kind::Credits);
    if is_pool {
        // The pool's figures are its balance (credits.rs).
        return credits::observe(x, amount);
    }
    let read = observe_usage(x, amount)?;
    // A priced feature: does its pool cover it?
    Ok(credits::observe(x, amount)? || read)
}

fn observe_usage(x: &mut Decided, amount: i64) -> FluxResult<bool> {
    if !x.d.allowed {
        return Ok(false);
    }
    let list = allowances(x)?;
    if list.is_empty() {
        return Ok(false);
    }
    let mut outcomes = Vec::with_capacity(list.len());
    for a in &list {
        outcomes.push(match a.meter {
            Meter::Allowance | Meter::Quota { .. } => {
                let used = used_counting_holds(x, &a.counter(x))?;
                Outcome::Counter {
                    used,
                    fits: fits(a.ceiling(), used, amount),
                }
            }
            Meter::Rate { window } => {
                let tat = sql::load_tat(&x.d.tenant, &x.d.feature, a.caller.as_deref())?;
                let limit = a.limit.unwrap_or(i64::MAX);
                // Would `amount` more pass? Report what is counted now.
                let mut o = gcra(tat, x.ctx.now, limit, window, amount);
                let current = gcra(tat, x.ctx.now, limit, window, 0);
                (o.used, o.resets_at) = (current.used, current.resets_at);
                Outcome::Rate(o)
            }
        });
    }
    // No limit anywhere on a rate feature: nothing is counted.
    if list
        .iter()
        .all(|a| a.limit.is_none() && matches!(a.meter, Meter::Rate { .. }))
    {
        return Ok(true);
    }
    report(x, &list, &outcomes);
    Ok(true)
}

/// What a counter holds now: its used, less the holds past their ttl that
/// no writer has given back yet, for a feature with holds.
fn used_counting_holds(x: &Decided, c: &Counter) -> FluxResult<i64> {
    let used = sql::load_used(c)?;
    if !holds::may_carry(x, c) {
        return Ok(used);
    }
    Ok((used - holds::expired(c, x.ctx.now)?).max(0))
}

/// Record `amount` against a counter if it fits. Returns whether it did and
/// the total after (when it did not fit, the total as it stands). A
/// feature's counter that may carry holds is written through holds.rs
/// (which gives back the holds past their ttl).
fn record_counter(
    x: &Decided,
    c: &Counter,
    amount: i64,
    limit: Option<i64>,
) -> FluxResult<(bool, i64)> {
    if holds::may_carry(x, c) {
        return holds::record_counter(c, amount, limit, x.ctx.now);
    }
    if !fits(limit, 0, amount) {
        return Ok((false, sql::load_used(c)?));
    }
    // The common case, without SQL: the row exists.
    let cat = crate::cache::catalogue()?;
    match counters::add(cat.namespace, c, amount, limit)? {
        counters::Added::Total(n) => Ok((true, n)),
        counters::Added::Full(used) => Ok((false, used)),
        counters::Added::Fallback => sql::add(c, amount, limit),
    }
}

/// Advance a rate limiter by `amount` calls if they pass.
fn record_rate(x: &Decided, a: &Allowance, window: i64, amount: i64) -> FluxResult<RateOutcome> {
    let (tenant, feature, now) = (&x.d.tenant, &x.d.feature, x.ctx.now);
    let caller = a.caller.as_deref();
    let Some(limit) = a.limit else {
        return Ok(gcra(None, now, i64::MAX, window, amount));
    };
    Ok(
        match sql::record_rate(tenant, feature, caller, now, limit, window, amount)? {
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
                sql::load_tat(tenant, feature, caller)?,
                now,
                limit,
                window,
                amount,
            ),
        },
    )
}

/// Write path: record `amount` on every allowance if it fits them all, and
/// on none otherwise. Charged in order (the key's, the subject's, the
/// tenant's), each under its row's lock; when one refuses, what this call
/// recorded on the ones before is taken back (our own uncommitted writes,
/// under locks we still hold: no other transaction saw them).
fn record(x: &mut Decided, amount: i64) -> FluxResult<()> {
    if !x.d.allowed {
        return Ok(());
    }
    let list = allowances(x)?;
    if list.is_empty() {
        return Ok(());
    }
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(list.len());
    for a in &list {
        let o = match a.meter {
            Meter::Allowance | Meter::Quota { .. } => {
                let (fits, used) = record_counter(x, &a.counter(x), amount, a.ceiling())?;
                Outcome::Counter { used, fits }
            }
            Meter::Rate { window } => Outcome::Rate(record_rate(x, a, window, amount)?),
        };
        let refused = !o.fits();
        outcomes.push(o);
        if refused {
            let charged = outcomes.len() - 1;
            for (b, done) in list[..charged].iter().zip(&outcomes[..charged]).rev() {
                match (b.meter, done) {
                    (Meter::Rate { window }, Outcome::Rate(_)) => {
                        if let Some(limit) = b.limit {
                            sql::undo_rate(
                                &x.d.tenant,
                                &x.d.feature,
                                b.caller.as_deref(),
                                limit,
                                window,
                                amount,
                            )?;
                        }
                    }
                    _ => {
                        record_counter(x, &b.counter(x), -amount, None)?;
                    }
                }
            }
            // The earlier ones report what stands, without this call.
            for o in outcomes[..charged].iter_mut() {
                if let Outcome::Counter { used, .. } = o {
                    *used -= amount;
                }
            }
            report(x, &list[..=charged], &outcomes);
            return Ok(());
        }
    }
    // The tenant's counter (last in the list) against its thresholds,
    // still under its row lock.
    if let (Some(a), Some(Outcome::Counter { used, .. })) = (list.last(), outcomes.last()) {
        alerts::on_recorded(x, &a.counter(x), a.limit, *used, amount)?;
    }
    if list
        .iter()
        .all(|a| a.limit.is_none() && matches!(a.meter, Meter::Rate { .. }))
    {
        return Ok(());
    }
    report(x, &list, &outcomes);
    Ok(())
}

/// Record `amount`, drawing from the credits pool when the feature is
/// priced (or is the pool): the pool's rows are locked and the draw decided
/// first, the feature's own limits recorded next, the draw written last,
/// so that a refusal by either leaves nothing written (credits.rs).
fn draw_and_record(x: &mut Decided, amount: i64, key: Option<&str>) -> FluxResult<()> {
    let Some(_) = credits::price_of(x)? else {
        return record(x, amount);
    };
    let is_pool = x.feature().is_some_and(|f| f.kind == Kind::Credits);
    let open = x.d.allowed || (is_pool && x.d.reason == Reason::NotInPlan);
    if !open {
        return Ok(());
    }
    // The common case: the period's allowance covers it, and the feature's
    // own counters (if any) have no limit that could refuse after the draw
    // is written (a refusal must leave every row as it was).
    let unlimited = is_pool || allowances(x)?.iter().all(|a| a.ceiling().is_none());
    if unlimited {
        if let Some(f) = credits::draw_fast(x, amount, key)? {
            if is_pool {
                credits::drawn_fast(x, &f);
            } else {
                record(x, amount)?;
                x.d.balance = f.balance_after;
                credits::with_balance(x, &f.pool);
            }
            return Ok(());
        }
    }
    let Some(draw) = credits::reserve(x, amount)? else {
        return Ok(());
    };
    if is_pool {
        credits::write(&draw, key)?;
        credits::drawn_from_pool(x, &draw);
        return Ok(());
    }
    record(x, amount)?;
    if x.d.allowed {
        credits::write(&draw, key)?;
        x.d.balance = draw.balance_after;
        credits::with_balance(x, &draw.pool);
    }
    Ok(())
}

pub fn consume(
    tenant: &str,
    feature: &str,
    amount: i64,
    key: Option<&str>,
    subject: Option<&str>,
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
    let mut x = entitle(tenant, feature, subject)?;
    // An unknown tenant or feature records nothing, and so stores no key
    // (2,000 calls with junk keys stored 6.5 MB).
    let known = !matches!(x.d.reason, Reason::UnknownFeature | Reason::UnknownTenant);
    if let (Some(k), true) = (key, known) {
        if let Some(first) = keys::claim(tenant, feature, k, amount)? {
            return Ok(first);
        }
    }
    draw_and_record(&mut x, amount, key)?;
    if let (Some(k), true) = (key, known) {
        keys::store(tenant, feature, k, &x.d, amount)?;
    }
    // An idempotent repeat (returned above) is not a new decision.
    crate::stats::consumed(&x.d);
    Ok(x.d)
}

/// Atomically check and record usage. Allowed: records `amount` and returns
/// the new used / remaining. Denied: records nothing. A boolean feature
/// records nothing and answers whether the tenant is entitled.
/// (The `_v2` symbol: 0.1.0's script declares `flux_consume` without a
/// subject, and must keep loading and working until ALTER EXTENSION UPDATE.)
#[pg_extern(name = "flux_consume", volatile, parallel_unsafe)]
fn flux_consume_v2(
    tenant: Option<&str>,
    feature: Option<&str>,
    amount: default!(Option<i64>, "1"),
    idempotency_key: default!(Option<&str>, "NULL"),
    subject: default!(Option<&str>, "NULL"),
) -> Option<pgrx::composite_type!('static, "flux.decision")> {
    let (tenant, feature) = (tenant?, feature?);
    let amount = amount.unwrap_or(1);
    Some(to_composite(
        consume(tenant, feature, amount, idempotency_key, subject).or_raise(),
    ))
}

/// 0.1.0's flux_consume (four arguments), for its install script.
#[pg_extern(sql = false, volatile, parallel_unsafe)]
fn flux_consume(
    tenant: Option<&str>,
    feature: Option<&str>,
    amount: Option<i64>,
    idempotency_key: Option<&str>,
) -> Option<pgrx::composite_type!('static, "flux.decision")> {
    flux_consume_v2(tenant, feature, amount, idempotency_key, None)
}

/// Give units of a limit feature back (a seat freed); returns the tenant's
/// new used. Releasing more than is used stops at 0. The units go back to
/// the current API key's counter and (with `subject`) the subject's as
/// well, as flux_consume took them from those.
/// (The `_v2` symbol, as for flux_consume.)
#[pg_extern(name = "flux_release", volatile, parallel_unsafe)]
fn flux_release_v2(
    tenant: Option<&str>,
    feature: Option<&str>,
    amount: default!(Option<i64>, "1"),
    subject: default!(Option<&str>, "NULL"),
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
        let key = crate::identity::current_key()?.filter(|k| k.tenant == tenant);
        let key_caller = key.map(|k| format!("key:{}", k.id));
        // A feature that has had holds: expired ones are given back first,
        // and units live holds count are not released (holds.rs).
        let has_holds = crate::cache::catalogue()?
            .features
            .get(feature)
            .is_some_and(|f| f.has_holds);
        let now = gucs::clock()?;
        let release_held = |caller: Option<&str>| -> FluxResult<i64> {
            let c = Counter {
                tenant,
                feature,
                start: sql::period_key(None),
                caller,
            };
            holds::release_units(&c, amount, now)
        };
        let callers = key_caller
            .into_iter()
            .chain(subject.map(|s| format!("subject:{s}")));
        for caller in callers {
            if has_holds && caller.starts_with("key:") {
                release_held(Some(&caller))?;
                continue;
            }
            store::exec(
                "UPDATE flux.caller_usage \
                    SET used = GREATEST(used OPERATOR(pg_catalog.-) $3, 0), updated_at = pg_catalog.now() \
                  WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
                    AND period_start OPERATOR(pg_catalog.=) '-infinity'::pg_catalog.timestamptz \
                    AND caller OPERATOR(pg_catalog.=) $4",
                &[tenant.into(), feature.into(), amount.into(), caller.as_str().into()],
            )?;
        }
        if has_holds {
            return release_held(None);
        }
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

/// 0.1.0's flux_release (no subject), for its install script. Under a
/// 0.1.0 schema no key is ever current (identity.rs), so this touches the
/// tenant's counter only, as 0.1.0 did.
#[pg_extern(sql = false, volatile, parallel_unsafe)]
fn flux_release(tenant: Option<&str>, feature: Option<&str>, amount: Option<i64>) -> Option<i64> {
    flux_release_v2(tenant, feature, amount, None)
}

/// Units used in the current period (limit: held now; rate: calls in the
/// current window); with `subject`, the subject's own (NULL when its grant
/// gives subjects no allowance). NULL for unknown tenants or features and
/// for boolean features.
/// (The `_v2` symbol, as for flux_consume.)
#[pg_extern(name = "flux_usage", stable, parallel_safe)]
fn flux_usage_v2(
    tenant: Option<&str>,
    feature: Option<&str>,
    subject: default!(Option<&str>, "NULL"),
) -> Option<i64> {
    let (tenant, feature) = (tenant?, feature?);
    (|| -> FluxResult<Option<i64>> {
        crate::access::require_act_for("flux_usage", tenant)?;
        let mut x = entitle(tenant, feature, subject)?;
        usage_now(&mut x, subject)
    })()
    .or_raise()
}

/// What flux_usage answers for a decision's tenant (or subject): the
/// counter of the period of the plan in force, whether or not the tenant
/// is entitled now.
pub fn usage_now(x: &mut Decided, subject: Option<&str>) -> FluxResult<Option<i64>> {
    {
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
        let (caller, limit) = match subject {
            None => (None, x.d.limit),
            Some(s) => {
                let grant = x.d.plan.as_deref().and_then(|p| f.grant_of(p));
                let Some(own) = grant.and_then(|g| g.subject_limit) else {
                    return Ok(None);
                };
                (Some(format!("subject:{s}")), Some(own))
            }
        };
        used_now(x, meter(x)?, caller.as_deref(), limit)
    }
}

/// 0.1.0's flux_usage (STRICT, two arguments), for its install script.
#[pg_extern(sql = false, stable, strict, parallel_safe)]
fn flux_usage(tenant: &str, feature: &str) -> Option<i64> {
    flux_usage_v2(Some(tenant), Some(feature), None)
}

/// What a counter or rate limiter holds now, in the meter's period.
fn used_now(
    x: &Decided,
    meter: Option<Meter>,
    caller: Option<&str>,
    limit: Option<i64>,
) -> FluxResult<Option<i64>> {
    let counter = |start: Option<i64>| Counter {
        tenant: &x.d.tenant,
        feature: &x.d.feature,
        start: sql::period_key(start),
        caller,
    };
    Ok(match meter {
        Some(Meter::Allowance) => Some(used_counting_holds(x, &counter(None))?),
        Some(Meter::Quota { start, .. }) => Some(used_counting_holds(x, &counter(Some(start)))?),
        Some(Meter::Rate { window }) => {
            let tat = sql::load_tat(&x.d.tenant, &x.d.feature, caller)?;
            let limit = limit.unwrap_or(1).max(1);
            Some(gcra(tat, x.ctx.now, limit, window, 0).used)
        }
        None => None,
    })
}

/// Units an API key used of a feature in the current period: of its own
/// allowance's period when it has one (flux_key_limit), else of its
/// tenant's grant. NULL for a boolean feature, or a rate feature the key
/// has no allowance of. Acts for the key's tenant (flux_service, flux_admin
/// or that tenant's session).
#[pg_extern(stable, parallel_safe)]
fn flux_key_usage(key_id: Option<&str>, feature: Option<&str>) -> Option<i64> {
    let (key_id, feature) = (key_id?, feature?);
    (|| -> FluxResult<Option<i64>> {
        let tenant = {
            let _owner = crate::privilege::AsOwner::enter()?;
            store::one::<String>(
                "SELECT tenant FROM flux.api_keys WHERE id OPERATOR(pg_catalog.=) $1",
                &[key_id.into()],
            )?
        };
        let Some(tenant) = tenant else {
            return Err(FluxError::UnknownReference(format!(
                "no API key with id {}",
                shown(key_id)
            )));
        };
        crate::access::require_act_for("flux_key_usage", &tenant)?;
        let x = entitle(&tenant, feature, None)?;
        let Some(f) = x.feature() else {
            return Ok(None);
        };
        if !f.kind.has_limit() {
            return Ok(None);
        }
        let own = {
            let _owner = crate::privilege::AsOwner::enter()?;
            store::one::<String>(
                "SELECT coalesce(period, '') FROM flux.key_limits \
                 WHERE key_id OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2",
                &[key_id.into(), feature.into()],
            )?
        };
        let period = match &own {
            Some(p) if !p.is_empty() => Some(p.clone()),
            _ => {
                x.d.period
                    .clone()
                    .or_else(|| f.grants.iter().rev().find_map(|g| g.period.clone()))
            }
        };
        if f.kind == Kind::Rate && own.is_none() {
            return Ok(None);
        }
        let limit = match f.kind {
            Kind::Rate => {
                let _owner = crate::privilege::AsOwner::enter()?;
                store::one::<i64>(
                    "SELECT \"limit\" FROM flux.key_limits \
                     WHERE key_id OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2",
                    &[key_id.into(), feature.into()],
                )?
            }
            _ => None,
        };
        let caller = format!("key:{key_id}");
        used_now(&x, meter_of(&x, period.as_deref())?, Some(&caller), limit)
    })()
    .or_raise()
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::rules::gcra;
    use pgrx::prelude::*;

    /// A small deterministic generator (xorshift64*), so a failure repeats.
    struct Dice(u64);

    impl Dice {
        fn roll(&mut self, n: u64) -> i64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n) as i64
        }
    }

    type Outcome = (bool, String, Option<i64>, Option<i64>, Option<i64>);

    /// The same 300 steps for one tenant: consumes of 1 to 4 seats (a
    /// limit) and api calls (a daily quota), releases, the limit lowered
    /// and raised, the day rolling over.
    fn run(tenant: &str) -> Vec<Outcome> {
        Spi::run(
            "SET flux.now = '2026-11-18 10:00+00';
             SELECT flux_grant('pro', 'seats', 10);
             SELECT flux_grant('pro', 'api', 20, 'day');",
        )
        .unwrap();
        Spi::run(&format!("SELECT flux_subscribe('{tenant}', 'pro')")).unwrap();
        let mut dice = Dice(0x9e37_79b9_7f4a_7c15);
        let mut out = Vec::new();
        let mut day = 0;
        for _ in 0..300 {
            let sql = match dice.roll(10) {
                0 => format!("SELECT flux_release('{tenant}', 'seats', {})", 1 + dice.roll(3)),
                1 => format!("SELECT flux_grant('pro', 'seats', {})", 2 + dice.roll(12)),
                2 => {
                    day += 1;
                    let (m, d) = if 18 + day <= 30 { (11, 18 + day) } else { (12, day - 12) };
                    format!("SET flux.now = '2026-{m}-{d} 10:00+00'")
                }
                3..=5 => format!(
                    "SELECT allowed, reason, used, remaining, \"limit\" FROM flux_consume('{tenant}', 'seats', {})",
                    1 + dice.roll(4)
                ),
                _ => format!(
                    "SELECT allowed, reason, used, remaining, \"limit\" FROM flux_consume('{tenant}', 'api', {})",
                    1 + dice.roll(4)
                ),
            };
            if !sql.starts_with("SELECT allowed") {
                Spi::run(&sql).unwrap();
                continue;
            }
            let row = Spi::connect(|c| {
                let r = c.select(&sql, Some(1), &[])?;
                let r = r.first();
                Ok::<_, pgrx::spi::SpiError>((
                    r.get::<bool>(1)?.unwrap_or_default(),
                    r.get::<String>(2)?.unwrap_or_default(),
                    r.get::<i64>(3)?,
                    r.get::<i64>(4)?,
                    r.get::<i64>(5)?,
                ))
            })
            .unwrap();
            out.push(row);
        }
        Spi::run("RESET flux.now").unwrap();
        out
    }

    #[pg_test]
    fn the_sql_path_decides_as_the_heap_path() {
        Spi::run(
            "SELECT flux_define_feature('seats', 'limit');
             SELECT flux_define_feature('api', 'metered');
             SELECT flux_define_plan('pro');",
        )
        .unwrap();
        let heap = run("heap");
        // A trigger on flux.usage sends every write to SQL (counters.rs
        // stands aside), and counts the writes it sees.
        Spi::run(
            "CREATE TABLE flux_sql_writes (n int);
             CREATE FUNCTION flux_sql_write() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO public.flux_sql_writes VALUES (1); RETURN NEW; END $$;
             GRANT INSERT ON flux_sql_writes TO flux_owner;
             CREATE TRIGGER count_writes BEFORE INSERT OR UPDATE ON flux.usage
               FOR EACH ROW EXECUTE FUNCTION flux_sql_write();",
        )
        .unwrap();
        let sql = run("sql");
        let writes = Spi::get_one::<i64>("SELECT count(*) FROM flux_sql_writes").unwrap();
        let recorded = heap.iter().filter(|o| o.0).count() as i64;
        assert!(
            writes.unwrap_or(0) >= recorded,
            "the SQL path ran: {writes:?} writes, {recorded} recorded"
        );
        assert!(
            heap.iter().any(|o| !o.0) && recorded > 50,
            "the sequence hits the limits and passes them"
        );
        assert_eq!(heap, sql);
        let totals = Spi::get_two::<i64, i64>(
            "SELECT sum(used) FILTER (WHERE tenant = 'heap')::bigint, sum(used) FILTER (WHERE tenant = 'sql')::bigint
               FROM flux.usage",
        )
        .unwrap();
        assert_eq!(totals.0, totals.1);
    }

    #[pg_test]
    fn the_rate_limiters_sql_is_gcra() {
        Spi::run(
            "SELECT flux_define_feature('calls', 'rate');
             SELECT flux_define_plan('pro');
             SELECT flux_grant('pro', 'calls', 5, '10 seconds');
             SELECT flux_subscribe('acme', 'pro');",
        )
        .unwrap();
        let (limit, window) = (5, 10_000_000);
        let start = 848_311_200_000_000_i64; // 2026-11-18 10:00 UTC, PostgreSQL epoch
        let mut dice = Dice(0x2545_f491_4f6c_dd1d);
        let (mut now, mut tat) = (start, None);
        let mut denied = 0;
        for _ in 0..300 {
            // Whole seconds: the emission interval is 2 s, so calls land
            // exactly on the boundary often.
            now += dice.roll(4) * 1_000_000;
            let amount = 1 + dice.roll(3);
            let at = Spi::get_one::<String>(&format!(
                "SELECT (timestamptz 'epoch' + interval '946684800 seconds' + {now} * interval '1 microsecond')::text"
            ))
            .unwrap()
            .unwrap();
            Spi::run(&format!("SET flux.now = '{at}'")).unwrap();
            let (allowed, used) = Spi::get_two::<bool, i64>(&format!(
                "SELECT allowed, used FROM flux_consume('acme', 'calls', {amount})"
            ))
            .unwrap();
            let want = gcra(tat, now, limit, window, amount);
            assert_eq!(allowed, Some(want.allowed), "at {at}, {amount} calls");
            if want.allowed {
                tat = Some(want.new_tat);
                assert_eq!(used, Some(want.used), "at {at}, {amount} calls");
            } else {
                denied += 1;
            }
        }
        assert!(denied > 20, "the sequence is rate limited ({denied} times)");
        let stored = Spi::get_one::<i64>(
            "SELECT ((extract(epoch FROM tat) - 946684800) * 1000000)::bigint FROM flux.rate_state",
        )
        .unwrap();
        assert_eq!(stored, tat);
        Spi::run("RESET flux.now").unwrap();
    }
}
