//! Reading the `flux` tables with SPI (read-only, so reads work on a hot
//! standby). Two kinds of reads:
//! - the cache's loads (`load_catalogue`, `load_tenant`) run under the
//!   latest snapshot, so a cache is never filled with data older than an
//!   invalidation it has already consumed;
//! - usage probes (`load_used`, `load_tat`) read under the statement's
//!   snapshot with plans prepared once per backend: one index probe each.

use crate::error::{FluxError, FluxResult};
use crate::gucs::span_of;
use crate::model::*;
use crate::timeutil::Span;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiHeapTupleData};
use pgrx::{PgBuiltInOids, PgOid};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

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
/// what it loaded as provisional (see cache.rs).
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

/// Refuse a write on a read-only connection with 25006 before touching any
/// table (on a hot standby, asking for a transaction id would fail with an
/// internal error instead).
pub fn ensure_writable(what: &str) -> FluxResult<()> {
    // SAFETY: reads backend-local state.
    let read_only = unsafe { pg_sys::XactReadOnly || pg_sys::RecoveryInProgress() };
    if read_only {
        return Err(FluxError::ReadOnly(format!(
            "{what} writes, and this is a read-only transaction (a hot standby, or SET TRANSACTION READ ONLY): call it on the primary"
        )));
    }
    Ok(())
}

/// The tables whose changes make the cache stale: those it loads (each has
/// the statement trigger flux._cache_invalidate, see finalize.sql). The
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
    /// Feature keys in order, for flux_entitlements.
    pub keys: Vec<String>,
    pub plan_grace: HashMap<String, Option<Span>>,
    /// By feature: what one unit of each addon grants.
    pub addon_grants: HashMap<String, Vec<AddonUnit>>,
    pub flags: HashMap<String, FlagEntry>,
    /// OIDs of the flux tables whose changes make the cache stale.
    pub watched: Vec<pg_sys::Oid>,
    /// The composite type flux.decision (looking it up by name per call
    /// cost more than building the row).
    pub decision_type: pg_sys::Oid,
    /// flux.decision's attributes are DECISION_COLUMNS (so a row can be
    /// formed in one go, not set attribute by attribute).
    pub decision_plain: bool,
    /// The schema flux (counters.rs finds flux.usage in it).
    pub namespace: pg_sys::Oid,
}

pub fn load_catalogue() -> FluxResult<Catalogue> {
    with_latest_snapshot(|| {
        Spi::connect(|c| {
            let mut cat = Catalogue::default();
            let mut default_plan = None;
            for r in c.select(
                "SELECT key, is_default, grace_period FROM flux.plans",
                None,
                &[],
            )? {
                let key = required(text(&r, 1)?, "plans.key")?;
                if r.get::<bool>(2)?.unwrap_or(false) {
                    default_plan = Some(key.clone());
                }
                cat.plan_grace
                    .insert(key, r.get::<Interval>(3)?.map(span_of));
            }
            let mut grants: HashMap<String, Vec<PlanGrant>> = HashMap::new();
            for r in c.select(
                "SELECT g.feature, g.plan, p.rank, g.\"limit\", g.period, g.value::pg_catalog.text \
                 FROM flux.grants g JOIN flux.plans p ON p.key OPERATOR(pg_catalog.=) g.plan \
                 WHERE g.enabled ORDER BY g.feature, p.rank, p.key",
                None,
                &[],
            )? {
                grants
                    .entry(required(text(&r, 1)?, "grants.feature")?)
                    .or_default()
                    .push(PlanGrant {
                        plan: required(text(&r, 2)?, "grants.plan")?,
                        rank: required(r.get::<i32>(3)?, "plans.rank")?,
                        limit: r.get::<i64>(4)?,
                        period: text(&r, 5)?,
                        value: json(&r, 6)?,
                    });
            }
            for r in c.select(
                "SELECT key, kind FROM flux.features ORDER BY key",
                None,
                &[],
            )? {
                let key = required(text(&r, 1)?, "features.key")?;
                let kind = Kind::parse(&required(text(&r, 2)?, "features.kind")?)?;
                let facts = FeatureFacts {
                    key: key.clone(),
                    kind,
                    grants: grants.remove(&key).unwrap_or_default(),
                    default_plan: default_plan.clone(),
                };
                cat.keys.push(key.clone());
                cat.features.insert(key, std::rc::Rc::new(facts));
            }
            for r in c.select(
                "SELECT feature, addon, \"limit\", value::pg_catalog.text FROM flux.addon_grants ORDER BY addon",
                None,
                &[],
            )? {
                cat.addon_grants
                    .entry(required(text(&r, 1)?, "addon_grants.feature")?)
                    .or_default()
                    .push((
                        required(text(&r, 2)?, "addon_grants.addon")?,
                        r.get::<i64>(3)?,
                        json(&r, 4)?,
                    ));
            }
            for r in c.select(
                "SELECT feature, enabled, rollout_percent::pg_catalog.text, coalesce(salt, feature) FROM flux.flags",
                None,
                &[],
            )? {
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
            for r in c.select("SELECT feature, id, list FROM flux.flag_lists", None, &[])? {
                let feature = required(text(&r, 1)?, "flag_lists.feature")?;
                let id = required(text(&r, 2)?, "flag_lists.id")?;
                if let Some(flag) = cat.flags.get_mut(&feature) {
                    match text(&r, 3)?.as_deref() {
                        Some("deny") => flag.deny.insert(id),
                        _ => flag.allow.insert(id),
                    };
                }
            }
            // What the cache needs to know about the schema, in one query
            // (a new backend, a parallel worker above all, pays the parse
            // and plan of each; scanning pg_class for the schema's tables
            // was half of a cold load).
            let meta = c.select(
                "SELECT $1::pg_catalog.regclass[]::pg_catalog.oid[], \
                        'flux.decision'::pg_catalog.regtype::pg_catalog.oid, \
                        (SELECT pg_catalog.array_agg(attname::pg_catalog.text ORDER BY attnum) \
                           FROM pg_catalog.pg_attribute \
                          WHERE attrelid OPERATOR(pg_catalog.=) 'flux.decision'::pg_catalog.regclass \
                            AND attnum OPERATOR(pg_catalog.>) 0 AND NOT attisdropped), \
                        'flux'::pg_catalog.regnamespace::pg_catalog.oid",
                Some(1),
                &[WATCHED.map(|t| format!("flux.{t}")).to_vec().into()],
            )?;
            let meta = meta.first();
            cat.watched = required(meta.get::<Vec<pg_sys::Oid>>(1)?, "watched tables")?;
            cat.decision_type = required(meta.get::<pg_sys::Oid>(2)?, "flux.decision")?;
            let names = meta.get::<Vec<String>>(3)?.unwrap_or_default();
            cat.decision_plain = names.iter().map(String::as_str).eq(DECISION_COLUMNS);
            cat.namespace = required(meta.get::<pg_sys::Oid>(4)?, "schema flux")?;
            Ok(cat)
        })
    })
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

/// Plans prepared once per backend and kept (SPI_keepplan): parsing and
/// planning a statement costs more than running it.
struct Plans {
    tenant: OwnedPreparedStatement,
    tenant_addons: OwnedPreparedStatement,
    tenant_overrides: OwnedPreparedStatement,
    tat: OwnedPreparedStatement,
}

thread_local! {
    static PLANS: RefCell<Option<std::rc::Rc<Plans>>> = const { RefCell::new(None) };
}

const TEXT: PgOid = PgOid::BuiltIn(PgBuiltInOids::TEXTOID);

fn plans(c: &SpiClient) -> FluxResult<std::rc::Rc<Plans>> {
    if let Some(p) = PLANS.with(|p| p.borrow().clone()) {
        return Ok(p);
    }
    let p = std::rc::Rc::new(Plans {
        tenant: c
            .prepare(
                &format!("SELECT {TENANT_COLUMNS} FROM flux.tenants WHERE id OPERATOR(pg_catalog.=) $1"),
                &[TEXT],
            )?
            .keep(),
        tenant_addons: c
            .prepare(
                "SELECT addon, quantity FROM flux.tenant_addons WHERE tenant OPERATOR(pg_catalog.=) $1",
                &[TEXT],
            )?
            .keep(),
        tenant_overrides: c
            .prepare(
                &format!("SELECT {OVERRIDE_COLUMNS} FROM flux.overrides WHERE tenant OPERATOR(pg_catalog.=) $1"),
                &[TEXT],
            )?
            .keep(),
        tat: c
            .prepare(
                "SELECT tat FROM flux.rate_state \
                 WHERE tenant OPERATOR(pg_catalog.=) $1 AND feature OPERATOR(pg_catalog.=) $2",
                &[TEXT, TEXT],
            )?
            .keep(),
    });
    PLANS.with(|slot| *slot.borrow_mut() = Some(p.clone()));
    Ok(p)
}

thread_local! {
    static KEPT: RefCell<HashMap<&'static str, std::rc::Rc<OwnedPreparedStatement>>> =
        RefCell::new(HashMap::new());
}

/// A statement prepared once per backend and kept, looked up by its text.
pub fn kept(
    c: &SpiClient,
    sql: &'static str,
    args: &[PgOid],
    mutating: bool,
) -> FluxResult<std::rc::Rc<OwnedPreparedStatement>> {
    if let Some(p) = KEPT.with(|k| k.borrow().get(sql).cloned()) {
        return Ok(p);
    }
    let p = if mutating {
        c.prepare_mut(sql, args)?
    } else {
        c.prepare(sql, args)?
    };
    let p = std::rc::Rc::new(p.keep());
    KEPT.with(|k| k.borrow_mut().insert(sql, p.clone()));
    Ok(p)
}

/// Forget the prepared plans (the extension was dropped or replaced).
pub fn forget_plans() {
    PLANS.with(|p| *p.borrow_mut() = None);
    KEPT.with(|k| k.borrow_mut().clear());
}

const TENANT_COLUMNS: &str = "plan, status, trial_ends_at, current_period_start, \
     current_period_end, cancel_at_period_end, past_due_since, grace_until";
const OVERRIDE_COLUMNS: &str =
    "feature, enabled, \"limit\", value::pg_catalog.text, starts_at, expires_at, reason";

/// A tenant's subscription from TENANT_COLUMNS starting at column `at`.
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
    })
}

/// An override from OVERRIDE_COLUMNS starting at column `at`.
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

/// The tenant with its addons and overrides, or None when unknown.
pub fn load_tenant(id: &str) -> FluxResult<Option<TenantEntry>> {
    with_latest_snapshot(|| {
        Spi::connect(|c| {
            let p = plans(c)?;
            let head = c.select(&p.tenant, Some(1), &[id.into()])?;
            if head.is_empty() {
                return Ok(None);
            }
            let r = required(head.first().get_heap_tuple()?, "tenant row")?;
            let base = tenant_base(id, &r, 1)?;
            let mut addons = Vec::new();
            for r in c.select(&p.tenant_addons, None, &[id.into()])? {
                addons.push(addon_row(&r, 1)?);
            }
            let mut overrides = HashMap::new();
            for r in c.select(&p.tenant_overrides, None, &[id.into()])? {
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

/// Every tenant, in three queries, when there are at most `max` of them
/// (None otherwise). A parallel worker starts with an empty cache for each
/// query; loading a thousand tenants one by one (three probes each) cost
/// the worker more than its share of the scan.
pub fn load_all_tenants(max: usize) -> FluxResult<Option<Vec<TenantEntry>>> {
    with_latest_snapshot(|| {
        Spi::connect(|c| {
            // One more than `max` says there are too many (no count first:
            // in a worker each query is parsed and planned cold).
            let sql = format!("SELECT id, {TENANT_COLUMNS} FROM flux.tenants LIMIT $1");
            let rows = c.select(&sql, None, &[((max + 1) as i64).into()])?;
            if rows.len() > max {
                return Ok(None);
            }
            let mut all: HashMap<String, TenantEntry> = HashMap::with_capacity(rows.len());
            for r in rows {
                let id = required(text(&r, 1)?, "tenants.id")?;
                let base = tenant_base(&id, &r, 2)?;
                all.insert(
                    id,
                    TenantEntry {
                        base,
                        addons: Vec::new(),
                        overrides: HashMap::new(),
                    },
                );
            }
            for r in c.select(
                "SELECT tenant, addon, quantity FROM flux.tenant_addons",
                None,
                &[],
            )? {
                let id = required(text(&r, 1)?, "tenant_addons.tenant")?;
                if let Some(e) = all.get_mut(&id) {
                    e.addons.push(addon_row(&r, 2)?);
                }
            }
            let sql = format!("SELECT tenant, {OVERRIDE_COLUMNS} FROM flux.overrides");
            for r in c.select(&sql, None, &[])? {
                let id = required(text(&r, 1)?, "overrides.tenant")?;
                if let Some(e) = all.get_mut(&id) {
                    let (feature, o) = override_row(&r, 2)?;
                    e.overrides.insert(feature, o);
                }
            }
            Ok(Some(all.into_values().collect()))
        })
    })
}

/// Units recorded for a counter in the period starting at `period_start`
/// (-infinity for limit features): one primary-key probe.
pub fn load_used(tenant: &str, feature: &str, period_start: Option<i64>) -> FluxResult<i64> {
    let cat = crate::cache::catalogue()?;
    let start = ts_datum(period_start).into_inner();
    crate::counters::read_used(cat.namespace, tenant, feature, start)
}

/// The rate limiter's theoretical arrival time, if any.
pub fn load_tat(tenant: &str, feature: &str) -> FluxResult<Option<i64>> {
    let _owner = crate::privilege::AsOwner::enter()?;
    Spi::connect(|c| {
        let p = plans(c)?;
        let t = c.select(&p.tat, Some(1), &[tenant.into(), feature.into()])?;
        Ok(if t.is_empty() {
            None
        } else {
            t.first()
                .get_one::<TimestampWithTimeZone>()?
                .map(|t| t.into_inner())
        })
    })
}

/// A timestamp for SPI; None is -infinity (the period of limit features).
pub fn ts_datum(t: Option<i64>) -> TimestampWithTimeZone {
    match t {
        Some(v) => TimestampWithTimeZone::try_from(v)
            .unwrap_or_else(|_| TimestampWithTimeZone::negative_infinity()),
        None => TimestampWithTimeZone::negative_infinity(),
    }
}

/// Run a statement that writes (refused on a read-only connection).
pub fn exec(sql: &str, args: &[pgrx::datum::DatumWithOid]) -> FluxResult<()> {
    ensure_writable("this function")?;
    let _path = crate::privilege::Pinned::enter();
    Spi::connect_mut(|c| c.update(sql, None, args).map(|_| ()))?;
    Ok(())
}

/// The first column of the first row of a read-only query, or None.
pub fn one<T: FromDatum + IntoDatum>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> FluxResult<Option<T>> {
    let _path = crate::privilege::Pinned::enter();
    Spi::connect(|c| {
        let t = c.select(sql, Some(1), args)?;
        Ok(if t.is_empty() {
            None
        } else {
            t.first().get_one::<T>()?
        })
    })
}

/// The same for a statement that writes (UPDATE ... RETURNING).
pub fn one_mut<T: FromDatum + IntoDatum>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> FluxResult<Option<T>> {
    let _path = crate::privilege::Pinned::enter();
    Spi::connect_mut(|c| {
        let t = c.update(sql, Some(1), args)?;
        Ok(if t.is_empty() {
            None
        } else {
            t.first().get_one::<T>()?
        })
    })
}

/// An application table's name as SQL (schema-qualified when needed) and
/// the type of its tenant column; a missing column is an error that says
/// what to pass instead.
pub fn table_and_column(tbl: pg_sys::Oid, column: &str) -> FluxResult<(String, String)> {
    let table = one::<String>(
        "SELECT $1::pg_catalog.regclass::pg_catalog.text",
        &[tbl.into()],
    )?
    .unwrap_or_default();
    let coltype = one::<String>(
        "SELECT pg_catalog.format_type(atttypid, atttypmod) FROM pg_catalog.pg_attribute \
         WHERE attrelid OPERATOR(pg_catalog.=) $1 AND attname OPERATOR(pg_catalog.=) $2 \
           AND attnum OPERATOR(pg_catalog.>) 0 AND NOT attisdropped",
        &[tbl.into(), column.into()],
    )?
    .ok_or_else(|| {
        FluxError::InvalidValue(format!(
            "table {table} has no column \"{column}\": pass the tenant column as tenant_column"
        ))
    })?;
    Ok((table, coltype))
}
