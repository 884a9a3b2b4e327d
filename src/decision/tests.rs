//! The decision's rules, one example each (`properties.rs` has the
//! randomized ones).

use super::*;
use crate::timeutil::{from_civil, USECS_PER_DAY};

fn day(d: u32) -> i64 {
    from_civil(2026, 11, d, 0)
}

pub(super) fn ctx(now: i64) -> Context {
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
        subject_limit: None,
        overage: None,
        listed: true,
    }
}

pub(super) fn export() -> FeatureFacts {
    FeatureFacts {
        key: "export".into(),
        kind: Kind::Boolean,
        grants: vec![grant("pro", 2, None), grant("enterprise", 3, None)],
        default_plan: Some("free".into()),
        has_holds: false,
        alerts: Vec::new(),
    }
}

pub(super) fn seats() -> FeatureFacts {
    FeatureFacts {
        key: "seats".into(),
        kind: Kind::Limit,
        grants: vec![
            grant("free", 0, Some(1)),
            grant("pro", 2, Some(10)),
            grant("enterprise", 3, None),
        ],
        default_plan: Some("free".into()),
        has_holds: false,
        alerts: Vec::new(),
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
        scheduled: None,
    }
}

fn run(f: &FeatureFacts, t: &TenantFacts, now: i64) -> Decision {
    decide(&t.id, &f.key, None, Some(f), Some(t), None, None, &ctx(now))
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
    let d = decide("nobody", "nothing", None, None, None, None, None, &ctx(0));
    assert_eq!(d.reason, Reason::UnknownFeature);
    let d = decide(
        "nobody",
        "export",
        None,
        Some(&export()),
        None,
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
        None,
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
        None,
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

fn scheduled(plan: &str, at: i64, direction: std::cmp::Ordering) -> Option<Scheduled> {
    Some(Scheduled {
        plan: plan.into(),
        at,
        grace: None,
        direction,
    })
}

#[test]
fn a_scheduled_change_applies_from_its_instant_and_says_so_before() {
    let mut t = tenant("pro", Status::Active);
    t.scheduled = scheduled("free", day(10), std::cmp::Ordering::Less);
    let before = run(&seats(), &t, day(10) - 1);
    assert_eq!(
        (before.plan.as_deref(), before.limit),
        (Some("pro"), Some(10))
    );
    assert_eq!(
        before.scheduled.as_deref(),
        Some("; downgrades to free on 2026-11-10 (limit 1)")
    );
    let after = run(&seats(), &t, day(10));
    assert_eq!(
        (after.plan.as_deref(), after.limit),
        (Some("free"), Some(1))
    );
    assert_eq!(after.scheduled, None);
    // Export: pro has it, free does not.
    let e = run(&export(), &t, day(9));
    assert!(e.allowed);
    assert_eq!(
        e.scheduled.as_deref(),
        Some("; downgrades to free on 2026-11-10, which does not include it")
    );
    assert!(!run(&export(), &t, day(10)).allowed);
    // Nothing to say when the feature does not change.
    t.scheduled = scheduled("enterprise", day(10), std::cmp::Ordering::Greater);
    assert_eq!(run(&export(), &t, day(9)).scheduled, None);
    assert_eq!(
        run(&seats(), &t, day(9)).scheduled.as_deref(),
        Some("; upgrades to enterprise on 2026-11-10 (unlimited)")
    );
    // flux_check builds no message.
    let quiet = decide(
        &t.id,
        "seats",
        None,
        Some(&seats()),
        Some(&t),
        None,
        None,
        &Context {
            detail: false,
            ..ctx(day(9))
        },
    );
    assert_eq!(quiet.scheduled, None);
}

#[test]
fn a_cached_answer_never_outlives_a_scheduled_change() {
    let mut t = tenant("pro", Status::Active);
    t.scheduled = scheduled("free", day(10), std::cmp::Ordering::Less);
    assert_eq!(steady_window(Some(&t), &ctx(day(5))), (i64::MIN, day(10)));
    assert_eq!(steady_window(Some(&t), &ctx(day(12))), (day(10), i64::MAX));
}
