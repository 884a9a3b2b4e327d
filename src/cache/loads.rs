//! Loading the cache, under the latest snapshot (so a cache is never
//! filled with data older than an invalidation it has already read):
//! - the catalogue, whole, in seven queries whose plans are kept for the
//!   backend;
//! - one tenant, by heap and index access from Rust, no SQL: a probe of
//!   flux.tenants' primary key, plus one of tenant_addons' and overrides'
//!   when those tables hold any row. Three queries through SPI cost about
//!   40 us a tenant (a check of a tenant outside the cache ran at half a
//!   plain SQL join); the probes about 3 us. When a table is not as the
//!   install script made it (another access method, a column retyped or
//!   gone), SQL reads it instead.

use crate::error::{FluxError, FluxResult};
use crate::gucs::span_of;
use crate::model::*;
use crate::prepared::kept;
use crate::timeutil::Span;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::spi::SpiHeapTupleData;
use pgrx::{PgBuiltInOids, PgOid};
use std::collections::{HashMap, HashSet};
use std::ffi::CStr;

const TEXT: PgOid = PgOid::BuiltIn(PgBuiltInOids::TEXTOID);
const TEXT_ARRAY: PgOid = PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID);

fn ts(row: &SpiHeapTupleData, col: usize) -> FluxResult<Option<i64>> {
    Ok(row
        .get::<TimestampWithTimeZone>(col)?
        .map(|t| t.into_inner()))
}

fn text(row: &SpiHeapTupleData, col: usize) -> FluxResult<Option<String>> {
    Ok(row.get::<String>(col)?)
}

/// A jsonb column selected as text (`value::text`): kept as text.
fn json(row: &SpiHeapTupleData, col: usize) -> FluxResult<Option<JsonText>> {
    text(row, col)
}

fn required<T>(v: Option<T>, what: &str) -> FluxResult<T> {
    v.ok_or_else(|| FluxError::Internal(format!("{what} is NULL")))
}

/// Run `f` with the latest snapshot as the active one: SPI's read-only
/// queries use the active snapshot, and the latest one includes every
/// commit that happened before this call (and this transaction's own
/// changes), whatever the isolation level or the statement's snapshot.
///
/// During a parallel query (leader or worker) the snapshot cannot be
/// changed: the load then uses the statement's snapshot, and the cache marks
/// what it loaded as provisional (see mod.rs).
fn with_latest_snapshot<R>(f: impl FnOnce() -> FluxResult<R>) -> FluxResult<R> {
    let _owner = crate::privilege::AsOwner::enter()?;
    if crate::backend::in_parallel_mode() {
        return f();
    }
    // SAFETY: GetLatestSnapshot returns a static snapshot that
    // PushActiveSnapshot copies; it is popped below on success, and on error
    // PostgreSQL's abort processing pops it.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot()) };
    let r = f();
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    r
}

/// The tables whose changes make the cache stale: those it loads (each has
/// the triggers of invalidation.rs, see finalize.sql). The
/// first CATALOGUE_TABLES hold the catalogue; a change to the others (the
/// tenants' rows) leaves the catalogue loaded.
const WATCHED: [&str; 10] = [
    "features",
    "plans",
    "grants",
    "addons",
    "addon_grants",
    "flags",
    "flag_lists",
    "tenants",
    "tenant_addons",
    "overrides",
];
pub const CATALOGUE_TABLES: usize = 7;

/// Catalogue tables read after the main load, by SQL (`alert_thresholds`):
/// missing under a 0.1.0 schema, so not watched by OID. Their row trigger
/// names the catalogue's target as the others' does, and so does their
/// TRUNCATE trigger (invalidation.rs).
pub const LATE_CATALOGUE: [&str; 1] = ["alerts"];

/// A flag as the cache holds it: lists are sets of ids.
#[derive(Debug, Clone, Default)]
pub struct FlagEntry {
    pub enabled: bool,
    pub threshold: u32,
    pub salt: String,
    pub allow: HashSet<String>,
    pub deny: HashSet<String>,
}

/// (addon, per-unit limit, value)
pub type AddonUnit = (String, Option<i64>, Option<JsonText>);

/// The whole catalogue: features with their grants, plans, addon grants and
/// flags, plus what the invalidation callback needs to recognise our tables.
#[derive(Debug, Default)]
pub struct Catalogue {
    pub features: HashMap<String, std::rc::Rc<FeatureFacts>>,
    /// Feature keys in the database's order (collation), for
    /// flux_entitlements: sorted when first asked for (see `keys`).
    keys: std::cell::OnceCell<Vec<String>>,
    /// By plan: its grace_period and rank.
    pub plan_grace: HashMap<String, (Option<Span>, i32)>,
    /// By feature: what one unit of each addon grants.
    pub addon_grants: HashMap<String, Vec<AddonUnit>>,
    pub flags: HashMap<String, FlagEntry>,
    /// By priced feature: the credits pool it draws from and the credits
    /// one unit costs (flux_set_cost).
    pub costs: HashMap<String, (String, i64)>,
    /// OIDs of the flux tables whose changes make the cache stale.
    pub watched: Vec<pg_sys::Oid>,
    /// The composite type flux.decision (looking it up by name per call
    /// cost more than building the row).
    pub decision_type: pg_sys::Oid,
    /// flux.decision's attributes are Column's, names and types (so a row can be
    /// formed in one go, not set attribute by attribute).
    pub decision_plain: bool,
    /// The schema flux (counters.rs finds flux.usage in it).
    pub namespace: pg_sys::Oid,
}

const PLANS_SQL: &str = "SELECT key, is_default, grace_period, rank FROM flux.plans";
/// subject_limit read through to_jsonb, which a 0.1.0 schema (no such
/// column) answers with NULL.
const GRANTS_SQL: &str =
    "SELECT g.feature, g.plan, p.rank, g.\"limit\", g.period, g.value::pg_catalog.text, \
            (pg_catalog.to_jsonb(g) OPERATOR(pg_catalog.->>) 'subject_limit')::pg_catalog.int8, \
            COALESCE((pg_catalog.to_jsonb(g) OPERATOR(pg_catalog.->>) 'overage')::pg_catalog.bool, false), \
            (pg_catalog.to_jsonb(g) OPERATOR(pg_catalog.->>) 'overage_cap')::pg_catalog.int8, \
            COALESCE((pg_catalog.to_jsonb(p) OPERATOR(pg_catalog.->>) 'listed')::pg_catalog.bool, true) \
     FROM flux.grants g JOIN flux.plans p ON p.key OPERATOR(pg_catalog.=) g.plan \
     WHERE g.enabled ORDER BY g.feature, p.rank, p.key";
/// cost_pool and cost_credits read through to_jsonb, which a 0.1.0 schema
/// (no such columns) answers with NULL.
const FEATURES_SQL: &str = "SELECT f.key, f.kind, \
        pg_catalog.to_jsonb(f) OPERATOR(pg_catalog.->>) 'cost_pool', \
        (pg_catalog.to_jsonb(f) OPERATOR(pg_catalog.->>) 'cost_credits')::pg_catalog.int8 \
   FROM flux.features f ORDER BY f.key";
const ADDON_GRANTS_SQL: &str = "SELECT feature, addon, \"limit\", value::pg_catalog.text \
     FROM flux.addon_grants ORDER BY addon";
const FLAGS_SQL: &str = "SELECT feature, enabled, rollout_percent::pg_catalog.text, \
     coalesce(salt, feature) FROM flux.flags";
const FLAG_LISTS_SQL: &str = "SELECT feature, id, list FROM flux.flag_lists";
// What the cache needs to know about the schema, in one query (a new
// backend, a parallel worker above all, pays the parse and plan of each;
// scanning pg_class for the schema's tables was half of a cold load).
const META_SQL: &str = "SELECT $1::pg_catalog.regclass[]::pg_catalog.oid[], \
            'flux.decision'::pg_catalog.regtype::pg_catalog.oid, \
            (SELECT pg_catalog.array_agg(attname::pg_catalog.text ORDER BY attnum) \
               FROM pg_catalog.pg_attribute \
              WHERE attrelid OPERATOR(pg_catalog.=) 'flux.decision'::pg_catalog.regclass \
                AND attnum OPERATOR(pg_catalog.>) 0), \
            'flux'::pg_catalog.regnamespace::pg_catalog.oid, \
            (SELECT pg_catalog.array_agg(atttypid ORDER BY attnum) \
               FROM pg_catalog.pg_attribute \
              WHERE attrelid OPERATOR(pg_catalog.=) 'flux.decision'::pg_catalog.regclass \
                AND attnum OPERATOR(pg_catalog.>) 0)";

/// The whole catalogue: six sequential scans from Rust (a reload of 2,000
/// grants through SPI took 4 ms; every change to a catalogue table also
/// made PostgreSQL re-plan the queries), or SQL when a table is not as the
/// install script made it. What the cache needs to know about the schema
/// comes from one kept query either way.
pub fn load_catalogue() -> FluxResult<Catalogue> {
    let mut cat = match schema_facts_direct() {
        Some(cat) => cat,
        None => with_latest_snapshot(|| Spi::connect(schema_facts))?,
    };
    let rows = match load_catalogue_direct(cat.namespace)? {
        Some(rows) => rows,
        None => load_catalogue_sql()?,
    };
    (
        cat.features,
        cat.plan_grace,
        cat.addon_grants,
        cat.flags,
        cat.costs,
    ) = rows.0;
    if let Some(keys) = rows.1 {
        let _ = cat.keys.set(keys);
    }
    for feature in held_features(cat.namespace)? {
        // Just built: each feature's facts have one owner.
        if let Some(f) = cat
            .features
            .get_mut(&feature)
            .and_then(std::rc::Rc::get_mut)
        {
            f.has_holds = true;
        }
    }
    for (feature, thresholds) in alert_thresholds(cat.namespace)? {
        if let Some(f) = cat
            .features
            .get_mut(&feature)
            .and_then(std::rc::Rc::get_mut)
        {
            f.alerts = thresholds;
        }
    }
    Ok(cat)
}

const ALERTS_SQL: &str = "SELECT feature, \
        (threshold OPERATOR(pg_catalog.*) 10000)::pg_catalog.int8 \
   FROM flux.alerts ORDER BY 1, 2";

/// Each feature's usage alert thresholds in ten-thousandths, ascending
/// (flux.alerts; none under a schema without that table).
fn alert_thresholds(namespace: pg_sys::Oid) -> FluxResult<Vec<(String, Vec<i64>)>> {
    // SAFETY: a syscache lookup by name inside a transaction.
    let exists =
        unsafe { pg_sys::get_relname_relid(c"alerts".as_ptr(), namespace) != pg_sys::InvalidOid };
    if !exists {
        return Ok(Vec::new());
    }
    with_latest_snapshot(|| {
        Spi::connect(|c| {
            let mut v: Vec<(String, Vec<i64>)> = Vec::new();
            for r in c.select(&*kept(c, ALERTS_SQL, &[], false)?, None, &[])? {
                let (Some(f), Some(t)) = (text(&r, 1)?, r.get::<i64>(2)?) else {
                    continue;
                };
                match v.last_mut() {
                    Some((last, ts)) if *last == f => ts.push(t),
                    _ => v.push((f, vec![t])),
                }
            }
            Ok(v)
        })
    })
}

const HELD_SQL: &str = "SELECT DISTINCT feature FROM flux.held_features";

/// The features that have had a hold (flux.held_features; none under a
/// 0.1.0 schema, which has no such table).
fn held_features(namespace: pg_sys::Oid) -> FluxResult<Vec<String>> {
    // SAFETY: a syscache lookup by name inside a transaction.
    let exists = unsafe {
        pg_sys::get_relname_relid(c"held_features".as_ptr(), namespace) != pg_sys::InvalidOid
    };
    if !exists {
        return Ok(Vec::new());
    }
    with_latest_snapshot(|| {
        Spi::connect(|c| {
            let mut v = Vec::new();
            for r in c.select(&*kept(c, HELD_SQL, &[], false)?, None, &[])? {
                if let Some(f) = text(&r, 1)? {
                    v.push(f);
                }
            }
            Ok(v)
        })
    })
}

/// The catalogue's contents: (features, plan_grace, addon_grants, flags,
/// costs),
/// and the feature keys in order when the load had them sorted.
type CatalogueRows = (
    (
        HashMap<String, std::rc::Rc<FeatureFacts>>,
        HashMap<String, (Option<Span>, i32)>,
        HashMap<String, Vec<AddonUnit>>,
        HashMap<String, FlagEntry>,
        HashMap<String, (String, i64)>,
    ),
    Option<Vec<String>>,
);

/// What `schema_facts` reads, from the syscache (no SQL: in a new backend,
/// parsing and planning that query was a fifth of the first check). None
/// when something is missing: the query then says what.
fn schema_facts_direct() -> Option<Catalogue> {
    let mut cat = Catalogue::default();
    // SAFETY: syscache lookups by name; flux.decision's relation is opened
    // under a lock to read its descriptor, then closed keeping the lock.
    unsafe {
        let ns = pg_sys::get_namespace_oid(c"flux".as_ptr(), true);
        if ns == pg_sys::InvalidOid {
            return None;
        }
        for t in WATCHED {
            let name = std::ffi::CString::new(t).ok()?;
            let oid = pg_sys::get_relname_relid(name.as_ptr(), ns);
            if oid == pg_sys::InvalidOid {
                return None;
            }
            cat.watched.push(oid);
        }
        let decision = pg_sys::get_relname_relid(c"decision".as_ptr(), ns);
        if decision == pg_sys::InvalidOid
            || pg_sys::get_rel_relkind(decision) as u8 != pg_sys::RELKIND_COMPOSITE_TYPE
        {
            return None;
        }
        cat.decision_type = pg_sys::get_rel_type_id(decision);
        let rel = pg_sys::relation_open(decision, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let names = crate::pgver::attributes(&*(*rel).rd_att)
            .iter()
            .map(|a| {
                (
                    CStr::from_ptr(a.attname.data.as_ptr()).to_bytes(),
                    a.atttypid,
                )
            })
            .eq(Column::ALL
                .iter()
                .map(|c| (c.as_str().as_bytes(), c.type_oid())));
        pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        cat.decision_plain = names;
        cat.namespace = ns;
    }
    Some(cat)
}

fn schema_facts(c: &pgrx::spi::SpiClient) -> FluxResult<Catalogue> {
    let mut cat = Catalogue::default();
    let meta = c.select(
        &*kept(c, META_SQL, &[TEXT_ARRAY], false)?,
        Some(1),
        &[WATCHED.map(|t| format!("flux.{t}")).to_vec().into()],
    )?;
    let meta = meta.first();
    cat.watched = required(meta.get::<Vec<pg_sys::Oid>>(1)?, "watched tables")?;
    cat.decision_type = required(meta.get::<pg_sys::Oid>(2)?, "flux.decision")?;
    let names = meta.get::<Vec<String>>(3)?.unwrap_or_default();
    let types = meta.get::<Vec<pg_sys::Oid>>(5)?.unwrap_or_default();
    cat.decision_plain = names
        .iter()
        .map(String::as_str)
        .zip(types)
        .eq(Column::ALL.iter().map(|c| (c.as_str(), c.type_oid())));
    cat.namespace = required(meta.get::<pg_sys::Oid>(4)?, "schema flux")?;
    Ok(cat)
}

/// The catalogue's rows through SQL: six queries whose plans are kept.
fn load_catalogue_sql() -> FluxResult<CatalogueRows> {
    with_latest_snapshot(|| {
        Spi::connect(|c| {
            let mut cat = Catalogue::default();
            let mut default_plan = None;
            for r in c.select(&*kept(c, PLANS_SQL, &[], false)?, None, &[])? {
                let key = required(text(&r, 1)?, "plans.key")?;
                if r.get::<bool>(2)?.unwrap_or(false) {
                    default_plan = Some(key.clone());
                }
                let rank = r.get::<i32>(4)?.unwrap_or(0);
                cat.plan_grace
                    .insert(key, (r.get::<Interval>(3)?.map(span_of), rank));
            }
            let mut grants: HashMap<String, Vec<PlanGrant>> = HashMap::new();
            let mut keys = Vec::new();
            for r in c.select(&*kept(c, GRANTS_SQL, &[], false)?, None, &[])? {
                grants
                    .entry(required(text(&r, 1)?, "grants.feature")?)
                    .or_default()
                    .push(PlanGrant {
                        plan: required(text(&r, 2)?, "grants.plan")?.into(),
                        rank: required(r.get::<i32>(3)?, "plans.rank")?,
                        limit: r.get::<i64>(4)?,
                        period: text(&r, 5)?,
                        value: json(&r, 6)?,
                        subject_limit: r.get::<i64>(7)?,
                        overage: r
                            .get::<bool>(8)?
                            .unwrap_or(false)
                            .then(|| r.get::<i64>(9))
                            .transpose()?,
                        listed: r.get::<bool>(10)?.unwrap_or(true),
                    });
            }
            for r in c.select(&*kept(c, FEATURES_SQL, &[], false)?, None, &[])? {
                let key = required(text(&r, 1)?, "features.key")?;
                let kind = Kind::parse(&required(text(&r, 2)?, "features.kind")?)?;
                if let (Some(pool), Some(credits)) = (text(&r, 3)?, r.get::<i64>(4)?) {
                    cat.costs.insert(key.clone(), (pool, credits));
                }
                let facts = FeatureFacts {
                    key: key.clone(),
                    kind,
                    grants: grants.remove(&key).unwrap_or_default(),
                    default_plan: default_plan.clone(),
                    has_holds: false,
                    alerts: Vec::new(),
                };
                keys.push(key.clone());
                cat.features.insert(key, std::rc::Rc::new(facts));
            }
            let _ = cat.keys.set(keys);
            for r in c.select(&*kept(c, ADDON_GRANTS_SQL, &[], false)?, None, &[])? {
                cat.addon_grants
                    .entry(required(text(&r, 1)?, "addon_grants.feature")?)
                    .or_default()
                    .push((
                        required(text(&r, 2)?, "addon_grants.addon")?,
                        r.get::<i64>(3)?,
                        json(&r, 4)?,
                    ));
            }
            for r in c.select(&*kept(c, FLAGS_SQL, &[], false)?, None, &[])? {
                let percent = required(text(&r, 3)?, "flags.rollout_percent")?;
                cat.flags.insert(
                    required(text(&r, 1)?, "flags.feature")?,
                    FlagEntry {
                        enabled: r.get::<bool>(2)?.unwrap_or(true),
                        threshold: crate::rollout::threshold(&percent)?,
                        salt: required(text(&r, 4)?, "flags.salt")?,
                        ..FlagEntry::default()
                    },
                );
            }
            for r in c.select(&*kept(c, FLAG_LISTS_SQL, &[], false)?, None, &[])? {
                let feature = required(text(&r, 1)?, "flag_lists.feature")?;
                let id = required(text(&r, 2)?, "flag_lists.id")?;
                if let Some(flag) = cat.flags.get_mut(&feature) {
                    match text(&r, 3)?.as_deref() {
                        Some("deny") => flag.deny.insert(id),
                        _ => flag.allow.insert(id),
                    };
                }
            }
            Ok((
                (
                    cat.features,
                    cat.plan_grace,
                    cat.addon_grants,
                    cat.flags,
                    cat.costs,
                ),
                cat.keys.take(),
            ))
        })
    })
}

impl Catalogue {
    /// The feature keys in the database's order (its default collation,
    /// as `ORDER BY key` sorts them).
    pub fn keys(&self) -> &[String] {
        self.keys.get_or_init(|| {
            let mut keys: Vec<String> = self.features.keys().cloned().collect();
            keys.sort_by(|a, b| collate(a, b));
            keys
        })
    }
}

/// Two texts compared as the database's default collation compares them.
fn collate(a: &str, b: &str) -> std::cmp::Ordering {
    // SAFETY: varstr_cmp reads len bytes of each (no NUL needed).
    let c = unsafe {
        pg_sys::varstr_cmp(
            a.as_ptr().cast(),
            a.len() as i32,
            b.as_ptr().cast(),
            b.len() as i32,
            pg_sys::DEFAULT_COLLATION_OID,
        )
    };
    c.cmp(&0)
}

/// The catalogue's rows read directly; None when a table is not as the
/// install script made it (SQL reads them then).
fn load_catalogue_direct(namespace: pg_sys::Oid) -> FluxResult<Option<CatalogueRows>> {
    const PLANS: [(&str, pg_sys::Oid); 4] = [
        ("key", pg_sys::TEXTOID),
        ("rank", pg_sys::INT4OID),
        ("is_default", pg_sys::BOOLOID),
        ("grace_period", pg_sys::INTERVALOID),
    ];
    const GRANTS: [(&str, pg_sys::Oid); 6] = [
        ("feature", pg_sys::TEXTOID),
        ("plan", pg_sys::TEXTOID),
        ("enabled", pg_sys::BOOLOID),
        ("limit", pg_sys::INT8OID),
        ("period", pg_sys::TEXTOID),
        ("value", pg_sys::JSONBOID),
    ];
    // 0.2's column: absent under a 0.1.0 schema (this library serves one
    // until ALTER EXTENSION UPDATE).
    const SUBJECT_LIMIT: [(&str, pg_sys::Oid); 1] = [("subject_limit", pg_sys::INT8OID)];
    // 0.2's columns too.
    const LISTED: [(&str, pg_sys::Oid); 1] = [("listed", pg_sys::BOOLOID)];
    const OVERAGE: [(&str, pg_sys::Oid); 2] = [
        ("overage", pg_sys::BOOLOID),
        ("overage_cap", pg_sys::INT8OID),
    ];
    const FEATURES: [(&str, pg_sys::Oid); 2] =
        [("key", pg_sys::TEXTOID), ("kind", pg_sys::TEXTOID)];
    const COSTS: [(&str, pg_sys::Oid); 2] = [
        ("cost_pool", pg_sys::TEXTOID),
        ("cost_credits", pg_sys::INT8OID),
    ];
    const ADDON_GRANTS: [(&str, pg_sys::Oid); 4] = [
        ("feature", pg_sys::TEXTOID),
        ("addon", pg_sys::TEXTOID),
        ("limit", pg_sys::INT8OID),
        ("value", pg_sys::JSONBOID),
    ];
    const FLAGS: [(&str, pg_sys::Oid); 4] = [
        ("feature", pg_sys::TEXTOID),
        ("enabled", pg_sys::BOOLOID),
        ("rollout_percent", pg_sys::NUMERICOID),
        ("salt", pg_sys::TEXTOID),
    ];
    const FLAG_LISTS: [(&str, pg_sys::Oid); 3] = [
        ("feature", pg_sys::TEXTOID),
        ("id", pg_sys::TEXTOID),
        ("list", pg_sys::TEXTOID),
    ];
    let open = |name: &CStr| Table::open(namespace, name);
    let (Some(plans), Some(grants), Some(features), Some(addon_grants), Some(flags), Some(lists)) = (
        open(c"plans"),
        open(c"grants"),
        open(c"features"),
        open(c"addon_grants"),
        open(c"flags"),
        open(c"flag_lists"),
    ) else {
        return Ok(None);
    };
    let (Some(pc), Some(gc), Some(fc), Some(ac), Some(flc), Some(lc)) = (
        plans.columns(&PLANS),
        grants.columns(&GRANTS),
        features.columns(&FEATURES),
        addon_grants.columns(&ADDON_GRANTS),
        flags.columns(&FLAGS),
        lists.columns(&FLAG_LISTS),
    ) else {
        return Ok(None);
    };
    let subject_limit_at = grants.columns(&SUBJECT_LIMIT).map(|c| c[0]);
    let overage_at = grants.columns(&OVERAGE);
    let listed_at = plans.columns(&LISTED).map(|c| c[0]);
    let costs_at = features.columns(&COSTS);
    let snapshot = LoadSnapshot::take();
    let snap = snapshot.0;

    // Plans: grace periods, the default, and each plan's place in
    // `ORDER BY rank, key` (grants are listed in that order).
    let mut plan_rows = Vec::new();
    let mut plan_grace = HashMap::new();
    let mut default_plan = None;
    plans.scan(snap, |row| {
        let key = row.text(pc[0]).ok_or_else(|| null("plans.key"))?;
        let rank = row.int(pc[1]).ok_or_else(|| null("plans.rank"))? as i32;
        if row.int(pc[2]).is_some_and(|b| b != 0) {
            default_plan = Some(key.clone());
        }
        plan_grace.insert(key.clone(), (row.interval(pc[3]).map(span_of), rank));
        let listed = listed_at.is_none_or(|at| row.int(at).is_none_or(|b| b != 0));
        plan_rows.push((rank, key, listed));
        Ok(())
    })?;
    plan_rows.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| collate(&a.1, &b.1)));
    // Each plan's name is shared by its grants (one allocation per plan).
    let place: HashMap<&str, (usize, i32, std::rc::Rc<str>, bool)> = plan_rows
        .iter()
        .enumerate()
        .map(|(i, (rank, key, listed))| {
            (
                key.as_str(),
                (i, *rank, std::rc::Rc::from(key.as_str()), *listed),
            )
        })
        .collect();

    let mut by_feature: HashMap<String, Vec<(usize, PlanGrant)>> = HashMap::new();
    grants.scan(snap, |row| {
        if row.int(gc[2]).is_none_or(|b| b == 0) {
            return Ok(());
        }
        let plan = row.str(gc[1]).ok_or_else(|| null("grants.plan"))?;
        // The inner join: a grant of a plan that is not there is not listed.
        let Some((at, rank, name, listed)) = place.get(plan) else {
            return Ok(());
        };
        let grant = (
            *at,
            PlanGrant {
                plan: name.clone(),
                rank: *rank,
                limit: row.int(gc[3]),
                period: row.text(gc[4]),
                value: row.jsonb(gc[5]),
                subject_limit: subject_limit_at.and_then(|at| row.int(at)),
                overage: overage_at.and_then(|[on, cap]| {
                    row.int(on).is_some_and(|b| b != 0).then(|| row.int(cap))
                }),
                listed: *listed,
            },
        );
        // Looked up by the borrowed text: one allocation per feature, not
        // per grant.
        let feature = row.str(gc[0]).ok_or_else(|| null("grants.feature"))?;
        match by_feature.get_mut(feature) {
            Some(v) => v.push(grant),
            None => {
                by_feature.insert(feature.to_string(), vec![grant]);
            }
        }
        Ok(())
    })?;

    let mut feature_map = HashMap::new();
    let mut costs = HashMap::new();
    features.scan(snap, |row| {
        let key = row.text(fc[0]).ok_or_else(|| null("features.key"))?;
        let kind = Kind::parse(&row.text(fc[1]).ok_or_else(|| null("features.kind"))?)?;
        if let Some([p, c]) = costs_at {
            if let (Some(pool), Some(credits)) = (row.text(p), row.int(c)) {
                costs.insert(key.clone(), (pool, credits));
            }
        }
        let mut g = by_feature.remove(&key).unwrap_or_default();
        g.sort_by_key(|(at, _)| *at);
        let facts = FeatureFacts {
            key: key.clone(),
            kind,
            grants: g.into_iter().map(|(_, g)| g).collect(),
            default_plan: default_plan.clone(),
            has_holds: false,
            alerts: Vec::new(),
        };
        feature_map.insert(key, std::rc::Rc::new(facts));
        Ok(())
    })?;

    let mut units: HashMap<String, Vec<AddonUnit>> = HashMap::new();
    addon_grants.scan(snap, |row| {
        units
            .entry(
                row.text(ac[0])
                    .ok_or_else(|| null("addon_grants.feature"))?,
            )
            .or_default()
            .push((
                row.text(ac[1]).ok_or_else(|| null("addon_grants.addon"))?,
                row.int(ac[2]),
                row.jsonb(ac[3]),
            ));
        Ok(())
    })?;
    // `ORDER BY addon`, as the query lists them.
    for v in units.values_mut() {
        v.sort_by(|a, b| collate(&a.0, &b.0));
    }

    let mut flag_map = HashMap::new();
    flags.scan(snap, |row| {
        let feature = row.text(flc[0]).ok_or_else(|| null("flags.feature"))?;
        let percent = row
            .numeric(flc[2])
            .ok_or_else(|| null("flags.rollout_percent"))?;
        flag_map.insert(
            feature.clone(),
            FlagEntry {
                enabled: row.int(flc[1]).is_none_or(|b| b != 0),
                threshold: crate::rollout::threshold(&percent)?,
                salt: row.text(flc[3]).unwrap_or(feature),
                ..FlagEntry::default()
            },
        );
        Ok(())
    })?;
    lists.scan(snap, |row| {
        let feature = row.text(lc[0]).ok_or_else(|| null("flag_lists.feature"))?;
        let id = row.text(lc[1]).ok_or_else(|| null("flag_lists.id"))?;
        if let Some(flag) = flag_map.get_mut(&feature) {
            match row.text(lc[2]).as_deref() {
                Some("deny") => flag.deny.insert(id),
                _ => flag.allow.insert(id),
            };
        }
        Ok(())
    })?;
    Ok(Some((
        (feature_map, plan_grace, units, flag_map, costs),
        None,
    )))
}

/// A tenant as the cache holds it: the subscription row, every addon held
/// and every override, for all features.
#[derive(Debug, Clone)]
pub struct TenantEntry {
    /// addons and override_ are empty here (`facts_for` fills them per
    /// feature); plan_grace is filled when the entry is cached.
    pub base: TenantFacts,
    pub addons: Vec<(String, i32)>,
    pub overrides: HashMap<String, Override>,
}

impl TenantEntry {
    /// The tenant's facts for one feature.
    /// The tenant's facts for one feature when its addons or an override
    /// concern it; None when `base` says everything (the common case, which
    /// then costs no copy).
    pub fn facts_for(&self, feature: &str, cat: &Catalogue) -> Option<TenantFacts> {
        let grants = cat.addon_grants.get(feature);
        let has_addon =
            grants.is_some_and(|g| self.addons.iter().any(|(a, _)| g.iter().any(|u| &u.0 == a)));
        let override_ = self.overrides.get(feature);
        if !has_addon && override_.is_none() {
            return None;
        }
        let mut t = self.base.clone();
        if let Some(grants) = grants {
            for (addon, quantity) in &self.addons {
                for (a, limit, value) in grants.iter().filter(|g| &g.0 == addon) {
                    t.addons.push(AddonGrant {
                        addon: a.clone(),
                        quantity: *quantity,
                        limit: *limit,
                        value: value.clone(),
                    });
                }
            }
        }
        t.override_ = override_.cloned();
        Some(t)
    }
}

// The scheduled change's columns through to_jsonb: NULL under a 0.1.0
// schema, which has none.
const TENANT_SQL: &str = "SELECT plan, status, trial_ends_at, current_period_start, \
     current_period_end, cancel_at_period_end, past_due_since, grace_until, \
     pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.->>) 'scheduled_plan', \
     (pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.->>) 'scheduled_at')::pg_catalog.timestamptz \
     FROM flux.tenants t WHERE id OPERATOR(pg_catalog.=) $1";
const TENANT_ADDONS_SQL: &str =
    "SELECT addon, quantity FROM flux.tenant_addons WHERE tenant OPERATOR(pg_catalog.=) $1";
const TENANT_OVERRIDES_SQL: &str =
    "SELECT feature, enabled, \"limit\", value::pg_catalog.text, starts_at, expires_at, reason \
     FROM flux.overrides WHERE tenant OPERATOR(pg_catalog.=) $1";

/// A tenant's subscription from TENANT_SQL's columns, from column `at`.
fn tenant_base(id: &str, r: &SpiHeapTupleData, at: usize) -> FluxResult<TenantFacts> {
    Ok(TenantFacts {
        id: id.to_string(),
        plan: text(r, at)?,
        status: Status::parse(&required(text(r, at + 1)?, "tenants.status")?)?,
        trial_ends_at: ts(r, at + 2)?,
        current_period_start: ts(r, at + 3)?,
        current_period_end: ts(r, at + 4)?,
        cancel_at_period_end: r.get::<bool>(at + 5)?.unwrap_or(false),
        past_due_since: ts(r, at + 6)?,
        grace_until: ts(r, at + 7)?,
        plan_grace: None,
        addons: Vec::new(),
        override_: None,
        scheduled: scheduled(text(r, at + 8)?, ts(r, at + 9)?),
    })
}

/// A scheduled change from its two columns (both set, or neither: a CHECK
/// constraint); its grace and direction are filled when it is cached.
fn scheduled(plan: Option<String>, at: Option<i64>) -> Option<Scheduled> {
    Some(Scheduled {
        plan: plan?,
        at: at?,
        grace: None,
        direction: std::cmp::Ordering::Equal,
    })
}

/// An override from TENANT_OVERRIDES_SQL's columns, from column `at`.
fn override_row(r: &SpiHeapTupleData, at: usize) -> FluxResult<(String, Override)> {
    Ok((
        required(text(r, at)?, "overrides.feature")?,
        Override {
            enabled: r.get::<bool>(at + 1)?.unwrap_or(true),
            limit: r.get::<i64>(at + 2)?,
            value: json(r, at + 3)?,
            starts_at: ts(r, at + 4)?,
            expires_at: ts(r, at + 5)?,
            reason: text(r, at + 6)?,
        },
    ))
}

fn addon_row(r: &SpiHeapTupleData, at: usize) -> FluxResult<(String, i32)> {
    Ok((
        required(text(r, at)?, "tenant_addons.addon")?,
        required(r.get::<i32>(at + 1)?, "tenant_addons.quantity")?,
    ))
}

/// `load_tenant` through SQL: three queries.
fn load_tenant_sql(id: &str) -> FluxResult<Option<TenantEntry>> {
    with_latest_snapshot(|| {
        Spi::connect(|c| {
            let tenant = kept(c, TENANT_SQL, &[TEXT], false)?;
            let head = c.select(&*tenant, Some(1), &[id.into()])?;
            if head.is_empty() {
                return Ok(None);
            }
            let r = required(head.first().get_heap_tuple()?, "tenant row")?;
            let base = tenant_base(id, &r, 1)?;
            let mut addons = Vec::new();
            let tenant_addons = kept(c, TENANT_ADDONS_SQL, &[TEXT], false)?;
            for r in c.select(&*tenant_addons, None, &[id.into()])? {
                addons.push(addon_row(&r, 1)?);
            }
            let mut overrides = HashMap::new();
            let tenant_overrides = kept(c, TENANT_OVERRIDES_SQL, &[TEXT], false)?;
            for r in c.select(&*tenant_overrides, None, &[id.into()])? {
                let (feature, o) = override_row(&r, 1)?;
                overrides.insert(feature, o);
            }
            Ok(Some(TenantEntry {
                base,
                addons,
                overrides,
            }))
        })
    })
}

/// The tenant with its addons and overrides, or None when unknown (see the
/// module comment). `namespace` is schema flux's OID.
pub fn load_tenant(namespace: pg_sys::Oid, id: &str) -> FluxResult<Option<TenantEntry>> {
    match load_tenant_direct(namespace, id)? {
        Some(loaded) => Ok(loaded),
        None => load_tenant_sql(id),
    }
}

const TENANT_COLS: [(&str, pg_sys::Oid); 9] = [
    ("id", pg_sys::TEXTOID),
    ("plan", pg_sys::TEXTOID),
    ("status", pg_sys::TEXTOID),
    ("trial_ends_at", pg_sys::TIMESTAMPTZOID),
    ("current_period_start", pg_sys::TIMESTAMPTZOID),
    ("current_period_end", pg_sys::TIMESTAMPTZOID),
    ("cancel_at_period_end", pg_sys::BOOLOID),
    ("past_due_since", pg_sys::TIMESTAMPTZOID),
    ("grace_until", pg_sys::TIMESTAMPTZOID),
];
/// Added in 0.2.0: a tenant's scheduled plan change (none when missing).
const SCHEDULE_COLS: [(&str, pg_sys::Oid); 2] = [
    ("scheduled_plan", pg_sys::TEXTOID),
    ("scheduled_at", pg_sys::TIMESTAMPTZOID),
];
const ADDON_COLS: [(&str, pg_sys::Oid); 3] = [
    ("tenant", pg_sys::TEXTOID),
    ("addon", pg_sys::TEXTOID),
    ("quantity", pg_sys::INT4OID),
];
const OVERRIDE_COLS: [(&str, pg_sys::Oid); 8] = [
    ("tenant", pg_sys::TEXTOID),
    ("feature", pg_sys::TEXTOID),
    ("enabled", pg_sys::BOOLOID),
    ("limit", pg_sys::INT8OID),
    ("value", pg_sys::JSONBOID),
    ("starts_at", pg_sys::TIMESTAMPTZOID),
    ("expires_at", pg_sys::TIMESTAMPTZOID),
    ("reason", pg_sys::TEXTOID),
];

fn null(what: &str) -> FluxError {
    FluxError::Internal(format!("{what} is NULL"))
}

/// Some(the tenant) when read directly; None when SQL must read it.
fn load_tenant_direct(namespace: pg_sys::Oid, id: &str) -> FluxResult<Option<Option<TenantEntry>>> {
    let (Some(tenants), Some(addons_t), Some(overrides_t)) = (
        Table::open(namespace, c"tenants"),
        Table::open(namespace, c"tenant_addons"),
        Table::open(namespace, c"overrides"),
    ) else {
        return Ok(None);
    };
    let (Some(tc), Some(ac), Some(oc)) = (
        tenants.columns(&TENANT_COLS),
        addons_t.columns(&ADDON_COLS),
        overrides_t.columns(&OVERRIDE_COLS),
    ) else {
        return Ok(None);
    };
    let (Some(tk), Some(ak), Some(ok)) = (
        tenants.key(tc[0]),
        addons_t.key(ac[0]),
        overrides_t.key(oc[0]),
    ) else {
        return Ok(None);
    };
    let sc = tenants.columns(&SCHEDULE_COLS);
    let snapshot = LoadSnapshot::take();
    let mut base = None;
    tenants.probe(tk, tc[0], id, snapshot.0, |row| {
        base = Some(TenantFacts {
            id: id.to_string(),
            plan: row.text(tc[1]),
            status: Status::parse(&row.text(tc[2]).ok_or_else(|| null("tenants.status"))?)?,
            trial_ends_at: row.int(tc[3]),
            current_period_start: row.int(tc[4]),
            current_period_end: row.int(tc[5]),
            cancel_at_period_end: row.int(tc[6]).is_some_and(|b| b != 0),
            past_due_since: row.int(tc[7]),
            grace_until: row.int(tc[8]),
            plan_grace: None,
            addons: Vec::new(),
            override_: None,
            scheduled: sc
                .as_ref()
                .and_then(|c| scheduled(row.text(c[0]), row.int(c[1]))),
        });
        Ok(())
    })?;
    let Some(base) = base else {
        return Ok(Some(None));
    };
    let mut addons = Vec::new();
    if !addons_t.is_empty() {
        addons_t.probe(ak, ac[0], id, snapshot.0, |row| {
            addons.push((
                row.text(ac[1]).ok_or_else(|| null("tenant_addons.addon"))?,
                row.int(ac[2])
                    .ok_or_else(|| null("tenant_addons.quantity"))? as i32,
            ));
            Ok(())
        })?;
    }
    let mut overrides = HashMap::new();
    if !overrides_t.is_empty() {
        overrides_t.probe(ok, oc[0], id, snapshot.0, |row| {
            overrides.insert(
                row.text(oc[1]).ok_or_else(|| null("overrides.feature"))?,
                Override {
                    enabled: row.int(oc[2]).is_none_or(|b| b != 0),
                    limit: row.int(oc[3]),
                    value: row.jsonb(oc[4]),
                    starts_at: row.int(oc[5]),
                    expires_at: row.int(oc[6]),
                    reason: row.text(oc[7]),
                },
            );
            Ok(())
        })?;
    }
    Ok(Some(Some(TenantEntry {
        base,
        addons,
        overrides,
    })))
}

/// The snapshot a tenant load reads under: the latest, registered for the
/// load (see with_latest_snapshot); during a parallel query, the active one.
struct LoadSnapshot(pg_sys::Snapshot, bool);

impl LoadSnapshot {
    fn take() -> LoadSnapshot {
        // SAFETY: inside a transaction; a parallel query always has an
        // active snapshot; RegisterSnapshot copies the static latest one.
        unsafe {
            if crate::backend::in_parallel_mode() {
                LoadSnapshot(pg_sys::GetActiveSnapshot(), false)
            } else {
                LoadSnapshot(pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot()), true)
            }
        }
    }
}

impl Drop for LoadSnapshot {
    fn drop(&mut self) {
        // While an error unwinds, the aborting transaction releases it.
        if self.1 && !std::thread::panicking() {
            // SAFETY: registered by take().
            unsafe { pg_sys::UnregisterSnapshot(self.0) };
        }
    }
}

/// One of our tables, opened for a read (AccessShareLock, held to the end
/// of the transaction as the executor holds it); closed when dropped.
struct Table {
    rel: pg_sys::Relation,
}

impl Table {
    /// flux.`name`, when it is a plain heap table; None sends the caller to SQL.
    fn open(namespace: pg_sys::Oid, name: &CStr) -> Option<Table> {
        // SAFETY: a syscache lookup, then the relation opened under a lock
        // and closed by drop (or by the abort of the transaction); its
        // relcache entry is read while open.
        unsafe {
            let oid = pg_sys::get_relname_relid(name.as_ptr(), namespace);
            if oid == pg_sys::InvalidOid {
                return None;
            }
            let t = Table {
                rel: pg_sys::relation_open(oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE),
            };
            let form = &*(*t.rel).rd_rel;
            (form.relkind as u8 == pg_sys::RELKIND_RELATION
                && form.relam == pg_sys::HEAP_TABLE_AM_OID)
                .then_some(t)
        }
    }

    /// Where each named column is among the row's values, when every one
    /// exists with that type.
    fn columns<const N: usize>(&self, want: &[(&str, pg_sys::Oid); N]) -> Option<[usize; N]> {
        // SAFETY: reads the open relation's tuple descriptor.
        let attrs = unsafe { crate::pgver::attributes(&*(*self.rel).rd_att) };
        let mut at = [0usize; N];
        for (slot, (name, typ)) in at.iter_mut().zip(want) {
            *slot = attrs.iter().position(|a| {
                // SAFETY: attname is a NUL-terminated NameData.
                let n = unsafe { CStr::from_ptr(a.attname.data.as_ptr()) };
                !a.attisdropped && a.atttypid == *typ && n.to_bytes() == name.as_bytes()
            })?;
        }
        Some(at)
    }

    /// The primary key when it is a B-tree led by column `at`: its OID and
    /// that column's collation (a B-tree is searched under its own).
    fn key(&self, at: usize) -> Option<(pg_sys::Oid, pg_sys::Oid)> {
        // SAFETY: the index is opened (as the scan will lock it) and its
        // relcache entry read, then closed keeping the lock.
        unsafe {
            let index = crate::pgver::primary_key_index(self.rel);
            if index == pg_sys::InvalidOid {
                return None;
            }
            let ix = pg_sys::index_open(index, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            let form = &*(*ix).rd_index;
            let ok = (*(*ix).rd_rel).relam == pg_sys::BTREE_AM_OID
                && form.indnkeyatts >= 1
                && form.indkey.values.as_slice(1)[0] as usize == at + 1;
            let collation = *(*ix).rd_indcollation;
            pg_sys::index_close(ix, pg_sys::NoLock as pg_sys::LOCKMODE);
            ok.then_some((index, collation))
        }
    }

    /// Whether the table has no pages at all (so no row in any snapshot).
    fn is_empty(&self) -> bool {
        // SAFETY: the relation is open and locked.
        unsafe {
            pg_sys::RelationGetNumberOfBlocksInFork(self.rel, pg_sys::ForkNumber::MAIN_FORKNUM) == 0
        }
    }

    /// Every row, as `snapshot` sees it (a sequential scan).
    fn scan(
        &self,
        snapshot: pg_sys::Snapshot,
        f: impl FnMut(&RowValues) -> FluxResult<()>,
    ) -> FluxResult<()> {
        // SAFETY: a scan without keys, not through an index.
        let scan = unsafe {
            pg_sys::systable_beginscan(
                self.rel,
                pg_sys::InvalidOid,
                false,
                snapshot,
                0,
                std::ptr::null_mut(),
            )
        };
        self.read(scan, f)
    }

    /// Every row whose column `at` equals `value`, through the index `key`,
    /// as `snapshot` sees it: `f` reads each (its values point into the
    /// buffer, valid until the next row).
    fn probe(
        &self,
        key: (pg_sys::Oid, pg_sys::Oid),
        at: usize,
        value: &str,
        snapshot: pg_sys::Snapshot,
        f: impl FnMut(&RowValues) -> FluxResult<()>,
    ) -> FluxResult<()> {
        let datum = value.into_datum().unwrap_or(pg_sys::Datum::from(0));
        let mut sk = pg_sys::ScanKeyData::default();
        // SAFETY: one scan key on a column of the index (systable_beginscan
        // maps the table's column number to the index's); the scan is ended
        // before return, or by the abort should f raise; the row's values
        // are deformed into arrays of the descriptor's length.
        unsafe {
            pg_sys::ScanKeyEntryInitialize(
                &mut sk,
                0,
                (at + 1) as pg_sys::AttrNumber,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::InvalidOid,
                key.1,
                pg_sys::Oid::from(pg_sys::F_TEXTEQ),
                datum,
            );
            let scan = pg_sys::systable_beginscan(self.rel, key.0, true, snapshot, 1, &mut sk);
            self.read(scan, f)
        }
    }

    /// The rows of `scan`, deformed, each given to `f`; the scan is ended
    /// before return (or by the abort, should f raise).
    fn read(
        &self,
        scan: pg_sys::SysScanDesc,
        mut f: impl FnMut(&RowValues) -> FluxResult<()>,
    ) -> FluxResult<()> {
        // SAFETY: the scan is of this relation; each row is deformed into
        // arrays of its descriptor's length before the next is fetched.
        unsafe {
            let desc = (*self.rel).rd_att;
            let n = (*desc).natts as usize;
            let mut row = RowValues {
                values: vec![pg_sys::Datum::from(0); n],
                nulls: vec![true; n],
            };
            let mut result = Ok(());
            loop {
                let tuple = pg_sys::systable_getnext(scan);
                if tuple.is_null() {
                    break;
                }
                pg_sys::heap_deform_tuple(
                    tuple,
                    desc,
                    row.values.as_mut_ptr(),
                    row.nulls.as_mut_ptr(),
                );
                result = f(&row);
                if result.is_err() {
                    break;
                }
            }
            pg_sys::systable_endscan(scan);
            result
        }
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        // SAFETY: closes what open() opened; NoLock keeps the lock.
        unsafe { pg_sys::relation_close(self.rel, pg_sys::NoLock as pg_sys::LOCKMODE) };
    }
}

/// A row's values, deformed (see Table::probe).
struct RowValues {
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
}

impl RowValues {
    fn text(&self, at: usize) -> Option<String> {
        self.str(at).map(str::to_string)
    }

    /// A text column's value, borrowed (from the buffer, or from a
    /// detoasted copy in the current memory context).
    fn str(&self, at: usize) -> Option<&str> {
        if self.nulls[at] {
            return None;
        }
        // SAFETY: a text column's value (Table::columns checked the type),
        // valid while the row is (the caller's closure).
        unsafe { <&str>::from_datum(self.values[at], false) }
    }

    /// A by-value column (bool, integer, timestamptz) as a number.
    fn int(&self, at: usize) -> Option<i64> {
        (!self.nulls[at]).then(|| self.values[at].value() as i64)
    }

    /// A jsonb column as its text, exactly as `value::text` gives it.
    fn jsonb(&self, at: usize) -> Option<JsonText> {
        self.output(at, pg_sys::F_JSONB_OUT)
    }

    /// A numeric column as its text, as `::text` gives it.
    fn numeric(&self, at: usize) -> Option<String> {
        self.output(at, pg_sys::F_NUMERIC_OUT)
    }

    fn interval(&self, at: usize) -> Option<Interval> {
        if self.nulls[at] {
            return None;
        }
        // SAFETY: an interval column's value (Table::columns checked it).
        unsafe { Interval::from_datum(self.values[at], false) }
    }

    /// The text of column `at` by the type's output function `out`.
    fn output(&self, at: usize, out: u32) -> Option<String> {
        if self.nulls[at] {
            return None;
        }
        // SAFETY: the output function of the column's type (Table::columns
        // checked it) on its value; the palloc'd string is copied, then
        // freed.
        unsafe {
            let c = pg_sys::OidOutputFunctionCall(pg_sys::Oid::from(out), self.values[at]);
            let s = CStr::from_ptr(c).to_string_lossy().into_owned();
            pg_sys::pfree(c.cast());
            Some(s)
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    fn namespace() -> pg_sys::Oid {
        Spi::get_one::<pg_sys::Oid>("SELECT 'flux'::regnamespace::oid")
            .unwrap()
            .unwrap()
    }

    /// The index probes read exactly what the three queries read: every
    /// column, NULLs, jsonb values, several addons and overrides, an
    /// unknown tenant.
    #[pg_test]
    fn direct_and_sql_tenant_loads_agree() {
        Spi::run(
            "SELECT flux_define_feature('export');
             SELECT flux_define_feature('seats', 'limit');
             SELECT flux_define_feature('theme');
             SELECT flux_define_plan('pro', rank => 2);
             SELECT flux_define_addon('seat_pack');
             SELECT flux_define_addon('extra');
             SELECT flux_grant_addon('seat_pack', 'seats', 5);
             SELECT flux_subscribe('plain', 'pro');
             SELECT flux_subscribe('rich', 'pro', status => 'trialing', trial_ends_at => '2030-01-01 00:00+00');
             INSERT INTO flux.tenants (id) VALUES ('bare');
             SELECT flux_attach_addon('rich', 'seat_pack', 3);
             SELECT flux_attach_addon('rich', 'extra');
             SELECT flux_override('rich', 'export', false, reason => 'abuse');
             SELECT flux_override('rich', 'seats', true, 40, expires_at => '2031-01-01 00:00+00');
             SELECT flux_override('rich', 'theme', value => '{\"a\": [1, 2.50, \"x\"]}'::jsonb);",
        )
        .unwrap();
        let ns = namespace();
        for id in ["plain", "rich", "bare", "nobody"] {
            let direct = load_tenant_direct(ns, id).unwrap().expect("read directly");
            let sql = load_tenant_sql(id).unwrap();
            let show = |e: &Option<TenantEntry>| {
                e.as_ref().map(|e| {
                    let mut o: Vec<_> = e
                        .overrides
                        .iter()
                        .map(|(k, v)| format!("{k}={v:?}"))
                        .collect();
                    o.sort();
                    let mut a = e.addons.clone();
                    a.sort();
                    format!("{:?} {a:?} {o:?}", e.base)
                })
            };
            assert_eq!(show(&direct), show(&sql), "tenant {id}");
        }
        let rich = load_tenant_direct(ns, "rich").unwrap().unwrap().unwrap();
        assert_eq!(rich.addons.len(), 2);
        assert_eq!(rich.overrides.len(), 3);
        assert_eq!(
            rich.overrides["theme"].value.as_deref(),
            Some(r#"{"a": [1, 2.50, "x"]}"#)
        );
    }

    /// The scans read exactly what the queries read, in their order: grants
    /// by plan rank then key, addon grants by addon, keys by collation.
    #[pg_test]
    fn direct_and_sql_catalogue_loads_agree() {
        Spi::run(
            "SELECT flux_define_feature('export');
             SELECT flux_define_feature('a_b');
             SELECT flux_define_feature('ab');
             SELECT flux_define_feature('seats', 'limit');
             SELECT flux_define_feature('calls', 'metered');
             SELECT flux_define_plan('free', rank => 0, is_default => true);
             SELECT flux_define_plan('pro', rank => 2, grace_period => '3 days');
             SELECT flux_define_plan('team', rank => 2);
             SELECT flux_define_plan('ent', rank => 3);
             SELECT flux_grant(p, 'export', value => '{\"x\": 1.50}'::jsonb) FROM unnest(ARRAY['team', 'pro', 'ent']) p;
             SELECT flux_grant('pro', 'seats', 10);
             SELECT flux_grant('free', 'calls', 100, 'month');
             SELECT flux_grant('ent', 'ab');
             UPDATE flux.grants SET enabled = false WHERE plan = 'ent' AND feature = 'ab';
             SELECT flux_define_addon('zpack');
             SELECT flux_define_addon('apack');
             SELECT flux_grant_addon('zpack', 'seats', 5);
             SELECT flux_grant_addon('apack', 'seats', 2, '[1]'::jsonb);
             SELECT flux_set_flag('export', rollout_percent => 12.5);
             SELECT flux_set_flag('seats', enabled => false);
             SELECT flux_flag_deny('export', 'acme');
             SELECT flux_flag_allow('export', 'globex');
             SELECT flux_define_feature('credits', 'credits');
             SELECT flux_set_cost('export', 'credits', 3);",
        )
        .unwrap();
        let direct = load_catalogue_direct(namespace())
            .unwrap()
            .expect("read directly");
        let sql = load_catalogue_sql().unwrap();
        let show = |r: &CatalogueRows| {
            let sorted = |v: Vec<String>| {
                let mut v = v;
                v.sort();
                v
            };
            let ((f, p, a, fl, co), _) = r;
            (
                sorted(co.iter().map(|(k, v)| format!("{k}={v:?}")).collect()),
                sorted(f.iter().map(|(k, v)| format!("{k}={v:?}")).collect()),
                sorted(p.iter().map(|(k, v)| format!("{k}={v:?}")).collect()),
                sorted(a.iter().map(|(k, v)| format!("{k}={v:?}")).collect()),
                sorted(
                    fl.iter()
                        .map(|(k, v)| {
                            format!(
                                "{k}={} {} {} {:?} {:?}",
                                v.enabled,
                                v.threshold,
                                v.salt,
                                sorted(v.allow.iter().cloned().collect()),
                                sorted(v.deny.iter().cloned().collect())
                            )
                        })
                        .collect(),
                ),
            )
        };
        assert_eq!(show(&direct), show(&sql));
        assert_eq!(direct.0 .4["export"], ("credits".to_string(), 3));
        let plans: Vec<_> = direct.0 .0["export"]
            .grants
            .iter()
            .map(|g| g.plan.clone())
            .collect();
        assert_eq!(
            plans,
            ["pro".into(), "team".into(), "ent".into()] as [std::rc::Rc<str>; 3]
        );
        assert!(
            direct.0 .0["ab"].grants.is_empty(),
            "a disabled grant is not listed"
        );
        // The lazily sorted keys are SQL's ORDER BY key.
        let cat = Catalogue {
            features: direct.0 .0,
            ..Catalogue::default()
        };
        assert_eq!(Some(cat.keys().to_vec()), sql.1);
    }

    /// The install script's invalidation triggers are on exactly the
    /// tables the cache loads (WATCHED), each with the function its kind
    /// needs, row-level, enabled ALWAYS, plus a TRUNCATE trigger.
    #[pg_test]
    fn invalidation_triggers_match_the_watched_tables() {
        let rows: Vec<(String, String, String, bool, String)> = Spi::connect(|c| {
            let t = c.select(
                "SELECT c.relname::text, t.tgname::text, t.tgfoid::regproc::text,
                        t.tgtype::int & 1 = 1, t.tgenabled::text
                   FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                  WHERE c.relnamespace = 'flux'::regnamespace AND t.tgname LIKE 'cache\\_invalidate%'
                  ORDER BY 1, 2",
                None,
                &[],
            )?;
            let mut v = Vec::new();
            for r in t {
                v.push((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<String>(2)?.unwrap_or_default(),
                    r.get::<String>(3)?.unwrap_or_default(),
                    r.get::<bool>(4)?.unwrap_or_default(),
                    r.get::<String>(5)?.unwrap_or_default(),
                ));
            }
            Ok::<_, pgrx::spi::SpiError>(v)
        })
        .unwrap();
        let mut want = Vec::new();
        let tables = WATCHED.iter().chain(LATE_CATALOGUE.iter());
        for (i, table) in tables.enumerate() {
            let row_fn = if i < CATALOGUE_TABLES || i >= WATCHED.len() {
                "flux._cache_invalidate"
            } else {
                "flux._tenant_invalidate"
            };
            want.push((
                table.to_string(),
                "cache_invalidate".to_string(),
                row_fn.to_string(),
                true,
                "A".to_string(),
            ));
            want.push((
                table.to_string(),
                "cache_invalidate_truncate".to_string(),
                "flux._cache_invalidate".to_string(),
                false,
                "A".to_string(),
            ));
        }
        want.sort();
        assert_eq!(rows, want);
    }

    /// A table that is not as the install script made it is read by SQL.
    #[pg_test]
    fn a_retyped_column_sends_the_load_to_sql() {
        Spi::run(
            "SELECT flux_define_plan('pro');
             SELECT flux_subscribe('acme', 'pro');
             ALTER TABLE flux.tenants ALTER COLUMN grace_until TYPE timestamp;",
        )
        .unwrap();
        assert!(load_tenant_direct(namespace(), "acme").unwrap().is_none());
        assert!(load_tenant(namespace(), "acme").unwrap().is_some());
    }
}
