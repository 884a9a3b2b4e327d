//! The usage counters' rows (`flux.usage`), read and written through the
//! primary key with heap and index access instead of SPI.
//!
//! Why: flux_consume is one SQL statement; running a second one through SPI
//! (planning checks, executor start-up, a fresh snapshot) cost half of the
//! call, so consume ran at 0.44 of a plain `UPDATE` by primary key. A plan
//! kept for the whole backend was also chosen when the table was empty and
//! kept scanning it sequentially as it grew.
//!
//! Each backend remembers where it last found each counter row (the root
//! of the row's chain of versions) and looks there first; what it finds
//! must be visible and carry the key, else the primary key is asked.
//!
//! The write does what `UPDATE ... WHERE used + amount <= limit` does under
//! READ COMMITTED: find the row's current version, check the limit, update
//! it (waiting for a concurrent writer); if that writer committed an update
//! first, lock the latest version (following its update, as EvalPlanQual
//! does), re-check the limit on it and update that. The new version is a HOT
//! update when the page has room, else gets index entries through the
//! executor's own routine (from 16 a HOT update may still need entries in a
//! summarizing index such as BRIN: heap_update says which, see
//! pgver::heap_update); the next command of the transaction sees it. It
//! rolls back with the transaction like any update. When that is not the
//! whole story it says `Fallback` and the caller uses SQL: the row does not
//! exist yet (an insert, with ON CONFLICT), REPEATABLE READ or SERIALIZABLE
//! (which need serialization failures and predicate locks), or someone
//! added a trigger, a CHECK constraint, forced row security, a rule, a
//! generated column (stored; on 18 virtual too, whose NOT NULL and CHECK
//! constraints the executor checks) or a publication's row filter or
//! column list. Version differences are pgver's.
//!
//! Both the read and the write are SQL's as well when flux.usage is not a
//! plain heap table of the expected shape (partitioned, a view, inherited
//! from, another access method, columns moved or retyped) or its key
//! collations are not deterministic (see Opened::open): a `used` column that
//! is not bigint is an error (42804), since the SQL path cannot read it.

use super::rules::fits;
use crate::error::{FluxError, FluxResult};
use crate::pgver;
use pgrx::pg_sys;
use pgrx::IntoDatum;
use std::ffi::CStr;

/// The columns of flux.usage, in order, with their types.
const COLUMNS: [(&str, pg_sys::Oid); 5] = [
    ("tenant", pg_sys::TEXTOID),
    ("feature", pg_sys::TEXTOID),
    ("period_start", pg_sys::TIMESTAMPTZOID),
    ("used", pg_sys::INT8OID),
    ("updated_at", pg_sys::TIMESTAMPTZOID),
];

/// The caller column of flux.caller_usage, after flux.usage's five.
const CALLER_COLUMN: (&str, pg_sys::Oid) = ("caller", pg_sys::TEXTOID);

/// One counter row's key: a tenant's (flux.usage) or, with `caller`, an
/// API key's or a subject's inside the tenant (flux.caller_usage: the same
/// five columns first, the caller after them, and a primary key of
/// (tenant, feature, period_start, caller)).
#[derive(Clone, Copy, Debug)]
pub struct Counter<'a> {
    pub tenant: &'a str,
    pub feature: &'a str,
    /// The period's start (i64::MIN: -infinity, for limit features).
    pub start: i64,
    /// `key:<id>` or `subject:<id>`.
    pub caller: Option<&'a str>,
}

impl Counter<'_> {
    fn of_caller(&self) -> bool {
        self.caller.is_some()
    }
}

/// The counter tables, by whether they hold callers' counters.
fn relname(callers: bool) -> &'static CStr {
    if callers {
        c"caller_usage"
    } else {
        c"usage"
    }
}

/// The table's name, for messages.
pub fn table_name(callers: bool) -> &'static str {
    if callers {
        "flux.caller_usage"
    } else {
        "flux.usage"
    }
}

/// The CHECK constraints of the install script, which an update of `used`
/// (by a positive amount, or an undo of one) and `updated_at` keeps.
fn our_checks(callers: bool) -> &'static [&'static [u8]] {
    if callers {
        &[b"caller_usage_used_check", b"caller_usage_caller_check"]
    } else {
        &[b"usage_used_check"]
    }
}

/// The primary key's columns.
fn key_columns(callers: bool) -> &'static [i16] {
    if callers {
        &[1, 2, 3, 6]
    } else {
        &[1, 2, 3]
    }
}

/// What a direct write did.
pub enum Added {
    /// Recorded; the new total.
    Total(i64),
    /// The amount does not fit under the limit; nothing recorded. The
    /// current total.
    Full(i64),
    /// Not done here: use SQL (see the module comment).
    Fallback,
}

/// flux.usage, opened for one call; closed (locks kept until the end of the
/// transaction, as the executor does) when dropped.
struct Opened {
    rel: pg_sys::Relation,
    /// Its primary key.
    pkey: pg_sys::Oid,
    /// flux.caller_usage rather than flux.usage.
    callers: bool,
}

/// What opening flux.usage found.
enum Open {
    /// A plain heap table of the expected shape: read and written here.
    Direct(Opened),
    /// Anything else: SQL reads and writes it (or says what is wrong).
    Sql,
}

impl Opened {
    /// Found by name in the schema (the relcache and syscache make that a
    /// hash lookup): an OID kept in the cache would go stale when the table
    /// or its index is rebuilt, and watching the table for that would
    /// reload every cache whenever autovacuum visits it.
    ///
    /// Direct only for a plain heap table (heap) whose first columns are
    /// ours (shaped) and whose primary key this module can probe (key_fits);
    /// each call reads the relcache entry's fields again (a few loads), so an
    /// ALTER TABLE is seen by the next call.
    fn open(namespace: pg_sys::Oid, lock: u32, callers: bool) -> FluxResult<Open> {
        // SAFETY: looks up and opens a relation of ours under a lock; it
        // stays open until drop (or until an error aborts the transaction,
        // which closes it). relation_open, not table_open: whatever the name
        // now is (an index raises in table_open) is looked at, then left to
        // SQL.
        unsafe {
            let table = pg_sys::get_relname_relid(relname(callers).as_ptr(), namespace);
            if table == pg_sys::InvalidOid {
                // SQL says it does not exist (42P01).
                return Ok(Open::Sql);
            }
            let rel = pg_sys::relation_open(table, lock as pg_sys::LOCKMODE);
            let mut opened = Opened {
                rel,
                pkey: pg_sys::InvalidOid,
                callers,
            };
            if !opened.shaped()? || !opened.heap() {
                return Ok(Open::Sql);
            }
            opened.pkey = pgver::primary_key_index(rel);
            Ok(
                if opened.pkey != pg_sys::InvalidOid && key_fits(opened.pkey, callers) {
                    Open::Direct(opened)
                } else {
                    Open::Sql
                },
            )
        }
    }

    /// The first columns are the ones this module reads in place (Row):
    /// their names and types, none dropped. Any other layout is SQL's, which
    /// finds columns by name and casts where PostgreSQL can (or raises its
    /// own error, 42703 or 42883), except `used` that is not bigint: SQL
    /// reads it back as a bigint, which pgrx refuses with XX000, so that is
    /// an error here, saying what is expected.
    fn shaped(&self) -> FluxResult<bool> {
        // SAFETY: reads the open relation's descriptor.
        unsafe {
            let desc = &*(*self.rel).rd_att;
            let attrs = pgver::attributes(desc);
            let named = |a: &pg_sys::FormData_pg_attribute, name: &str| {
                !a.attisdropped
                    && CStr::from_ptr(a.attname.data.as_ptr()).to_bytes() == name.as_bytes()
            };
            let caller = self.callers.then_some(&CALLER_COLUMN);
            let columns = COLUMNS.iter().chain(caller);
            if attrs.len() >= columns.clone().count()
                && columns
                    .zip(attrs)
                    .all(|((name, ty), a)| a.atttypid == *ty && named(a, name))
            {
                return Ok(true);
            }
            match attrs.iter().find(|a| named(a, "used")) {
                Some(a) if a.atttypid != pg_sys::INT8OID => {
                    let ty = CStr::from_ptr(pg_sys::format_type_be(a.atttypid)).to_string_lossy();
                    Err(FluxError::WrongType(format!(
                        "column \"used\" of {table} is {ty}, and flux_entitlements expects bigint: ALTER TABLE {table} ALTER COLUMN used TYPE bigint",
                        table = table_name(self.callers)
                    )))
                }
                _ => Ok(false),
            }
        }
    }

    /// A plain heap table, alone: its rows are heap tuples (Row reads them
    /// in place) and a query of flux.usage touches this table only. Not a
    /// partitioned table (no storage; its index is no B-tree of rows, and
    /// probing it crashed the backend), a view or a foreign table, another
    /// table access method, a partition (an update is checked against its
    /// bounds, and may be published as its root's) or a parent by
    /// inheritance (a query reads and updates the children too).
    fn heap(&self) -> bool {
        // SAFETY: reads the open relation's pg_class row in the relcache.
        let form = unsafe { &*(*self.rel).rd_rel };
        form.relkind as u8 == pg_sys::RELKIND_RELATION
            && form.relam == pg_sys::HEAP_TABLE_AM_OID
            && !form.relispartition
            && !form.relhassubclass
    }

    /// Nothing but the update acts on an update: no user trigger (the
    /// foreign keys' internal triggers skip updates that keep the key), only
    /// our CHECK constraint, no forced row security, no rule (DO ALSO adds
    /// a statement, INSTEAD replaces it), no generated column (the executor
    /// computes a stored one from the new row and checks a virtual one's
    /// constraints: pgver::has_generated), and nothing a publication
    /// asks of the executor (published_plainly).
    fn plain(&self) -> bool {
        // SAFETY: reads the open relation's descriptor fields.
        unsafe {
            let rel = &*self.rel;
            let form = &*rel.rd_rel;
            if form.relhasrules || !rel.rd_rules.is_null() || form.relforcerowsecurity {
                return false;
            }
            let desc = &*rel.rd_att;
            if !desc.constr.is_null() {
                let c = &*desc.constr;
                if pgver::has_generated(c) {
                    return false;
                }
                // Only ours: used >= 0, which an added positive amount keeps
                // (and the caller's shape, which an update leaves alone).
                if c.num_check > 0 {
                    let checks = std::slice::from_raw_parts(c.check, c.num_check as usize);
                    let ours = our_checks(self.callers);
                    if checks
                        .iter()
                        .any(|k| !ours.contains(&CStr::from_ptr(k.ccname).to_bytes()))
                    {
                        return false;
                    }
                }
            }
            if !rel.trigdesc.is_null() && (*rel.trigdesc).numtriggers > 0 {
                let td = &*rel.trigdesc;
                let triggers = std::slice::from_raw_parts(td.triggers, td.numtriggers as usize);
                // A deferrable unique constraint's internal trigger rechecks
                // what the executor queues for it; we queue nothing.
                let recheck = pg_sys::Oid::from(pg_sys::F_UNIQUE_KEY_RECHECK);
                if triggers
                    .iter()
                    .any(|t| !t.tgisinternal || t.tgfoid == recheck)
                {
                    return false;
                }
            }
            published_plainly(self.rel)
        }
    }
}

/// pg_publication_rel's prqual and prattrs (the row filter, the column
/// list), 1-based.
const ANUM_PRQUAL: i32 = 4;
const ANUM_PRATTRS: i32 = 5;

/// Whether publishing our update needs nothing the executor adds.
/// heap_update logs the replica identity as an UPDATE does and decoding
/// applies the publications to that, so a table published for updates is
/// left to SQL only when a publication filters its rows or lists its
/// columns (the executor first checks they are in the replica identity) or
/// it has no replica identity (the executor refuses the update): SQL then
/// does or refuses as an UPDATE would.
///
/// # Safety
/// `rel` is an open plain table.
unsafe fn published_plainly(rel: pg_sys::Relation) -> bool {
    // SAFETY: per the function's contract. The publication descriptor is
    // kept in the relcache entry (dropped with it when a publication
    // changes) once built, as RelationBuildPublicationDesc itself reads it:
    // after the first call, one read and no call.
    unsafe {
        let r = &*rel;
        let desc = if r.rd_pubdesc.is_null() {
            let mut d = pg_sys::PublicationDesc::default();
            pg_sys::RelationBuildPublicationDesc(rel, &mut d);
            d
        } else {
            *r.rd_pubdesc
        };
        if !desc.pubactions.pubupdate {
            return true;
        }
        let identity = (*r.rd_rel).relreplident as u8 == pg_sys::REPLICA_IDENTITY_FULL
            || pg_sys::RelationGetReplicaIndex(rel) != pg_sys::InvalidOid;
        identity && pgver::publication_allows_update(&desc) && !filtered_or_listed(r.rd_id)
    }
}

/// Whether a publication of the table by name (only those have row filters
/// and column lists) filters its rows or lists its columns: a list lookup
/// in the syscache, made only for a table published for updates.
///
/// # Safety
/// Inside a transaction.
unsafe fn filtered_or_listed(relid: pg_sys::Oid) -> bool {
    // SAFETY: a syscache list of pg_publication_rel rows by prrelid, held
    // while its tuples are read, then released.
    unsafe {
        let list = pg_sys::SearchSysCacheList(
            pg_sys::SysCacheIdentifier::PUBLICATIONRELMAP as i32,
            1,
            pg_sys::Datum::from(relid),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
        );
        let members = (*list).members.as_slice((*list).n_members as usize);
        let any = members.iter().any(|&m| {
            let t = &mut (*m).tuple;
            !pg_sys::heap_attisnull(t, ANUM_PRQUAL, std::ptr::null_mut())
                || !pg_sys::heap_attisnull(t, ANUM_PRATTRS, std::ptr::null_mut())
        });
        pg_sys::ReleaseCatCacheList(list);
        any
    }
}

thread_local! {
    /// The last index key_fits said yes to. What it checks is fixed for an
    /// index's OID: a new type or collation of a column builds a new index.
    /// Per table: flux.usage's, flux.caller_usage's.
    static CHECKED_KEY: [std::cell::Cell<pg_sys::Oid>; 2] = const {
        [std::cell::Cell::new(pg_sys::InvalidOid), std::cell::Cell::new(pg_sys::InvalidOid)]
    };
}

/// Whether the primary key is a B-tree whose columns are the table's first
/// three, in order (the scan keys number them so), and whose text columns'
/// collations are deterministic: under those (only) equal is byte-equal,
/// which Row::is compares (under a case-insensitive collation 'ACME' is
/// the row of 'acme'). find_by_key probes under the index's collations.
///
/// # Safety
/// Inside a transaction; `index` is the OID of an index of a table this
/// transaction has locked.
unsafe fn key_fits(index: pg_sys::Oid, callers: bool) -> bool {
    if CHECKED_KEY.with(|k| k[callers as usize].get()) == index {
        return true;
    }
    // SAFETY: opens the index (locked as find_by_key locks it) and reads its
    // relcache entry: pg_index's row, then its first indnkeyatts
    // collations; the collation lookups are syscache reads.
    let ok = unsafe {
        let ix = pg_sys::index_open(index, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let form = &*(*ix).rd_index;
        let columns = key_columns(callers);
        let n = columns.len();
        let collations = std::slice::from_raw_parts((*ix).rd_indcollation, n);
        // The text columns: tenant, feature and (callers) the caller.
        let texts = [0, 1, 3];
        let ok = (*(*ix).rd_rel).relam == pg_sys::BTREE_AM_OID
            && form.indnkeyatts as usize == n
            && form.indkey.values.as_slice(n) == columns
            && texts.iter().filter(|&&i| i < n).all(|&i| {
                let c = collations[i];
                c != pg_sys::InvalidOid && pg_sys::get_collation_isdeterministic(c)
            });
        pg_sys::index_close(ix, pg_sys::NoLock as pg_sys::LOCKMODE);
        ok
    };
    if ok {
        CHECKED_KEY.with(|k| k[callers as usize].set(index));
    }
    ok
}

impl Drop for Opened {
    fn drop(&mut self) {
        // While an error unwinds, the aborting transaction releases the
        // reference itself: no call into PostgreSQL then.
        if std::thread::panicking() {
            return;
        }
        // SAFETY: closes what open() opened; NoLock keeps the lock.
        unsafe { pg_sys::relation_close(self.rel, pg_sys::NoLock as pg_sys::LOCKMODE) };
    }
}

/// Scan keys for the counter's key columns = its values, the texts
/// compared under `collations`, the index's: a B-tree descends by its own
/// order only under the collation it was built with (under the database's,
/// most rows of an index built under another were not found). Returns the
/// keys and how many are used (3, or 4 with a caller).
fn keys(c: &Counter, collations: &[pg_sys::Oid]) -> ([pg_sys::ScanKeyData; 4], usize) {
    let mut k: [pg_sys::ScanKeyData; 4] = Default::default();
    let text = |s: &str| s.into_datum().unwrap_or(pg_sys::Datum::from(0));
    let eq = pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber;
    let texteq = pg_sys::Oid::from(pg_sys::F_TEXTEQ);
    let mut entries = vec![
        (collations[0], texteq, text(c.tenant)),
        (collations[1], texteq, text(c.feature)),
        (
            pg_sys::InvalidOid,
            pg_sys::Oid::from(pg_sys::F_TIMESTAMPTZ_EQ),
            pg_sys::Datum::from(c.start),
        ),
    ];
    if let Some(caller) = c.caller {
        entries.push((collations[3], texteq, text(caller)));
    }
    for (i, (collation, proc_, arg)) in entries.iter().enumerate() {
        // SAFETY: fills one scan key in place; the text datums live in the
        // current memory context for the call.
        unsafe {
            pg_sys::ScanKeyEntryInitialize(
                &mut k[i],
                0,
                (i + 1) as pg_sys::AttrNumber,
                eq,
                pg_sys::InvalidOid,
                *collation,
                *proc_,
                *arg,
            );
        }
    }
    (k, entries.len())
}

/// The row's version visible to `snapshot`, copied out of the buffer (its
/// t_self is where it is). Tried first where the row was last found, then
/// through the primary key.
fn find(
    opened: &Opened,
    snapshot: pg_sys::Snapshot,
    c: &Counter,
    prune: Prune,
) -> Option<pg_sys::HeapTuple> {
    let key = place_key(c);
    // SAFETY: reads the open relation's file number.
    let file = unsafe { pgver::file_number(opened.rel) };
    if let Some(p) = PLACES.with(|m| m.borrow().get(&key).copied()) {
        if p.file == file {
            if let Some(t) = fetch_at(opened, snapshot, p.root, c, prune) {
                return Some(t);
            }
        }
    }
    let (tuple, root) = find_by_key(opened, snapshot, c)?;
    remember_place(key, file, root);
    Some(tuple)
}

/// Where a counter row was last found: the root of its chain of versions
/// (the TID its index entry holds). Skipping the B-tree descent (text keys
/// compared under the database collation) was a tenth of flux_consume.
/// A place is only a hint: what is found there must be visible and carry
/// the key, else the index is asked (a vacuum, a rewrite, another session's
/// non-HOT update moved it). Keyed by a hash of the key: a collision is one
/// more index probe.
#[derive(Clone, Copy)]
struct Place {
    file: pg_sys::Oid,
    root: pg_sys::ItemPointerData,
}

/// At most this many places are kept (16 bytes each), then it starts over.
const MAX_PLACES: usize = 1 << 16;

thread_local! {
    static PLACES: std::cell::RefCell<std::collections::HashMap<u64, Place>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

fn place_key(c: &Counter) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(c.tenant.as_bytes());
    h.update(&[0]);
    h.update(c.feature.as_bytes());
    h.update(&[0]);
    h.update(&c.start.to_le_bytes());
    if let Some(caller) = c.caller {
        h.update(&[1]);
        h.update(caller.as_bytes());
    }
    h.digest()
}

fn remember_place(key: u64, file: pg_sys::Oid, root: pg_sys::ItemPointerData) {
    PLACES.with(|m| {
        let mut m = m.borrow_mut();
        if m.len() >= MAX_PLACES {
            m.clear();
        }
        m.insert(key, Place { file, root });
    });
}

/// How a probe prunes the page it reads (removes dead versions of rows).
#[derive(Clone, Copy, PartialEq)]
enum Prune {
    /// As an index fetch does: when less than a tenth of the page is free.
    Opportunistic,
    /// Before an update: only when the new version might not fit. A full
    /// page of counter rows holds about a hundred; pruned at a tenth free,
    /// it was pruned every third update, each pass walking every item (a
    /// fifth of flux_consume). Pruning when under PRUNE_BELOW bytes are free
    /// keeps the updates HOT and prunes such a page about a fifth as often;
    /// the counter tables' fillfactor of 50 leaves room for a few dozen
    /// versions per page between prunes (pruning a full page on every other
    /// update was a quarter of a consume charging two counters).
    WhenNeeded,
}

/// Free bytes under which an update prunes first: room for two versions of
/// a counter row (about 64 bytes and a 4-byte line pointer each), ours and
/// a concurrent writer's. Should the page still be full when the update
/// comes, PostgreSQL writes the version on another page, as for any UPDATE.
const PRUNE_BELOW: usize = 144;

/// The version visible to `snapshot` in the chain rooted at `root`, if it
/// is the counter's row; copied.
fn fetch_at(
    opened: &Opened,
    snapshot: pg_sys::Snapshot,
    root: pg_sys::ItemPointerData,
    c: &Counter,
    prune: Prune,
) -> Option<pg_sys::HeapTuple> {
    let rel = opened.rel;
    // SAFETY: the block is checked against the relation's size (a vacuum
    // may have truncated it since); pin, prune and share lock as an index
    // fetch does; heap_hot_search_buffer checks the offset and follows the
    // chain from its root; the visible version is copied before the buffer
    // is released.
    unsafe {
        let block = pgrx::itemptr::item_pointer_get_block_number(&root);
        if !block_exists(rel, block) {
            return None;
        }
        let buf = pg_sys::ReadBuffer(rel, block);
        // The free space is read unlocked, as heap_page_prune_opt reads it:
        // a hint.
        if prune == Prune::Opportunistic
            || pg_sys::PageGetHeapFreeSpace(pg_sys::BufferGetPage(buf)) < PRUNE_BELOW
        {
            pg_sys::heap_page_prune_opt(rel, buf);
        }
        pg_sys::LockBuffer(buf, pg_sys::BUFFER_LOCK_SHARE as i32);
        let mut tid = root;
        let mut tuple = pg_sys::HeapTupleData::default();
        let mut all_dead = false;
        let found = pg_sys::heap_hot_search_buffer(
            &mut tid,
            rel,
            buf,
            snapshot,
            &mut tuple,
            &mut all_dead,
            true,
        );
        let copy = found.then(|| pg_sys::heap_copytuple(&mut tuple));
        pg_sys::UnlockReleaseBuffer(buf);
        let copy = copy?;
        Row::of(copy, opened.callers)
            .is_some_and(|r| r.is(c))
            .then_some(copy)
    }
}

/// Whether `block` is inside the table (open and locked by this call).
/// The size smgr noted at its last look is trusted when the block is below
/// it: a table only shrinks by truncation, which first sends every backend
/// an invalidation that drops the note (read when this transaction locked
/// the table; a truncation needs a lock that conflicts with ours). Else the
/// size is asked of the file system (an lseek, 1% of flux_consume).
///
/// # Safety
/// `rel` is an open relation locked by this transaction.
unsafe fn block_exists(rel: pg_sys::Relation, block: pg_sys::BlockNumber) -> bool {
    // SAFETY: per the function's contract; rd_smgr, when set, is the open
    // storage manager handle of the relation.
    unsafe {
        let smgr = (*rel).rd_smgr;
        let main = pg_sys::ForkNumber::MAIN_FORKNUM as usize;
        if !smgr.is_null() {
            let noted = (*smgr).smgr_cached_nblocks[main];
            if noted != pg_sys::InvalidBlockNumber && block < noted {
                return true;
            }
        }
        block < pg_sys::RelationGetNumberOfBlocksInFork(rel, pg_sys::ForkNumber::MAIN_FORKNUM)
    }
}

/// A version of a counter row (a copy), read and written in place. Its
/// first columns are two texts and three 8-byte values (Opened::shaped), so
/// the fixed ones sit at the first multiple of 8 after the second text, as
/// heap_form_tuple lays them out. Reading them so replaced heap_getattr's
/// walks and forming the new version anew (a twentieth of flux_consume).
struct Row {
    data: *mut u8,
    tenant: usize,
    feature: usize,
    fixed: usize,
    /// The caller text (flux.caller_usage), after the fixed values.
    caller: Option<usize>,
}

/// The 8-byte columns, in order after the texts.
#[derive(Clone, Copy)]
enum Fixed {
    PeriodStart = 0,
    Used = 1,
    UpdatedAt = 2,
}

impl Row {
    /// None when one of these columns is null or the version is not as
    /// long as its columns say (neither can happen to a row of ours): the
    /// caller then asks the index or SQL.
    ///
    /// # Safety
    /// `tuple` is a copy of a version of a relation Opened::shaped accepted.
    unsafe fn of(tuple: pg_sys::HeapTuple, callers: bool) -> Option<Row> {
        // SAFETY: per the function's contract; every offset is checked
        // against the tuple's length before it is read.
        unsafe {
            let header = (*tuple).t_data;
            let natts = (*header).t_infomask2 as u32 & pg_sys::HEAP_NATTS_MASK;
            // A later column may be null; these (the bitmap's first bits,
            // set when not null) may not.
            let columns = COLUMNS.len() + callers as usize;
            let all = (1u8 << columns) - 1;
            if (natts as usize) < columns
                || ((*header).t_infomask as u32 & pg_sys::HEAP_HASNULL != 0
                    && *(*header).t_bits.as_ptr() & all != all)
            {
                return None;
            }
            let hoff = (*header).t_hoff as usize;
            let len = ((*tuple).t_len as usize).checked_sub(hoff)?;
            let data = header.cast::<u8>().add(hoff);
            // A text starts at the next 4-byte boundary unless its header
            // is a short one, which is never preceded by padding (the
            // padding bytes are zero, a short header never is).
            let text_at = |off: usize| -> Option<(usize, usize)> {
                if off >= len {
                    return None;
                }
                let off = if *data.add(off) != 0 {
                    off
                } else {
                    off.next_multiple_of(4)
                };
                // Room for the longest header (three 8-byte values follow
                // anyway).
                if off + 4 > len {
                    return None;
                }
                let size = pgrx::varlena::varsize_any(data.add(off).cast());
                (off + size <= len).then_some((off, size))
            };
            let (tenant, size) = text_at(0)?;
            let (feature, size) = text_at(tenant + size)?;
            let fixed = (feature + size).next_multiple_of(8);
            if fixed + 24 > len {
                return None;
            }
            let caller = if callers {
                Some(text_at(fixed + 24)?.0)
            } else {
                None
            };
            Some(Row {
                data,
                tenant,
                feature,
                fixed,
                caller,
            })
        }
    }

    /// A text column's bytes; None when held compressed or out of line
    /// (never compared here: the index is asked instead).
    fn text(&self, off: usize) -> Option<&[u8]> {
        // SAFETY: Row::of checked the text lies inside the tuple.
        unsafe {
            let p = self.data.add(off).cast::<pg_sys::varlena>();
            if pgrx::varlena::varatt_is_1b_e(p) || pgrx::varlena::varatt_is_4b_c(p) {
                return None;
            }
            let n = pgrx::varlena::varsize_any_exhdr(p);
            Some(std::slice::from_raw_parts(
                pgrx::varlena::vardata_any(p).cast::<u8>(),
                n,
            ))
        }
    }

    fn get(&self, f: Fixed) -> i64 {
        // SAFETY: Row::of checked the three values lie inside the tuple.
        unsafe {
            self.data
                .add(self.fixed + 8 * f as usize)
                .cast::<i64>()
                .read_unaligned()
        }
    }

    fn set(&self, f: Fixed, v: i64) {
        // SAFETY: as get; the tuple is our own copy.
        unsafe {
            self.data
                .add(self.fixed + 8 * f as usize)
                .cast::<i64>()
                .write_unaligned(v)
        }
    }

    /// Whether this is the counter's row.
    fn is(&self, c: &Counter) -> bool {
        self.get(Fixed::PeriodStart) == c.start
            && self.text(self.tenant) == Some(c.tenant.as_bytes())
            && self.text(self.feature) == Some(c.feature.as_bytes())
            && self.caller.and_then(|off| self.text(off)) == c.caller.map(str::as_bytes)
    }
}

/// Through the primary key: the visible version and the root of its chain.
fn find_by_key(
    opened: &Opened,
    snapshot: pg_sys::Snapshot,
    c: &Counter,
) -> Option<(pg_sys::HeapTuple, pg_sys::ItemPointerData)> {
    // SAFETY: an index scan of our own table under a live snapshot, as
    // index_getnext_slot runs it but keeping the TID the index entry holds
    // (the chain's root); the tuple is copied before the scan ends (which
    // releases its buffer). The scan keys number the index's columns,
    // which Opened::open checked are the table's first three (so it has
    // at least two collations).
    unsafe {
        let rel = opened.rel;
        let index = pg_sys::index_open(opened.pkey, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let n = key_columns(opened.callers).len();
        let coll = std::slice::from_raw_parts((*index).rd_indcollation, n);
        let (mut k, n) = keys(c, coll);
        let scan = pgver::index_beginscan(rel, index, snapshot, n as i32);
        pg_sys::index_rescan(scan, k.as_mut_ptr(), n as i32, std::ptr::null_mut(), 0);
        let slot = pg_sys::table_slot_create(rel, std::ptr::null_mut());
        let mut root = pg_sys::ItemPointerData::default();
        let mut found = None;
        loop {
            if !(*scan).xs_heap_continue {
                let tid =
                    pg_sys::index_getnext_tid(scan, pg_sys::ScanDirection::ForwardScanDirection);
                if tid.is_null() {
                    break;
                }
                root = *tid;
            }
            if pg_sys::index_fetch_heap(scan, slot) {
                let mut should_free = false;
                let t = pg_sys::ExecFetchSlotHeapTuple(slot, false, &mut should_free);
                let copy = pg_sys::heap_copytuple(t);
                (*copy).t_self = (*slot).tts_tid;
                found = Some((copy, root));
                break;
            }
        }
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::index_endscan(scan);
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        found
    }
}

/// Units recorded in the period starting at `start` (i64::MIN: -infinity,
/// for limit features), under the statement's snapshot: one index probe.
pub fn read_used(namespace: pg_sys::Oid, c: &Counter) -> FluxResult<i64> {
    let opened = match Opened::open(namespace, pg_sys::AccessShareLock, c.of_caller())? {
        Open::Direct(opened) => opened,
        Open::Sql => return super::sql::read_used(c),
    };
    // SAFETY: the active snapshot is the statement's, registered by it.
    let snapshot = unsafe { pg_sys::GetActiveSnapshot() };
    let Some(t) = find(&opened, snapshot, c, Prune::Opportunistic) else {
        return Ok(0);
    };
    // SAFETY: a copy of a row of this relation.
    match unsafe { Row::of(t, opened.callers) } {
        Some(row) => Ok(row.get(Fixed::Used)),
        // A null (NOT NULL dropped): SQL reads it as it is.
        None => super::sql::read_used(c),
    }
}

/// Add `amount` to an existing counter row if the total stays within
/// `limit` (None: unlimited). A negative amount undoes this transaction's
/// own earlier addition (a caller's counter, when the tenant's is full).
pub fn add(
    namespace: pg_sys::Oid,
    c: &Counter,
    amount: i64,
    limit: Option<i64>,
) -> FluxResult<Added> {
    // Opened first, whatever the isolation level: a `used` that is not
    // bigint is refused here, as SQL could not use it either.
    let opened = match Opened::open(namespace, pg_sys::RowExclusiveLock, c.of_caller())? {
        Open::Direct(opened) => opened,
        Open::Sql => return Ok(Added::Fallback),
    };
    // SAFETY: reads a backend-local setting.
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 || !opened.plain() {
        return Ok(Added::Fallback);
    }
    // The latest snapshot: every committed version and this transaction's
    // own earlier writes.
    // SAFETY: a snapshot used within this call only.
    let snapshot = unsafe { pg_sys::GetLatestSnapshot() };
    let Some(mut version) = find(&opened, snapshot, c, Prune::WhenNeeded) else {
        return Ok(Added::Fallback);
    };
    // As ExecUpdate: update the version we see; if a concurrent transaction
    // updated it first, lock its latest version (EvalPlanQual), re-check the
    // limit on it and update that one. The lock is only taken on conflict:
    // locking first cost a WAL record on every call.
    for _ in 0..2 {
        // SAFETY: `version` is a copy of a row of this relation.
        let Some(row) = (unsafe { Row::of(version, opened.callers) }) else {
            return Ok(Added::Fallback);
        };
        let used = row.get(Fixed::Used);
        if !fits(limit, used, amount) {
            return Ok(Added::Full(used));
        }
        let total = super::sql::total(used, amount)?;
        // The new version is our copy with its two values rewritten, as
        // catalog updates do with fixed-width fields; heap_update resets
        // its header.
        row.set(Fixed::Used, total);
        row.set(Fixed::UpdatedAt, crate::backend::transaction_start());
        // SAFETY: updates the old version with the new one in place of the
        // executor; pg_sys calls raise errors through the guard.
        let done = unsafe {
            let rel = opened.rel;
            let mut tmfd = pg_sys::TM_FailureData::default();
            let mut lockmode = pg_sys::LockTupleMode::LockTupleNoKeyExclusive;
            let mut otid = (*version).t_self;
            let (r, entries) = pgver::heap_update(
                rel,
                &mut otid,
                version,
                pg_sys::GetCurrentCommandId(true),
                &mut tmfd,
                &mut lockmode,
            );
            if r == pg_sys::TM_Result::TM_Ok {
                match entries {
                    // HOT: the chain's root keeps its entries (and place).
                    pgver::IndexEntries::None => {}
                    // HOT, but a summarizing index (BRIN) covers a
                    // column we changed (16 and later): entries in those.
                    pgver::IndexEntries::Summarizing => insert_index_entries(rel, version, true),
                    pgver::IndexEntries::All => {
                        insert_index_entries(rel, version, false);
                        // A new chain: its index entries point here.
                        remember_place(place_key(c), pgver::file_number(rel), (*version).t_self);
                    }
                }
                // Our next command (or the next consume in this
                // transaction) sees it.
                pg_sys::CommandCounterIncrement();
                Some(total)
            } else if r == pg_sys::TM_Result::TM_Updated {
                match lock_latest(rel, otid, snapshot) {
                    Some(latest) => {
                        version = latest;
                        None
                    }
                    None => return Ok(Added::Fallback),
                }
            } else {
                // Deleted meanwhile, or changed by this very command: SQL
                // decides (it inserts, or raises what UPDATE raises).
                return Ok(Added::Fallback);
            }
        };
        if let Some(total) = done {
            return Ok(Added::Total(total));
        }
    }
    // Locked the latest version and still could not update it: cannot
    // happen while we hold the lock; let SQL have the last word.
    Ok(Added::Fallback)
}

/// Lock the latest version of the row at `tid` (waiting for a concurrent
/// writer and following its updates), and copy it; None when the row was
/// deleted.
fn lock_latest(
    rel: pg_sys::Relation,
    mut tid: pg_sys::ItemPointerData,
    snapshot: pg_sys::Snapshot,
) -> Option<pg_sys::HeapTuple> {
    let mut tmfd = pg_sys::TM_FailureData::default();
    // SAFETY: the table AM's tuple_lock, as the executor calls it for an
    // UPDATE under READ COMMITTED, into a slot of this call; errors while
    // waiting (a cancel, a deadlock) are raised through the guard. The
    // version is copied out before the slot (and its buffer pin) is dropped.
    unsafe {
        let lock = (*(*rel).rd_tableam).tuple_lock?;
        let slot = pg_sys::table_slot_create(rel, std::ptr::null_mut());
        let cid = pg_sys::GetCurrentCommandId(true);
        let r = pg_sys::ffi::pg_guard_ffi_boundary(|| {
            lock(
                rel,
                &mut tid,
                snapshot,
                slot,
                cid,
                pg_sys::LockTupleMode::LockTupleNoKeyExclusive,
                pg_sys::LockWaitPolicy::LockWaitBlock,
                pg_sys::TUPLE_LOCK_FLAG_FIND_LAST_VERSION as u8,
                &mut tmfd,
            )
        });
        let latest = (r == pg_sys::TM_Result::TM_Ok).then(|| {
            let mut should_free = false;
            let t = pg_sys::ExecFetchSlotHeapTuple(slot, false, &mut should_free);
            let copy = pg_sys::heap_copytuple(t);
            (*copy).t_self = (*slot).tts_tid;
            copy
        });
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        latest
    }
}

/// New index entries for a version, through the executor's routine (so any
/// index someone adds, expression or partial, is maintained too): in every
/// index for a version that is not a HOT update, in the summarizing ones
/// only (`only_summarizing`) for a HOT update that changed their columns,
/// as heap_update said (pgver::heap_update).
///
/// # Safety
/// `rel` is open with RowExclusiveLock and `tuple` was just written to it.
unsafe fn insert_index_entries(
    rel: pg_sys::Relation,
    tuple: pg_sys::HeapTuple,
    only_summarizing: bool,
) {
    // SAFETY: a throwaway executor state for one call, as CatalogTupleUpdate
    // and COPY use; freed before returning.
    unsafe {
        let estate = pg_sys::CreateExecutorState();
        let rri = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
            .cast::<pg_sys::ResultRelInfo>();
        (*rri).type_ = pg_sys::NodeTag::T_ResultRelInfo;
        pg_sys::InitResultRelInfo(rri, rel, 0, std::ptr::null_mut(), 0);
        pg_sys::ExecOpenIndices(rri, false);
        let slot = pg_sys::MakeSingleTupleTableSlot((*rel).rd_att, &pg_sys::TTSOpsHeapTuple);
        pg_sys::ExecStoreHeapTuple(tuple, slot, false);
        pgver::insert_index_tuples(rri, slot, estate, only_summarizing);
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::ExecCloseIndices(rri);
        pg_sys::FreeExecutorState(estate);
    }
}
