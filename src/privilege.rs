//! Running flux's SQL safely, and table access as the flux tables' owner.
//!
//! Decisions, usage and API keys must work for any role, including roles
//! with no grant on the `flux` tables (an application role, a PostgREST
//! `authenticated` role), while those roles must not be able to write the
//! tables or read key hashes themselves. So the few places that touch the
//! tables switch the user id to the owner of schema `flux` for the duration,
//! as SECURITY DEFINER would, but without its per-call settings save and
//! restore, and only around cache loads, usage probes and writes: the cached
//! decision path never switches.
//!
//! # Why nothing a caller creates runs with the owner's rights
//!
//! A name in SQL (a function, an operator, a cast's target type, a domain,
//! a table) is resolved through `search_path` when the statement is parsed,
//! and what it resolves to runs with the rights of whoever runs the
//! statement. Running a caller's resolution of `now()` or `=` as the owner
//! handed the owner's rights to whatever the caller put first in its path
//! (`app_s.now()`) or in `pg_temp` (a domain `pg_temp.text`). Three layers
//! close that class, not one case at a time:
//! 1. The owner is `flux_owner`, a NOLOGIN role that is not a superuser and
//!    that nobody is a member of (created by the install script, which also
//!    gives it the schema, tables, sequences and functions). Should schema
//!    flux still be owned by a superuser (a new library on a database not yet
//!    updated with ALTER EXTENSION UPDATE), flux warns once per backend;
//!    layers 2 and 3 still hold.
//! 2. Every switch pins `search_path` to `pg_catalog, pg_temp` (`Pinned`),
//!    as does every SQL text flux runs as the caller (`store::exec` and
//!    friends); flux_consume's switch (`AsOwnerUnpinned`) does not, and
//!    each SQL text under it pins for itself: with `pg_catalog` first no user object can shadow a built-in
//!    one, and `pg_temp` last is never searched for functions or operators.
//!    The caller's path comes back when the guard drops, or when the
//!    (sub)transaction aborts (PostgreSQL pops the GUC nest level and the
//!    user id itself).
//! 3. The SQL texts qualify every function, operator (`OPERATOR(pg_catalog.=)`),
//!    cast and type anyway (checked by tests/integration/test_sql_qualified.py),
//!    so a text that some day runs without the pin stays safe.
//!
//! Object names in the texts are `flux.`-qualified tables and catalogs
//! looked up by OID; application tables come in as `regclass` and are
//! printed qualified.

use crate::error::{FluxError, FluxResult};
use pgrx::pg_sys;

/// The only search_path flux's SQL runs under.
const PINNED_PATH: &std::ffi::CStr = c"pg_catalog, pg_temp";

/// While alive, `search_path` is `pg_catalog, pg_temp`; the previous value
/// comes back on drop (or with the abort of the (sub)transaction on error).
pub struct Pinned {
    /// The GUC nest level to pop, None when the path was already pinned by
    /// an outer guard (or by a function's own SET clause).
    level: Option<i32>,
}

impl Pinned {
    pub fn enter() -> Self {
        // SAFETY: namespace_search_path is the GUC's current string (never
        // NULL once GUCs are initialised); compared, not kept.
        let already = unsafe {
            let cur = pg_sys::namespace_search_path;
            !cur.is_null() && std::ffi::CStr::from_ptr(cur) == PINNED_PATH
        };
        if already {
            return Pinned { level: None };
        }
        // SAFETY: as fmgr_security_definer does for a function's SET clause:
        // a new nest level, the value saved in it, popped in drop. A valid
        // literal path cannot fail to parse; elevel ERROR would raise
        // through pgrx's guard.
        let level = unsafe {
            let level = pg_sys::NewGUCNestLevel();
            pg_sys::set_config_option(
                c"search_path".as_ptr(),
                PINNED_PATH.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                pg_sys::PGERROR as i32,
                false,
            );
            level
        };
        Pinned { level: Some(level) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // While an error unwinds, the aborting (sub)transaction pops the nest
        // level itself: no call into PostgreSQL then.
        if std::thread::panicking() {
            return;
        }
        if let Some(level) = self.level {
            // SAFETY: pops the level pushed in enter(), restoring the
            // caller's search_path (as a function's SET clause does on exit).
            unsafe { pg_sys::AtEOXact_GUC(true, level) };
        }
    }
}

/// The owner of schema `flux` when it may be switched to (not a
/// superuser), kept until pg_namespace or pg_authid changes.
#[derive(Clone, Copy)]
enum Owner {
    Unknown,
    Usable(pg_sys::Oid),
    Superuser(pg_sys::Oid),
}

thread_local! {
    /// The two syscache lookups by name were a fiftieth of flux_consume.
    static OWNER: std::cell::Cell<Owner> = const { std::cell::Cell::new(Owner::Unknown) };
    static WARNED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The syscache callback for pg_namespace and pg_authid: a change to a
/// schema or a role (an owner, a name, rolsuper), or a cache reset, forgets
/// the owner. It runs where the syscache itself would see the change.
///
/// # Safety
/// Called by PostgreSQL's invalidation machinery; touches only a thread-local cell.
unsafe extern "C-unwind" fn on_owner_invalidate(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    OWNER.set(Owner::Unknown);
}

pub fn init() {
    // SAFETY: registers a plain function once per backend, from _PG_init.
    unsafe {
        for cache in [
            pg_sys::SysCacheIdentifier::NAMESPACEOID,
            pg_sys::SysCacheIdentifier::AUTHOID,
        ] {
            pg_sys::CacheRegisterSyscacheCallback(
                cache as i32,
                Some(on_owner_invalidate),
                pg_sys::Datum::from(0),
            )
        }
    };
}

/// The owner of schema `flux`, from the syscache (no SPI).
fn flux_owner() -> FluxResult<pg_sys::Oid> {
    let owner = match OWNER.get() {
        Owner::Unknown => {
            // SAFETY: syscache lookups inside a transaction; only plain
            // values are copied out of the rows.
            let found = unsafe {
                let ns = pg_sys::get_namespace_oid(c"flux".as_ptr(), true);
                if ns == pg_sys::InvalidOid {
                    None
                } else {
                    crate::backend::syscache_row(
                        pg_sys::SysCacheIdentifier::NAMESPACEOID,
                        pg_sys::Datum::from(ns),
                        |form: &pg_sys::FormData_pg_namespace| form.nspowner,
                    )
                }
            };
            let Some(oid) = found else {
                return Err(FluxError::Internal(
                    "schema flux is missing: is the extension installed in this database?".into(),
                ));
            };
            // SAFETY: a syscache lookup of the role's rolsuper.
            let owner = if unsafe { pg_sys::superuser_arg(oid) } {
                Owner::Superuser(oid)
            } else {
                Owner::Usable(oid)
            };
            OWNER.set(owner);
            owner
        }
        known => known,
    };
    match owner {
        Owner::Usable(oid) => Ok(oid),
        Owner::Superuser(oid) => {
            // A 0.1.0 database on this library, before ALTER EXTENSION
            // UPDATE. Refusing would stop every application at the binary
            // upgrade; the pinned path and qualified SQL keep the caller's
            // objects out, so it runs, and says once per backend what to do.
            if !WARNED.replace(true) {
                pgrx::warning!(
                    "schema flux is owned by the superuser {}: run ALTER EXTENSION flux_entitlements UPDATE \
                     so that flux runs as the role flux_owner",
                    role_name(oid)
                );
            }
            Ok(oid)
        }
        Owner::Unknown => unreachable!("set above"),
    }
}

/// A role's name, or its OID when it has none.
pub fn role_name(oid: pg_sys::Oid) -> String {
    // SAFETY: GetUserNameFromId with noerr = true returns NULL rather than
    // raising for a dropped role; the name is copied at once.
    unsafe {
        let name = pg_sys::GetUserNameFromId(oid, true);
        if name.is_null() {
            format!("(role {})", u32::from(oid))
        } else {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        }
    }
}

/// The user id switched to `role` (with extra security-context flags)
/// until drop; PostgreSQL restores it too if the transaction aborts.
struct Switched {
    uid: pg_sys::Oid,
    ctx: i32,
    caller: Option<pg_sys::Oid>,
}

thread_local! {
    /// The role that called, while flux acts as the owner (see `caller`).
    static CALLER: std::cell::Cell<Option<pg_sys::Oid>> = const { std::cell::Cell::new(None) };
}

/// The role that made a change: the current user, or, while flux writes as
/// the tables' owner on a caller's behalf (flux_add_credits, Stripe
/// events), the role that called it (the audit log names it).
pub fn caller() -> pg_sys::Oid {
    // SAFETY: GetUserId reads backend-local state.
    CALLER
        .get()
        .unwrap_or_else(|| unsafe { pg_sys::GetUserId() })
}

impl Switched {
    fn to(role: pg_sys::Oid, flags: u32) -> Self {
        let (mut uid, mut ctx) = (pg_sys::InvalidOid, 0);
        // SAFETY: reads and writes backend-local identity state; the
        // SECURITY_LOCAL_USERID_CHANGE flag keeps SET ROLE from undoing it.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut uid, &mut ctx);
            pg_sys::SetUserIdAndSecContext(
                role,
                ctx | (pg_sys::SECURITY_LOCAL_USERID_CHANGE | flags) as i32,
            );
        }
        let caller = CALLER.get();
        if caller.is_none() {
            CALLER.set(Some(uid));
        }
        Switched { uid, ctx, caller }
    }
}

impl Drop for Switched {
    fn drop(&mut self) {
        CALLER.set(self.caller);
        // SAFETY: restores the identity saved in to() (a plain store that
        // cannot raise, so it is also safe while an error unwinds).
        unsafe { pg_sys::SetUserIdAndSecContext(self.uid, self.ctx) }
    }
}

/// While alive, the current user is the owner of the flux tables and
/// search_path is pinned. Restored on drop, and by PostgreSQL itself if the
/// transaction aborts.
pub struct AsOwner {
    // Fields drop in order: the user id comes back, then the path.
    _user: Switched,
    _path: Pinned,
}

impl AsOwner {
    pub fn enter() -> FluxResult<Self> {
        let owner = flux_owner()?;
        let path = Pinned::enter();
        Ok(AsOwner {
            _user: Switched::to(owner, 0),
            _path: path,
        })
    }
}

/// The owner's user id without the pin, for flux_consume: its common path
/// runs no SQL (the cache and the counter row are read and written from
/// Rust, names looked up in schema flux by OID), and pinning a GUC nest
/// level on each call was 7% of it (9,000 instructions). Every SQL it may
/// run pins the path itself: `store`'s helpers, `AsOwner` in the cache's
/// and usage probes' SQL paths, `Pinned` in usage/sql.rs's SQL fallbacks.
pub struct AsOwnerUnpinned {
    _user: Switched,
}

impl AsOwnerUnpinned {
    pub fn enter() -> FluxResult<Self> {
        Ok(AsOwnerUnpinned {
            _user: Switched::to(flux_owner()?, 0),
        })
    }
}

/// Whether relation `relid` is in schema flux (the tables flux's trigger
/// functions belong to).
pub fn in_flux_schema(relid: pg_sys::Oid) -> bool {
    // SAFETY: syscache lookups inside a transaction.
    unsafe {
        let flux = pg_sys::get_namespace_oid(c"flux".as_ptr(), true);
        flux != pg_sys::InvalidOid && pg_sys::get_rel_namespace(relid) == flux
    }
}

/// While alive, the current user is the owner of an application table, as
/// PostgreSQL's foreign-key checks run: row security is not applied (even
/// when forced), the operation is restricted (no SET ROLE, no temporary
/// objects), and search_path is pinned. flux_enforce_limit counts a
/// tenant's rows this way, so rows the inserting role cannot see still
/// count against the limit.
pub struct AsTableOwner {
    _user: Switched,
    _path: Pinned,
}

impl AsTableOwner {
    pub fn enter(relid: pg_sys::Oid) -> FluxResult<Self> {
        // SAFETY: a syscache lookup of the relation's owner.
        let owner = unsafe {
            crate::backend::syscache_row(
                pg_sys::SysCacheIdentifier::RELOID,
                pg_sys::Datum::from(relid),
                |form: &pg_sys::FormData_pg_class| form.relowner,
            )
        }
        .ok_or_else(|| FluxError::Internal(format!("no relation with OID {}", u32::from(relid))))?;
        let path = Pinned::enter();
        // As ri_triggers.c runs a foreign key's check.
        Ok(AsTableOwner {
            _user: Switched::to(
                owner,
                pg_sys::SECURITY_RESTRICTED_OPERATION | pg_sys::SECURITY_NOFORCE_RLS,
            ),
            _path: path,
        })
    }
}
