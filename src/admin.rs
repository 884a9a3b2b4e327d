//! Admin functions (psql): idempotent upserts on the flux tables. The
//! tables' triggers validate every row (src/validate.rs), so these functions
//! only say what to write; a bad value fails the whole call and nothing is
//! half-written.

use crate::error::{FluxError, FluxResult, OrRaise};
use crate::store;
use crate::validate::{feature_kind, need, require_addon, require_plan, require_tenant};
use pgrx::datum::{AnyNumeric, Interval, TimestampWithTimeZone};
use pgrx::prelude::*;

/// Define (or redefine) a feature. A NULL description keeps the current one.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_define_feature(
    key: Option<&str>,
    kind: default!(Option<&str>, "'boolean'"),
    description: default!(Option<&str>, "NULL"),
) {
    (|| {
        let key = need(key, "feature key")?;
        let kind = need(kind, "kind")?;
        store::exec(
            "INSERT INTO flux.features AS f (key, kind, description) VALUES ($1, $2, $3) \
             ON CONFLICT (key) DO UPDATE SET kind = EXCLUDED.kind, \
                 description = coalesce(EXCLUDED.description, f.description)",
            &[key.into(), kind.into(), description.into()],
        )
    })()
    .or_raise()
}

/// Define (or redefine) a plan. A NULL name or grace_period keeps the current one.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_define_plan(
    key: Option<&str>,
    name: default!(Option<&str>, "NULL"),
    rank: default!(Option<i32>, "0"),
    is_default: default!(Option<bool>, "false"),
    grace_period: default!(Option<Interval>, "NULL"),
) {
    (|| {
        let key = need(key, "plan key")?;
        let rank = need(rank, "rank")?;
        let is_default = need(is_default, "is_default")?;
        store::exec(
            "INSERT INTO flux.plans AS p (key, name, rank, is_default, grace_period) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (key) DO UPDATE SET name = coalesce(EXCLUDED.name, p.name), \
                 rank = EXCLUDED.rank, is_default = EXCLUDED.is_default, \
                 grace_period = coalesce(EXCLUDED.grace_period, p.grace_period)",
            &[
                key.into(),
                name.into(),
                rank.into(),
                is_default.into(),
                grace_period.into(),
            ],
        )
    })()
    .or_raise()
}

/// Remove a feature from a plan. Revoking what was not granted does nothing;
/// an unknown plan or feature is an error (a typo should not pass silently).
#[pg_extern(volatile, parallel_unsafe)]
fn flux_revoke(plan: Option<&str>, feature: Option<&str>) {
    (|| {
        let plan = need(plan, "plan")?;
        let feature = need(feature, "feature")?;
        require_plan(plan)?;
        feature_kind(feature)?;
        store::exec(
            "DELETE FROM flux.grants WHERE plan OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2",
            &[plan.into(), feature.into()],
        )
    })()
    .or_raise()
}

/// Set a tenant's subscription, creating the tenant when new.
/// current_period_start defaults to the clock for a new tenant and is kept
/// otherwise; cancel_at_period_end is set as given (default false).
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::too_many_arguments)]
fn flux_subscribe(
    tenant: Option<&str>,
    plan: Option<&str>,
    status: default!(Option<&str>, "'active'"),
    current_period_end: default!(Option<TimestampWithTimeZone>, "NULL"),
    trial_ends_at: default!(Option<TimestampWithTimeZone>, "NULL"),
    current_period_start: default!(Option<TimestampWithTimeZone>, "NULL"),
    cancel_at_period_end: default!(Option<bool>, "false"),
) {
    (|| {
        let tenant = need(tenant, "tenant")?;
        let status = need(status, "status")?;
        let cancel = need(cancel_at_period_end, "cancel_at_period_end")?;
        // A plan other than the one in force replaces a change to come (or
        // one already due); the same plan (a renewal) keeps it.
        // (IS NOT DISTINCT FROM, spelled out with the qualified =.)
        const KEEPS: &str = "coalesce(EXCLUDED.plan OPERATOR(pg_catalog.=) CASE WHEN t.scheduled_at \
             OPERATOR(pg_catalog.<=) flux._clock() THEN t.scheduled_plan ELSE t.plan END, \
             EXCLUDED.plan IS NULL AND t.plan IS NULL)";
        let schedule = if store::flux_has_column(c"tenants", c"scheduled_plan") {
            format!(", scheduled_plan = CASE WHEN {KEEPS} THEN t.scheduled_plan END, \
                     scheduled_at = CASE WHEN {KEEPS} THEN t.scheduled_at END")
        } else {
            String::new()
        };
        store::exec(
            &format!(
                "INSERT INTO flux.tenants AS t (id, plan, status, current_period_end, trial_ends_at, \
                     current_period_start, cancel_at_period_end) \
                 VALUES ($1, $2, $3, $4, $5, coalesce($6, flux._clock()), $7) \
                 ON CONFLICT (id) DO UPDATE SET plan = EXCLUDED.plan, status = EXCLUDED.status, \
                     current_period_end = EXCLUDED.current_period_end, \
                     trial_ends_at = EXCLUDED.trial_ends_at, \
                     current_period_start = coalesce($6, t.current_period_start), \
                     cancel_at_period_end = EXCLUDED.cancel_at_period_end{schedule}"
            ),
            &[
                tenant.into(),
                plan.into(),
                status.into(),
                current_period_end.into(),
                trial_ends_at.into(),
                current_period_start.into(),
                cancel.into(),
            ],
        )
    })()
    .or_raise()
}

/// Define (or rename) an addon. A NULL name keeps the current one.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_define_addon(key: Option<&str>, name: default!(Option<&str>, "NULL")) {
    (|| {
        let key = need(key, "addon key")?;
        store::exec(
            "INSERT INTO flux.addons AS a (key, name) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET name = coalesce(EXCLUDED.name, a.name)",
            &[key.into(), name.into()],
        )
    })()
    .or_raise()
}

/// Set how many units of an addon a tenant has; 0 detaches it.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_attach_addon(
    tenant: Option<&str>,
    addon: Option<&str>,
    quantity: default!(Option<i32>, "1"),
) {
    (|| {
        let tenant = need(tenant, "tenant")?;
        let addon = need(addon, "addon")?;
        let quantity = need(quantity, "quantity")?;
        if quantity < 0 {
            return Err(FluxError::InvalidValue(format!(
                "quantity {quantity} of addon {} must be >= 0 (0 detaches it)",
                crate::error::shown(addon)
            )));
        }
        if quantity == 0 {
            require_tenant(tenant)?;
            require_addon(addon)?;
            return store::exec(
                "DELETE FROM flux.tenant_addons \
                 WHERE tenant OPERATOR(pg_catalog.=) $1 AND addon OPERATOR(pg_catalog.=) $2",
                &[tenant.into(), addon.into()],
            );
        }
        store::exec(
            "INSERT INTO flux.tenant_addons (tenant, addon, quantity) VALUES ($1, $2, $3) \
             ON CONFLICT (tenant, addon) DO UPDATE SET quantity = EXCLUDED.quantity",
            &[tenant.into(), addon.into(), quantity.into()],
        )
    })()
    .or_raise()
}

/// Set a feature's flag: the kill switch (enabled) and the rollout
/// percentage (0..100, up to 4 decimals). A NULL salt keeps the current one
/// (the feature key by default).
#[pg_extern(volatile, parallel_unsafe)]
fn flux_set_flag(
    feature: Option<&str>,
    enabled: default!(Option<bool>, "true"),
    rollout_percent: default!(Option<AnyNumeric>, "100"),
    salt: default!(Option<&str>, "NULL"),
) {
    (|| {
        let feature = need(feature, "feature")?;
        let enabled = need(enabled, "enabled")?;
        let percent = need(rollout_percent, "rollout_percent")?;
        // Validate here too, so an overflowing value is named before the row is built.
        crate::rollout::threshold(&percent.to_string())?;
        store::exec(
            "INSERT INTO flux.flags AS f (feature, enabled, rollout_percent, salt) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (feature) DO UPDATE SET enabled = EXCLUDED.enabled, \
                 rollout_percent = EXCLUDED.rollout_percent, salt = coalesce(EXCLUDED.salt, f.salt)",
            &[feature.into(), enabled.into(), percent.into(), salt.into()],
        )
    })()
    .or_raise()
}

/// Put `id` (a tenant or subject id) on a flag's allow or deny list,
/// creating the flag (enabled, 100%) when the feature has none.
fn flag_list(feature: Option<&str>, id: Option<&str>, list: &str) -> FluxResult<()> {
    let feature = need(feature, "feature")?;
    let id = need(id, "id")?;
    store::exec(
        "INSERT INTO flux.flags (feature) VALUES ($1) ON CONFLICT (feature) DO NOTHING",
        &[feature.into()],
    )?;
    store::exec(
        "INSERT INTO flux.flag_lists (feature, id, list) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        &[feature.into(), id.into(), list.into()],
    )
}

/// Let `id` in whatever the rollout percentage (the deny list still wins).
#[pg_extern(volatile, parallel_unsafe)]
fn flux_flag_allow(feature: Option<&str>, id: Option<&str>) {
    flag_list(feature, id, "allow").or_raise()
}

/// Keep `id` out whatever the percentage and the allow list.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_flag_deny(feature: Option<&str>, id: Option<&str>) {
    flag_list(feature, id, "deny").or_raise()
}

/// Take `id` off both lists of the flag.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_flag_clear(feature: Option<&str>, id: Option<&str>) {
    (|| {
        let feature = need(feature, "feature")?;
        let id = need(id, "id")?;
        feature_kind(feature)?;
        store::exec(
            "DELETE FROM flux.flag_lists \
             WHERE feature OPERATOR(pg_catalog.=) $1 AND id OPERATOR(pg_catalog.=) $2",
            &[feature.into(), id.into()],
        )
    })()
    .or_raise()
}

/// The bodies of flux_grant, flux_override and flux_grant_addon: SQL
/// wrappers (sql/finalize.sql) take the jsonb value and pass it as text, so a
/// value is stored exactly as given and never parsed here.
#[pg_schema]
mod flux {
    use super::*;

    /// Grant a feature on a plan, replacing any earlier grant of it.
    /// (The `_v2` symbol: 0.1.0's script declares `flux._grant` with five
    /// arguments, and must keep working until ALTER EXTENSION UPDATE.)
    #[pg_extern(name = "_grant", volatile, parallel_unsafe)]
    fn _grant_v2(
        plan: Option<&str>,
        feature: Option<&str>,
        limit: Option<i64>,
        period: Option<&str>,
        value: Option<&str>,
        subject_limit: Option<i64>,
    ) {
        (|| {
            let plan = need(plan, "plan")?;
            let feature = need(feature, "feature")?;
            store::exec(
                "INSERT INTO flux.grants (plan, feature, enabled, \"limit\", period, value, subject_limit) \
                 VALUES ($1, $2, true, $3, $4, $5::pg_catalog.jsonb, $6) \
                 ON CONFLICT (plan, feature) DO UPDATE SET enabled = true, \"limit\" = EXCLUDED.\"limit\", \
                     period = EXCLUDED.period, value = EXCLUDED.value, subject_limit = EXCLUDED.subject_limit",
                &[
                    plan.into(),
                    feature.into(),
                    limit.into(),
                    period.into(),
                    value.into(),
                    subject_limit.into(),
                ],
            )
        })()
        .or_raise()
    }
    /// 0.1.0's flux._grant (no subject_limit), for its install script.
    #[pg_extern(sql = false, volatile, parallel_unsafe)]
    fn _grant(
        plan: Option<&str>,
        feature: Option<&str>,
        limit: Option<i64>,
        period: Option<&str>,
        value: Option<&str>,
    ) {
        (|| {
            let plan = need(plan, "plan")?;
            let feature = need(feature, "feature")?;
            store::exec(
                "INSERT INTO flux.grants (plan, feature, enabled, \"limit\", period, value) \
                 VALUES ($1, $2, true, $3, $4, $5::pg_catalog.jsonb) \
                 ON CONFLICT (plan, feature) DO UPDATE SET enabled = true, \"limit\" = EXCLUDED.\"limit\", \
                     period = EXCLUDED.period, value = EXCLUDED.value",
                &[plan.into(), feature.into(), limit.into(), period.into(), value.into()],
            )
        })()
        .or_raise()
    }

    /// Give, change or revoke one feature for one tenant, optionally within a
    /// time window. Replaces the tenant's earlier override of that feature.
    #[pg_extern(volatile, parallel_unsafe)]
    #[allow(clippy::too_many_arguments)]
    fn _override(
        tenant: Option<&str>,
        feature: Option<&str>,
        enabled: Option<bool>,
        limit: Option<i64>,
        starts_at: Option<TimestampWithTimeZone>,
        expires_at: Option<TimestampWithTimeZone>,
        reason: Option<&str>,
        value: Option<&str>,
    ) {
        (|| {
            let tenant = need(tenant, "tenant")?;
            let feature = need(feature, "feature")?;
            let enabled = need(enabled, "enabled")?;
            store::exec(
                "INSERT INTO flux.overrides (tenant, feature, enabled, \"limit\", starts_at, expires_at, reason, value) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8::pg_catalog.jsonb) \
                 ON CONFLICT (tenant, feature) DO UPDATE SET enabled = EXCLUDED.enabled, \
                     \"limit\" = EXCLUDED.\"limit\", starts_at = EXCLUDED.starts_at, \
                     expires_at = EXCLUDED.expires_at, reason = EXCLUDED.reason, value = EXCLUDED.value",
                &[
                    tenant.into(),
                    feature.into(),
                    enabled.into(),
                    limit.into(),
                    starts_at.into(),
                    expires_at.into(),
                    reason.into(),
                    value.into(),
                ],
            )
        })()
        .or_raise()
    }
    /// What one unit of an addon grants.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _grant_addon(
        addon: Option<&str>,
        feature: Option<&str>,
        limit: Option<i64>,
        value: Option<&str>,
    ) {
        (|| {
            let addon = need(addon, "addon")?;
            let feature = need(feature, "feature")?;
            store::exec(
                "INSERT INTO flux.addon_grants (addon, feature, \"limit\", value) VALUES ($1, $2, $3, $4::pg_catalog.jsonb) \
                 ON CONFLICT (addon, feature) DO UPDATE SET \"limit\" = EXCLUDED.\"limit\", value = EXCLUDED.value",
                &[addon.into(), feature.into(), limit.into(), value.into()],
            )
        })()
        .or_raise()
    }
}

/// An API key's own allowance of a limit, metered or rate feature, on top
/// of its tenant's (both must fit); `limit => NULL` removes it. Admin only.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_key_limit(
    key_id: Option<&str>,
    feature: Option<&str>,
    limit: Option<i64>,
    period: default!(Option<&str>, "NULL"),
) {
    (|| {
        let key_id = need(key_id, "key_id")?;
        let feature = need(feature, "feature")?;
        match limit {
            None => store::exec(
                "DELETE FROM flux.key_limits \
                 WHERE key_id OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2",
                &[key_id.into(), feature.into()],
            ),
            Some(l) => store::exec(
                "INSERT INTO flux.key_limits (key_id, feature, \"limit\", period) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (key_id, feature) DO UPDATE SET \"limit\" = EXCLUDED.\"limit\", \
                     period = EXCLUDED.period",
                &[key_id.into(), feature.into(), l.into(), period.into()],
            ),
        }
    })()
    .or_raise()
}

/// Price `feature` in credits: each unit consumed draws `credits` from
/// `pool` (a feature of kind credits); `credits => NULL` (or `pool => NULL`)
/// removes the price. Admin only; audited as a change of the feature.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_set_cost(feature: Option<&str>, pool: Option<&str>, credits: Option<i64>) {
    (|| {
        let feature = need(feature, "feature")?;
        let (pool, credits) = match (pool, credits) {
            (Some(p), Some(c)) => (Some(p), Some(c)),
            _ => (None, None),
        };
        let found = store::one_mut::<String>(
            "UPDATE flux.features SET cost_pool = $2, cost_credits = $3 \
              WHERE key OPERATOR(pg_catalog.=) $1 RETURNING key",
            &[feature.into(), pool.into(), credits.into()],
        )?;
        match found {
            Some(_) => Ok(()),
            None => Err(crate::error::FluxError::UnknownReference(format!(
                "unknown feature {}: define it first with flux_define_feature",
                crate::error::shown(feature)
            ))),
        }
    })()
    .or_raise()
}

/// Make `plan`'s grant of a limit or metered feature soft: consumes past
/// the limit are allowed up to limit + `cap` (NULL: no cap) and reported
/// as overage; `enabled => false` makes it hard again. Admin only; audited
/// as a change of the grant (its trigger checks the kind and the cap).
#[pg_extern(volatile, parallel_unsafe)]
fn flux_set_overage(
    plan: Option<&str>,
    feature: Option<&str>,
    enabled: default!(Option<bool>, "true"),
    cap: default!(Option<i64>, "NULL"),
) {
    (|| {
        let plan = need(plan, "plan")?;
        let feature = need(feature, "feature")?;
        let enabled = need(enabled, "enabled")?;
        crate::validate::require_plan(plan)?;
        crate::validate::feature_kind(feature)?;
        let found = store::one_mut::<String>(
            "UPDATE flux.grants SET overage = $3, overage_cap = CASE WHEN $3 THEN $4 END \
              WHERE plan OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 RETURNING plan",
            &[plan.into(), feature.into(), enabled.into(), cap.into()],
        )?;
        match found {
            Some(_) => Ok(()),
            None => Err(crate::error::FluxError::UnknownReference(format!(
                "plan {} does not grant {}: grant it first with flux_grant",
                crate::error::shown(plan),
                crate::error::shown(feature)
            ))),
        }
    })()
    .or_raise()
}
