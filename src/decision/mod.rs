//! The entitlement decision: the one place that owns the order of reasons.
//!
//! Pure Rust over `model` facts, so every rule is unit-tested without a
//! backend. The store decides where the facts come from.

use crate::error::shown;
use crate::model::*;
use crate::rollout::in_rollout;
use crate::timeutil::{add_span, format_date, format_minute, Span};

/// Everything outside the catalogue that a decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// The clock: `flux.now` when set, else the transaction time.
    pub now: i64,
    /// `flux.default_grace_period`.
    pub default_grace: Span,
    /// Build the message and figures for people; false when only `allowed`
    /// is wanted (flux_check, RLS), which skips the string formatting.
    pub detail: bool,
}

/// Why a subscription is not live, as a sentence fragment; None when live.
pub fn not_live_because(t: &TenantFacts, ctx: &Context) -> Option<String> {
    let id = &t.id;
    if t.plan_at(ctx.now).is_none() {
        return Some(format!("{id} has no subscription"));
    }
    match t.status {
        Status::Trialing => match t.trial_ends_at {
            Some(end) if ctx.now < end => None,
            Some(end) => Some(format!("{id}'s trial ended {}", format_minute(end))),
            None => Some(format!("{id}'s trial has no end date")),
        },
        Status::Active => match t.current_period_end {
            Some(end) if t.cancel_at_period_end && ctx.now >= end => Some(format!(
                "{id}'s subscription was canceled at the end of its period on {}",
                format_date(end)
            )),
            _ => None,
        },
        Status::PastDue => {
            let until = grace_deadline(t, ctx);
            match until {
                Some(u) if ctx.now < u => None,
                Some(u) => Some(format!(
                    "{id}'s subscription is past_due and its grace period ended {}",
                    format_minute(u)
                )),
                None => Some(format!("{id}'s subscription is past_due")),
            }
        }
        Status::Canceled => Some(format!("{id}'s subscription is canceled")),
        Status::Paused => Some(format!("{id}'s subscription is paused")),
    }
}

/// When a past_due subscription stops being live: `grace_until`, else
/// `past_due_since` + the plan's grace period (else the setting).
pub fn grace_deadline(t: &TenantFacts, ctx: &Context) -> Option<i64> {
    t.grace_until.or_else(|| {
        t.past_due_since
            .map(|since| add_span(since, t.grace_at(ctx.now).unwrap_or(ctx.default_grace)))
    })
}

/// The interval of clocks `[from, until)` around `ctx.now` in which every
/// time rule answers as it does at `ctx.now`: between the instants the rules
/// compare the clock with (trial end, period end, grace deadline, override
/// window), the decision is the same, so an answer can be kept that long.
/// Conservative: every such instant bounds it, whether or not it decided.
pub fn steady_window(t: Option<&TenantFacts>, ctx: &Context) -> (i64, i64) {
    let Some(t) = t else {
        return (i64::MIN, i64::MAX);
    };
    let o = t.override_.as_ref();
    let instants = [
        t.trial_ends_at,
        t.current_period_end,
        grace_deadline(t, ctx),
        o.and_then(|o| o.starts_at),
        o.and_then(|o| o.expires_at),
        t.scheduled.as_ref().map(|s| s.at),
    ];
    instants
        .into_iter()
        .flatten()
        .fold((i64::MIN, i64::MAX), |(from, until), x| {
            if x <= ctx.now {
                (from.max(x), until)
            } else {
                (from, until.min(x))
            }
        })
}

/// The allowance computed from plan, addons and override.
#[derive(Debug, Clone, PartialEq)]
enum Allowance {
    /// Nothing grants it.
    None,
    /// A live override with enabled = false.
    Revoked(Option<String>),
    /// Granted, with a limit (None = unlimited) and a value.
    Granted {
        limit: Option<i64>,
        value: Option<JsonText>,
        via_override: bool,
    },
}

/// Add two limits where None means unlimited (unlimited wins).
fn add_limits(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    Some(a?.saturating_add(b?))
}

fn allowance(
    f: &FeatureFacts,
    t: &TenantFacts,
    plan: Option<&str>,
    live: bool,
    now: i64,
) -> Allowance {
    let mut limit: Option<Option<i64>> = None;
    let mut value = None;
    if let Some(g) = plan.and_then(|p| f.grant_of(p)) {
        limit = Some(g.limit);
        value = g.value.clone();
    }
    if live {
        for a in &t.addons {
            let units = a.limit.map(|l| l.saturating_mul(a.quantity as i64));
            limit = Some(match limit {
                None => units,
                Some(l) => add_limits(l, units),
            });
            if value.is_none() {
                value = a.value.clone();
            }
        }
    }
    if let Some(o) = t.override_.as_ref().filter(|o| o.is_live(now)) {
        if !o.enabled {
            return Allowance::Revoked(o.reason.clone());
        }
        return Allowance::Granted {
            limit: o.limit,
            value: o.value.clone().or(value),
            via_override: true,
        };
    }
    match limit {
        None => Allowance::None,
        Some(limit) => Allowance::Granted {
            limit,
            value,
            via_override: false,
        },
    }
}

/// "the pro plan", "the pro or enterprise plan", "the starter, pro or enterprise plan".
fn plans_phrase(plans: &[String]) -> String {
    match plans {
        [] => String::new(),
        [one] => format!("the {one} plan"),
        [init @ .., last] => format!("the {} or {last} plan", init.join(", ")),
    }
}

fn blank(tenant: &str, feature: &str, subject: Option<&str>) -> Decision {
    Decision {
        allowed: false,
        reason: Reason::Ok,
        message: String::new(),
        tenant: tenant.to_string(),
        feature: feature.to_string(),
        plan: None,
        limit: None,
        used: None,
        remaining: None,
        resets_at: None,
        retry_after: None,
        upgrade_plans: None,
        kind: None,
        subject: subject.map(str::to_string),
        api_key: None,
        overage: None,
        balance: None,
        hold_id: None,
        value: None,
        period: None,
        source: None,
        scheduled: None,
    }
}

/// Decide whether `tenant` may use `feature`. The first reason that applies
/// wins, in the contract's order. `key` is the API key current in the
/// transaction, when it is this tenant's: its scopes apply here, its
/// allowances where usage is counted (usage/).
#[allow(clippy::too_many_arguments)]
pub fn decide(
    tenant_id: &str,
    feature_key: &str,
    subject: Option<&str>,
    feature: Option<&FeatureFacts>,
    tenant: Option<&TenantFacts>,
    flag: Option<&FlagFacts>,
    key: Option<&KeyFacts>,
    ctx: &Context,
) -> Decision {
    let mut d = decide_now(
        tenant_id,
        feature_key,
        subject,
        feature,
        tenant,
        flag,
        key,
        ctx,
    );
    if let (true, Some(t)) = (ctx.detail, tenant) {
        if let Some(s) = t.pending(ctx.now) {
            // The same decision at the change's instant, on the new plan.
            let mut after_t = t.clone();
            after_t.plan = Some(s.plan.clone());
            after_t.plan_grace = s.grace;
            after_t.scheduled = None;
            let at = Context { now: s.at, ..*ctx };
            let after = decide_now(
                tenant_id,
                feature_key,
                subject,
                feature,
                Some(&after_t),
                flag,
                key,
                &at,
            );
            d.scheduled = scheduled_note(&d, &after, s);
        }
    }
    d
}

/// What a scheduled change does to a decision, when it changes anything:
/// "; downgrades to starter on 2027-01-01, which does not include it",
/// "; downgrades to starter on 2027-01-01 (limit 3)".
fn scheduled_note(now: &Decision, after: &Decision, s: &Scheduled) -> Option<String> {
    let verb = match s.direction {
        std::cmp::Ordering::Less => "downgrades",
        std::cmp::Ordering::Greater => "upgrades",
        std::cmp::Ordering::Equal => "moves",
    };
    // At the instant the subscription may no longer be live (canceled at
    // the period's end): then the new plan decides nothing.
    if after.plan.as_deref() != Some(s.plan.as_str()) {
        return None;
    }
    let when = format!("{verb} to {} on {}", s.plan, format_date(s.at));
    let limited = now.kind.is_some_and(|k| k.has_limit());
    let limit =
        |l: Option<i64>| l.map_or_else(|| "unlimited".to_string(), |l| format!("limit {l}"));
    match (now.allowed, after.allowed) {
        (true, false) => Some(format!("; {when}, which does not include it")),
        (false, true) if limited => Some(format!(
            "; {when}, which includes it ({})",
            limit(after.limit)
        )),
        (false, true) => Some(format!("; {when}, which includes it")),
        (true, true) if now.limit != after.limit && limited => {
            Some(format!("; {when} ({})", limit(after.limit)))
        }
        _ => None,
    }
}

#[allow(clippy::too_many_arguments)]
fn decide_now(
    tenant_id: &str,
    feature_key: &str,
    subject: Option<&str>,
    feature: Option<&FeatureFacts>,
    tenant: Option<&TenantFacts>,
    flag: Option<&FlagFacts>,
    key: Option<&KeyFacts>,
    ctx: &Context,
) -> Decision {
    let mut d = blank(tenant_id, feature_key, subject);
    let key = key.filter(|k| k.tenant == tenant_id);
    d.api_key = key.map(|k| k.id.clone());

    let Some(f) = feature else {
        d.reason = Reason::UnknownFeature;
        d.message = format!("unknown feature {}", shown(feature_key));
        return d;
    };
    d.kind = Some(f.kind);
    let Some(t) = tenant else {
        d.reason = Reason::UnknownTenant;
        d.message = format!("unknown tenant {}", shown(tenant_id));
        return d;
    };
    if let Some(k) = key {
        if !k.permits(feature_key) {
            d.reason = Reason::NotPermitted;
            d.message = format!("the key {} may not use {feature_key}", k.name);
            return d;
        }
    }

    // Flags come before entitlement: a kill switch or a rollout gate says
    // "not yet", whatever the plan.
    if let Some(flag) = flag {
        if !flag.enabled {
            d.reason = Reason::FeatureDisabled;
            d.message = format!("{feature_key} is turned off");
            return d;
        }
        let who = subject.unwrap_or(tenant_id);
        if flag.denied || (!flag.allowed && !in_rollout(&flag.salt, who, flag.threshold)) {
            d.reason = Reason::NotInRollout;
            d.message = match subject {
                Some(s) => format!("{feature_key} is not yet available to {s} of {tenant_id}"),
                None => format!("{feature_key} is not yet available to {tenant_id}"),
            };
            return d;
        }
    }

    let why_not_live = not_live_because(t, ctx);
    let live = why_not_live.is_none();
    let plan = if live {
        t.plan_at(ctx.now)
    } else {
        f.default_plan.as_deref()
    };
    d.plan = plan.map(str::to_string);

    match allowance(f, t, plan, live, ctx.now) {
        Allowance::Granted {
            limit,
            value,
            via_override,
        } => {
            d.allowed = true;
            d.reason = Reason::Ok;
            d.value = value;
            if f.kind.has_limit() {
                d.limit = limit;
            }
            if matches!(f.kind, Kind::Metered | Kind::Rate | Kind::Credits) {
                let from_plan = plan
                    .and_then(|p| f.grant_of(p))
                    .and_then(|g| g.period.clone());
                d.period =
                    from_plan.or_else(|| f.grants.iter().rev().find_map(|g| g.period.clone()));
            }
            let source = match (via_override, plan) {
                (true, _) => Source::Override,
                (false, Some(_)) => Source::Plan,
                (false, None) => Source::Addon,
            };
            d.source = Some(source);
            // Sentences cost more than the decision: only when asked for,
            // and not for a counter, whose figures the meter then puts in
            // the message (metering::apply_counter).
            if ctx.detail && !matches!(f.kind, Kind::Limit | Kind::Metered | Kind::Credits) {
                let source = source.phrase(plan);
                d.message = match (f.kind.has_limit(), limit) {
                    (false, _) => format!("{tenant_id} may use {feature_key} {source}"),
                    (true, None) => format!("{feature_key}: unlimited {source}"),
                    (true, Some(l)) => format!("{feature_key}: up to {l} {source}"),
                };
            }
        }
        Allowance::Revoked(reason) => {
            let default_grants = f
                .default_plan
                .as_deref()
                .is_some_and(|p| f.grant_of(p).is_some());
            if let (Some(why), false) = (&why_not_live, default_grants) {
                d.reason = Reason::SubscriptionInactive;
                d.message = format!("{why}; {feature_key} is turned off for {tenant_id}");
            } else {
                d.reason = Reason::NotInPlan;
                d.message = match reason {
                    Some(r) => format!("{feature_key} is turned off for {tenant_id} ({r})"),
                    None => format!("{feature_key} is turned off for {tenant_id}"),
                };
            }
            d.upgrade_plans = Some(Vec::new());
        }
        Allowance::None => {
            d.reason = if live {
                Reason::NotInPlan
            } else {
                Reason::SubscriptionInactive
            };
            // Plans that are sold: a grandfathered copy is not offered.
            let granting: Vec<String> = f
                .grants
                .iter()
                .filter(|g| g.listed)
                .map(|g| g.plan.to_string())
                .collect();
            let needs = if granting.is_empty() {
                format!("{feature_key} is not included in any plan")
            } else {
                format!("{feature_key} requires {}", plans_phrase(&granting))
            };
            d.message = match why_not_live {
                Some(why) => format!("{why}; {needs}"),
                None => needs,
            };
            d.upgrade_plans = Some(granting);
        }
    }
    d
}

#[cfg(test)]
mod properties;
#[cfg(test)]
mod tests;
