//! Pricing changes (CONTRACT "Pricing changes"): what the people who run
//! pricing need to change plans without surprising a customer.
//!
//! - `flux_schedule_change` / `flux_cancel_scheduled_change`: a plan change
//!   at a later instant (by default the end of the billing period). No job
//!   makes it: the decision uses the scheduled plan from its instant by the
//!   clock (`TenantFacts::plan_at`), the answers cache keeps no answer past
//!   it (`decision::steady_window`), and the row's next write after it
//!   makes it the plan (the tenants trigger).
//! - `flux_preview`: per feature, what a tenant has now and would have on
//!   another plan, against what it uses.
//! - `flux_plan_impact`: the plan's tenants a new limit would put over it,
//!   in one pass over the feature's counters (reports.rs's scan).
//! - `flux_copy_plan` / `flux_move_tenants`: grandfathering (copy the plan,
//!   move its customers to the copy, then change the original).
//! - `flux_pricing_table`: the listed plans and the addons, as a pricing
//!   page renders them.

use crate::decision::decide;
use crate::entitle::entitle_with;
use crate::error::{shown, FluxError, FluxResult, OrRaise};
use crate::model::Kind;
use crate::reports::{counter_rows, subscribed, CounterRow, COUNTERS};
use crate::store;
use crate::timeutil::format_minute;
use crate::usage::rules::{meter_for, Meter};
use crate::validate::need;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

fn micros(t: TimestampWithTimeZone) -> i64 {
    t.into_inner()
}

fn tstz(t: i64) -> FluxResult<TimestampWithTimeZone> {
    TimestampWithTimeZone::try_from(t)
        .map_err(|_| FluxError::BadDatetime(format!("{t} is not a finite timestamp")))
}

/// A tenant's subscription as a scheduled change sees it.
struct Subscription {
    plan: Option<String>,
    period_end: Option<i64>,
    scheduled: Option<(String, i64)>,
}

impl Subscription {
    /// The plan in force at `now`.
    fn plan_at(&self, now: i64) -> Option<&str> {
        match &self.scheduled {
            Some((p, at)) if *at <= now => Some(p),
            _ => self.plan.as_deref(),
        }
    }
}

/// The tenant's row, locked: a concurrent change of its plan is waited
/// for and then read, never written over.
fn subscription(tenant: &str) -> FluxResult<Subscription> {
    let row = Spi::connect_mut(|c| {
        let t = c.update(
            "SELECT plan, current_period_end, scheduled_plan, scheduled_at \
               FROM flux.tenants WHERE id OPERATOR(pg_catalog.=) $1 FOR UPDATE",
            Some(1),
            &[tenant.into()],
        )?;
        if t.is_empty() {
            return Ok::<_, pgrx::spi::SpiError>(None);
        }
        let r = t.first();
        Ok(Some(Subscription {
            plan: r.get::<String>(1)?,
            period_end: r.get::<TimestampWithTimeZone>(2)?.map(micros),
            scheduled: match (
                r.get::<String>(3)?,
                r.get::<TimestampWithTimeZone>(4)?.map(micros),
            ) {
                (Some(p), Some(at)) => Some((p, at)),
                _ => None,
            },
        }))
    })?;
    row.ok_or_else(|| {
        FluxError::UnknownReference(format!(
            "unknown tenant {}: create it first with flux_subscribe",
            shown(tenant)
        ))
    })
}

/// The instant a change is scheduled for, which must be after the clock.
fn future(at: i64, now: i64, what: &str) -> FluxResult<i64> {
    if at == i64::MAX || at == i64::MIN {
        return Err(FluxError::InvalidValue(format!(
            "{what} must be a finite instant, not {}",
            if at > 0 { "infinity" } else { "-infinity" }
        )));
    }
    if at <= now {
        return Err(FluxError::InvalidValue(format!(
            "{what} {} is not after the clock ({}): flux_subscribe moves a tenant now",
            format_minute(at),
            format_minute(now)
        )));
    }
    Ok(at)
}

/// Move `tenant` to `plan` when the clock reaches `at` (default: the end of
/// its billing period); returns that instant. A change already scheduled is
/// replaced. Admin only; audited as a change of the tenant.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_schedule_change(
    tenant: Option<&str>,
    plan: Option<&str>,
    at: default!(Option<TimestampWithTimeZone>, "NULL"),
) -> Option<TimestampWithTimeZone> {
    (|| -> FluxResult<TimestampWithTimeZone> {
        store::ensure_writable("flux_schedule_change")?;
        let tenant = need(tenant, "tenant")?;
        let plan = need(plan, "plan")?;
        crate::validate::require_plan(plan)?;
        let now = crate::gucs::clock()?;
        let s = subscription(tenant)?;
        let at = match at.map(micros).or(s.period_end) {
            Some(at) => future(at, now, "at")?,
            None => {
                return Err(FluxError::InvalidValue(format!(
                    "tenant {} has no current_period_end to schedule the change at: give at",
                    shown(tenant)
                )))
            }
        };
        let current = s.plan_at(now).map(str::to_string);
        if current.as_deref() == Some(plan) {
            return Err(FluxError::InvalidValue(format!(
                "tenant {} is on plan {} already (flux_cancel_scheduled_change drops a change to come)",
                shown(tenant),
                shown(plan)
            )));
        }
        // A change already due is made the plan in the same write.
        store::exec(
            "UPDATE flux.tenants SET plan = $2, scheduled_plan = $3, scheduled_at = $4 \
              WHERE id OPERATOR(pg_catalog.=) $1",
            &[
                tenant.into(),
                current.into(),
                plan.into(),
                tstz(at)?.into(),
            ],
        )?;
        tstz(at)
    })()
    .map(Some)
    .or_raise()
}

/// Drop the change scheduled for `tenant`; false when there was none. A
/// change whose instant has passed is in force, not cancelled. Admin only.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_cancel_scheduled_change(tenant: Option<&str>) -> Option<bool> {
    (|| -> FluxResult<bool> {
        store::ensure_writable("flux_cancel_scheduled_change")?;
        let tenant = need(tenant, "tenant")?;
        let now = crate::gucs::clock()?;
        let s = subscription(tenant)?;
        match s.scheduled {
            None => Ok(false),
            Some((plan, at)) if at <= now => Err(FluxError::InvalidValue(format!(
                "the change of {} to {} took effect at {}: flux_subscribe moves it back",
                shown(tenant),
                shown(&plan),
                format_minute(at)
            ))),
            Some(_) => {
                store::exec(
                    "UPDATE flux.tenants SET scheduled_plan = NULL, scheduled_at = NULL \
                      WHERE id OPERATOR(pg_catalog.=) $1",
                    &[tenant.into()],
                )?;
                Ok(true)
            }
        }
    })()
    .map(Some)
    .or_raise()
}

/// Whether `plan` is listed, or is the tenant's own (now or scheduled).
fn listed_or_own(tenant: &str, plan: &str) -> FluxResult<bool> {
    let _owner = crate::privilege::AsOwner::enter()?;
    Ok(store::one::<bool>(
        "SELECT p.listed OR EXISTS (SELECT FROM flux.tenants t WHERE t.id OPERATOR(pg_catalog.=) $1 \
                AND (t.plan OPERATOR(pg_catalog.=) $2 OR t.scheduled_plan OPERATOR(pg_catalog.=) $2)) \
           FROM flux.plans p WHERE p.key OPERATOR(pg_catalog.=) $2",
        &[tenant.into(), plan.into()],
    )?
    .unwrap_or(false))
}

/// One row of flux_preview.
type Preview = (
    String,
    bool,
    bool,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

fn preview(tenant: &str, plan: &str) -> FluxResult<Vec<Preview>> {
    crate::access::require_act_for("flux_preview", tenant)?;
    let cat = crate::cache::catalogue()?;
    let unknown = || {
        FluxError::UnknownReference(format!(
            "unknown plan {}: define it first with flux_define_plan",
            shown(plan)
        ))
    };
    let Some(&(grace, _)) = cat.plan_grace.get(plan) else {
        return Err(unknown());
    };
    // A tenant's own session sees the plans that are sold, and its own.
    if !crate::access::trusted_caller() && !listed_or_own(tenant, plan)? {
        return Err(unknown());
    }
    let mut out = Vec::with_capacity(cat.keys().len());
    for key in cat.keys() {
        let mut x = entitle_with(tenant, key, None, false)?;
        let (Some(f), Some(t)) = (x.facts.feature.clone(), x.tenant().cloned()) else {
            return Err(FluxError::UnknownReference(format!(
                "unknown tenant {}: create it first with flux_subscribe",
                shown(tenant)
            )));
        };
        // The same tenant (addons, override, lifecycle) on `plan`, now.
        let mut on = t;
        on.plan = Some(plan.to_string());
        on.plan_grace = grace;
        on.scheduled = None;
        let after = decide(
            tenant,
            key,
            None,
            Some(&f),
            Some(&on),
            x.facts.flag.as_ref(),
            None,
            &x.ctx,
        );
        let counted = matches!(f.kind, Kind::Limit | Kind::Metered);
        let (allowed_now, limit_now) = (x.d.allowed, x.d.limit);
        // What the decision will count after the move: the counter of the
        // new plan's period (a daily quota after a monthly one starts at
        // the day's use).
        let used = if counted {
            x.d.plan = after.plan.clone();
            x.d.period = after.period.clone();
            crate::usage::usage_now(&mut x, None)?
        } else {
            None
        };
        let limit = |allowed: bool, l: Option<i64>| l.filter(|_| allowed);
        let over_by = match (counted, used) {
            (true, Some(u)) if !after.allowed => Some(u),
            (true, Some(u)) => Some(after.limit.map_or(0, |l| u.saturating_sub(l).max(0))),
            _ => None,
        };
        out.push((
            key.clone(),
            allowed_now,
            after.allowed,
            limit(allowed_now, limit_now),
            limit(after.allowed, after.limit),
            used,
            over_by,
        ));
    }
    Ok(out)
}

/// Per feature: what the tenant has now and would have on `plan` (its
/// addons, overrides and subscription's state as they are), what it uses,
/// and how far over the new limit that is (seats: 5 used, 3 after: 2; a
/// feature the plan lacks: all of it). For the tenant's own session, a
/// flux_service backend or flux_admin.
#[pg_extern(stable, parallel_safe)]
#[allow(clippy::type_complexity)]
fn flux_preview(
    tenant: Option<&str>,
    plan: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(feature, String),
        name!(allowed_now, bool),
        name!(allowed_after, bool),
        name!(limit_now, Option<i64>),
        name!(limit_after, Option<i64>),
        name!(used, Option<i64>),
        name!(over_by, Option<i64>),
    ),
> {
    let rows = (|| preview(need(tenant, "tenant")?, need(plan, "plan")?))().or_raise();
    TableIterator::new(rows)
}

fn impact(plan: &str, feature: &str, limit: Option<i64>) -> FluxResult<Vec<(String, i64, i64)>> {
    let cat = crate::cache::catalogue()?;
    let ctx = crate::entitle::context(false)?;
    let Some(f) = cat.features.get(feature) else {
        return Err(FluxError::UnknownReference(format!(
            "unknown feature {}: define it first with flux_define_feature",
            shown(feature)
        )));
    };
    if !matches!(f.kind, Kind::Limit | Kind::Metered) {
        return Err(FluxError::InvalidValue(format!(
            "feature {} is a {} feature: impact is for limit and metered features",
            shown(feature),
            f.kind.as_str()
        )));
    }
    if limit.is_some_and(|l| l < 0) {
        return Err(FluxError::InvalidValue(format!(
            "limit {} must be >= 0 (NULL: unlimited)",
            limit.unwrap_or_default()
        )));
    }
    let mut changed = (**f).clone();
    match changed.grants.iter_mut().find(|g| &*g.plan == plan) {
        Some(g) => g.limit = limit,
        None => {
            crate::validate::require_plan(plan)?;
            return Err(FluxError::UnknownReference(format!(
                "plan {} does not grant {}: grant it first with flux_grant",
                shown(plan),
                shown(feature)
            )));
        }
    }
    // The plan's tenants, and those scheduled onto it (plan_at decides).
    let sql = format!(
        "{COUNTERS} WHERE u.feature OPERATOR(pg_catalog.=) $1 \
           AND (t.plan OPERATOR(pg_catalog.=) $2 OR t.scheduled_plan OPERATOR(pg_catalog.=) $2)"
    );
    let mut out = Vec::new();
    for CounterRow {
        tenant,
        start,
        used,
        facts,
        ..
    } in counter_rows(&sql, &[feature.into(), plan.into()])?
    {
        if facts.plan_at(ctx.now) != Some(plan) {
            continue;
        }
        // The plan's tenants on its terms, whatever their subscription's
        // state (as flux.billable_usage judges them).
        let t = subscribed(&facts);
        let d = decide(
            &tenant,
            feature,
            None,
            Some(&changed),
            Some(&t),
            None,
            None,
            &ctx,
        );
        let Some(new_limit) = d.limit.filter(|_| d.allowed) else {
            continue;
        };
        let current = match meter_for(
            f.kind,
            d.period.as_deref(),
            ctx.now,
            t.current_period_start,
            t.current_period_end,
            |_| None,
        )? {
            Some(Meter::Quota { start: s, .. }) => s == start,
            Some(Meter::Allowance) => start == i64::MIN,
            _ => false,
        };
        if current && used > new_limit {
            out.push((tenant, used, used - new_limit));
        }
    }
    out.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    Ok(out)
}

/// The plan's tenants (by the plan in force now) that `limit` as its grant
/// of `feature` would put over it this period, with what they use and by
/// how much, most over first; addons and overrides count as they would.
/// One pass over the feature's counters. Admin only.
#[pg_extern(stable, parallel_safe)]
fn flux_plan_impact(
    plan: Option<&str>,
    feature: Option<&str>,
    limit: Option<i64>,
) -> TableIterator<'static, (name!(tenant, String), name!(used, i64), name!(over_by, i64))> {
    let rows = (|| impact(need(plan, "plan")?, need(feature, "feature")?, limit))().or_raise();
    TableIterator::new(rows)
}

/// A new plan `target` with `source`'s grants (limits, periods, values,
/// subject limits, overage), grace period and rank (or `name` and `rank`),
/// not listed on the pricing table: the grandfathered customers' plan.
/// Admin only; audited as inserts.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_copy_plan(
    source: Option<&str>,
    target: Option<&str>,
    name: default!(Option<&str>, "NULL"),
    rank: default!(Option<i32>, "NULL"),
) {
    (|| -> FluxResult<()> {
        store::ensure_writable("flux_copy_plan")?;
        let source = need(source, "source")?;
        let target = need(target, "target")?;
        crate::validate::require_plan(source)?;
        if crate::validate::require_plan(target).is_ok() {
            return Err(FluxError::Conflict(format!(
                "plan {} exists already: flux_copy_plan makes a new plan",
                shown(target)
            )));
        }
        store::exec(
            "INSERT INTO flux.plans (key, name, rank, is_default, grace_period, listed) \
             SELECT $2, COALESCE($3, name), COALESCE($4, rank), false, grace_period, false \
               FROM flux.plans WHERE key OPERATOR(pg_catalog.=) $1",
            &[source.into(), target.into(), name.into(), rank.into()],
        )?;
        store::exec(
            "INSERT INTO flux.grants (plan, feature, enabled, \"limit\", period, value, \
                                      subject_limit, overage, overage_cap) \
             SELECT $2, feature, enabled, \"limit\", period, value, subject_limit, overage, overage_cap \
               FROM flux.grants WHERE plan OPERATOR(pg_catalog.=) $1",
            &[source.into(), target.into()],
        )
    })()
    .or_raise()
}

/// The plan in force, for SQL: a due scheduled change's plan, else plan.
const IN_FORCE: &str = "CASE WHEN scheduled_at OPERATOR(pg_catalog.<=) $3 \
     THEN scheduled_plan ELSE plan END";

/// Move every tenant on `from_plan` (by the plan in force now) to
/// `to_plan`, or schedule the move at `at`, in one statement; returns how
/// many. A move now replaces a change still pending; a scheduled one
/// replaces it too. Admin only; audited as one change per tenant.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_move_tenants(
    from_plan: Option<&str>,
    to_plan: Option<&str>,
    at: default!(Option<TimestampWithTimeZone>, "NULL"),
) -> Option<i64> {
    (|| -> FluxResult<i64> {
        store::ensure_writable("flux_move_tenants")?;
        let from = need(from_plan, "from_plan")?;
        let to = need(to_plan, "to_plan")?;
        crate::validate::require_plan(from)?;
        crate::validate::require_plan(to)?;
        if from == to {
            return Err(FluxError::InvalidValue(format!(
                "from_plan and to_plan are both {}",
                shown(from)
            )));
        }
        let now = crate::gucs::clock()?;
        let sql = match at {
            None => format!(
                "WITH m AS (UPDATE flux.tenants SET plan = $2, scheduled_plan = NULL, scheduled_at = NULL \
                  WHERE {IN_FORCE} OPERATOR(pg_catalog.=) $1 RETURNING 1) SELECT pg_catalog.count(*) FROM m"
            ),
            Some(_) => format!(
                "WITH m AS (UPDATE flux.tenants SET plan = {IN_FORCE}, scheduled_plan = $2, scheduled_at = $4 \
                  WHERE {IN_FORCE} OPERATOR(pg_catalog.=) $1 RETURNING 1) SELECT pg_catalog.count(*) FROM m"
            ),
        };
        let mut args: Vec<pgrx::datum::DatumWithOid> = vec![from.into(), to.into(), tstz(now)?.into()];
        if let Some(at) = at {
            args.push(tstz(future(micros(at), now, "at")?)?.into());
        }
        Ok(store::one_mut::<i64>(&sql, &args)?.unwrap_or(0))
    })()
    .map(Some)
    .or_raise()
}

/// The pricing page's data: listed plans by rank, each with its enabled
/// grants (kind, limit, period, value, overage), and the addons with what
/// one unit grants, as JSON text (flux_pricing_table makes it jsonb).
const PRICING: &str = "SELECT pg_catalog.jsonb_build_object( \
  'plans', COALESCE((SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object( \
      'key', p.key, 'name', p.name, 'rank', p.rank, 'default', p.is_default, \
      'features', COALESCE((SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object( \
           'feature', g.feature, 'kind', f.kind, 'description', f.description, \
           'limit', g.\"limit\", 'period', g.period, 'value', g.value, \
           'overage', CASE WHEN g.overage THEN pg_catalog.jsonb_build_object('cap', g.overage_cap) END) \
           ORDER BY g.feature) \
         FROM flux.grants g JOIN flux.features f ON f.key OPERATOR(pg_catalog.=) g.feature \
        WHERE g.plan OPERATOR(pg_catalog.=) p.key AND g.enabled), '[]'::pg_catalog.jsonb)) \
      ORDER BY p.rank, p.key) \
    FROM flux.plans p WHERE p.listed), '[]'::pg_catalog.jsonb), \
  'addons', COALESCE((SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object( \
      'key', a.key, 'name', a.name, \
      'grants', COALESCE((SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object( \
           'feature', ag.feature, 'kind', f.kind, 'limit', ag.\"limit\", 'value', ag.value) \
           ORDER BY ag.feature) \
         FROM flux.addon_grants ag JOIN flux.features f ON f.key OPERATOR(pg_catalog.=) ag.feature \
        WHERE ag.addon OPERATOR(pg_catalog.=) a.key), '[]'::pg_catalog.jsonb)) \
      ORDER BY a.key) \
    FROM flux.addons a), '[]'::pg_catalog.jsonb))::pg_catalog.text";

/// The body of flux_pricing_table (its JSON as text).
#[pg_extern(schema = "flux", stable, parallel_safe)]
fn _pricing_table() -> String {
    (|| -> FluxResult<String> {
        let _owner = crate::privilege::AsOwner::enter()?;
        let _path = crate::privilege::Pinned::enter();
        Ok(store::one::<String>(PRICING, &[])?.unwrap_or_else(|| "{}".to_string()))
    })()
    .or_raise()
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// flux_preview against the decisions after the move is made: for
    /// tenants with addons, overrides, usage and a canceled subscription,
    /// allowed_after and limit_after are what flux_decide then says (its
    /// entitlement: allowed, or only over the limit), and over_by is the
    /// use past the new limit.
    #[pg_test]
    fn the_preview_is_the_decision_after_the_move() {
        Spi::run(
            "SET flux.now = '2026-12-10 12:00+00';
             SELECT flux_define_feature('seats', 'limit');
             SELECT flux_define_feature('api_calls', 'metered');
             SELECT flux_define_feature('export');
             SELECT flux_define_plan('free', rank => 0, is_default => true);
             SELECT flux_define_plan('starter', rank => 1);
             SELECT flux_define_plan('pro', rank => 2);
             SELECT flux_grant('free', 'seats', 1);
             SELECT flux_grant('starter', 'seats', 3);
             SELECT flux_grant('starter', 'api_calls', 100, 'month');
             SELECT flux_grant('pro', 'seats', 10);
             SELECT flux_grant('pro', 'api_calls', 1000, 'month');
             SELECT flux_grant('pro', 'export');
             SELECT flux_define_addon('seat_pack');
             SELECT flux_grant_addon('seat_pack', 'seats', 2);
             SELECT flux_subscribe('t' || i, 'pro') FROM generate_series(1, 30) i;
             SELECT flux_attach_addon('t' || i, 'seat_pack', 1) FROM generate_series(2, 30, 4) i;
             SELECT flux_override('t' || i, 'seats', \"limit\" => 4) FROM generate_series(3, 30, 7) i;
             SELECT flux_override('t' || i, 'export', enabled => false) FROM generate_series(5, 30, 9) i;
             SELECT flux_consume('t' || i, 'seats', 1 + i % 9) FROM generate_series(1, 30) i;
             SELECT flux_consume('t' || i, 'api_calls', (i * 37) % 300 + 1) FROM generate_series(1, 30) i;
             UPDATE flux.tenants SET status = 'canceled' WHERE id IN ('t7', 't14');
             CREATE TEMP TABLE previewed AS
               SELECT t.id AS tenant, p.* FROM flux.tenants t, LATERAL flux_preview(t.id, 'starter') p;
             SELECT flux_move_tenants('pro', 'starter');",
        )
        .unwrap();
        let mismatches = Spi::get_one::<i64>(
            "SELECT count(*) FROM previewed p, LATERAL flux_decide(p.tenant, p.feature) d
              WHERE p.allowed_after IS DISTINCT FROM (d.allowed OR d.reason = 'limit_reached')
                 OR p.limit_after IS DISTINCT FROM CASE WHEN d.allowed OR d.reason = 'limit_reached' THEN d.\"limit\" END
                 OR (p.feature <> 'export' AND p.used IS DISTINCT FROM flux_usage(p.tenant, p.feature))
                 OR p.over_by IS DISTINCT FROM CASE
                      WHEN p.feature = 'export' THEN NULL
                      WHEN NOT (d.allowed OR d.reason = 'limit_reached') THEN p.used
                      ELSE GREATEST(p.used - COALESCE(d.\"limit\", p.used), 0) END",
        )
        .unwrap();
        assert_eq!(mismatches, Some(0));
        let over = Spi::get_one::<i64>("SELECT count(*) FROM previewed WHERE over_by > 0").unwrap();
        assert!(
            over.unwrap_or(0) > 5,
            "the move puts tenants over: {over:?}"
        );
        Spi::run("RESET flux.now").unwrap();
    }
}
