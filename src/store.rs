//! Where decision facts come from: the `flux` tables, read with SPI in
//! read-only mode (so reads work on a hot standby and never write).

use crate::error::{FluxError, FluxResult};
use crate::gucs::span_of;
use crate::model::*;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::spi::SpiHeapTupleData;
use pgrx::JsonB;

fn ts(row: &SpiHeapTupleData, col: usize) -> FluxResult<Option<i64>> {
    Ok(row
        .get::<TimestampWithTimeZone>(col)?
        .map(|t| t.into_inner()))
}

fn text(row: &SpiHeapTupleData, col: usize) -> FluxResult<Option<String>> {
    Ok(row.get::<String>(col)?)
}

fn json(row: &SpiHeapTupleData, col: usize) -> FluxResult<Option<serde_json::Value>> {
    Ok(row.get::<JsonB>(col)?.map(|j| j.0))
}

fn required<T>(v: Option<T>, what: &str) -> FluxResult<T> {
    v.ok_or_else(|| FluxError::Internal(format!("{what} is NULL")))
}

/// The feature with its enabled grants by every plan, or None when unknown.
pub fn load_feature(key: &str) -> FluxResult<Option<FeatureFacts>> {
    Spi::connect(|client| {
        let head = client.select(
            "SELECT f.kind, (SELECT p.key FROM flux.plans p WHERE p.is_default) \
             FROM flux.features f WHERE f.key = $1",
            Some(1),
            &[key.into()],
        )?;
        if head.is_empty() {
            return Ok(None);
        }
        let head = head.first();
        let kind = Kind::parse(&required(head.get::<String>(1)?, "features.kind")?)?;
        let default_plan = head.get::<String>(2)?;
        let rows = client.select(
            "SELECT g.plan, p.rank, g.\"limit\", g.period, g.value \
             FROM flux.grants g JOIN flux.plans p ON p.key = g.plan \
             WHERE g.feature = $1 AND g.enabled ORDER BY p.rank, p.key",
            None,
            &[key.into()],
        )?;
        let mut grants = Vec::with_capacity(rows.len());
        for row in rows {
            grants.push(PlanGrant {
                plan: required(text(&row, 1)?, "grants.plan")?,
                rank: required(row.get::<i32>(2)?, "plans.rank")?,
                limit: row.get::<i64>(3)?,
                period: text(&row, 4)?,
                value: json(&row, 5)?,
            });
        }
        Ok(Some(FeatureFacts {
            key: key.to_string(),
            kind,
            grants,
            default_plan,
        }))
    })
}

/// The tenant's subscription with its addons and override for one feature,
/// or None when the tenant is unknown.
pub fn load_tenant(id: &str, feature: &str) -> FluxResult<Option<TenantFacts>> {
    Spi::connect(|client| {
        let head = client.select(
            "SELECT t.plan, t.status, t.trial_ends_at, t.current_period_start, \
                    t.current_period_end, t.cancel_at_period_end, t.past_due_since, \
                    t.grace_until, p.grace_period \
             FROM flux.tenants t LEFT JOIN flux.plans p ON p.key = t.plan WHERE t.id = $1",
            Some(1),
            &[id.into()],
        )?;
        if head.is_empty() {
            return Ok(None);
        }
        let row = head.first().get_heap_tuple()?;
        let row = required(row, "tenant row")?;
        let mut t = TenantFacts {
            id: id.to_string(),
            plan: text(&row, 1)?,
            status: Status::parse(&required(text(&row, 2)?, "tenants.status")?)?,
            trial_ends_at: ts(&row, 3)?,
            current_period_start: ts(&row, 4)?,
            current_period_end: ts(&row, 5)?,
            cancel_at_period_end: row.get::<bool>(6)?.unwrap_or(false),
            past_due_since: ts(&row, 7)?,
            grace_until: ts(&row, 8)?,
            plan_grace: row.get::<Interval>(9)?.map(span_of),
            addons: Vec::new(),
            override_: None,
        };
        let addons = client.select(
            "SELECT ta.addon, ta.quantity, ag.\"limit\", ag.value \
             FROM flux.tenant_addons ta JOIN flux.addon_grants ag ON ag.addon = ta.addon \
             WHERE ta.tenant = $1 AND ag.feature = $2 ORDER BY ta.addon",
            None,
            &[id.into(), feature.into()],
        )?;
        for row in addons {
            t.addons.push(AddonGrant {
                addon: required(text(&row, 1)?, "tenant_addons.addon")?,
                quantity: required(row.get::<i32>(2)?, "tenant_addons.quantity")?,
                limit: row.get::<i64>(3)?,
                value: json(&row, 4)?,
            });
        }
        let ov = client.select(
            "SELECT enabled, \"limit\", value, starts_at, expires_at, reason \
             FROM flux.overrides WHERE tenant = $1 AND feature = $2",
            Some(1),
            &[id.into(), feature.into()],
        )?;
        for row in ov {
            t.override_ = Some(Override {
                enabled: row.get::<bool>(1)?.unwrap_or(true),
                limit: row.get::<i64>(2)?,
                value: json(&row, 3)?,
                starts_at: ts(&row, 4)?,
                expires_at: ts(&row, 5)?,
                reason: text(&row, 6)?,
            });
        }
        Ok(Some(t))
    })
}

/// Every feature key, in order (for flux_entitlements).
pub fn feature_keys() -> FluxResult<Vec<String>> {
    Spi::connect(|client| {
        let rows = client.select("SELECT key FROM flux.features ORDER BY key", None, &[])?;
        let mut keys = Vec::with_capacity(rows.len());
        for row in rows {
            keys.push(required(text(&row, 1)?, "features.key")?);
        }
        Ok(keys)
    })
}

/// The feature's flag and whether the tenant or subject is on its lists;
/// None when the feature has no flag.
pub fn load_flag(
    feature: &str,
    tenant: &str,
    subject: Option<&str>,
) -> FluxResult<Option<FlagFacts>> {
    Spi::connect(|client| {
        let mut rows = client.select(
            "SELECT f.enabled, f.rollout_percent::text, coalesce(f.salt, f.feature), \
                    EXISTS (SELECT 1 FROM flux.flag_lists l WHERE l.feature = f.feature \
                            AND l.list = 'allow' AND l.id IN ($2, $3)), \
                    EXISTS (SELECT 1 FROM flux.flag_lists l WHERE l.feature = f.feature \
                            AND l.list = 'deny' AND l.id IN ($2, $3)) \
             FROM flux.flags f WHERE f.feature = $1",
            Some(1),
            &[feature.into(), tenant.into(), subject.into()],
        )?;
        if let Some(row) = rows.next() {
            let percent = required(text(&row, 2)?, "flags.rollout_percent")?;
            return Ok(Some(FlagFacts {
                enabled: row.get::<bool>(1)?.unwrap_or(true),
                threshold: crate::rollout::threshold(&percent)?,
                salt: required(text(&row, 3)?, "flags.salt")?,
                allowed: row.get::<bool>(4)?.unwrap_or(false),
                denied: row.get::<bool>(5)?.unwrap_or(false),
            }));
        }
        Ok(None)
    })
}

/// Units recorded for a counter in the period starting at `period_start`
/// (-infinity for limit features): one primary-key probe.
pub fn load_used(tenant: &str, feature: &str, period_start: Option<i64>) -> FluxResult<i64> {
    let start = ts_datum(period_start);
    Ok(Spi::connect(|client| {
        let t = client.select(
            "SELECT used FROM flux.usage WHERE tenant = $1 AND feature = $2 AND period_start = $3",
            Some(1),
            &[tenant.into(), feature.into(), start.into()],
        )?;
        if t.is_empty() {
            Ok::<_, pgrx::spi::SpiError>(None)
        } else {
            t.first().get_one::<i64>()
        }
    })?
    .unwrap_or(0))
}

/// The rate limiter's theoretical arrival time, if any.
pub fn load_tat(tenant: &str, feature: &str) -> FluxResult<Option<i64>> {
    Ok(Spi::connect(|client| {
        let t = client.select(
            "SELECT tat FROM flux.rate_state WHERE tenant = $1 AND feature = $2",
            Some(1),
            &[tenant.into(), feature.into()],
        )?;
        if t.is_empty() {
            Ok::<_, pgrx::spi::SpiError>(None)
        } else {
            t.first().get_one::<TimestampWithTimeZone>()
        }
    })?
    .map(|t| t.into_inner()))
}

/// A timestamp for SPI; None is -infinity (the period of limit features).
pub fn ts_datum(t: Option<i64>) -> TimestampWithTimeZone {
    match t {
        Some(v) => TimestampWithTimeZone::try_from(v)
            .unwrap_or_else(|_| TimestampWithTimeZone::negative_infinity()),
        None => TimestampWithTimeZone::negative_infinity(),
    }
}
