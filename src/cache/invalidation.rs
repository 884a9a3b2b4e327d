//! Invalidation: the triggers that announce a change, the messages they
//! send, and the callback that receives them, side by side (as pg_cron's
//! job_metadata.c keeps them).
//!
//! Every message is a relcache invalidation, so PostgreSQL carries it with
//! the transaction: delivered to this backend at the end of the command
//! (its next statement sees its own change), to every other backend when
//! the transaction commits (read at the first lookup of their next
//! statement), delivered again locally when it rolls back (so a rolled-back
//! state never stays cached), WAL-logged for physical standbys, and
//! replaced by "everything" (relid 0) when a backend falls too far behind.
//!
//! - A change to the catalogue's tables (features, plans, grants, addons,
//!   addon_grants, flags, flag_lists) names the catalogue's own target
//!   (CATALOGUE_TARGET): every backend reloads the catalogue. DDL on any of
//!   our tables names the table itself (PostgreSQL sends that): a reload,
//!   or every tenant forgotten for a tenant table.
//! - A change to a tenant's rows (tenants, tenant_addons, overrides) names
//!   one of BUCKETS invalidation targets, chosen by a hash of the tenant id:
//!   every backend forgets the tenants of that bucket (a 1,024th of what it
//!   holds) and its remembered answers, and keeps the rest. A target is an
//!   OID in [BUCKET_BASE, BUCKET_BASE + BUCKETS) given to
//!   CacheInvalidateRelcacheByTuple in a pg_class row of our own making:
//!   PostgreSQL's message holds only (database, OID), relcache processing
//!   ignores an OID it has no entry for, and registered callbacks receive
//!   it. Cost: one message per changed tenant per transaction (duplicates
//!   are merged), 12 bytes in the shared queue; should a real relation ever
//!   get one of these OIDs (after 4 billion OIDs), its relcache entry is
//!   rebuilt once per tenant change and our callback forgets a bucket when
//!   it changes: both harmless.
//! - TRUNCATE of a tenant table names the table: every tenant is forgotten.
//!
//! The row triggers are enabled ALWAYS (finalize.sql): a logical
//! replication subscriber's apply worker runs with session_replication_role
//! = replica and fires only those, and it fires no statement-level trigger
//! for INSERT, UPDATE or DELETE, hence row-level ones.

use super::STATE;
use crate::error::FluxError;
use pgrx::prelude::*;

/// How many invalidation targets the tenants are spread over.
pub const BUCKETS: usize = 1024;

/// The OID of bucket 0's target; the others follow. Far from where OIDs
/// are handed out (upwards from 16384, wrapping only after 2^32).
const BUCKET_BASE: u32 = 0xFFFF_F000;

/// The target of a change to a catalogue row. Not the table's own OID: an
/// invalidation of a real table also makes every backend rebuild its
/// relcache entry (reading its constraints' expressions again) and re-plan
/// every cached statement that reads it, on each change.
const CATALOGUE_TARGET: u32 = BUCKET_BASE - 1;

/// The bucket of a tenant id: the top bits of its xxh3 (the low bits place
/// answers in their tables).
#[inline]
pub fn bucket(id: &[u8]) -> usize {
    (xxhash_rust::xxh3::xxh3_64(id) >> (64 - BUCKETS.trailing_zeros())) as usize
}

/// What a relcache invalidation of `relid` means for the cache.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    /// relid 0: the queue overflowed, forget everything.
    Everything,
    /// One of the catalogue's tables.
    Catalogue,
    /// A tenant table as a whole (TRUNCATE).
    AllTenants,
    /// The tenants of one bucket.
    Bucket(usize),
    /// Not ours.
    Other,
}

/// Classify `relid` given the watched tables' OIDs (the catalogue's first,
/// `catalogue` of them, then the tenant tables).
pub fn target(relid: u32, watched: &[u32], catalogue: usize) -> Target {
    if relid == 0 {
        return Target::Everything;
    }
    if relid == CATALOGUE_TARGET {
        return Target::Catalogue;
    }
    if let Some(b) = relid.checked_sub(BUCKET_BASE) {
        if (b as usize) < BUCKETS {
            return Target::Bucket(b as usize);
        }
    }
    match watched.iter().position(|&w| w == relid) {
        Some(i) if i < catalogue => Target::Catalogue,
        Some(_) => Target::AllTenants,
        None => Target::Other,
    }
}

/// The relcache callback (registered in _PG_init): only marks what is
/// stale, no SPI and no catalog access.
///
/// # Safety
/// Called by PostgreSQL's invalidation machinery; touches only thread-local cells.
unsafe extern "C-unwind" fn on_relcache_invalidate(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    STATE.with(|st| {
        match target(
            u32::from(relid),
            &st.watched.get(),
            super::loads::CATALOGUE_TABLES,
        ) {
            Target::Everything | Target::Catalogue => st.stale.set(true),
            Target::AllTenants => st.tenants_stale.set(true),
            Target::Bucket(b) => {
                st.buckets[b].set(st.buckets[b].get().wrapping_add(1));
                // The answers are not kept per tenant: forget them all.
                st.epoch.set(st.epoch.get().wrapping_add(1));
            }
            Target::Other => {}
        }
    });
}

pub fn init() {
    // SAFETY: registers a plain function once per backend, from _PG_init.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache_invalidate), pg_sys::Datum::from(0))
    };
}

/// A pg_class row as CacheInvalidateRelcacheByTuple reads it: a tuple
/// header whose t_hoff points past itself, then the fixed part of the row
/// (it reads oid and relisshared, nothing else).
#[repr(C, align(8))]
struct ClassRow {
    header: [u8; CLASS_HOFF],
    class: pg_sys::FormData_pg_class,
}

/// MAXALIGN(offsetof(HeapTupleHeaderData, t_bits)): a header without nulls.
const CLASS_HOFF: usize = 24;
const _: () = assert!(std::mem::offset_of!(pg_sys::HeapTupleHeaderData, t_bits) <= CLASS_HOFF);

/// Queue the invalidation of the tenants of `id`'s bucket, sent with this
/// transaction (see the module comment).
pub fn send_tenant(id: &[u8]) {
    send(BUCKET_BASE + bucket(id) as u32);
}

/// Queue the invalidation of every backend's catalogue, sent with this
/// transaction.
pub fn send_catalogue() {
    send(CATALOGUE_TARGET);
}

/// Queue a relcache invalidation of `oid`, which need not be a relation.
fn send(oid: u32) {
    // SAFETY: the row is zeroed (a valid pg_class row for the two fields
    // read: relisshared false, the database's own), its header's t_hoff set
    // so GETSTRUCT finds the row; it lives until the call returns, which
    // copies what it needs into the transaction's invalidation list.
    unsafe {
        let mut row: ClassRow = std::mem::zeroed();
        row.class.oid = pg_sys::Oid::from(oid);
        row.class.relisshared = false;
        let header = std::ptr::addr_of_mut!(row).cast::<pg_sys::HeapTupleHeaderData>();
        (*header).t_hoff = CLASS_HOFF as u8;
        let mut tuple = pg_sys::HeapTupleData {
            t_len: std::mem::size_of::<ClassRow>() as u32,
            t_data: header,
            ..Default::default()
        };
        pg_sys::CacheInvalidateRelcacheByTuple(&mut tuple);
    }
}

#[pg_schema]
mod flux {
    use super::*;

    /// The catalogue tables' row-level trigger (the catalogue's target:
    /// every backend reloads the catalogue), and every cached table's
    /// TRUNCATE trigger (a relcache invalidation of the table, which every
    /// backend's cache callback turns into a reload, or into forgetting
    /// every tenant for a tenant table).
    #[pg_trigger]
    fn _cache_invalidate<'a>(
        trigger: &'a pgrx::PgTrigger<'a>,
    ) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
        let relid = trigger.relid()?;
        // Only for the flux tables: it is not PUBLIC, and a trigger function
        // refuses a table that is not its own.
        if !crate::privilege::in_flux_schema(relid) {
            FluxError::Forbidden(format!(
                "flux._cache_invalidate is a trigger of the flux tables, not of {}",
                trigger.table_name()?
            ))
            .raise();
        }
        if matches!(trigger.level(), pgrx::PgTriggerLevel::Row) {
            send(CATALOGUE_TARGET);
        } else {
            // SAFETY: queues an invalidation message for a relation that
            // exists (the trigger fires on it) inside a transaction.
            unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relid) };
            // A catalogue table the cache does not watch by its OID
            // (flux.alerts) is reloaded too.
            send(CATALOGUE_TARGET);
        }
        Ok(None)
    }

    /// The tenant tables' row-level trigger (AFTER INSERT OR UPDATE OR
    /// DELETE, argument: the tenant column): invalidates the bucket of the
    /// old and of the new row's tenant.
    #[pg_trigger]
    fn _tenant_invalidate<'a>(
        trigger: &'a pgrx::PgTrigger<'a>,
    ) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
        let relid = trigger.relid()?;
        let args = trigger.extra_args()?;
        let column = match (crate::privilege::in_flux_schema(relid), args.as_slice()) {
            (true, [column]) => column.clone(),
            _ => FluxError::Forbidden(format!(
                "flux._tenant_invalidate is a trigger of the flux tenant tables, with their tenant column as argument, not of {}",
                trigger.table_name()?
            ))
            .raise(),
        };
        let id_of = |row: Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>| {
            row.and_then(|r| {
                r.get_by_name::<String>(&column).unwrap_or_else(|e| {
                    FluxError::Forbidden(format!("flux._tenant_invalidate: {e}")).raise()
                })
            })
        };
        let old = id_of(trigger.old());
        let new = id_of(trigger.new());
        if let Some(id) = &old {
            send_tenant(id.as_bytes());
        }
        if let Some(id) = new.filter(|n| old.as_ref() != Some(n)) {
            send_tenant(id.as_bytes());
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_the_range_evenly() {
        let mut counts = vec![0u32; BUCKETS];
        for i in 0..200_000 {
            counts[bucket(format!("tenant-{i}").as_bytes())] += 1;
        }
        // 195 a bucket on average.
        assert!(
            counts.iter().all(|&c| (120..280).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn targets() {
        let watched = [100, 101, 102, 200, 201];
        assert_eq!(target(0, &watched, 3), Target::Everything);
        assert_eq!(target(CATALOGUE_TARGET, &watched, 3), Target::Catalogue);
        assert_eq!(target(101, &watched, 3), Target::Catalogue);
        assert_eq!(target(201, &watched, 3), Target::AllTenants);
        assert_eq!(target(BUCKET_BASE, &watched, 3), Target::Bucket(0));
        assert_eq!(
            target(BUCKET_BASE + BUCKETS as u32 - 1, &watched, 3),
            Target::Bucket(BUCKETS - 1)
        );
        assert_eq!(
            target(BUCKET_BASE + BUCKETS as u32, &watched, 3),
            Target::Other
        );
        assert_eq!(target(CATALOGUE_TARGET - 1, &watched, 3), Target::Other);
        assert_eq!(target(16384, &watched, 3), Target::Other);
    }
}
