//! The facts a decision is made from, as plain Rust values. The store (SPI
//! today, a per-backend cache later) fills them; `decision` reads them.

use crate::error::{shown, FluxError, FluxResult};
use crate::timeutil::Span;
/// A jsonb value as its text: never parsed on the decision path (a deeply
/// nested document must not be able to break a decision).
pub type JsonText = String;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Boolean,
    Limit,
    Metered,
    Rate,
}

impl Kind {
    pub fn parse(s: &str) -> FluxResult<Kind> {
        match s {
            "boolean" => Ok(Kind::Boolean),
            "limit" => Ok(Kind::Limit),
            "metered" => Ok(Kind::Metered),
            "rate" => Ok(Kind::Rate),
            _ => Err(FluxError::InvalidValue(format!(
                "unknown feature kind {}: expected boolean, limit, metered or rate",
                shown(s)
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Boolean => "boolean",
            Kind::Limit => "limit",
            Kind::Metered => "metered",
            Kind::Rate => "rate",
        }
    }

    /// Kinds that carry a numeric allowance.
    pub fn has_limit(self) -> bool {
        !matches!(self, Kind::Boolean)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Trialing,
    Active,
    PastDue,
    Canceled,
    Paused,
}

impl Status {
    pub fn parse(s: &str) -> FluxResult<Status> {
        match s {
            "trialing" => Ok(Status::Trialing),
            "active" => Ok(Status::Active),
            "past_due" => Ok(Status::PastDue),
            "canceled" => Ok(Status::Canceled),
            "paused" => Ok(Status::Paused),
            _ => Err(FluxError::InvalidValue(format!(
                "unknown subscription status {}: expected trialing, active, past_due, canceled or paused",
                shown(s)
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Trialing => "trialing",
            Status::Active => "active",
            Status::PastDue => "past_due",
            Status::Canceled => "canceled",
            Status::Paused => "paused",
        }
    }
}

/// The reasons of the contract, in the order they are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    UnknownFeature,
    UnknownTenant,
    FeatureDisabled,
    NotInRollout,
    SubscriptionInactive,
    NotInPlan,
    LimitReached,
    RateLimited,
    Ok,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownFeature => "unknown_feature",
            Reason::UnknownTenant => "unknown_tenant",
            Reason::FeatureDisabled => "feature_disabled",
            Reason::NotInRollout => "not_in_rollout",
            Reason::SubscriptionInactive => "subscription_inactive",
            Reason::NotInPlan => "not_in_plan",
            Reason::LimitReached => "limit_reached",
            Reason::RateLimited => "rate_limited",
            Reason::Ok => "ok",
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
}

/// The attributes of the composite type `flux.decision`, in order.
pub const DECISION_COLUMNS: [&str; 14] = [
    "allowed",
    "reason",
    "message",
    "tenant",
    "feature",
    "plan",
    "limit",
    "used",
    "remaining",
    "resets_at",
    "retry_after",
    "upgrade_plans",
    "kind",
    "subject",
];

/// The answer, field for field the composite type `flux.decision`.
#[derive(Debug, Clone, PartialEq)]
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
    pub retry_after: Option<Span>,
    pub upgrade_plans: Option<Vec<String>>,
    pub kind: Option<Kind>,
    pub subject: Option<String>,
    /// The effective grant value (what flux_value returns); not in the type.
    pub value: Option<JsonText>,
    /// metered: the reset period; rate: the window. From the applied plan's
    /// grant, else the highest-ranked grant that has one. Not in the type.
    pub period: Option<String>,
    /// Where the grant came from, for messages. Not in the type.
    pub source: Option<Source>,
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
