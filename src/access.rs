//! Who may act for a tenant.
//!
//! A function that takes a tenant argument answers or writes for it only
//! when it is the caller's current tenant (`flux_current_tenant()`), or the
//! caller has the privileges of `flux_service` (trusted application
//! backends) or `flux_admin` (superusers have every role's). Otherwise any
//! PostgREST client could burn another tenant's quota or read its plan with
//! one RPC call.
//!
//! The hot path pays one `GetUserId()` and a compare: the answer for the
//! current role is kept until pg_auth_members or pg_authid changes (a
//! syscache callback forgets it, so a REVOKE is seen by every session's next
//! transaction).

use crate::error::{shown, FluxError, FluxResult};
use crate::gucs;
use pgrx::pg_sys;
use std::sync::atomic::{AtomicU64, Ordering};

/// (role, whether it has flux_service's or flux_admin's privileges), packed:
/// the role's OID in the low 32 bits (0: not looked up), the answer in bit
/// 32. A plain static, not a thread-local: flux_check's entry reads it on
/// every row, and a thread-local in a shared library is a call to
/// __tls_get_addr (a backend has one thread).
static TRUSTED: AtomicU64 = AtomicU64::new(0);

fn trusted_get() -> (pg_sys::Oid, bool) {
    let v = TRUSTED.load(Ordering::Relaxed);
    (pg_sys::Oid::from(v as u32), v >> 32 != 0)
}

fn trusted_set(role: pg_sys::Oid, yes: bool) {
    TRUSTED.store(
        u64::from(u32::from(role)) | u64::from(yes) << 32,
        Ordering::Relaxed,
    );
}

/// # Safety
/// Called by PostgreSQL's invalidation machinery; touches only a thread-local cell.
unsafe extern "C-unwind" fn on_roles_invalidate(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    trusted_set(pg_sys::InvalidOid, false);
}

pub fn init() {
    // SAFETY: registers a plain function once per backend, from _PG_init.
    unsafe {
        for cache in [
            pg_sys::SysCacheIdentifier::AUTHMEMROLEMEM,
            pg_sys::SysCacheIdentifier::AUTHOID,
        ] {
            pg_sys::CacheRegisterSyscacheCallback(
                cache as i32,
                Some(on_roles_invalidate),
                pg_sys::Datum::from(0),
            );
        }
    }
}

/// The current role, without a call that could raise.
fn current_role() -> pg_sys::Oid {
    // SAFETY: GetUserId reads backend-local state (it only asserts).
    unsafe { pg_sys::GetUserId() }
}

/// Whether the current role may act for any tenant (syscache lookups on a
/// miss, then kept).
fn trusted() -> bool {
    let uid = current_role();
    let (known, yes) = trusted_get();
    if known == uid {
        return yes;
    }
    // SAFETY: role lookups by name and membership checks through the
    // syscache, inside a transaction; missing roles are not an error.
    let yes = unsafe {
        [c"flux_service", c"flux_admin"].iter().any(|name| {
            let role = pg_sys::get_role_oid(name.as_ptr(), true);
            role != pg_sys::InvalidOid && pg_sys::has_privs_of_role(uid, role)
        })
    };
    trusted_set(uid, yes);
    yes
}

/// For flux_check's hand-written entry: Some(answer) when it is known
/// without calling into PostgreSQL (a trusted role already looked up, or
/// flux.tenant set), None when the full path must decide.
#[inline]
pub fn may_act_for_fast(tenant: &[u8]) -> Option<bool> {
    let (known, yes) = trusted_get();
    if known != current_role() {
        // Not looked up for this role yet (a new backend, a parallel
        // worker, a role change): the full path asks.
        return None;
    }
    if yes {
        return Some(true);
    }
    gucs::tenant_bytes().map(|current| current == tenant)
}

/// Whether the caller may act for any tenant (flux_service, flux_admin).
pub fn trusted_caller() -> bool {
    trusted()
}

/// Whether the caller may act for `tenant`.
pub fn may_act_for(tenant: &str) -> bool {
    trusted() || crate::identity::current_tenant().as_deref() == Some(tenant)
}

/// Refuse with 42501 when the caller may not act for `tenant`.
pub fn require_act_for(function: &str, tenant: &str) -> FluxResult<()> {
    if may_act_for(tenant) {
        return Ok(());
    }
    let current = match crate::identity::current_tenant() {
        Some(t) => format!("its current tenant is {}", shown(&t)),
        None => "it has no current tenant".to_string(),
    };
    Err(FluxError::Forbidden(format!(
        "{function}: role {} may not act for tenant {}: {current} (flux.tenant, flux_authenticate() or the JWT claim); \
         a trusted backend acting for any tenant needs GRANT flux_service TO {}",
        crate::privilege::role_name(current_role()),
        shown(tenant),
        crate::privilege::role_name(current_role()),
    )))
}
