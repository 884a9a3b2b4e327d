//! The entitle step: the facts of a tenant and feature (from the cache)
//! and the decision up to `limit_reached`, which reads and usage go on
//! from; and the decision as a `flux.decision` row.

use crate::cache;
use crate::decision::{decide, Context};
use crate::error::{FluxResult, OrRaise};
use crate::gucs;
use crate::model::{Column, Decision, FeatureFacts, KeyFacts, TenantFacts};
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::{IntoDatum, PgTupleDesc};

pub fn context(detail: bool) -> FluxResult<Context> {
    Ok(Context {
        now: gucs::clock()?,
        default_grace: gucs::default_grace()?,
        detail,
    })
}

/// An entitlement decision with the facts it was made from, so metering can
/// go on from it without reading them again.
pub struct Decided {
    pub d: Decision,
    pub facts: cache::Facts,
    pub ctx: Context,
    /// The API key current in the transaction, when it is this tenant's.
    pub key: Option<std::rc::Rc<KeyFacts>>,
    /// The subject inside the tenant, when the decision is for one.
    pub subject: Option<String>,
    /// The feature's counters may carry holds (usage/holds.rs): they are
    /// read and written counting them.
    pub holds: bool,
}

impl Decided {
    pub fn feature(&self) -> Option<&FeatureFacts> {
        self.facts.feature.as_deref()
    }

    pub fn tenant(&self) -> Option<&TenantFacts> {
        self.facts.tenant()
    }
}

/// The entitlement part of a decision: everything up to `limit_reached`.
pub fn entitle(tenant: &str, feature: &str, subject: Option<&str>) -> FluxResult<Decided> {
    entitle_with(tenant, feature, subject, true)
}

/// `entitle`, choosing whether to build the message (see Context::detail).
pub fn entitle_with(
    tenant: &str,
    feature: &str,
    subject: Option<&str>,
    detail: bool,
) -> FluxResult<Decided> {
    let ctx = context(detail)?;
    let facts = cache::facts(tenant, feature, subject)?;
    let key = crate::identity::current_key()?.filter(|k| k.tenant == tenant);
    let d = decide(
        tenant,
        feature,
        subject,
        facts.feature.as_deref(),
        facts.tenant(),
        facts.flag.as_ref(),
        key.as_deref(),
        &ctx,
    );
    let holds = facts.feature.as_deref().is_some_and(|f| f.has_holds);
    Ok(Decided {
        d,
        facts,
        ctx,
        key,
        subject: subject.map(str::to_string),
        holds,
    })
}

/// One column's value, taken out of the decision.
fn datum(d: &mut Decision, c: Column) -> Option<pg_sys::Datum> {
    let ts = |t: Option<i64>| t.and_then(|v| TimestampWithTimeZone::try_from(v).ok());
    match c {
        Column::Allowed => d.allowed.into_datum(),
        Column::Reason => d.reason.as_str().into_datum(),
        Column::Message => std::mem::take(&mut d.message).into_datum(),
        Column::Tenant => std::mem::take(&mut d.tenant).into_datum(),
        Column::Feature => std::mem::take(&mut d.feature).into_datum(),
        Column::Plan => d.plan.take().into_datum(),
        Column::Limit => d.limit.into_datum(),
        Column::Used => d.used.into_datum(),
        Column::Remaining => d.remaining.into_datum(),
        Column::ResetsAt => ts(d.resets_at).into_datum(),
        Column::RetryAfter => d
            .retry_after
            .and_then(|s| Interval::new(s.months, s.days, s.micros).ok())
            .into_datum(),
        Column::UpgradePlans => d.upgrade_plans.take().into_datum(),
        Column::Kind => d.kind.map(|k| k.as_str()).into_datum(),
        Column::Subject => d.subject.take().into_datum(),
        Column::ApiKey => d.api_key.take().into_datum(),
        Column::Overage => d.overage.into_datum(),
        Column::Balance => d.balance.into_datum(),
        Column::HoldId => d.hold_id.take().into_datum(),
    }
}

/// The decision as a `flux.decision` row, formed once (setting 14
/// attributes by name formed the row 14 times, a tenth of flux_consume).
pub fn to_composite(mut d: Decision) -> pgrx::composite_type!('static, "flux.decision") {
    // A scheduled change's note follows the usage figures.
    if let Some(note) = d.scheduled.take() {
        d.message.push_str(&note);
    }
    let cat = cache::catalogue().or_raise();
    // The type cache's descriptor, pinned and released with the row
    // (for_composite_type_by_oid copied it twice per call).
    // SAFETY: lookup_rowtype_tupdesc returns a reference-counted
    // descriptor (or raises); from_pg releases it on drop.
    let desc =
        unsafe { PgTupleDesc::from_pg(pg_sys::lookup_rowtype_tupdesc(cat.decision_type, -1)) };
    let datums: Vec<Option<pg_sys::Datum>> = if cat.decision_plain {
        Column::ALL.iter().map(|&c| datum(&mut d, c)).collect()
    } else {
        // The type was altered: fill the attributes it has by name, where
        // their type is still ours, and leave the others NULL.
        desc.iter()
            .map(|a| {
                if a.is_dropped() {
                    return None;
                }
                let c = Column::parse(a.name()).ok()?;
                (a.atttypid == c.type_oid())
                    .then(|| datum(&mut d, c))
                    .flatten()
            })
            .collect()
    };
    // SAFETY: one datum per attribute of the descriptor, each of the
    // attribute's type (decision_plain: the catalogue load compared names
    // and types with Column; otherwise compared just above).
    match unsafe { PgHeapTuple::from_datums(desc, datums) } {
        Ok(row) => row,
        Err(e) => crate::error::FluxError::Internal(e.to_string()).raise(),
    }
}
