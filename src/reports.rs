//! flux_limit_report: "who is pushing their limit", over every tenant at
//! once. One query reads each counter row with its tenant's rows (plan,
//! subscription, addons, the feature's override); the limit each tenant has
//! now and the period it is in come from the decision's own rules
//! (`decision::decide`, `usage::rules`), applied in memory to each row, so the
//! report agrees with flux_decide without a decision query per tenant.

use crate::decision::decide;
use crate::error::{FluxError, FluxResult, OrRaise};
use crate::model::{
    AddonGrant, FeatureFacts, Kind, Override, Period, Scheduled, Status, TenantFacts,
};
use crate::usage::rules::{meter_for, period_bounds, Meter};
use pgrx::datum::{AnyNumeric, TimestampWithTimeZone};
use pgrx::prelude::*;

/// Every counter row of a tenant with its tenant's rows. Holds past their
/// ttl that no writer has given back yet (usage/holds.rs) are not counted.
pub(crate) const COUNTERS: &str = "SELECT u.tenant, u.feature, u.period_start, \
        (u.used OPERATOR(pg_catalog.-) LEAST(COALESCE((SELECT pg_catalog.sum(hc.amount) \
            FROM flux.hold_charges hc \
           WHERE hc.tenant OPERATOR(pg_catalog.=) u.tenant AND hc.feature OPERATOR(pg_catalog.=) u.feature \
             AND hc.period_start OPERATOR(pg_catalog.=) u.period_start AND hc.caller OPERATOR(pg_catalog.=) '' \
             AND hc.open AND hc.expires_at OPERATOR(pg_catalog.<=) flux._clock()), 0), u.used))::pg_catalog.int8 AS used, \
        t.plan, t.status, t.trial_ends_at, t.current_period_start, t.current_period_end, \
        t.cancel_at_period_end, t.past_due_since, t.grace_until, a.addons, a.quantities, \
        o.enabled, o.\"limit\", o.starts_at, o.expires_at, t.scheduled_plan, t.scheduled_at \
   FROM flux.usage u \
   JOIN flux.tenants t ON t.id OPERATOR(pg_catalog.=) u.tenant \
   LEFT JOIN flux.overrides o ON o.tenant OPERATOR(pg_catalog.=) u.tenant \
        AND o.feature OPERATOR(pg_catalog.=) u.feature \
   LEFT JOIN LATERAL (SELECT pg_catalog.array_agg(ta.addon) AS addons, \
                             pg_catalog.array_agg(ta.quantity) AS quantities \
                        FROM flux.tenant_addons ta \
                       WHERE ta.tenant OPERATOR(pg_catalog.=) u.tenant) a ON true";

/// Counter rows of the last 400 days, or of limit features (-infinity):
/// older periods cannot be current.
const CURRENT: &str = " WHERE u.used OPERATOR(pg_catalog.>) 0 \
    AND (u.period_start OPERATOR(pg_catalog.=) '-infinity'::pg_catalog.timestamptz \
         OR u.period_start OPERATOR(pg_catalog.>=) \
            (flux._clock() OPERATOR(pg_catalog.-) '400 days'::pg_catalog.interval))";

/// One counter row of COUNTERS: whose, of what, and the tenant's facts as
/// the decision takes them.
pub(crate) struct CounterRow {
    pub tenant: String,
    pub feature: std::rc::Rc<FeatureFacts>,
    pub start: i64,
    pub used: i64,
    pub facts: TenantFacts,
}

/// Read every row of `sql` (COUNTERS, filtered) of a limit or metered
/// feature, as the table's owner.
pub(crate) fn counter_rows(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> FluxResult<Vec<CounterRow>> {
    let cat = crate::cache::catalogue()?;
    let _owner = crate::privilege::AsOwner::enter()?;
    let mut out = Vec::new();
    Spi::connect(|c| {
        for r in c.select(sql, None, args)? {
            let (Some(tenant), Some(feature), Some(start), Some(used)) = (
                r.get::<String>(1)?,
                r.get::<String>(2)?,
                r.get::<TimestampWithTimeZone>(3)?,
                r.get::<i64>(4)?,
            ) else {
                continue;
            };
            let Some(f) = cat.features.get(&feature) else {
                continue;
            };
            if !matches!(f.kind, Kind::Limit | Kind::Metered) {
                continue;
            }
            let plan = r.get::<String>(5)?;
            let held: Vec<(String, i32)> = r
                .get::<Vec<Option<String>>>(13)?
                .unwrap_or_default()
                .into_iter()
                .zip(r.get::<Vec<Option<i32>>>(14)?.unwrap_or_default())
                .filter_map(|(a, q)| Some((a?, q?)))
                .collect();
            let addons = cat
                .addon_grants
                .get(&feature)
                .map(|units| {
                    units
                        .iter()
                        .filter_map(|(addon, limit, value)| {
                            let (_, quantity) = held.iter().find(|(a, _)| a == addon)?;
                            Some(AddonGrant {
                                addon: addon.clone(),
                                quantity: *quantity,
                                limit: *limit,
                                value: value.clone(),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            let override_ = match r.get::<bool>(15)? {
                Some(enabled) => Some(Override {
                    enabled,
                    limit: r.get::<i64>(16)?,
                    value: None,
                    starts_at: ts(r.get::<TimestampWithTimeZone>(17)?),
                    expires_at: ts(r.get::<TimestampWithTimeZone>(18)?),
                    reason: None,
                }),
                None => None,
            };
            let status = Status::parse(&r.get::<String>(6)?.unwrap_or_default())?;
            let mut t = TenantFacts {
                id: tenant.clone(),
                plan_grace: None,
                plan,
                status,
                trial_ends_at: ts(r.get::<TimestampWithTimeZone>(7)?),
                current_period_start: ts(r.get::<TimestampWithTimeZone>(8)?),
                current_period_end: ts(r.get::<TimestampWithTimeZone>(9)?),
                cancel_at_period_end: r.get::<bool>(10)?.unwrap_or(false),
                past_due_since: ts(r.get::<TimestampWithTimeZone>(11)?),
                grace_until: ts(r.get::<TimestampWithTimeZone>(12)?),
                addons,
                override_,
                scheduled: match (
                    r.get::<String>(19)?,
                    ts(r.get::<TimestampWithTimeZone>(20)?),
                ) {
                    (Some(plan), Some(at)) => Some(Scheduled {
                        plan,
                        at,
                        grace: None,
                        direction: std::cmp::Ordering::Equal,
                    }),
                    _ => None,
                },
            };
            crate::cache::with_plan_terms(&cat, &mut t);
            out.push(CounterRow {
                tenant,
                feature: f.clone(),
                start: start.into_inner(),
                used,
                facts: t,
            });
        }
        Ok::<_, FluxError>(())
    })?;
    Ok(out)
}

type Row = (
    String,
    String,
    Option<String>,
    i64,
    i64,
    AnyNumeric,
    Option<TimestampWithTimeZone>,
);

fn ts(t: Option<TimestampWithTimeZone>) -> Option<i64> {
    t.map(|t| t.into_inner())
}

fn report(threshold: AnyNumeric) -> FluxResult<Vec<(AnyNumeric, Row)>> {
    let ctx = crate::entitle::context(false)?;
    let mut out = Vec::new();
    for CounterRow {
        tenant,
        feature: f,
        start,
        used,
        facts: t,
    } in counter_rows(&format!("{COUNTERS}{CURRENT}"), &[])?
    {
        let feature = f.key.clone();
        // Flags and API keys are the caller's, not the plan's: left out.
        let d = decide(
            &tenant,
            &feature,
            None,
            Some(&f),
            Some(&t),
            None,
            None,
            &ctx,
        );
        let Some(limit) = d.limit.filter(|_| d.allowed) else {
            continue;
        };
        let meter = meter_for(
            f.kind,
            d.period.as_deref(),
            ctx.now,
            t.current_period_start,
            t.current_period_end,
            |_| None,
        )?;
        let resets_at = match meter {
            Some(Meter::Quota { start: s, end, .. }) if s == start => Some(end),
            Some(Meter::Allowance) if start == i64::MIN => None,
            _ => continue,
        };
        if limit == 0 {
            continue;
        }
        // Exactly: used >= threshold x limit.
        let mut floor = threshold.clone();
        floor *= limit;
        if AnyNumeric::from(used) < floor {
            continue;
        }
        let mut ratio = AnyNumeric::from(used);
        ratio /= limit;
        // Four decimals (0.8125); a ratio never needs more than 15 digits before them.
        let ratio: AnyNumeric = ratio
            .rescale::<19, 4>()
            .map_err(|e| FluxError::Internal(e.to_string()))?
            .into();
        let resets_at = resets_at.and_then(|e| TimestampWithTimeZone::try_from(e).ok());
        out.push((
            ratio.clone(),
            (tenant, feature, d.plan, limit, used, ratio, resets_at),
        ));
    }
    out.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| (&a.1 .0, &a.1 .1).cmp(&(&b.1 .0, &b.1 .1)))
    });
    Ok(out)
}

/// Every tenant and limit or metered feature whose use in the current
/// period is at least `threshold` of the limit it has now (plan, addons,
/// override, the default plan when the subscription is not live), most
/// pressed first. A tenant with nothing recorded of a feature is not
/// listed; unlimited grants never are. Admin only.
#[pg_extern(stable, parallel_safe)]
#[allow(clippy::type_complexity)]
fn flux_limit_report(
    threshold: default!(Option<AnyNumeric>, "0.8"),
) -> TableIterator<
    'static,
    (
        name!(tenant, String),
        name!(feature, String),
        name!(plan, Option<String>),
        name!(limit, i64),
        name!(used, i64),
        name!(ratio, AnyNumeric),
        name!(resets_at, Option<TimestampWithTimeZone>),
    ),
> {
    // NULL: the default.
    let threshold = threshold.unwrap_or_else(|| AnyNumeric::from(8) / 10);
    let rows = report(threshold).or_raise();
    TableIterator::new(rows.into_iter().map(|(_, row)| row))
}

/// Where a metered period that began at `start` ends: the calendar's
/// bounds, or a billing period's (the tenant's current one, else monthly
/// from its anchor); a billing period anchored elsewhere since (the
/// subscription's dates moved) ran until the next recorded one began.
fn period_end(p: Period, start: i64, next: Option<i64>, t: &TenantFacts) -> Option<i64> {
    let (s, e) = period_bounds(p, start, t.current_period_start, t.current_period_end);
    if s == start {
        return Some(e);
    }
    next.or(t.current_period_start.filter(|&a| a > start))
}

/// One row of flux.billable_usage.
type Billable = (
    String,
    String,
    Option<TimestampWithTimeZone>,
    Option<TimestampWithTimeZone>,
    Option<i64>,
    i64,
    i64,
    Option<String>,
);

fn tstz(t: Option<i64>) -> Option<TimestampWithTimeZone> {
    t.and_then(|t| TimestampWithTimeZone::try_from(t).ok())
}

/// The terms a subscription includes, whatever its state: the tenant's
/// plan (the default plan without one) as if live. Whether the tenant may
/// use the feature now (a trial over, a cancellation, past_due beyond
/// grace) is a question of access; what it had bought for a period is
/// not, and an invoice run after the period ended must not bill it on the
/// default plan.
pub(crate) fn subscribed(t: &TenantFacts) -> TenantFacts {
    TenantFacts {
        status: Status::Active,
        trial_ends_at: None,
        cancel_at_period_end: false,
        past_due_since: None,
        grace_until: None,
        ..t.clone()
    }
}

/// Every recorded period of every tenant's limit and metered features with
/// what its invoice line needs. The terms (plan, addons, override) are the
/// tenant's rows as they stand, as subscribed (`subscribed`), judged by the
/// decision's rules at the clock for the current period and at the
/// period's last instant for a closed one. Overage is billable only under a
/// soft grant (flux_set_overage), as the decision reports it; a limit
/// feature's count is standing, shown in the current billing period.
fn billable() -> FluxResult<Vec<Billable>> {
    let ctx = crate::entitle::context(false)?;
    let mut rows = counter_rows(COUNTERS, &[])?;
    rows.sort_by(|a, b| {
        (&a.tenant, &a.feature.key, a.start).cmp(&(&b.tenant, &b.feature.key, b.start))
    });
    let mut out = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let (t, f) = (&subscribed(&r.facts), &r.feature);
        let next = rows
            .get(i + 1)
            .filter(|n| n.tenant == r.tenant && n.feature.key == f.key)
            .map(|n| n.start);
        let judge = |at: &crate::decision::Context| {
            decide(&r.tenant, &f.key, None, Some(f), Some(t), None, None, at)
        };
        let now = judge(&ctx);
        let (start, end, d) = if f.kind == Kind::Limit {
            (t.current_period_start, t.current_period_end, now)
        } else {
            let p = Period::parse(now.period.as_deref().unwrap_or("month"))?;
            let end = period_end(p, r.start, next, t);
            let d = match end {
                Some(e) if e <= ctx.now => judge(&crate::decision::Context { now: e - 1, ..ctx }),
                _ => now,
            };
            (Some(r.start), end, d)
        };
        // Not in the plan at that moment: nothing is included.
        let included = if d.allowed { d.limit } else { Some(0) };
        let soft = d
            .plan
            .as_deref()
            .and_then(|p| f.grant_of(p))
            .is_some_and(|g| g.overage.is_some());
        let overage = match included {
            Some(l) if soft && d.allowed => r.used.saturating_sub(l).max(0),
            _ => 0,
        };
        out.push((
            r.tenant.clone(),
            f.key.clone(),
            tstz(start),
            tstz(end),
            included,
            r.used,
            overage,
            d.plan,
        ));
    }
    Ok(out)
}

/// The body of the view flux.billable_usage. Admin only.
#[pg_extern(schema = "flux", stable, parallel_safe)]
#[allow(clippy::type_complexity)]
fn _billable_usage() -> TableIterator<
    'static,
    (
        name!(tenant, String),
        name!(feature, String),
        name!(period_start, Option<TimestampWithTimeZone>),
        name!(period_end, Option<TimestampWithTimeZone>),
        name!(included, Option<i64>),
        name!(used, i64),
        name!(overage, i64),
        name!(plan, Option<String>),
    ),
> {
    TableIterator::new(billable().or_raise())
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// The report against each tenant's own decision: for every tenant and
    /// limited feature, listed exactly when flux_decide's used / limit is
    /// at least the threshold, with the same limit, used and plan. The
    /// tenants cover addons, overrides (live, expired, revoking), the
    /// default plan after a cancellation, past periods and unlimited grants.
    #[pg_test]
    fn the_report_agrees_with_each_decision() {
        Spi::run(
            "SET flux.now = '2026-11-20 12:00+00';
             SELECT flux_define_feature('seats', 'limit');
             SELECT flux_define_feature('exports', 'metered');
             SELECT flux_define_feature('sso');
             SELECT flux_define_plan('free', rank => 0, is_default => true);
             SELECT flux_define_plan('pro', rank => 1);
             SELECT flux_define_plan('max', rank => 2);
             SELECT flux_grant('free', 'seats', 2);
             SELECT flux_grant('free', 'exports', 5, 'day');
             SELECT flux_grant('pro', 'seats', 10);
             SELECT flux_grant('pro', 'exports', 100, 'month');
             SELECT flux_grant('max', 'seats');
             SELECT flux_grant('max', 'exports', 1000, 'month');
             SELECT flux_define_addon('seat_pack');
             SELECT flux_grant_addon('seat_pack', 'seats', 5);
             SELECT flux_subscribe('t' || i, CASE i % 3 WHEN 0 THEN 'pro' WHEN 1 THEN 'max' ELSE 'free' END)
               FROM generate_series(1, 60) i;
             SELECT flux_attach_addon('t' || i, 'seat_pack', 1 + i % 2) FROM generate_series(3, 60, 7) i;
             SELECT flux_override('t' || i, 'seats', \"limit\" => 3) FROM generate_series(6, 60, 11) i;
             SELECT flux_override('t' || i, 'exports', expires_at => '2026-11-01') FROM generate_series(9, 60, 13) i;
             SELECT flux_override('t' || i, 'seats', enabled => false) FROM generate_series(12, 60, 17) i;
             SELECT flux_consume('t' || i, 'seats', 1 + i % 12) FROM generate_series(1, 60) i;
             SELECT flux_consume('t' || i, 'exports', 1 + (i * 7) % 110) FROM generate_series(1, 60) i;
             -- Canceled after using a paid plan: the default plan's limits now.
             UPDATE flux.tenants SET status = 'canceled' WHERE id IN ('t15', 't30', 't45');
             -- A past period's usage is not current.
             INSERT INTO flux.usage (tenant, feature, period_start, used)
               SELECT 't' || i, 'exports', '2026-10-01', 99 FROM generate_series(1, 60) i
               ON CONFLICT DO NOTHING;",
        )
        .unwrap();
        for threshold in ["0.5", "0.8", "1"] {
            let mismatches = Spi::get_one::<i64>(&format!(
                "WITH d AS (
                   SELECT t.id AS tenant, f.key AS feature, x.plan, x.\"limit\", x.used
                     FROM flux.tenants t CROSS JOIN flux.features f,
                          LATERAL flux_decide(t.id, f.key) x
                    WHERE f.kind IN ('limit', 'metered') AND x.\"limit\" > 0 AND x.used > 0
                      AND x.reason IN ('ok', 'limit_reached')
                      AND x.used >= {threshold} * x.\"limit\"
                 ), r AS (
                   SELECT tenant, feature, plan, \"limit\", used FROM flux_limit_report({threshold})
                 )
                 SELECT count(*) FROM ((TABLE d EXCEPT TABLE r) UNION ALL (TABLE r EXCEPT TABLE d)) m"
            ))
            .unwrap();
            assert_eq!(mismatches, Some(0), "threshold {threshold}");
        }
        let listed = Spi::get_one::<i64>("SELECT count(*) FROM flux_limit_report(0.5)").unwrap();
        assert!(
            listed.unwrap_or(0) > 10,
            "the population reaches the threshold: {listed:?}"
        );
        // t24: pro's 10 seats and a seat pack of 5, one used.
        let (limit, ratio) = Spi::get_two::<i64, String>(
            "SELECT \"limit\", ratio::text FROM flux_limit_report(0) WHERE tenant = 't24' AND feature = 'seats'",
        )
        .unwrap();
        assert_eq!((limit, ratio.as_deref()), (Some(15), Some("0.0667")));
        // t30 used pro's seats, then canceled: free's 2 seats apply.
        let plan = Spi::get_one::<String>(
            "SELECT plan FROM flux_limit_report(0.5) WHERE tenant = 't30' AND feature = 'seats'",
        )
        .unwrap();
        assert_eq!(plan.as_deref(), Some("free"));
        Spi::run("RESET flux.now").unwrap();
    }

    /// The billable view's current periods against each live tenant's own
    /// decision: the same limit (0 when not in the plan), used and plan,
    /// and overage = used past the limit under the soft grant only. A
    /// canceled subscription is billed on its plan's terms, and a closed
    /// period at its last instant.
    #[pg_test]
    fn billable_usage_agrees_with_each_decision() {
        Spi::run(
            "SET flux.now = '2026-11-20 12:00+00';
             SELECT flux_define_feature('seats', 'limit');
             SELECT flux_define_feature('exports', 'metered');
             SELECT flux_define_plan('free', rank => 0, is_default => true);
             SELECT flux_define_plan('pro', rank => 1);
             SELECT flux_grant('free', 'seats', 2);
             SELECT flux_grant('pro', 'seats', 10);
             SELECT flux_grant('pro', 'exports', 100, 'month');
             SELECT flux_set_overage('pro', 'exports');
             SELECT flux_define_addon('seat_pack');
             SELECT flux_grant_addon('seat_pack', 'seats', 5);
             SELECT flux_subscribe('t' || i, CASE WHEN i % 4 = 0 THEN 'free' ELSE 'pro' END)
               FROM generate_series(1, 40) i;
             SELECT flux_attach_addon('t' || i, 'seat_pack', 1) FROM generate_series(3, 40, 5) i;
             SELECT flux_override('t' || i, 'exports', \"limit\" => 7) FROM generate_series(2, 40, 9) i;
             SELECT flux_consume('t' || i, 'seats', 1 + i % 9) FROM generate_series(1, 40) i;
             SELECT flux_consume('t' || i, 'exports', 1 + (i * 13) % 150) FROM generate_series(1, 40) i;
             UPDATE flux.tenants SET status = 'canceled' WHERE id IN ('t5', 't10');",
        )
        .unwrap();
        let mismatches = Spi::get_one::<i64>(
            "WITH d AS (
               SELECT t.id AS tenant, f.key AS feature, x.plan,
                      CASE WHEN x.allowed OR x.reason = 'limit_reached' THEN x.\"limit\" ELSE 0 END AS included,
                      COALESCE(x.used, flux_usage(t.id, f.key)) AS used
                 FROM flux.tenants t CROSS JOIN flux.features f,
                      LATERAL flux_decide(t.id, f.key) x
                WHERE EXISTS (SELECT FROM flux.usage u WHERE u.tenant = t.id AND u.feature = f.key)
                  AND t.status = 'active'
             ), b AS (
               SELECT tenant, feature, plan, included, used FROM flux.billable_usage
                WHERE (period_end IS NULL OR period_end > '2026-11-20 12:00+00')
                  AND tenant NOT IN ('t5', 't10')
             )
             SELECT count(*) FROM ((TABLE d EXCEPT TABLE b) UNION ALL (TABLE b EXCEPT TABLE d)) m",
        )
        .unwrap();
        assert_eq!(mismatches, Some(0));
        let wrong = Spi::get_one::<i64>(
            "SELECT count(*) FROM flux.billable_usage
              WHERE overage <> CASE WHEN feature = 'exports' THEN GREATEST(used - COALESCE(included, used), 0) ELSE 0 END",
        )
        .unwrap();
        assert_eq!(wrong, Some(0));
        let over =
            Spi::get_one::<i64>("SELECT sum(overage)::bigint FROM flux.billable_usage").unwrap();
        assert!(over.unwrap_or(0) > 0, "some tenants went past their limit");
        // t5 (pro, canceled): pro's 100 exports, not the default plan's none.
        let (included, plan) = Spi::get_two::<i64, String>(
            "SELECT included, plan FROM flux.billable_usage WHERE tenant = 't5' AND feature = 'exports'",
        )
        .unwrap();
        assert_eq!((included, plan.as_deref()), (Some(100), Some("pro")));
        // A hard grant over a lowered limit (t1: 2 seats, an override of 1)
        // bills nothing over.
        Spi::run("SELECT flux_override('t1', 'seats', \"limit\" => 1)").unwrap();
        let (included, used, overage) = Spi::get_three::<i64, i64, i64>(
            "SELECT included, used, overage FROM flux.billable_usage WHERE tenant = 't1' AND feature = 'seats'",
        )
        .unwrap();
        assert_eq!((included, used, overage), (Some(1), Some(2), Some(0)));
        // Closed: November as it ended (t1 on pro with cancel at period end).
        Spi::run(
            "UPDATE flux.tenants SET cancel_at_period_end = true, current_period_end = '2026-12-01'
              WHERE id = 't1';
             SET flux.now = '2026-12-03 00:00+00';",
        )
        .unwrap();
        let (included, plan) = Spi::get_two::<i64, String>(
            "SELECT included, plan FROM flux.billable_usage
              WHERE tenant = 't1' AND feature = 'exports' AND period_start = '2026-11-01'",
        )
        .unwrap();
        assert_eq!((included, plan.as_deref()), (Some(100), Some("pro")));
        Spi::run("RESET flux.now").unwrap();
    }
}
