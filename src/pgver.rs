//! What differs between the PostgreSQL versions this crate builds for (15,
//! 16 and 18), in one place: each difference is a small function with one
//! body per version, side by side, and the rest of the crate calls the
//! function. Supporting another version means adding its bodies here.
//!
//! Only differences live here; what every version does alike is written
//! where it is used. Where a version changed what a call means, not only
//! its arguments, the function returns what the caller needs to know (see
//! `heap_update`), so callers never test a version themselves.

use pgrx::pg_sys;

/// The columns of a tuple descriptor, in order (dropped ones included).
/// 18 keeps a compact copy of each in `compact_attrs` and the full rows
/// after it (`TupleDescAttr`); 15 and 16 keep the rows in `attrs`.
///
/// # Safety
/// `desc` is a valid tuple descriptor.
#[cfg(any(feature = "pg15", feature = "pg16"))]
#[inline]
pub unsafe fn attributes(desc: &pg_sys::TupleDescData) -> &[pg_sys::FormData_pg_attribute] {
    // SAFETY: per the function's contract, `natts` rows follow.
    unsafe { desc.attrs.as_slice(desc.natts as usize) }
}

/// The columns of a tuple descriptor, in order (dropped ones included).
/// 18 keeps a compact copy of each in `compact_attrs` and the full rows
/// after it (`TupleDescAttr`); 15 and 16 keep the rows in `attrs`.
///
/// # Safety
/// `desc` is a valid tuple descriptor.
#[cfg(feature = "pg18")]
#[inline]
pub unsafe fn attributes(desc: &pg_sys::TupleDescData) -> &[pg_sys::FormData_pg_attribute] {
    // SAFETY: per the function's contract; as TupleDescAttr, the
    // FormData_pg_attribute rows start after the `natts` compact ones.
    unsafe {
        let n = desc.natts as usize;
        let rows = desc
            .compact_attrs
            .as_ptr()
            .add(n)
            .cast::<pg_sys::FormData_pg_attribute>();
        std::slice::from_raw_parts(rows, n)
    }
}

/// The table's primary key index, InvalidOid when none. 18 asks whether a
/// deferrable one will do; yes, as 15 and 16 answer it.
///
/// # Safety
/// `rel` is an open relation.
#[cfg(any(feature = "pg15", feature = "pg16"))]
#[inline]
pub unsafe fn primary_key_index(rel: pg_sys::Relation) -> pg_sys::Oid {
    // SAFETY: per the function's contract.
    unsafe { pg_sys::RelationGetPrimaryKeyIndex(rel) }
}

/// The table's primary key index, InvalidOid when none. 18 asks whether a
/// deferrable one will do; yes, as 15 and 16 answer it.
///
/// # Safety
/// `rel` is an open relation.
#[cfg(feature = "pg18")]
#[inline]
pub unsafe fn primary_key_index(rel: pg_sys::Relation) -> pg_sys::Oid {
    // SAFETY: per the function's contract.
    unsafe { pg_sys::RelationGetPrimaryKeyIndex(rel, true) }
}

/// The number of the relation's current file (changed by a rewrite:
/// TRUNCATE, VACUUM FULL, CLUSTER, ALTER TABLE ... TYPE). 16 renamed
/// RelFileNode.relNode to RelFileLocator.relNumber.
///
/// # Safety
/// `rel` is an open relation.
#[cfg(feature = "pg15")]
#[inline]
pub unsafe fn file_number(rel: pg_sys::Relation) -> pg_sys::Oid {
    // SAFETY: per the function's contract.
    unsafe { (*rel).rd_node.relNode }
}

/// The number of the relation's current file (changed by a rewrite:
/// TRUNCATE, VACUUM FULL, CLUSTER, ALTER TABLE ... TYPE). 16 renamed
/// RelFileNode.relNode to RelFileLocator.relNumber.
///
/// # Safety
/// `rel` is an open relation.
#[cfg(any(feature = "pg16", feature = "pg18"))]
#[inline]
pub unsafe fn file_number(rel: pg_sys::Relation) -> pg_sys::Oid {
    // SAFETY: per the function's contract.
    unsafe { (*rel).rd_locator.relNumber }
}

/// index_beginscan without instrumentation (18 takes where to count the
/// searches EXPLAIN ANALYZE shows; none here, as for a catalog scan).
///
/// # Safety
/// As index_beginscan: open relations, a registered snapshot.
#[cfg(any(feature = "pg15", feature = "pg16"))]
#[inline]
pub unsafe fn index_beginscan(
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    snapshot: pg_sys::Snapshot,
    nkeys: i32,
) -> pg_sys::IndexScanDesc {
    // SAFETY: per the function's contract.
    unsafe { pg_sys::index_beginscan(heap, index, snapshot, nkeys, 0) }
}

/// index_beginscan without instrumentation (18 takes where to count the
/// searches EXPLAIN ANALYZE shows; none here, as for a catalog scan).
///
/// # Safety
/// As index_beginscan: open relations, a registered snapshot.
#[cfg(feature = "pg18")]
#[inline]
pub unsafe fn index_beginscan(
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    snapshot: pg_sys::Snapshot,
    nkeys: i32,
) -> pg_sys::IndexScanDesc {
    // SAFETY: per the function's contract.
    unsafe { pg_sys::index_beginscan(heap, index, snapshot, std::ptr::null_mut(), nkeys, 0) }
}

/// Which index entries a new version needs, as the executor decides after
/// an update (ExecUpdateEpilogue, ExecSimpleRelationUpdate).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IndexEntries {
    /// A HOT update that changed no indexed column: none (the chain's
    /// root keeps the index entries).
    None,
    /// A HOT update that changed only columns of summarizing indexes
    /// (BRIN), 16 and later: entries in those only; still HOT.
    Summarizing,
    /// Not HOT (a new chain): entries in every index.
    All,
}

/// heap_update of `tuple` over the version at `otid`, waiting for a
/// concurrent writer, with no crosscheck snapshot; on TM_Ok, `tuple`'s
/// t_self is where the new version is, and which index entries it needs.
///
/// 15 decides HOT only when no indexed column changed, and the executor
/// inserts entries in every index when the version is not heap-only. 16
/// and 18 also update HOT when only summarizing indexes' columns changed,
/// and heap_update says through TU_UpdateIndexes which entries are needed
/// (the test of the heap-only bit alone would skip the BRIN entries).
///
/// # Safety
/// As heap_update: `rel` open with RowExclusiveLock, `tuple` a version of it.
#[cfg(feature = "pg15")]
#[inline]
pub unsafe fn heap_update(
    rel: pg_sys::Relation,
    otid: &mut pg_sys::ItemPointerData,
    tuple: pg_sys::HeapTuple,
    cid: pg_sys::CommandId,
    tmfd: &mut pg_sys::TM_FailureData,
    lockmode: &mut pg_sys::LockTupleMode::Type,
) -> (pg_sys::TM_Result::Type, IndexEntries) {
    // SAFETY: per the function's contract.
    unsafe {
        let r = pg_sys::heap_update(
            rel,
            otid,
            tuple,
            cid,
            std::ptr::null_mut(),
            true,
            tmfd,
            lockmode,
        );
        let entries = if r != pg_sys::TM_Result::TM_Ok
            || pg_sys::submodules::htup::HeapTupleHeaderIsHeapOnly((*tuple).t_data)
        {
            IndexEntries::None
        } else {
            IndexEntries::All
        };
        (r, entries)
    }
}

/// heap_update of `tuple` over the version at `otid`, waiting for a
/// concurrent writer, with no crosscheck snapshot; on TM_Ok, `tuple`'s
/// t_self is where the new version is, and which index entries it needs.
///
/// 15 decides HOT only when no indexed column changed, and the executor
/// inserts entries in every index when the version is not heap-only. 16
/// and 18 also update HOT when only summarizing indexes' columns changed,
/// and heap_update says through TU_UpdateIndexes which entries are needed
/// (the test of the heap-only bit alone would skip the BRIN entries).
///
/// # Safety
/// As heap_update: `rel` open with RowExclusiveLock, `tuple` a version of it.
#[cfg(any(feature = "pg16", feature = "pg18"))]
#[inline]
pub unsafe fn heap_update(
    rel: pg_sys::Relation,
    otid: &mut pg_sys::ItemPointerData,
    tuple: pg_sys::HeapTuple,
    cid: pg_sys::CommandId,
    tmfd: &mut pg_sys::TM_FailureData,
    lockmode: &mut pg_sys::LockTupleMode::Type,
) -> (pg_sys::TM_Result::Type, IndexEntries) {
    use pg_sys::TU_UpdateIndexes;
    // SAFETY: per the function's contract.
    unsafe {
        let mut update_indexes = TU_UpdateIndexes::TU_None;
        let r = pg_sys::heap_update(
            rel,
            otid,
            tuple,
            cid,
            std::ptr::null_mut(),
            true,
            tmfd,
            lockmode,
            &mut update_indexes,
        );
        // As heapam_tuple_update: no entries unless the update was done.
        let entries = if r != pg_sys::TM_Result::TM_Ok {
            IndexEntries::None
        } else if update_indexes == TU_UpdateIndexes::TU_All {
            IndexEntries::All
        } else if update_indexes == TU_UpdateIndexes::TU_Summarizing {
            IndexEntries::Summarizing
        } else {
            IndexEntries::None
        };
        (r, entries)
    }
}

/// ExecInsertIndexTuples for a new version (no ON CONFLICT arbiter, no
/// speculative insertion): into the summarizing indexes only when
/// `only_summarizing` (16 and later; 15 has no summarizing HOT update, so
/// never asks it).
///
/// # Safety
/// As ExecInsertIndexTuples: `rri`'s indices open, `slot` holds the stored
/// version.
#[cfg(feature = "pg15")]
#[inline]
pub unsafe fn insert_index_tuples(
    rri: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
    estate: *mut pg_sys::EState,
    only_summarizing: bool,
) -> *mut pg_sys::List {
    debug_assert!(!only_summarizing);
    let _ = only_summarizing;
    // SAFETY: per the function's contract.
    unsafe {
        pg_sys::ExecInsertIndexTuples(
            rri,
            slot,
            estate,
            false,
            false,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    }
}

/// ExecInsertIndexTuples for a new version (no ON CONFLICT arbiter, no
/// speculative insertion): into the summarizing indexes only when
/// `only_summarizing` (16 and later; 15 has no summarizing HOT update, so
/// never asks it).
///
/// # Safety
/// As ExecInsertIndexTuples: `rri`'s indices open, `slot` holds the stored
/// version.
#[cfg(any(feature = "pg16", feature = "pg18"))]
#[inline]
pub unsafe fn insert_index_tuples(
    rri: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
    estate: *mut pg_sys::EState,
    only_summarizing: bool,
) -> *mut pg_sys::List {
    // SAFETY: per the function's contract.
    unsafe {
        pg_sys::ExecInsertIndexTuples(
            rri,
            slot,
            estate,
            false,
            false,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            only_summarizing,
        )
    }
}

/// Whether the executor computes or checks anything of a generated column
/// on UPDATE: a stored one is computed from the new row (every version);
/// 18's virtual ones are computed when read, but their NOT NULL and CHECK
/// constraints are checked against the new row.
#[cfg(any(feature = "pg15", feature = "pg16"))]
#[inline]
pub fn has_generated(constr: &pg_sys::TupleConstr) -> bool {
    constr.has_generated_stored
}

/// Whether the executor computes or checks anything of a generated column
/// on UPDATE: a stored one is computed from the new row (every version);
/// 18's virtual ones are computed when read, but their NOT NULL and CHECK
/// constraints are checked against the new row.
#[cfg(feature = "pg18")]
#[inline]
pub fn has_generated(constr: &pg_sys::TupleConstr) -> bool {
    constr.has_generated_stored || constr.has_generated_virtual
}

/// Whether the publications of a table allow an UPDATE as
/// CheckCmdReplicaIdentity checks it, beyond the replica identity itself:
/// the row filters' and column lists' columns are in it, and (18) it holds
/// no generated column that is not published.
#[cfg(any(feature = "pg15", feature = "pg16"))]
#[inline]
pub fn publication_allows_update(desc: &pg_sys::PublicationDesc) -> bool {
    desc.rf_valid_for_update && desc.cols_valid_for_update
}

/// Whether the publications of a table allow an UPDATE as
/// CheckCmdReplicaIdentity checks it, beyond the replica identity itself:
/// the row filters' and column lists' columns are in it, and (18) it holds
/// no generated column that is not published.
#[cfg(feature = "pg18")]
#[inline]
pub fn publication_allows_update(desc: &pg_sys::PublicationDesc) -> bool {
    desc.rf_valid_for_update && desc.cols_valid_for_update && desc.gencols_valid_for_update
}

/// This backend's local transaction id: a number no other transaction of
/// this backend has (a per-transaction state is tagged with it). 17 moved
/// it into the PGPROC's virtual transaction id.
#[cfg(any(feature = "pg15", feature = "pg16"))]
pub fn local_transaction() -> u32 {
    // SAFETY: MyProc is this backend's PGPROC, set before any function runs.
    unsafe { (*pg_sys::MyProc).lxid }
}

/// As above, for 18.
#[cfg(feature = "pg18")]
pub fn local_transaction() -> u32 {
    // SAFETY: as above.
    unsafe { (*pg_sys::MyProc).vxid.lxid }
}
