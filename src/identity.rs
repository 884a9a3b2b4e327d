//! Who is asking: the session's tenant.

use crate::gucs;
use pgrx::prelude::*;
use std::ffi::{CStr, CString};

/// The value of any setting, None when unset or unknown.
fn setting(name: &str) -> Option<String> {
    let name = CString::new(name).ok()?;
    // SAFETY: GetConfigOption with missing_ok = true returns NULL or a
    // pointer to a NUL-terminated string owned by the GUC machinery, valid
    // until the setting changes; we copy it at once.
    unsafe {
        let p = pg_sys::GetConfigOption(name.as_ptr(), true, false);
        if p.is_null() {
            None
        } else {
            Some(CStr::from_ptr(p).to_string_lossy().into_owned())
        }
    }
}

/// The id (a tenant, a subject) named by a claim in a JWT claims JSON object. Malformed JSON,
/// a missing claim, or a claim that is not a non-empty string or number
/// gives None: an unreadable identity is no identity. So does a claim with
/// a NUL in it (`\u0000`), which no tenant id can hold.
pub fn id_from_claims(claims: &str, claim: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(claims).ok()?;
    match v.get(claim)? {
        serde_json::Value::String(s) if !s.is_empty() && !s.contains('\0') => Some(s.clone()),
        // Integers only: a float (1.0, or an integer past 2^64 that serde
        // reads as one) has no exact text, and two ids could meet in it.
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// `flux.tenant` when set and not empty; else the claim named by
/// `flux.jwt_tenant_claim` in `request.jwt.claims`; else None.
pub fn current_tenant() -> Option<String> {
    from_setting_or_claim(&gucs::TENANT, &gucs::JWT_TENANT_CLAIM, "tenant_id")
}

/// The setting when set and not empty; else the claim the claim setting
/// names (default `default_claim`) in `request.jwt.claims`; else None.
fn from_setting_or_claim(
    setting_of: &gucs::StringSetting,
    claim_setting: &gucs::StringSetting,
    default_claim: &str,
) -> Option<String> {
    if let Some(v) = gucs::string_setting(setting_of) {
        return Some(v);
    }
    let claims = setting("request.jwt.claims").filter(|s| !s.trim().is_empty())?;
    let claim = gucs::string_setting(claim_setting).unwrap_or_else(|| default_claim.into());
    id_from_claims(&claims, &claim)
}

/// The current tenant: flux.tenant, else the PostgREST JWT claim, else NULL.
#[pg_extern(stable, parallel_safe)]
fn flux_current_tenant() -> Option<String> {
    current_tenant()
}

/// `flux.subject` when set and not empty; else the claim named by
/// `flux.jwt_subject_claim` (default `sub`) in `request.jwt.claims`; else
/// None. The same reading rules as the tenant's claim.
pub fn current_subject() -> Option<String> {
    from_setting_or_claim(&gucs::SUBJECT, &gucs::JWT_SUBJECT_CLAIM, "sub")
}

/// The current subject: flux.subject, else the JWT claim, else NULL.
#[pg_extern(stable, parallel_safe)]
fn flux_current_subject() -> Option<String> {
    current_subject()
}

#[cfg(test)]
mod tests {
    use super::id_from_claims;

    #[test]
    fn claims() {
        assert_eq!(
            id_from_claims(r#"{"tenant_id":"acme"}"#, "tenant_id").as_deref(),
            Some("acme")
        );
        assert_eq!(
            id_from_claims(r#"{"org":42}"#, "org").as_deref(),
            Some("42")
        );
        assert_eq!(id_from_claims(r#"{"tenant_id":""}"#, "tenant_id"), None);
        assert_eq!(
            id_from_claims(r#"{"tenant_id":{"a":1}}"#, "tenant_id"),
            None
        );
        assert_eq!(id_from_claims("not json", "tenant_id"), None);
        assert_eq!(id_from_claims("[1,2]", "tenant_id"), None);
        assert_eq!(
            id_from_claims(r#"{"tenant_id":"acme\u0000x"}"#, "tenant_id"),
            None
        );
        assert_eq!(id_from_claims(r#"{"org":1.0}"#, "org"), None);
        assert_eq!(
            id_from_claims(r#"{"org":18446744073709551616}"#, "org"),
            None
        );
    }
}

// ---- API keys ---------------------------------------------------------------
//
// A key is `flux_<id>_<secret>`: `id` is 12 hex digits (public, the primary
// key of flux.api_keys), `secret` 64 hex digits (256 bits from
// pg_strong_random). Only SHA-256(secret) is stored; the key is shown once.

use crate::error::{FluxError, FluxResult, OrRaise};
use crate::model::{KeyFacts, KeyLimit};
use crate::validate::{need, require_tenant};
use pgrx::datum::TimestampWithTimeZone;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

fn random_hex(bytes: usize) -> FluxResult<String> {
    let mut buf = vec![0u8; bytes];
    // SAFETY: fills exactly buf.len() bytes of a buffer we own.
    let ok = unsafe { pg_sys::pg_strong_random(buf.as_mut_ptr().cast(), buf.len()) };
    if !ok {
        return Err(FluxError::Internal(
            "pg_strong_random failed: no strong random source".into(),
        ));
    }
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Equal in time independent of where the inputs differ (subtle's).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// Split `flux_<id>_<secret>`; None when it does not have that shape.
pub fn parse_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("flux_")?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 12) && hex(secret, 64)).then_some((id, secret))
}

fn unauthorized() -> FluxError {
    FluxError::Unauthorized("invalid API key".into())
}

/// Create an API key for a tenant; returns the key, shown this once.
/// `scopes`: the features it may use (NULL: every feature).
/// (The `_v2` symbol: 0.1.0's script declares `flux_create_api_key`
/// without scopes, and must keep working until ALTER EXTENSION UPDATE.)
#[pg_extern(name = "flux_create_api_key", volatile, parallel_unsafe)]
fn flux_create_api_key_v2(
    tenant: Option<&str>,
    name: Option<&str>,
    expires_at: default!(Option<TimestampWithTimeZone>, "NULL"),
    scopes: default!(Option<Vec<Option<String>>>, "NULL"),
) -> String {
    create_key(tenant, name, expires_at, Some(scopes)).or_raise()
}

/// 0.1.0's flux_create_api_key (no scopes), for its install script: its
/// schema has no scopes column to write.
#[pg_extern(sql = false, volatile, parallel_unsafe)]
fn flux_create_api_key(
    tenant: Option<&str>,
    name: Option<&str>,
    expires_at: Option<TimestampWithTimeZone>,
) -> String {
    create_key(tenant, name, expires_at, None).or_raise()
}

/// A new key's row; `scopes` None: a 0.1.0 schema (no scopes column).
fn create_key(
    tenant: Option<&str>,
    name: Option<&str>,
    expires_at: Option<TimestampWithTimeZone>,
    scopes: Option<Option<Vec<Option<String>>>>,
) -> FluxResult<String> {
    let tenant = need(tenant, "tenant")?;
    let name = need(name, "name")?;
    crate::validate::check_key("API key name", name)?;
    require_tenant(tenant)?;
    let id = random_hex(6)?;
    let secret = random_hex(32)?;
    let mut args = vec![
        id.as_str().into(),
        tenant.into(),
        name.into(),
        hash(&secret).into(),
        expires_at.into(),
    ];
    let sql = match scopes {
        Some(scopes) => {
            args.push(scopes.into());
            "INSERT INTO flux.api_keys (id, tenant, name, secret_hash, expires_at, scopes) \
             VALUES ($1, $2, $3, $4, $5, $6)"
        }
        None => {
            "INSERT INTO flux.api_keys (id, tenant, name, secret_hash, expires_at) \
             VALUES ($1, $2, $3, $4, $5)"
        }
    };
    crate::store::exec(sql, &args)?;
    Ok(format!("flux_{id}_{secret}"))
}

/// Check an API key; on success set flux.tenant for the current transaction
/// and return the tenant. Unknown, revoked and expired keys all raise the
/// same 28000 error, so a caller learns nothing about which.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_authenticate(api_key: Option<&str>) -> String {
    (|| -> FluxResult<String> {
        let key = api_key.ok_or_else(unauthorized)?;
        let (id, secret) = parse_key(key).ok_or_else(unauthorized)?;
        let now = gucs::clock()?;
        let row = {
            let _owner = crate::privilege::AsOwner::enter()?;
            Spi::connect(|c| {
                // Whether the schema is 0.2's (keys have scopes and
                // allowances): a 0.1.0 one, served until ALTER EXTENSION
                // UPDATE, makes no key current.
                let t = c.select(
                    "SELECT tenant, secret_hash, expires_at, revoked_at, \
                            pg_catalog.to_regclass('flux.key_limits') IS NOT NULL \
                       FROM flux.api_keys WHERE id OPERATOR(pg_catalog.=) $1",
                    Some(1),
                    &[id.into()],
                )?;
                if t.is_empty() {
                    return Ok::<_, FluxError>(None);
                }
                let t = t.first();
                Ok(Some((
                    t.get::<String>(1)?,
                    t.get::<Vec<u8>>(2)?,
                    t.get::<TimestampWithTimeZone>(3)?.map(|x| x.into_inner()),
                    t.get::<TimestampWithTimeZone>(4)?.map(|x| x.into_inner()),
                    t.get::<bool>(5)?.unwrap_or(false),
                )))
            })?
        };
        // Hash even when the id is unknown, so timing does not tell.
        let presented = hash(secret);
        let Some((Some(tenant), Some(stored), expires, revoked, callers)) = row else {
            let _ = constant_time_eq(&presented, &[0u8; 32]);
            return Err(unauthorized());
        };
        let valid = constant_time_eq(&presented, &stored)
            & revoked.is_none_or(|r| now < r)
            & expires.is_none_or(|e| now < e);
        if !valid {
            return Err(unauthorized());
        }
        set_local("flux.tenant", &tenant)?;
        // The key is current for the transaction: a superuser-only setting
        // (a caller cannot move or drop it), set here as by SET LOCAL.
        if callers {
            set_local_as("flux.api_key", id, pg_sys::GucContext::PGC_SUSET)?;
        }
        Ok(tenant)
    })()
    .or_raise()
}

/// SET LOCAL name = value, for the current transaction.
pub fn set_local(name: &str, value: &str) -> FluxResult<()> {
    set_local_as(name, value, pg_sys::GucContext::PGC_USERSET)
}

/// SET LOCAL in the given context (PGC_SUSET: as a superuser would).
fn set_local_as(name: &str, value: &str, context: pg_sys::GucContext::Type) -> FluxResult<()> {
    let name = CString::new(name).map_err(|_| FluxError::Internal("setting name".into()))?;
    let value = CString::new(value).map_err(|_| FluxError::Internal("setting value".into()))?;
    // SAFETY: both strings are NUL-terminated and outlive the call; errors
    // are raised by PostgreSQL (elevel ERROR).
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            context,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            pg_sys::PGERROR as i32,
            false,
        );
    }
    Ok(())
}

thread_local! {
    /// The facts of the current key, read once per key and transaction
    /// (tagged with the local transaction: a worker or the next
    /// transaction reads them again).
    static CURRENT_KEY: std::cell::RefCell<Option<(u32, std::rc::Rc<KeyFacts>)>> =
        const { std::cell::RefCell::new(None) };
}

/// The API key current in this transaction (flux.api_key, set by
/// flux_authenticate), with its scopes and allowances; None without one.
pub fn current_key() -> FluxResult<Option<std::rc::Rc<KeyFacts>>> {
    let Some(id) = gucs::api_key_bytes() else {
        return Ok(None);
    };
    let xact = crate::pgver::local_transaction();
    let kept = CURRENT_KEY.with(|k| {
        k.borrow()
            .as_ref()
            .filter(|(x, f)| *x == xact && f.id.as_bytes() == id)
            .map(|(_, f)| f.clone())
    });
    if kept.is_some() {
        return Ok(kept);
    }
    let id = String::from_utf8_lossy(id).into_owned();
    let facts = load_key(&id)?.map(std::rc::Rc::new);
    if let Some(f) = &facts {
        CURRENT_KEY.with(|k| *k.borrow_mut() = Some((xact, f.clone())));
    }
    Ok(facts)
}

/// The key `id`'s facts (a hold's key, when it is settled in a session
/// with another key or none).
pub fn key_facts(id: &str) -> FluxResult<Option<std::rc::Rc<KeyFacts>>> {
    Ok(load_key(id)?.map(std::rc::Rc::new))
}

/// A key's name, tenant, scopes and allowances, as the tables' owner.
fn load_key(id: &str) -> FluxResult<Option<KeyFacts>> {
    let _owner = crate::privilege::AsOwner::enter()?;
    Spi::connect(|c| {
        let t = c.select(
            "SELECT tenant, name, scopes FROM flux.api_keys WHERE id OPERATOR(pg_catalog.=) $1",
            Some(1),
            &[id.into()],
        )?;
        if t.is_empty() {
            return Ok::<_, FluxError>(None);
        }
        let t = t.first();
        let (Some(tenant), Some(name)) = (t.get::<String>(1)?, t.get::<String>(2)?) else {
            return Ok(None);
        };
        let scopes = t
            .get::<Vec<Option<String>>>(3)?
            .map(|v| v.into_iter().flatten().collect());
        let mut limits = Vec::new();
        for r in c.select(
            "SELECT feature, \"limit\", period FROM flux.key_limits \
             WHERE key_id OPERATOR(pg_catalog.=) $1",
            None,
            &[id.into()],
        )? {
            if let (Some(feature), Some(limit)) = (r.get::<String>(1)?, r.get::<i64>(2)?) {
                limits.push(KeyLimit {
                    feature,
                    limit,
                    period: r.get::<String>(3)?,
                });
            }
        }
        Ok(Some(KeyFacts {
            id: id.to_string(),
            tenant,
            name,
            scopes,
            limits,
        }))
    })
}

/// The id of the API key current in this transaction (flux_authenticate).
#[pg_extern(stable, parallel_safe)]
fn flux_current_api_key() -> Option<String> {
    gucs::api_key_bytes().map(|b| String::from_utf8_lossy(b).into_owned())
}

/// Revoke the API key whose flux.api_keys.id is `id`, from the clock on.
#[pg_extern(volatile, parallel_unsafe)]
fn flux_revoke_api_key(id: Option<&str>) {
    (|| -> FluxResult<()> {
        let id = need(id, "id")?;
        let found = crate::store::one_mut::<i32>(
            "UPDATE flux.api_keys SET revoked_at = COALESCE(revoked_at, flux._clock()) \
             WHERE id OPERATOR(pg_catalog.=) $1 RETURNING 1",
            &[id.into()],
        )?
        .is_some();
        if !found {
            return Err(FluxError::UnknownReference(format!(
                "no API key with id {}",
                crate::error::shown(id)
            )));
        }
        Ok(())
    })()
    .or_raise()
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn key_shape_and_comparison() {
        let id = "0123456789ab";
        let secret = "f".repeat(64);
        let key = format!("flux_{id}_{secret}");
        assert_eq!(parse_key(&key), Some((id, secret.as_str())));
        assert_eq!(parse_key("flux_xyz_abc"), None);
        assert_eq!(parse_key(""), None);
        assert_eq!(parse_key(&format!("flux_{id}_{}", "f".repeat(63))), None);
        assert!(constant_time_eq(&hash("a"), &hash("a")));
        assert!(!constant_time_eq(&hash("a"), &hash("b")));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert_eq!(hash("abc").len(), 32);
    }
}
