//! Reading and writing the flux tables as their owner.
//!
//! Decisions, usage and API keys must work for any role, including roles
//! with no grant on the `flux` tables (an application role, a PostgREST
//! `authenticated` role), while those roles must not be able to write the
//! tables or read key hashes themselves. So the few places that touch the
//! tables switch the user id to the owner of schema `flux` (the extension's
//! owner) for the duration, as SECURITY DEFINER would, but without its
//! per-call settings save and restore, and only around cache loads, usage
//! probes and writes: the cached decision path never switches.

use crate::error::{FluxError, FluxResult};
use pgrx::pg_sys;

thread_local! {
    /// The owner of schema `flux`, kept until pg_namespace changes (the two
    /// syscache lookups by name were a fiftieth of flux_consume).
    static OWNER: std::cell::Cell<Option<pg_sys::Oid>> = const { std::cell::Cell::new(None) };
}

/// The syscache callback for pg_namespace: any change to a schema (an
/// owner, a name, a drop), or a cache reset, forgets the owner. It runs
/// where the syscache itself would see the change.
///
/// # Safety
/// Called by PostgreSQL's invalidation machinery; touches only a thread-local cell.
unsafe extern "C-unwind" fn on_namespace_invalidate(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    OWNER.set(None);
}

pub fn init() {
    // SAFETY: registers a plain function once per backend, from _PG_init.
    unsafe {
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
            Some(on_namespace_invalidate),
            pg_sys::Datum::from(0),
        )
    };
}

/// The owner of schema `flux`, from the syscache (no SPI).
fn flux_owner() -> Option<pg_sys::Oid> {
    if let Some(owner) = OWNER.get() {
        return Some(owner);
    }
    // SAFETY: syscache lookups inside a transaction; only a plain Oid is
    // copied out of the row.
    let owner = unsafe {
        let ns = pg_sys::get_namespace_oid(c"flux".as_ptr(), true);
        if ns == pg_sys::InvalidOid {
            return None;
        }
        crate::backend::syscache_row(
            pg_sys::SysCacheIdentifier::NAMESPACEOID,
            pg_sys::Datum::from(ns),
            |form: &pg_sys::FormData_pg_namespace| form.nspowner,
        )
    };
    OWNER.set(owner);
    owner
}

/// While alive, the current user is the owner of the flux tables. Restored
/// on drop, and by PostgreSQL itself if the transaction aborts.
pub struct AsOwner {
    uid: pg_sys::Oid,
    ctx: i32,
}

impl AsOwner {
    pub fn enter() -> FluxResult<Self> {
        let owner = flux_owner().ok_or_else(|| {
            FluxError::Internal(
                "schema flux is missing: is the extension installed in this database?".into(),
            )
        })?;
        let (mut uid, mut ctx) = (pg_sys::InvalidOid, 0);
        // SAFETY: reads and writes backend-local identity state; the
        // SECURITY_LOCAL_USERID_CHANGE flag keeps SET ROLE from undoing it.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut uid, &mut ctx);
            pg_sys::SetUserIdAndSecContext(
                owner,
                ctx | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
            );
        }
        Ok(AsOwner { uid, ctx })
    }
}

impl Drop for AsOwner {
    fn drop(&mut self) {
        // SAFETY: restores the identity saved in enter().
        unsafe { pg_sys::SetUserIdAndSecContext(self.uid, self.ctx) }
    }
}
