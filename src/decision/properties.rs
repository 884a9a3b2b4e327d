//! Properties over random tenants, clocks, overrides and flags. The steady
//! window is what the answer cache trusts (cache/answers.rs keeps an answer while
//! the clock stays inside it), so a clock inside it must decide the same.

use super::tests::{ctx, export, seats};
use super::*;
use crate::timeutil::{from_civil, USECS_PER_DAY};
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
            scheduled: None,
        }
    }
}

fn feature() -> impl Strategy<Value = FeatureFacts> {
    prop_oneof![Just(export()), Just(seats())]
}

fn at(f: &FeatureFacts, t: &TenantFacts, flag: Option<&FlagFacts>, now: i64) -> Decision {
    decide(&t.id, &f.key, None, Some(f), Some(t), flag, None, &ctx(now))
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
