//! Idempotency keys: a consume with a key records once; a replay within
//! flux.idempotency_ttl returns the first decision (its JSON form is the
//! Decision's serde form, the names of flux.decision's columns).

use crate::error::{shown, FluxError, FluxResult, OrRaise};
use crate::gucs;
use crate::model::Decision;
use crate::store;
use pgrx::datum::Interval;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

/// The decision remembered for an idempotency key, with the amount the key
/// was first used with.
fn to_json(d: &Decision, amount: i64) -> Value {
    let mut v = serde_json::to_value(d).unwrap_or_else(|_| json!({}));
    if let Some(o) = v.as_object_mut() {
        o.insert("amount".into(), amount.into());
    }
    v
}

/// A remembered decision; keys stored by 0.1.0 have the same names, and
/// what a value lacks is left empty.
fn from_json(v: Value) -> FluxResult<Decision> {
    serde_json::from_value(v).map_err(|e| {
        FluxError::Internal(format!(
            "an idempotency key's stored decision is unreadable: {e}"
        ))
    })
}

/// Claim an idempotency key. Returns the first decision when the key was
/// used before (within flux.idempotency_ttl), None when this call owns it.
/// A concurrent caller with the same key waits on the unique index until the
/// first commits, then sees its decision. A replay with another amount is
/// refused (22023): it is not the same request.
pub fn claim(tenant: &str, feature: &str, key: &str, amount: i64) -> FluxResult<Option<Decision>> {
    let ttl = gucs::idempotency_ttl()?;
    let ttl = Interval::new(ttl.months, ttl.days, ttl.micros)
        .map_err(|e| FluxError::Internal(e.to_string()))?;
    let claim = JsonB(json!({ "amount": amount }));
    let claimed = store::one_mut::<i32>(
        "INSERT INTO flux.usage_keys AS k (tenant, feature, idempotency_key, decision, created_at) \
         VALUES ($1, $2, $3, $5, pg_catalog.now()) \
         ON CONFLICT (tenant, feature, idempotency_key) DO UPDATE \
             SET decision = EXCLUDED.decision, created_at = pg_catalog.now() \
             WHERE k.created_at OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) $4) \
         RETURNING 1",
        &[tenant.into(), feature.into(), key.into(), ttl.into(), claim.into()],
    )?
    .is_some();
    if claimed {
        return Ok(None);
    }
    let first = store::one::<JsonB>(
        "SELECT decision FROM flux.usage_keys \
         WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
           AND idempotency_key OPERATOR(pg_catalog.=) $3",
        &[tenant.into(), feature.into(), key.into()],
    )?;
    let Some(first) = first else { return Ok(None) };
    // Keys stored by 0.1.0 carry no amount: they replay as before.
    if let Some(was) = first.0.get("amount").and_then(Value::as_i64) {
        if was != amount {
            return Err(FluxError::InvalidValue(format!(
                "idempotency_key {} was used with amount {was} for {feature}; this call has amount {amount}: \
                 a replay must repeat the first request, a new request needs a new key",
                shown(key)
            )));
        }
    }
    Ok(Some(from_json(first.0)?))
}

pub fn store(tenant: &str, feature: &str, key: &str, d: &Decision, amount: i64) -> FluxResult<()> {
    store::exec(
        "UPDATE flux.usage_keys SET decision = $4 \
         WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2 \
           AND idempotency_key OPERATOR(pg_catalog.=) $3",
        &[
            tenant.into(),
            feature.into(),
            key.into(),
            JsonB(to_json(d, amount)).into(),
        ],
    )
}

/// Delete idempotency keys older than flux.idempotency_ttl; returns how many.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_prune_usage_keys() -> i64 {
    (|| -> FluxResult<i64> {
        let ttl = gucs::idempotency_ttl()?;
        let ttl = Interval::new(ttl.months, ttl.days, ttl.micros).map_err(|e| FluxError::Internal(e.to_string()))?;
        Ok(store::one_mut::<i64>(
            "WITH d AS (DELETE FROM flux.usage_keys \
                         WHERE created_at OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) $1) \
                         RETURNING 1) \
             SELECT pg_catalog.count(*) FROM d",
            &[ttl.into()],
        )?
        .unwrap_or(0))
    })()
    .or_raise()
}
