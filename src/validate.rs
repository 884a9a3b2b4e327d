//! Validation shared by the admin functions and plain DML: the tables'
//! triggers (sql/schema.sql) call the `flux._check_*` functions below, so a
//! psql INSERT and `flux_grant` give the same error for the same bad value.

use crate::error::{shown, FluxError, FluxResult, OrRaise};
use crate::gucs;
use crate::model::{Kind, Period};
use crate::store;
use crate::timeutil::Span;
use pgrx::datum::{AnyNumeric, Interval, TimestampWithTimeZone};
use pgrx::prelude::*;

const MAX_KEY_CHARS: usize = 200;

/// Keys and ids: non-empty, at most 200 characters, no surrounding
/// whitespace and no control characters (they end up in messages and URLs).
pub fn check_key(what: &str, key: &str) -> FluxResult<()> {
    let problem = if key.is_empty() {
        Some("must not be empty")
    } else if key.chars().count() > MAX_KEY_CHARS {
        Some("is longer than 200 characters")
    } else if key.trim() != key {
        Some("has leading or trailing whitespace")
    } else if key.chars().any(char::is_control) {
        Some("contains control characters")
    } else {
        None
    };
    match problem {
        Some(p) => Err(FluxError::InvalidValue(format!(
            "{what} {} {p}",
            shown(key)
        ))),
        None => Ok(()),
    }
}

pub fn need<T>(v: Option<T>, what: &str) -> FluxResult<T> {
    v.ok_or_else(|| FluxError::InvalidValue(format!("{what} must not be NULL")))
}

/// Validate a grant's period for the feature's kind; returns the period to
/// store (metered features default to month).
/// `parse_interval` reads a rate window (PostgreSQL's interval syntax in the
/// backend; injected so the rules stay testable as plain Rust).
pub fn check_period(
    feature: &str,
    kind: Kind,
    period: Option<&str>,
    parse_interval: impl Fn(&str) -> Option<Span>,
) -> FluxResult<Option<String>> {
    match (kind, period) {
        (Kind::Boolean | Kind::Limit, None) => Ok(None),
        (Kind::Boolean | Kind::Limit, Some(p)) => Err(FluxError::InvalidValue(format!(
            "period {} does not apply to {} feature \"{feature}\": only metered, rate and credits features have a period",
            shown(p),
            kind.as_str()
        ))),
        (Kind::Metered | Kind::Credits, None) => Ok(Some("month".to_string())),
        (Kind::Metered | Kind::Credits, Some(p)) if Period::parse(p).is_ok() => Ok(Some(p.to_string())),
        (Kind::Metered | Kind::Credits, Some(p)) => Err(FluxError::InvalidValue(format!(
            "unknown period {} for {} feature \"{feature}\": expected {}",
            shown(p),
            kind.as_str(),
            Period::expected()
        ))),
        (Kind::Rate, None) => Err(FluxError::InvalidValue(format!(
            "rate feature \"{feature}\" needs a window as its period, such as '1 hour'"
        ))),
        (Kind::Rate, Some(p)) => match parse_interval(p) {
            Some(s) if s.months == 0 && s.days >= 0 && s.micros >= 0 && (s.days > 0 || s.micros > 0) => {
                Ok(Some(p.trim().to_string()))
            }
            _ => Err(FluxError::InvalidValue(format!(
                "invalid window {} for rate feature \"{feature}\": expected a positive fixed interval such as '1 second', '1 hour' or '1 day' (not months)",
                shown(p)
            ))),
        },
    }
}

/// A limit must be >= 0, and only limited kinds have one.
pub fn check_limit(feature: &str, kind: Kind, limit: Option<i64>) -> FluxResult<()> {
    match limit {
        Some(l) if l < 0 => Err(FluxError::InvalidValue(format!(
            "limit {l} for feature \"{feature}\" must be >= 0 (NULL means unlimited)"
        ))),
        Some(l) if !kind.has_limit() => Err(FluxError::InvalidValue(format!(
            "limit {l} does not apply to boolean feature \"{feature}\": grant it without a limit, or define it as kind limit, metered, rate or credits"
        ))),
        _ => Ok(()),
    }
}

fn exists(sql: &str, key: &str) -> FluxResult<bool> {
    Ok(store::one::<i32>(sql, &[key.into()])?.is_some())
}

pub fn feature_kind(key: &str) -> FluxResult<Kind> {
    match store::one::<String>(
        "SELECT kind FROM flux.features WHERE key OPERATOR(pg_catalog.=) $1",
        &[key.into()],
    )? {
        Some(k) => Kind::parse(&k),
        None => Err(FluxError::UnknownReference(format!(
            "unknown feature {}: define it first with flux_define_feature",
            shown(key)
        ))),
    }
}

pub fn require_plan(key: &str) -> FluxResult<()> {
    if exists(
        "SELECT 1 FROM flux.plans WHERE key OPERATOR(pg_catalog.=) $1",
        key,
    )? {
        Ok(())
    } else {
        Err(FluxError::UnknownReference(format!(
            "unknown plan {}: define it first with flux_define_plan",
            shown(key)
        )))
    }
}

pub fn require_tenant(id: &str) -> FluxResult<()> {
    if exists(
        "SELECT 1 FROM flux.tenants WHERE id OPERATOR(pg_catalog.=) $1",
        id,
    )? {
        Ok(())
    } else {
        Err(FluxError::UnknownReference(format!(
            "unknown tenant {}: create it first with flux_subscribe",
            shown(id)
        )))
    }
}

pub fn require_addon(key: &str) -> FluxResult<()> {
    if exists(
        "SELECT 1 FROM flux.addons WHERE key OPERATOR(pg_catalog.=) $1",
        key,
    )? {
        Ok(())
    } else {
        Err(FluxError::UnknownReference(format!(
            "unknown addon {}: define it first with flux_define_addon",
            shown(key)
        )))
    }
}

fn ts(v: Option<TimestampWithTimeZone>) -> Option<i64> {
    v.map(|t| t.into_inner())
}

// The trigger entry points, in schema flux (internal: prefixed with _).
#[pg_schema]
mod flux {
    use super::*;

    #[pg_extern(volatile, parallel_unsafe)]
    fn _check_feature(key: Option<&str>, kind: Option<&str>, old_key: Option<&str>) {
        (|| -> FluxResult<()> {
            let key = need(key, "feature key")?;
            check_key("feature key", key)?;
            let kind = Kind::parse(need(kind, "feature kind")?)?;
            // A kind change must keep every existing grant valid.
            if let Some(old) = old_key {
                let _path = crate::privilege::Pinned::enter();
                let rows: Vec<(String, Option<i64>, Option<String>)> = Spi::connect(|c| {
                    let t = c.select(
                        "SELECT 'plan ' OPERATOR(pg_catalog.||) plan, \"limit\", period \
                           FROM flux.grants WHERE feature OPERATOR(pg_catalog.=) $1 \
                         UNION ALL SELECT 'addon ' OPERATOR(pg_catalog.||) addon, \"limit\", NULL \
                           FROM flux.addon_grants WHERE feature OPERATOR(pg_catalog.=) $1 \
                         UNION ALL SELECT 'override for tenant ' OPERATOR(pg_catalog.||) tenant, \"limit\", NULL \
                           FROM flux.overrides WHERE feature OPERATOR(pg_catalog.=) $1",
                        None,
                        &[old.into()],
                    )?;
                    let mut v = Vec::new();
                    for r in t {
                        v.push((r.get::<String>(1)?.unwrap_or_default(), r.get::<i64>(2)?, r.get::<String>(3)?));
                    }
                    Ok::<_, pgrx::spi::SpiError>(v)
                })?;
                for (owner, limit, period) in rows {
                    let ok = check_limit(key, kind, limit).and_then(|_| {
                        if owner.starts_with("plan ") {
                            check_period(key, kind, period.as_deref(), gucs::parse_span).map(|_| ())
                        } else {
                            Ok(())
                        }
                    });
                    if let Err(e) = ok {
                        return Err(FluxError::InvalidValue(format!(
                            "feature \"{key}\" cannot become kind {}: its {owner} does not fit ({e})",
                            kind.as_str()
                        )));
                    }
                }
                // Alert thresholds are of limits: a kind without one would
                // leave rows its own trigger refuses (on restore too).
                if !matches!(kind, Kind::Limit | Kind::Metered) && has_alerts(old)? {
                    return Err(FluxError::InvalidValue(format!(
                        "feature \"{key}\" cannot become kind {}: it has usage alert thresholds \
                         (remove them first with flux_alert_clear)",
                        kind.as_str()
                    )));
                }
            }
            Ok(())
        })()
        .or_raise()
    }

    /// Whether `feature` has rows in flux.alerts (none under a 0.1.0
    /// schema, which has no such table).
    fn has_alerts(feature: &str) -> FluxResult<bool> {
        let _path = crate::privilege::Pinned::enter();
        Ok(store::one::<bool>(
            "SELECT pg_catalog.to_regclass('flux.alerts') IS NOT NULL",
            &[],
        )? == Some(true)
            && store::one::<bool>(
                "SELECT EXISTS (SELECT FROM flux.alerts WHERE feature OPERATOR(pg_catalog.=) $1)",
                &[feature.into()],
            )? == Some(true))
    }

    #[pg_extern(volatile, parallel_unsafe)]
    fn _check_plan(
        key: Option<&str>,
        is_default: Option<bool>,
        grace_period: Option<Interval>,
        old_key: Option<&str>,
    ) {
        (|| -> FluxResult<()> {
            let key = need(key, "plan key")?;
            check_key("plan key", key)?;
            if let Some(g) = grace_period.map(gucs::span_of) {
                if g.months < 0 || g.days < 0 || g.micros < 0 {
                    return Err(FluxError::InvalidValue(format!(
                        "grace_period of plan \"{key}\" must not be negative"
                    )));
                }
            }
            if is_default == Some(true) {
                let me = old_key.unwrap_or(key);
                let other = store::one::<String>(
                    "SELECT key FROM flux.plans WHERE is_default AND key OPERATOR(pg_catalog.<>) $1",
                    &[me.into()],
                )?;
                if let Some(other) = other {
                    return Err(FluxError::Conflict(format!(
                        "plan \"{other}\" is already the default plan: set its is_default to false before making \"{key}\" the default (at most one plan is the default)"
                    )));
                }
            }
            Ok(())
        })()
        .or_raise()
    }

    #[pg_extern(volatile, parallel_unsafe)]
    fn _check_plan_unused(key: &str) {
        (|| -> FluxResult<()> {
            let _path = crate::privilege::Pinned::enter();
            let (n, example) = Spi::connect(|c| {
                let t = c.select(
                    "SELECT pg_catalog.count(*), pg_catalog.min(id) FROM flux.tenants t \
                     WHERE t.plan OPERATOR(pg_catalog.=) $1 \
                        OR (pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.->>) 'scheduled_plan') OPERATOR(pg_catalog.=) $1",
                    Some(1),
                    &[key.into()],
                )?;
                t.first().get_two::<i64, String>()
            })?;
            let n = n.unwrap_or(0);
            if n > 0 {
                return Err(FluxError::InUse(format!(
                    "plan \"{key}\" cannot be deleted: {n} tenant{} on it (e.g. \"{}\"); move them to another plan with flux_subscribe first",
                    if n == 1 { " is" } else { "s are" },
                    example.unwrap_or_default()
                )));
            }
            Ok(())
        })()
        .or_raise()
    }

    #[pg_extern(volatile, parallel_unsafe)]
    fn _check_grant(
        plan: Option<&str>,
        feature: Option<&str>,
        limit: Option<i64>,
        period: Option<&str>,
    ) -> Option<String> {
        (|| -> FluxResult<Option<String>> {
            let plan = need(plan, "plan")?;
            let feature = need(feature, "feature")?;
            require_plan(plan)?;
            let kind = feature_kind(feature)?;
            check_limit(feature, kind, limit)?;
            check_period(feature, kind, period, gucs::parse_span)
        })()
        .or_raise()
    }

    /// An API key's scopes name defined features (23503 otherwise).
    #[pg_extern(volatile, parallel_unsafe)]
    fn _check_scopes(scopes: Option<Vec<Option<String>>>) {
        (|| -> FluxResult<()> {
            for s in scopes.unwrap_or_default() {
                let s = need(s.as_deref(), "a scope")?;
                feature_kind(s).map_err(|_| {
                    FluxError::UnknownReference(format!(
                        "unknown feature {} in scopes: define it first with flux_define_feature",
                        shown(s)
                    ))
                })?;
            }
            Ok(())
        })()
        .or_raise()
    }

    /// An API key's allowance: the key exists, and the feature is limited
    /// (limit, metered, rate) with a period its kind takes. Returns the
    /// period to store.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _check_key_limit(
        key_id: Option<&str>,
        feature: Option<&str>,
        limit: Option<i64>,
        period: Option<&str>,
    ) -> Option<String> {
        (|| -> FluxResult<Option<String>> {
            let key_id = need(key_id, "key_id")?;
            let feature = need(feature, "feature")?;
            if !exists(
                "SELECT 1 FROM flux.api_keys WHERE id OPERATOR(pg_catalog.=) $1",
                key_id,
            )? {
                return Err(FluxError::UnknownReference(format!(
                    "no API key with id {}",
                    shown(key_id)
                )));
            }
            let kind = feature_kind(feature)?;
            if !kind.has_limit() {
                return Err(FluxError::InvalidValue(format!(
                    "an API key's allowance applies to limit, metered and rate features; \"{feature}\" is boolean (use scopes to keep a key from it)"
                )));
            }
            check_limit(feature, kind, limit)?;
            check_period(feature, kind, period, gucs::parse_span)
        })()
        .or_raise()
    }

    /// A feature's price in credits (flux_set_cost, or psql on
    /// flux.features): the pool is another feature, of kind credits, and a
    /// pool is not priced itself; a feature that prices others stays a pool.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _check_cost(
        key: Option<&str>,
        kind: Option<&str>,
        cost_pool: Option<&str>,
        cost_credits: Option<i64>,
    ) {
        (|| -> FluxResult<()> {
            let key = need(key, "feature key")?;
            let kind = Kind::parse(need(kind, "feature kind")?)?;
            // pg_restore loads the rows in any order: a price may come
            // before its pool (the foreign key still checks it exists).
            if crate::audit::copying_into_flux(c"features") {
                return Ok(());
            }
            if let Some(pool) = cost_pool {
                if kind == Kind::Credits {
                    return Err(FluxError::InvalidValue(format!(
                        "\"{key}\" is a credits pool: a pool is drawn from, not priced in another"
                    )));
                }
                if pool == key {
                    return Err(FluxError::InvalidValue(format!(
                        "\"{key}\" cannot be priced in itself: name a feature of kind credits as its pool"
                    )));
                }
                let pool_kind = feature_kind(pool)?;
                if pool_kind != Kind::Credits {
                    return Err(FluxError::InvalidValue(format!(
                        "pool \"{pool}\" is a {} feature: a cost draws from a feature of kind credits (flux_define_feature('{pool}', 'credits'))",
                        pool_kind.as_str()
                    )));
                }
                match cost_credits {
                    Some(c) if c > 0 => {}
                    c => {
                        return Err(FluxError::InvalidValue(format!(
                            "credits {} for \"{key}\" must be > 0 (NULL removes the cost)",
                            c.map_or("NULL".to_string(), |c| c.to_string())
                        )))
                    }
                }
            }
            if kind != Kind::Credits {
                if let Some(user) = store::one::<String>(
                    "SELECT key FROM flux.features WHERE cost_pool OPERATOR(pg_catalog.=) $1 \
                      ORDER BY key LIMIT 1",
                    &[key.into()],
                )? {
                    return Err(FluxError::InvalidValue(format!(
                        "feature \"{key}\" cannot become kind {}: \"{user}\" draws from it (flux_set_cost('{user}', NULL, NULL) first)",
                        kind.as_str()
                    )));
                }
            }
            Ok(())
        })()
        .or_raise()
    }

    /// A grant's overage (soft limit): only for limit and metered features,
    /// with a cap >= 0 only when it is on.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _check_overage(feature: Option<&str>, overage: Option<bool>, cap: Option<i64>) {
        (|| -> FluxResult<()> {
            let Some(feature) = feature else {
                return Ok(());
            };
            let on = overage.unwrap_or(false);
            if let Some(c) = cap {
                if c < 0 {
                    return Err(FluxError::InvalidValue(format!(
                        "overage cap {c} of feature \"{feature}\" must be >= 0 (NULL: no cap)"
                    )));
                }
                if !on {
                    return Err(FluxError::InvalidValue(format!(
                        "overage cap {c} of feature \"{feature}\" needs overage on"
                    )));
                }
            }
            if on {
                let kind = feature_kind(feature)?;
                if !matches!(kind, Kind::Limit | Kind::Metered) {
                    return Err(FluxError::InvalidValue(format!(
                        "overage applies to limit and metered features; \"{feature}\" is {}",
                        kind.as_str()
                    )));
                }
            }
            Ok(())
        })()
        .or_raise()
    }

    /// A grant's subject_limit: only for limited kinds.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _check_subject_limit(feature: Option<&str>, subject_limit: Option<i64>) {
        (|| -> FluxResult<()> {
            let (Some(feature), Some(l)) = (feature, subject_limit) else {
                return Ok(());
            };
            if l < 0 {
                return Err(FluxError::InvalidValue(format!(
                    "subject_limit {l} of feature \"{feature}\" must be >= 0 (NULL: no allowance per subject)"
                )));
            }
            let kind = feature_kind(feature)?;
            if !kind.has_limit() {
                return Err(FluxError::InvalidValue(format!(
                    "subject_limit {l} does not apply to boolean feature \"{feature}\": only limit, metered and rate features have allowances"
                )));
            }
            Ok(())
        })()
        .or_raise()
    }

    #[pg_extern(volatile, parallel_unsafe)]
    fn _check_tenant(
        id: Option<&str>,
        plan: Option<&str>,
        status: Option<&str>,
        trial_ends_at: Option<TimestampWithTimeZone>,
        current_period_start: Option<TimestampWithTimeZone>,
        current_period_end: Option<TimestampWithTimeZone>,
        _old_id: Option<&str>,
    ) {
        (|| -> FluxResult<()> {
            let id = need(id, "tenant id")?;
            check_key("tenant id", id)?;
            if let Some(p) = plan {
                require_plan(p)?;
            }
            let status = crate::model::Status::parse(need(status, "status")?)?;
            if status == crate::model::Status::Trialing && trial_ends_at.is_none() {
                return Err(FluxError::InvalidValue(format!(
                    "tenant \"{id}\" is trialing but has no trial_ends_at: say when the trial ends"
                )));
            }
            if let (Some(s), Some(e)) = (ts(current_period_start), ts(current_period_end)) {
                if e <= s {
                    return Err(FluxError::InvalidValue(format!(
                        "tenant \"{id}\": current_period_end must be after current_period_start"
                    )));
                }
            }
            Ok(())
        })()
        .or_raise()
    }

    #[pg_extern(volatile, parallel_unsafe)]
    fn _check_addon(key: Option<&str>) {
        (|| check_key("addon key", need(key, "addon key")?))().or_raise()
    }

    #[pg_extern(volatile, parallel_unsafe)]
    fn _check_addon_unused(key: &str) {
        (|| -> FluxResult<()> {
            let n = store::one::<i64>(
                "SELECT pg_catalog.count(*) FROM flux.tenant_addons WHERE addon OPERATOR(pg_catalog.=) $1",
                &[key.into()],
            )?
                .unwrap_or(0);
            if n > 0 {
                return Err(FluxError::InUse(format!(
                    "addon \"{key}\" cannot be deleted: {n} tenant{} it; detach it with flux_attach_addon(tenant, '{key}', 0) first",
                    if n == 1 { " holds" } else { "s hold" }
                )));
            }
            Ok(())
        })()
        .or_raise()
    }

    #[pg_extern(volatile, parallel_unsafe)]
    fn _check_addon_grant(addon: Option<&str>, feature: Option<&str>, limit: Option<i64>) {
        (|| -> FluxResult<()> {
            require_addon(need(addon, "addon")?)?;
            let feature = need(feature, "feature")?;
            let kind = feature_kind(feature)?;
            check_limit(feature, kind, limit)
        })()
        .or_raise()
    }

    #[pg_extern(volatile, parallel_unsafe)]
    fn _check_tenant_addon(tenant: Option<&str>, addon: Option<&str>, quantity: Option<i32>) {
        (|| -> FluxResult<()> {
            let tenant = need(tenant, "tenant")?;
            let addon = need(addon, "addon")?;
            require_tenant(tenant)?;
            require_addon(addon)?;
            let q = need(quantity, "quantity")?;
            if q <= 0 {
                return Err(FluxError::InvalidValue(format!(
                    "quantity {q} of addon \"{addon}\" for tenant \"{tenant}\" must be > 0 (flux_attach_addon with 0 detaches it)"
                )));
            }
            Ok(())
        })()
        .or_raise()
    }

    #[pg_extern(volatile, parallel_unsafe)]
    fn _check_override(
        tenant: Option<&str>,
        feature: Option<&str>,
        limit: Option<i64>,
        starts_at: Option<TimestampWithTimeZone>,
        expires_at: Option<TimestampWithTimeZone>,
    ) {
        (|| -> FluxResult<()> {
            let tenant = need(tenant, "tenant")?;
            let feature = need(feature, "feature")?;
            require_tenant(tenant)?;
            let kind = feature_kind(feature)?;
            check_limit(feature, kind, limit)?;
            if let (Some(s), Some(e)) = (ts(starts_at), ts(expires_at)) {
                if e <= s {
                    return Err(FluxError::InvalidValue(format!(
                        "override of \"{feature}\" for tenant \"{tenant}\": expires_at must be after starts_at"
                    )));
                }
            }
            Ok(())
        })()
        .or_raise()
    }

    #[pg_extern(volatile, parallel_unsafe)]
    fn _check_flag(feature: Option<&str>, rollout_percent: Option<AnyNumeric>, salt: Option<&str>) {
        (|| -> FluxResult<()> {
            feature_kind(need(feature, "feature")?)?;
            crate::rollout::threshold(&need(rollout_percent, "rollout_percent")?.to_string())?;
            if let Some(s) = salt {
                check_key("salt", s)?;
            }
            Ok(())
        })()
        .or_raise()
    }

    #[pg_extern(volatile, parallel_unsafe)]
    fn _check_flag_list(feature: Option<&str>, id: Option<&str>, list: Option<&str>) {
        (|| -> FluxResult<()> {
            let feature = need(feature, "feature")?;
            check_key("id", need(id, "id")?)?;
            let list = need(list, "list")?;
            if list != "allow" && list != "deny" {
                return Err(FluxError::InvalidValue(format!(
                    "unknown list {}: expected allow or deny",
                    shown(list)
                )));
            }
            let has_flag = exists(
                "SELECT 1 FROM flux.flags WHERE feature OPERATOR(pg_catalog.=) $1",
                feature,
            )?;
            if !has_flag {
                feature_kind(feature)?;
                return Err(FluxError::UnknownReference(format!(
                    "feature \"{feature}\" has no flag: create it with flux_set_flag first"
                )));
            }
            Ok(())
        })()
        .or_raise()
    }

    /// The clock as a timestamptz, for triggers (past_due_since) and SQL.
    #[pg_extern(stable, parallel_safe)]
    fn _clock() -> TimestampWithTimeZone {
        let t = gucs::clock().or_raise();
        TimestampWithTimeZone::try_from(t)
            .unwrap_or_else(|_| FluxError::BadDatetime("flux.now is out of range".into()).raise())
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn keys() {
        assert!(check_key("k", "export").is_ok());
        assert!(check_key("k", "").is_err());
        assert!(check_key("k", " x").is_err());
        assert!(check_key("k", &"x".repeat(201)).is_err());
        assert!(check_key("k", "a\u{0}b").is_err());
        assert!(check_key("k", "日本語").is_ok());
        let e = check_key("tenant id", &"y".repeat(1_000_000))
            .unwrap_err()
            .to_string();
        assert!(
            e.len() < 200,
            "message must not echo a huge value: {}",
            e.len()
        );
    }

    #[test]
    fn periods() {
        let hour = |s: &str| {
            (s == "1 hour").then_some(Span {
                months: 0,
                days: 0,
                micros: 3_600_000_000,
            })
        };
        let month = |_: &str| {
            Some(Span {
                months: 1,
                days: 0,
                micros: 0,
            })
        };
        assert_eq!(
            check_period("q", Kind::Metered, None, hour)
                .unwrap()
                .as_deref(),
            Some("month")
        );
        assert_eq!(
            check_period("q", Kind::Metered, Some("day"), hour)
                .unwrap()
                .as_deref(),
            Some("day")
        );
        let e = check_period("q", Kind::Metered, Some("fortnight"), hour)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"fortnight\"") && e.contains("billing_period"),
            "{e}"
        );
        assert!(check_period("b", Kind::Boolean, Some("day"), hour).is_err());
        assert!(check_period("r", Kind::Rate, None, hour).is_err());
        assert_eq!(
            check_period("r", Kind::Rate, Some("1 hour"), hour)
                .unwrap()
                .as_deref(),
            Some("1 hour")
        );
        assert!(check_period("r", Kind::Rate, Some("1 month"), month).is_err());
        assert!(check_period("r", Kind::Rate, Some("soon"), hour).is_err());
    }

    #[test]
    fn limits() {
        assert!(check_limit("s", Kind::Limit, Some(0)).is_ok());
        assert!(check_limit("s", Kind::Limit, None).is_ok());
        assert!(check_limit("s", Kind::Limit, Some(-1))
            .unwrap_err()
            .to_string()
            .contains("-1"));
        assert!(check_limit("b", Kind::Boolean, Some(3)).is_err());
    }
}

/// One list per enum: the words of the Rust enums (model.rs) are the words
/// the install script's CHECK constraints allow, and the columns of
/// `flux.decision` are model::Column's, in order and type.
#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::model::{Column, Kind, Status};
    use pgrx::prelude::*;

    /// The quoted words of a CHECK (col IN ('a', 'b')) constraint.
    fn check_words(table: &str, constraint: &str) -> Vec<String> {
        let def = Spi::get_one::<String>(&format!(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint
              WHERE conrelid = 'flux.{table}'::regclass AND conname = '{constraint}'"
        ))
        .unwrap()
        .unwrap_or_else(|| panic!("no constraint {constraint} on flux.{table}"));
        def.split('\'')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    #[pg_test]
    fn enum_words_are_the_check_constraints() {
        assert_eq!(check_words("features", "features_kind_check"), Kind::WORDS);
        assert_eq!(
            check_words("tenants", "tenants_status_check"),
            Status::WORDS
        );
    }

    #[pg_test]
    fn decision_columns_are_the_type() {
        let attrs: Vec<(String, pg_sys::Oid)> = Spi::connect(|c| {
            let t = c.select(
                "SELECT attname::text, atttypid FROM pg_attribute
                  WHERE attrelid = 'flux.decision'::regclass AND attnum > 0 AND NOT attisdropped
                  ORDER BY attnum",
                None,
                &[],
            )?;
            let mut v = Vec::new();
            for r in t {
                v.push((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<pg_sys::Oid>(2)?.unwrap_or_default(),
                ));
            }
            Ok::<_, pgrx::spi::SpiError>(v)
        })
        .unwrap();
        let want: Vec<(String, pg_sys::Oid)> = Column::ALL
            .iter()
            .map(|c| (c.as_str().to_string(), c.type_oid()))
            .collect();
        assert_eq!(attrs, want);
        // The type's comment lists the reasons, in the contract's order.
        let comment =
            Spi::get_one::<String>("SELECT obj_description('flux.decision'::regtype, 'pg_type')")
                .unwrap()
                .unwrap_or_default();
        let listed = crate::model::Reason::WORDS.join(", ");
        assert!(comment.contains(&listed), "{comment} should list {listed}");
    }
}
