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
    if t.plan.is_none() {
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
            .map(|since| add_span(since, t.plan_grace.unwrap_or(ctx.default_grace)))
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
        value: None,
        period: None,
        source: None,
    }
}

/// Decide whether `tenant` may use `feature`. The first reason that applies
/// wins, in the contract's order.
pub fn decide(
    tenant_id: &str,
    feature_key: &str,
    subject: Option<&str>,
    feature: Option<&FeatureFacts>,
    tenant: Option<&TenantFacts>,
    flag: Option<&FlagFacts>,
    ctx: &Context,
) -> Decision {
    let mut d = blank(tenant_id, feature_key, subject);

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
        t.plan.as_deref()
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
            if matches!(f.kind, Kind::Metered | Kind::Rate) {
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
            if ctx.detail && !matches!(f.kind, Kind::Limit | Kind::Metered) {
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
            let granting: Vec<String> = f.grants.iter().map(|g| g.plan.to_string()).collect();
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
mod tests {
    use super::*;
    use crate::timeutil::{from_civil, USECS_PER_DAY};

    fn day(d: u32) -> i64 {
        from_civil(2026, 11, d, 0)
    }

    fn ctx(now: i64) -> Context {
        Context {
            now,
            default_grace: Span::days(7),
            detail: true,
        }
    }

    fn grant(plan: &str, rank: i32, limit: Option<i64>) -> PlanGrant {
        PlanGrant {
            plan: plan.into(),
            rank,
            limit,
            period: None,
            value: None,
        }
    }

    fn export() -> FeatureFacts {
        FeatureFacts {
            key: "export".into(),
            kind: Kind::Boolean,
            grants: vec![grant("pro", 2, None), grant("enterprise", 3, None)],
            default_plan: Some("free".into()),
        }
    }

    fn seats() -> FeatureFacts {
        FeatureFacts {
            key: "seats".into(),
            kind: Kind::Limit,
            grants: vec![
                grant("free", 0, Some(1)),
                grant("pro", 2, Some(10)),
                grant("enterprise", 3, None),
            ],
            default_plan: Some("free".into()),
        }
    }

    fn tenant(plan: &str, status: Status) -> TenantFacts {
        TenantFacts {
            id: "acme".into(),
            plan: Some(plan.into()),
            status,
            trial_ends_at: None,
            current_period_start: None,
            current_period_end: None,
            cancel_at_period_end: false,
            past_due_since: None,
            grace_until: None,
            plan_grace: None,
            addons: vec![],
            override_: None,
        }
    }

    fn run(f: &FeatureFacts, t: &TenantFacts, now: i64) -> Decision {
        decide(&t.id, &f.key, None, Some(f), Some(t), None, &ctx(now))
    }

    #[test]
    fn plan_gating_names_the_plans_to_upgrade_to() {
        let d = run(&export(), &tenant("starter", Status::Active), day(1));
        assert_eq!(d.reason, Reason::NotInPlan);
        assert!(!d.allowed);
        assert_eq!(d.message, "export requires the pro or enterprise plan");
        assert_eq!(
            d.upgrade_plans,
            Some(vec!["pro".to_string(), "enterprise".to_string()])
        );
        let d = run(&export(), &tenant("pro", Status::Active), day(1));
        assert_eq!((d.allowed, d.reason), (true, Reason::Ok));
        assert_eq!(d.plan.as_deref(), Some("pro"));
    }

    #[test]
    fn answers_are_the_same_throughout_the_steady_window() {
        let mut trial = tenant("pro", Status::Trialing);
        trial.trial_ends_at = Some(day(10));
        let mut late = tenant("pro", Status::PastDue);
        late.past_due_since = Some(day(3));
        let mut leaving = tenant("pro", Status::Active);
        leaving.cancel_at_period_end = true;
        leaving.current_period_end = Some(day(20));
        let mut promo = tenant("starter", Status::Active);
        promo.override_ = Some(Override {
            enabled: true,
            limit: None,
            value: None,
            starts_at: Some(day(5)),
            expires_at: Some(day(15)),
            reason: None,
        });
        let plain = tenant("pro", Status::Active);
        for t in [&trial, &late, &leaving, &promo, &plain] {
            for f in [export(), seats()] {
                for now in (0..30).map(|h| day(1) + h * USECS_PER_DAY - 1) {
                    let (from, until) = steady_window(Some(t), &ctx(now));
                    assert!(from <= now && now < until);
                    let want = run(&f, t, now);
                    // Every clock in the window decides the same; the
                    // clocks just outside it may not.
                    for c in [from, until - 1, now] {
                        if c == i64::MIN || c == i64::MAX {
                            continue;
                        }
                        let got = run(&f, t, c);
                        assert_eq!((got.allowed, got.reason), (want.allowed, want.reason));
                    }
                }
            }
        }
        assert_eq!(
            steady_window(Some(&trial), &ctx(day(2))),
            (i64::MIN, day(10))
        );
        assert_eq!(
            steady_window(Some(&late), &ctx(day(4))),
            (i64::MIN, day(10))
        );
        assert_eq!(steady_window(Some(&promo), &ctx(day(7))), (day(5), day(15)));
        assert_eq!(
            steady_window(Some(&plain), &ctx(day(7))),
            (i64::MIN, i64::MAX)
        );
        // The windows are tight: the answer changes at their ends.
        assert!(run(&export(), &trial, day(10) - 1).allowed);
        assert!(!run(&export(), &trial, day(10)).allowed);
        assert!(!run(&export(), &promo, day(5) - 1).allowed);
        assert!(run(&export(), &promo, day(5)).allowed);
    }

    #[test]
    fn unknown_feature_wins_over_unknown_tenant() {
        let d = decide("nobody", "nothing", None, None, None, None, &ctx(0));
        assert_eq!(d.reason, Reason::UnknownFeature);
        let d = decide(
            "nobody",
            "export",
            None,
            Some(&export()),
            None,
            None,
            &ctx(0),
        );
        assert_eq!(d.reason, Reason::UnknownTenant);
        assert_eq!(d.message, "unknown tenant \"nobody\"");
    }

    #[test]
    fn trial_is_live_until_its_end() {
        let mut t = tenant("pro", Status::Trialing);
        t.trial_ends_at = Some(day(10));
        assert!(run(&export(), &t, day(9)).allowed);
        let d = run(&export(), &t, day(10));
        assert_eq!(d.reason, Reason::SubscriptionInactive);
        assert_eq!(d.plan.as_deref(), Some("free"));
        assert!(
            d.message
                .starts_with("acme's trial ended 2026-11-10 00:00 UTC;"),
            "{}",
            d.message
        );
    }

    #[test]
    fn cancel_at_period_end_keeps_access_until_the_end() {
        let mut t = tenant("pro", Status::Active);
        t.cancel_at_period_end = true;
        t.current_period_end = Some(day(15));
        assert!(run(&export(), &t, day(15) - 1).allowed);
        assert_eq!(
            run(&export(), &t, day(15)).reason,
            Reason::SubscriptionInactive
        );
        t.cancel_at_period_end = false;
        assert!(
            run(&export(), &t, day(20)).allowed,
            "a period end alone does not end access"
        );
    }

    #[test]
    fn past_due_grace_from_plan_then_setting_then_grace_until() {
        let mut t = tenant("pro", Status::PastDue);
        t.past_due_since = Some(day(1));
        assert!(run(&export(), &t, day(8) - 1).allowed);
        assert_eq!(
            run(&export(), &t, day(8)).reason,
            Reason::SubscriptionInactive
        );
        t.plan_grace = Some(Span::days(3));
        assert_eq!(
            run(&export(), &t, day(4)).reason,
            Reason::SubscriptionInactive
        );
        t.grace_until = Some(day(20));
        assert!(run(&export(), &t, day(19)).allowed);
    }

    #[test]
    fn canceled_and_paused_fall_back_to_the_default_plan() {
        for status in [Status::Canceled, Status::Paused] {
            let t = tenant("pro", status);
            let d = run(&seats(), &t, day(1));
            assert!(d.allowed);
            assert_eq!((d.plan.as_deref(), d.limit), (Some("free"), Some(1)));
            assert_eq!(
                run(&export(), &t, day(1)).reason,
                Reason::SubscriptionInactive
            );
        }
    }

    #[test]
    fn addons_add_and_unlimited_wins() {
        let mut t = tenant("pro", Status::Active);
        t.addons = vec![AddonGrant {
            addon: "seat_pack".into(),
            quantity: 3,
            limit: Some(5),
            value: None,
        }];
        assert_eq!(run(&seats(), &t, day(1)).limit, Some(25));
        t.addons.push(AddonGrant {
            addon: "unlimited".into(),
            quantity: 1,
            limit: None,
            value: None,
        });
        let d = run(&seats(), &t, day(1));
        assert_eq!((d.allowed, d.limit), (true, None));
        // Addons grant even what the plan does not.
        let mut t = tenant("starter", Status::Active);
        t.addons = vec![AddonGrant {
            addon: "x".into(),
            quantity: 2,
            limit: Some(5),
            value: Some("1".into()),
        }];
        let d = run(&seats(), &t, day(1));
        assert_eq!(
            (d.allowed, d.limit, d.value),
            (true, Some(10), Some("1".to_string()))
        );
        // ...but not when the subscription is not live.
        t.status = Status::Canceled;
        assert_eq!(run(&seats(), &t, day(1)).limit, Some(1));
    }

    #[test]
    fn overrides_replace_revoke_and_respect_their_window() {
        let mut t = tenant("starter", Status::Active);
        t.override_ = Some(Override {
            enabled: true,
            limit: Some(3),
            value: None,
            starts_at: Some(day(5)),
            expires_at: Some(day(10)),
            reason: Some("promo".into()),
        });
        assert_eq!(run(&export(), &t, day(4)).reason, Reason::NotInPlan);
        let d = run(&export(), &t, day(5));
        assert!(d.allowed);
        assert_eq!(d.message, "acme may use export through an override");
        assert_eq!(run(&export(), &t, day(10)).reason, Reason::NotInPlan);
        assert_eq!(run(&seats(), &t, day(6)).limit, Some(3));

        let mut t = tenant("enterprise", Status::Active);
        t.override_ = Some(Override {
            enabled: false,
            limit: None,
            value: None,
            starts_at: None,
            expires_at: None,
            reason: Some("abuse".into()),
        });
        let d = run(&export(), &t, day(1));
        assert_eq!(d.reason, Reason::NotInPlan);
        assert_eq!(d.message, "export is turned off for acme (abuse)");
        assert_eq!(d.upgrade_plans, Some(vec![]));
    }

    #[test]
    fn overrides_apply_whatever_the_subscription_state() {
        let mut t = tenant("pro", Status::Canceled);
        t.override_ = Some(Override {
            enabled: true,
            limit: None,
            value: None,
            starts_at: None,
            expires_at: None,
            reason: None,
        });
        assert!(run(&export(), &t, day(1)).allowed);
    }

    #[test]
    fn limits_are_only_reported_for_limited_kinds() {
        let t = tenant("pro", Status::Active);
        let d = run(&seats(), &t, day(1));
        assert_eq!((d.limit, d.source), (Some(10), Some(Source::Plan)));
        assert_eq!(run(&export(), &t, day(1)).limit, None);
    }

    #[test]
    fn no_subscription_means_the_default_plan() {
        let mut t = tenant("pro", Status::Active);
        t.plan = None;
        let d = run(&seats(), &t, day(1));
        assert_eq!(
            (d.allowed, d.plan.as_deref(), d.limit),
            (true, Some("free"), Some(1))
        );
        let d = run(&export(), &t, day(1));
        assert_eq!(
            d.message,
            "acme has no subscription; export requires the pro or enterprise plan"
        );
    }

    fn flag(enabled: bool, percent: &str, allowed: bool, denied: bool) -> FlagFacts {
        FlagFacts {
            enabled,
            threshold: crate::rollout::threshold(percent).unwrap(),
            salt: "export".into(),
            allowed,
            denied,
        }
    }

    fn with_flag(t: &TenantFacts, f: &FlagFacts, subject: Option<&str>) -> Decision {
        decide(
            &t.id,
            "export",
            subject,
            Some(&export()),
            Some(t),
            Some(f),
            &ctx(day(1)),
        )
    }

    #[test]
    fn flags_come_first_and_deny_beats_allow_and_kill_beats_all() {
        let starter = tenant("starter", Status::Active);
        let pro = tenant("pro", Status::Active);
        // The kill switch wins over the allow list and the plan.
        assert_eq!(
            with_flag(&pro, &flag(false, "100", true, false), None).reason,
            Reason::FeatureDisabled
        );
        // The deny list wins over the allow list.
        assert_eq!(
            with_flag(&pro, &flag(true, "100", true, true), None).reason,
            Reason::NotInRollout
        );
        // The allow list lets in at 0%.
        assert_eq!(
            with_flag(&pro, &flag(true, "0", true, false), None).reason,
            Reason::Ok
        );
        assert_eq!(
            with_flag(&pro, &flag(true, "0", false, false), None).reason,
            Reason::NotInRollout
        );
        // Rollout before the plan: a starter tenant outside the rollout hears "not yet".
        assert_eq!(
            with_flag(&starter, &flag(true, "0", false, false), None).reason,
            Reason::NotInRollout
        );
        assert_eq!(
            with_flag(&starter, &flag(true, "100", false, false), None).reason,
            Reason::NotInPlan
        );
        // Unknown tenants are reported before flags.
        let d = decide(
            "x",
            "export",
            None,
            Some(&export()),
            None,
            Some(&flag(false, "0", false, false)),
            &ctx(0),
        );
        assert_eq!(d.reason, Reason::UnknownTenant);
    }

    #[test]
    fn subject_buckets_per_user_inside_a_tenant() {
        let pro = tenant("pro", Status::Active);
        let f = flag(true, "50", false, false);
        let answers: Vec<bool> = (0..200)
            .map(|i| with_flag(&pro, &f, Some(&format!("user-{i}"))).allowed)
            .collect();
        let inside = answers.iter().filter(|a| **a).count();
        assert!(
            (60..=140).contains(&inside),
            "about half of the users: {inside}"
        );
        let d = with_flag(&pro, &flag(true, "0", false, false), Some("user-9"));
        assert_eq!(d.message, "export is not yet available to user-9 of acme");
    }

    #[test]
    fn phrases() {
        assert_eq!(plans_phrase(&["a".into()]), "the a plan");
        assert_eq!(
            plans_phrase(&["a".into(), "b".into(), "c".into()]),
            "the a, b or c plan"
        );
        let _ = USECS_PER_DAY;
    }

    /// Properties over random tenants, clocks, overrides and flags. The steady
    /// window is what the answer cache trusts (cache/answers.rs keeps an answer while
    /// the clock stays inside it), so a clock inside it must decide the same.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn base() -> i64 {
            from_civil(2026, 11, 1, 0)
        }

        /// An instant within 40 days of the base, at a whole minute or not.
        fn instant() -> impl Strategy<Value = i64> {
            (-40 * USECS_PER_DAY..40 * USECS_PER_DAY).prop_map(|d| base() + d)
        }

        fn status() -> impl Strategy<Value = Status> {
            prop_oneof![
                Just(Status::Trialing),
                Just(Status::Active),
                Just(Status::PastDue),
                Just(Status::Canceled),
                Just(Status::Paused),
            ]
        }

        fn plan() -> impl Strategy<Value = Option<String>> {
            prop::option::of(prop_oneof![
                Just("free"),
                Just("starter"),
                Just("pro"),
                Just("enterprise")
            ])
            .prop_map(|p| p.map(str::to_string))
        }

        fn override_() -> impl Strategy<Value = Option<Override>> {
            prop::option::of(
                (
                    any::<bool>(),
                    prop::option::of(0i64..20),
                    prop::option::of(instant()),
                    prop::option::of(instant()),
                )
                    .prop_map(|(enabled, limit, starts_at, expires_at)| Override {
                        enabled,
                        limit,
                        value: None,
                        starts_at,
                        expires_at,
                        reason: None,
                    }),
            )
        }

        prop_compose! {
            fn tenant()(
                plan in plan(),
                status in status(),
                trial_ends_at in prop::option::of(instant()),
                current_period_end in prop::option::of(instant()),
                cancel_at_period_end in any::<bool>(),
                past_due_since in prop::option::of(instant()),
                grace_until in prop::option::of(instant()),
                plan_grace in prop::option::of((0i32..10).prop_map(Span::days)),
                addon in prop::option::of((1i32..3, prop::option::of(1i64..5))),
                override_ in override_(),
            ) -> TenantFacts {
                TenantFacts {
                    id: "acme".into(),
                    plan,
                    status,
                    trial_ends_at,
                    current_period_start: None,
                    current_period_end,
                    cancel_at_period_end,
                    past_due_since,
                    grace_until,
                    plan_grace,
                    addons: addon
                        .map(|(quantity, limit)| AddonGrant {
                            addon: "extra".into(),
                            quantity,
                            limit,
                            value: None,
                        })
                        .into_iter()
                        .collect(),
                    override_,
                }
            }
        }

        fn feature() -> impl Strategy<Value = FeatureFacts> {
            prop_oneof![Just(export()), Just(seats())]
        }

        fn at(f: &FeatureFacts, t: &TenantFacts, flag: Option<&FlagFacts>, now: i64) -> Decision {
            decide(&t.id, &f.key, None, Some(f), Some(t), flag, &ctx(now))
        }

        proptest! {
            // A rule that flips inside a wrongly wide window needs a few
            // fields to line up (an active tenant cancelling at a period end
            // between the two clocks): about one case in 300.
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn a_clock_inside_the_steady_window_decides_the_same(
                f in feature(),
                t in tenant(),
                now in instant(),
                u in 0.0f64..1.0,
            ) {
                let (from, until) = steady_window(Some(&t), &ctx(now));
                prop_assert!(from <= now && now < until);
                // Somewhere in the window, within the instants' range.
                let (lo, hi) = (from.max(base() - 50 * USECS_PER_DAY), until.min(base() + 50 * USECS_PER_DAY));
                let later = lo + ((hi - lo) as f64 * u) as i64;
                let (a, b) = (at(&f, &t, None, now), at(&f, &t, None, later));
                prop_assert_eq!((a.allowed, a.reason, a.limit), (b.allowed, b.reason, b.limit), "at {} and {}", now, later);
                // At the window's end (when an instant bounds it) the clock has
                // passed a rule's instant: the window starts over there.
                if until < i64::MAX {
                    prop_assert_eq!(steady_window(Some(&t), &ctx(until)).0, until);
                }
            }

            #[test]
            fn reasons_agree_with_the_answer(f in feature(), t in tenant(), now in instant()) {
                let d = at(&f, &t, None, now);
                prop_assert_eq!(d.allowed, d.reason == Reason::Ok);
                prop_assert_eq!(
                    d.upgrade_plans.is_some(),
                    matches!(d.reason, Reason::NotInPlan | Reason::SubscriptionInactive)
                );
                if f.kind == Kind::Boolean {
                    prop_assert_eq!(d.limit, None);
                }
                if !d.allowed {
                    prop_assert!(!d.message.is_empty());
                }
                prop_assert_eq!(d.clone(), at(&f, &t, None, now));
            }

            #[test]
            fn a_live_override_has_the_last_word(f in feature(), mut t in tenant(), now in instant(), enabled in any::<bool>()) {
                t.override_ = Some(Override {
                    enabled,
                    limit: Some(3),
                    value: None,
                    starts_at: None,
                    expires_at: None,
                    reason: None,
                });
                let d = at(&f, &t, None, now);
                prop_assert_eq!(d.allowed, enabled);
                if enabled && f.kind.has_limit() {
                    prop_assert_eq!(d.limit, Some(3));
                }
            }

            #[test]
            fn flags_come_before_the_plan(f in feature(), t in tenant(), now in instant(), enabled in any::<bool>(), denied in any::<bool>()) {
                let flag = FlagFacts {
                    enabled,
                    threshold: 1_000_000,
                    salt: "s".into(),
                    allowed: false,
                    denied,
                };
                let d = at(&f, &t, Some(&flag), now);
                let plain = at(&f, &t, None, now);
                match (enabled, denied) {
                    (false, _) => prop_assert_eq!(d.reason, Reason::FeatureDisabled),
                    (true, true) => prop_assert_eq!(d.reason, Reason::NotInRollout),
                    // Everyone is in a 100% rollout: the plan decides.
                    (true, false) => prop_assert_eq!((d.allowed, d.reason), (plain.allowed, plain.reason)),
                }
            }
        }
    }
}
