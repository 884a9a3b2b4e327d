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

/// The tenant named by a claim in a JWT claims JSON object. Malformed JSON,
/// a missing claim, or a claim that is not a non-empty string or number
/// gives None: an unreadable identity is no identity.
pub fn tenant_from_claims(claims: &str, claim: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(claims).ok()?;
    match v.get(claim)? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `flux.tenant` when set and not empty; else the claim named by
/// `flux.jwt_tenant_claim` in `request.jwt.claims`; else None.
pub fn current_tenant() -> Option<String> {
    if let Some(t) = gucs::string_setting(&gucs::TENANT) {
        return Some(t);
    }
    let claims = setting("request.jwt.claims").filter(|s| !s.trim().is_empty())?;
    let claim = gucs::string_setting(&gucs::JWT_TENANT_CLAIM).unwrap_or_else(|| "tenant_id".into());
    tenant_from_claims(&claims, &claim)
}

/// The current tenant: flux.tenant, else the PostgREST JWT claim, else NULL.
#[pg_extern(stable, parallel_safe)]
fn flux_current_tenant() -> Option<String> {
    current_tenant()
}

#[cfg(test)]
mod tests {
    use super::tenant_from_claims;

    #[test]
    fn claims() {
        assert_eq!(
            tenant_from_claims(r#"{"tenant_id":"acme"}"#, "tenant_id").as_deref(),
            Some("acme")
        );
        assert_eq!(
            tenant_from_claims(r#"{"org":42}"#, "org").as_deref(),
            Some("42")
        );
        assert_eq!(tenant_from_claims(r#"{"tenant_id":""}"#, "tenant_id"), None);
        assert_eq!(
            tenant_from_claims(r#"{"tenant_id":{"a":1}}"#, "tenant_id"),
            None
        );
        assert_eq!(tenant_from_claims("not json", "tenant_id"), None);
        assert_eq!(tenant_from_claims("[1,2]", "tenant_id"), None);
    }
}
