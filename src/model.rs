//! The facts a decision is made from, as plain Rust values, and the words
//! of the enums stored in the tables. The cache (cache/loads.rs) fills the
//! facts; `decision` reads them.

use crate::error::{shown, FluxError, FluxResult};
use crate::timeutil::Span;
/// A jsonb value as its text: never parsed on the decision path (a deeply
/// nested document must not be able to break a decision).
pub type JsonText = String;

/// "a, b or c": the words a value may be, for error messages.
pub fn one_of(words: &[&str]) -> String {
    match words.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// An enum stored as a word in a column. Its words are listed once, here:
/// `parse`, `as_str`, the "expected ..." of its error, its JSON form and
/// (checked by a test in validate.rs) the column's CHECK constraint.
macro_rules! words {
    ($(#[$meta:meta])* $name:ident, $what:literal { $($variant:ident = $word:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($variant),+
        }

        impl $name {
            /// Every value, in the order of the list.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// Every word, in the same order.
            pub const WORDS: &'static [&'static str] = &[$($word),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word),+
                }
            }

            pub fn parse(s: &str) -> FluxResult<$name> {
                match s {
                    $($word => Ok($name::$variant),)+
                    _ => Err(FluxError::InvalidValue(format!(
                        concat!("unknown ", $what, " {}: expected {}"),
                        shown(s),
                        Self::expected()
                    ))),
                }
            }

            /// "a, b or c".
            pub fn expected() -> String {
                one_of(Self::WORDS)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $name::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

words!(Kind, "feature kind" {
    Boolean = "boolean",
    Limit = "limit",
    Metered = "metered",
    Rate = "rate",
    Credits = "credits",
});

impl Kind {
    /// Kinds that carry a numeric allowance.
    pub fn has_limit(self) -> bool {
        !matches!(self, Kind::Boolean)
    }
}

words!(Status, "subscription status" {
    Trialing = "trialing",
    Active = "active",
    PastDue = "past_due",
    Canceled = "canceled",
    Paused = "paused",
});

words!(
    /// The reasons of the contract, in the order they are checked.
    #[derive(PartialOrd, Ord)]
    Reason, "reason" {
        UnknownFeature = "unknown_feature",
        UnknownTenant = "unknown_tenant",
        NotPermitted = "not_permitted",
        FeatureDisabled = "feature_disabled",
        NotInRollout = "not_in_rollout",
        SubscriptionInactive = "subscription_inactive",
        NotInPlan = "not_in_plan",
        LimitReached = "limit_reached",
        RateLimited = "rate_limited",
        Ok = "ok",
    }
);

words!(
    /// The period of a metered quota.
    Period, "period" {
        Minute = "minute",
        Hour = "hour",
        Day = "day",
        Week = "week",
        Month = "month",
        BillingPeriod = "billing_period",
    }
);

impl Period {
    /// "used today", "used this month", for messages.
    pub fn phrase(self) -> &'static str {
        match self {
            Period::Minute => "this minute",
            Period::Hour => "this hour",
            Period::Day => "today",
            Period::Week => "this week",
            Period::Month => "this month",
            Period::BillingPeriod => "this billing period",
        }
    }
}

/// One plan's grant of the feature being decided.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanGrant {
    pub plan: std::rc::Rc<str>,
    pub rank: i32,
    pub limit: Option<i64>,
    pub period: Option<String>,
    pub value: Option<JsonText>,
    /// Each subject's own allowance inside the tenant's (None: none).
    pub subject_limit: Option<i64>,
    /// A soft limit (flux_set_overage): None, hard; Some(cap), consumes
    /// may go past the limit by cap (None: no cap).
    pub overage: Option<Option<i64>>,
    /// The plan is sold (flux.plans.listed): offered in upgrade_plans and
    /// messages; a grandfathered copy is not.
    pub listed: bool,
}

/// What the catalogue says about one feature.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureFacts {
    pub key: String,
    pub kind: Kind,
    /// Enabled grants of this feature by every plan, ordered by rank then key.
    pub grants: Vec<PlanGrant>,
    /// The default plan's key, whether or not it grants this feature.
    pub default_plan: Option<String>,
    /// A hold was ever taken on it (flux.held_features), so its counters
    /// may carry holds past their ttl (usage/holds.rs).
    pub has_holds: bool,
    /// Its usage alert thresholds (flux.alerts), in ten-thousandths of the
    /// limit, ascending (usage/alerts.rs).
    pub alerts: Vec<i64>,
}

impl FeatureFacts {
    pub fn grant_of(&self, plan: &str) -> Option<&PlanGrant> {
        self.grants.iter().find(|g| &*g.plan == plan)
    }
}

/// The feature's flag, with the list entries that concern this decision.
#[derive(Debug, Clone, PartialEq)]
pub struct FlagFacts {
    /// false: the kill switch is off, for everyone.
    pub enabled: bool,
    /// Buckets (of rollout::BUCKETS) that are in: rollout_percent x 10,000.
    pub threshold: u32,
    /// Hash salt; the feature key unless set.
    pub salt: String,
    /// The tenant or the subject is on the allow list.
    pub allowed: bool,
    /// The tenant or the subject is on the deny list.
    pub denied: bool,
}

/// One addon the tenant holds that grants the feature.
#[derive(Debug, Clone, PartialEq)]
pub struct AddonGrant {
    pub addon: String,
    pub quantity: i32,
    /// Per unit; None = unlimited.
    pub limit: Option<i64>,
    pub value: Option<JsonText>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub enabled: bool,
    pub limit: Option<i64>,
    pub value: Option<JsonText>,
    pub starts_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub reason: Option<String>,
}

impl Override {
    /// Live between starts_at (inclusive) and expires_at (exclusive).
    pub fn is_live(&self, now: i64) -> bool {
        self.starts_at.is_none_or(|s| now >= s) && self.expires_at.is_none_or(|e| now < e)
    }
}

/// What the tenant's rows say, restricted to the feature being decided.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantFacts {
    pub id: String,
    pub plan: Option<String>,
    pub status: Status,
    pub trial_ends_at: Option<i64>,
    pub current_period_start: Option<i64>,
    pub current_period_end: Option<i64>,
    pub cancel_at_period_end: bool,
    pub past_due_since: Option<i64>,
    pub grace_until: Option<i64>,
    /// The tenant's plan's grace_period (None: use the setting).
    pub plan_grace: Option<Span>,
    pub addons: Vec<AddonGrant>,
    pub override_: Option<Override>,
    /// A plan change scheduled for a later instant (flux_schedule_change).
    pub scheduled: Option<Scheduled>,
}

/// A plan change that takes effect when the clock reaches `at`, with no
/// job: every decision from then on uses `plan`.
#[derive(Debug, Clone, PartialEq)]
pub struct Scheduled {
    pub plan: String,
    pub at: i64,
    /// The new plan's grace_period (filled when cached, as plan_grace).
    pub grace: Option<Span>,
    /// The new plan's rank against the current one's (filled when cached).
    pub direction: std::cmp::Ordering,
}

impl TenantFacts {
    /// The plan in force at `now`: the scheduled one from its instant on.
    pub fn plan_at(&self, now: i64) -> Option<&str> {
        match &self.scheduled {
            Some(s) if now >= s.at => Some(&s.plan),
            _ => self.plan.as_deref(),
        }
    }

    /// The grace_period of the plan in force at `now`.
    pub fn grace_at(&self, now: i64) -> Option<Span> {
        match &self.scheduled {
            Some(s) if now >= s.at => s.grace,
            _ => self.plan_grace,
        }
    }

    /// A change still to come at `now`.
    pub fn pending(&self, now: i64) -> Option<&Scheduled> {
        self.scheduled.as_ref().filter(|s| now < s.at)
    }
}

/// The API key current in the transaction (flux_authenticate): read once
/// then, with its allowances, and applied to its tenant's decisions.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyFacts {
    pub id: String,
    pub tenant: String,
    pub name: String,
    /// The features it may use; None: every feature.
    pub scopes: Option<Vec<String>>,
    pub limits: Vec<KeyLimit>,
}

impl KeyFacts {
    pub fn permits(&self, feature: &str) -> bool {
        self.scopes
            .as_ref()
            .is_none_or(|s| s.iter().any(|f| f == feature))
    }

    pub fn limit_of(&self, feature: &str) -> Option<&KeyLimit> {
        self.limits.iter().find(|l| l.feature == feature)
    }
}

/// One allowance of an API key (flux.key_limits).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyLimit {
    pub feature: String,
    pub limit: i64,
    pub period: Option<String>,
}

words!(
    /// The attributes of the composite type `flux.decision`, in order: the
    /// one list of them. `entitle::to_composite` fills each (an exhaustive
    /// match), the JSON form of a Decision has the same names, and tests
    /// compare the list with the type in the catalogue.
    Column, "decision column" {
        Allowed = "allowed",
        Reason = "reason",
        Message = "message",
        Tenant = "tenant",
        Feature = "feature",
        Plan = "plan",
        Limit = "limit",
        Used = "used",
        Remaining = "remaining",
        ResetsAt = "resets_at",
        RetryAfter = "retry_after",
        UpgradePlans = "upgrade_plans",
        Kind = "kind",
        Subject = "subject",
        ApiKey = "api_key",
        Overage = "overage",
        Balance = "balance",
        HoldId = "hold_id",
    }
);

/// The type of each column of `flux.decision` (checked against the
/// catalogue by a test, and by the catalogue load for the fast path).
/// Constants only: nothing here calls into PostgreSQL.
impl Column {
    pub fn type_oid(self) -> pgrx::pg_sys::Oid {
        use pgrx::pg_sys;
        match self {
            Column::Allowed => pg_sys::BOOLOID,
            Column::Reason
            | Column::Message
            | Column::Tenant
            | Column::Feature
            | Column::Plan
            | Column::Kind
            | Column::Subject
            | Column::ApiKey
            | Column::HoldId => pg_sys::TEXTOID,
            Column::Limit
            | Column::Used
            | Column::Remaining
            | Column::Overage
            | Column::Balance => pg_sys::INT8OID,
            Column::ResetsAt => pg_sys::TIMESTAMPTZOID,
            Column::RetryAfter => pg_sys::INTERVALOID,
            Column::UpgradePlans => pg_sys::TEXTARRAYOID,
        }
    }
}

impl Default for Reason {
    /// What an idempotency key stored by 0.1.0 without a reason replays as.
    fn default() -> Self {
        Reason::Ok
    }
}

/// A retry_after in JSON: microseconds (rate windows are fixed intervals).
mod micros {
    use crate::timeutil::Span;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Span>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(span) => s.serialize_some(&span.micros),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Span>, D::Error> {
        Ok(Option::<i64>::deserialize(d)?.map(|micros| Span {
            months: 0,
            days: 0,
            micros,
        }))
    }
}

/// The answer, field for field the composite type `flux.decision` (see
/// Column); as JSON, what an idempotency key replays.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    pub message: String,
    pub tenant: String,
    pub feature: String,
    pub plan: Option<String>,
    pub limit: Option<i64>,
    pub used: Option<i64>,
    pub remaining: Option<i64>,
    pub resets_at: Option<i64>,
    #[serde(with = "micros")]
    pub retry_after: Option<Span>,
    pub upgrade_plans: Option<Vec<String>>,
    pub kind: Option<Kind>,
    pub subject: Option<String>,
    /// The current API key's id, when its scopes and allowances applied.
    pub api_key: Option<String>,
    /// Units past a soft limit (not yet computed: NULL).
    pub overage: Option<i64>,
    /// Credits left (not yet computed: NULL).
    pub balance: Option<i64>,
    /// A reservation's id (not yet made: NULL).
    pub hold_id: Option<String>,
    /// The effective grant value (what flux_value returns); not in the type.
    #[serde(skip)]
    pub value: Option<JsonText>,
    /// metered: the reset period; rate: the window. From the applied plan's
    /// grant, else the highest-ranked grant that has one. Not in the type.
    #[serde(skip)]
    pub period: Option<String>,
    /// Where the grant came from, for messages. Not in the type.
    #[serde(skip)]
    pub source: Option<Source>,
    /// What a scheduled plan change will do to this feature ("; downgrades
    /// to starter on 2027-01-01, 3 seats"), added to the message when the
    /// decision is returned (after the usage figures). Not in the type.
    #[serde(skip)]
    pub scheduled: Option<String>,
}

/// Where a grant came from. Phrased only for a message that says it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Source {
    Override,
    Plan,
    Addon,
}

impl Source {
    /// "on the pro plan", "through an override", "through an addon".
    pub fn phrase(self, plan: Option<&str>) -> std::borrow::Cow<'static, str> {
        match (self, plan) {
            (Source::Override, _) => "through an override".into(),
            (Source::Plan, Some(p)) => format!("on the {p} plan").into(),
            _ => "through an addon".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON form of a decision (what an idempotency key replays) has
    /// the columns of flux.decision as its names, and reads back the same.
    #[test]
    fn json_names_are_the_columns() {
        let d = Decision {
            allowed: true,
            reason: Reason::LimitReached,
            message: "m".into(),
            tenant: "t".into(),
            feature: "f".into(),
            plan: Some("pro".into()),
            limit: Some(3),
            used: Some(2),
            remaining: Some(1),
            resets_at: Some(42),
            retry_after: Some(Span {
                months: 0,
                days: 0,
                micros: 7,
            }),
            upgrade_plans: Some(vec!["enterprise".into()]),
            kind: Some(Kind::Metered),
            subject: Some("u".into()),
            ..Decision::default()
        };
        let v = serde_json::to_value(&d).unwrap();
        let mut names: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        names.sort();
        let mut want = Column::WORDS.to_vec();
        want.sort();
        assert_eq!(names, want);
        assert_eq!(v["reason"], "limit_reached");
        assert_eq!(v["retry_after"], 7);
        assert_eq!(serde_json::from_value::<Decision>(v).unwrap(), d);
        // A key stored by 0.1.0 (these names, an amount) reads the same way.
        let old = serde_json::json!({"amount": 1, "allowed": false, "reason": "rate_limited",
                                      "message": "x", "tenant": "t", "feature": "f", "kind": "rate"});
        let d = serde_json::from_value::<Decision>(old).unwrap();
        assert_eq!((d.reason, d.kind), (Reason::RateLimited, Some(Kind::Rate)));
    }

    #[test]
    fn words_parse_back_and_errors_list_them() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()).unwrap(), *k);
        }
        assert_eq!(
            Kind::parse("bool").unwrap_err().to_string(),
            "unknown feature kind \"bool\": expected boolean, limit, metered, rate or credits"
        );
        assert_eq!(
            Period::expected(),
            "minute, hour, day, week, month or billing_period"
        );
        assert_eq!(one_of(&["a"]), "a");
    }
}
