//! Settings (`flux.*`) and the clock they drive.

use crate::error::{shown, FluxError, FluxResult};
use crate::timeutil::Span;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;
use std::str::FromStr;

/// A string setting of ours.
pub type StringSetting = GucSetting<Option<CString>>;

pub static NOW: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static DEFAULT_GRACE_PERIOD: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"7 days"));
pub static TENANT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static JWT_TENANT_CLAIM: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"tenant_id"));
pub static API_KEY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static SUBJECT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static JWT_SUBJECT_CLAIM: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"sub"));
pub static STATS_MAX: GucSetting<i32> = GucSetting::<i32>::new(5000);

/// Bumped by the assign hooks of the settings a decision depends on
/// (flux.now, flux.default_grace_period): answers remembered under another
/// value are forgotten (cache/answers.rs). A plain static, not a
/// thread-local: the hot path reads it, and a backend has one thread.
static SETTINGS_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The generation of the decision settings (see SETTINGS_GENERATION).
#[inline]
pub fn settings_generation() -> u64 {
    SETTINGS_GENERATION.load(std::sync::atomic::Ordering::Relaxed)
}

unsafe extern "C-unwind" fn decision_setting_assigned(
    _newval: *const std::ffi::c_char,
    _extra: *mut std::ffi::c_void,
) {
    SETTINGS_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

pub fn init() {
    // SAFETY: the hook only bumps a counter; it cannot raise or panic.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"flux.now",
            c"When set, the clock flux_entitlements uses instead of the transaction time.",
            c"For tests, simulations and what-if questions (\"what will this tenant have on the 1st?\"). Any timestamptz literal; empty or unset means the transaction start time. Only superusers and members of flux_admin may set it.",
            &NOW,
            // Every time rule (trials, key expiry, quota periods) follows
            // this clock: only superusers and flux_admin (GRANT SET ON
            // PARAMETER in the install script) may move it.
            GucContext::Suset,
            GucFlags::default(),
            None,
            Some(decision_setting_assigned),
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"flux.default_grace_period",
            c"How long a past_due subscription stays live when its plan sets no grace_period.",
            c"An interval, default 7 days. Only superusers and members of flux_admin may set it.",
            &DEFAULT_GRACE_PERIOD,
            // A tenant past its grace must not extend it: like flux.now.
            GucContext::Suset,
            GucFlags::default(),
            None,
            Some(decision_setting_assigned),
            None,
        );
    }
    GucRegistry::define_string_guc(
        c"flux.tenant",
        c"The current tenant, as returned by flux_current_tenant().",
        c"Set by trusted application connections (SET LOCAL flux.tenant = 'acme') or by flux_authenticate().",
        &TENANT,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"flux.jwt_tenant_claim",
        c"The claim in request.jwt.claims that names the tenant when flux.tenant is not set.",
        c"PostgREST sets request.jwt.claims on every request; default tenant_id.",
        &JWT_TENANT_CLAIM,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"flux.api_key",
        c"The id of the API key flux_authenticate() made current in this transaction (flux_current_api_key()).",
        c"Set by flux_authenticate() only (superuser-only for SET): a caller can neither name another key nor shed its own key's scopes. A setting, so parallel workers see it too.",
        &API_KEY,
        GucContext::Suset,
        GucFlags::NO_SHOW_ALL | GucFlags::NO_RESET_ALL,
    );
    GucRegistry::define_string_guc(
        c"flux.subject",
        c"The current subject (a user inside the tenant), as returned by flux_current_subject().",
        c"Set by application connections (SET LOCAL flux.subject = 'user_42'); subjects steer rollouts and their own allowances (flux_grant's subject_limit).",
        &SUBJECT,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"flux.jwt_subject_claim",
        c"The claim in request.jwt.claims that names the subject when flux.subject is not set.",
        c"Default sub, PostgREST's user id.",
        &JWT_SUBJECT_CLAIM,
        GucContext::Userset,
        GucFlags::default(),
    );
}

/// flux.stats_max: defined only while shared_preload_libraries loads us
/// (a server-start setting cannot be defined later; stats/ says why it is
/// needed).
pub fn init_stats() {
    GucRegistry::define_int_guc(
        c"flux.stats_max",
        c"How many entries the decision statistics keep (flux_decision_stats, flux_denials).",
        c"Each entry is one (feature, plan, reason) or one (tenant, feature, reason); when full, the least used 5% are evicted. About 350 bytes of shared memory per entry. Set at server start.",
        &STATS_MAX,
        100,
        1_000_000,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}

pub fn string_setting(g: &GucSetting<Option<CString>>) -> Option<String> {
    g.get()
        .and_then(|c| c.into_string().ok())
        .filter(|s| !s.trim().is_empty())
}

/// The current API key's id (flux.api_key), without copying it: the hot
/// path's one load when no key is current.
pub fn api_key_bytes() -> Option<&'static [u8]> {
    setting_bytes(&API_KEY)
}

/// The current text of a string setting, without copying it: the hot path
/// reads flux.now and flux.default_grace_period on every decision, and
/// `GucSetting::get` allocates a copy each time. None when unset or blank.
fn setting_bytes(g: &GucSetting<Option<CString>>) -> Option<&'static [u8]> {
    // SAFETY: the GUC machinery owns the string and replaces (never mutates)
    // it on SET; the slice is only used before this backend runs any more
    // SQL, so it cannot be freed under us.
    let raw = unsafe { *g.as_ptr() };
    if raw.is_null() {
        return None;
    }
    // SAFETY: a non-null GUC string is NUL-terminated.
    let bytes = unsafe { std::ffi::CStr::from_ptr(raw) }.to_bytes();
    (!bytes.trim_ascii().is_empty()).then_some(bytes)
}

type Memo<T> = std::thread::LocalKey<std::cell::RefCell<Option<(Vec<u8>, T)>>>;

/// The value of a setting's text, parsed once per text: parsing a timestamp
/// or an interval on every decision cost more than the decision.
fn parsed<T: Copy>(
    memo: &'static Memo<T>,
    bytes: &[u8],
    parse: impl FnOnce(&str) -> FluxResult<T>,
) -> FluxResult<T> {
    let known = memo.with(|m| {
        m.borrow()
            .as_ref()
            .filter(|(b, _)| b.as_slice() == bytes)
            .map(|(_, v)| *v)
    });
    if let Some(v) = known {
        return Ok(v);
    }
    let v = parse(&String::from_utf8_lossy(bytes))?;
    memo.with(|m| *m.borrow_mut() = Some((bytes.to_vec(), v)));
    Ok(v)
}

thread_local! {
    static NOW_MEMO: std::cell::RefCell<Option<(Vec<u8>, i64)>> = const { std::cell::RefCell::new(None) };
    static GRACE_MEMO: std::cell::RefCell<Option<(Vec<u8>, Span)>> = const { std::cell::RefCell::new(None) };
}

/// The bytes of flux.tenant when set and not blank, read in place (the
/// per-row check compares them with its tenant argument).
pub fn tenant_bytes() -> Option<&'static [u8]> {
    setting_bytes(&TENANT)
}

/// Whether flux.now is set (the clock is then fixed, not the transaction's).
pub fn clock_is_set() -> bool {
    setting_bytes(&NOW).is_some()
}

/// The clock every time-dependent rule uses: `flux.now` when set, else the
/// start of the current transaction (so one transaction sees one instant).
pub fn clock() -> FluxResult<i64> {
    let Some(bytes) = setting_bytes(&NOW) else {
        return Ok(crate::backend::transaction_start());
    };
    parsed(&NOW_MEMO, bytes, |s| {
        let ts = TimestampWithTimeZone::from_str(s).map_err(|_| {
            FluxError::BadDatetime(format!(
                "invalid flux.now {}: expected a timestamptz such as '2026-12-01 00:00+00', or empty for the transaction time",
                shown(s)
            ))
        })?;
        if !ts.is_finite() {
            return Err(FluxError::BadDatetime(format!(
                "invalid flux.now {}: the clock must be a finite time",
                shown(s)
            )));
        }
        Ok(ts.into_inner())
    })
}

/// Parse an interval literal into a Span.
pub fn parse_span(s: &str) -> Option<Span> {
    Interval::from_str(s).ok().map(span_of)
}

pub fn span_of(iv: Interval) -> Span {
    Span {
        months: iv.months(),
        days: iv.days(),
        micros: iv.micros(),
    }
}

pub fn default_grace() -> FluxResult<Span> {
    let bytes = setting_bytes(&DEFAULT_GRACE_PERIOD).unwrap_or(b"7 days");
    parsed(&GRACE_MEMO, bytes, |s| {
        match parse_span(s) {
        Some(span) if span.months >= 0 && span.days >= 0 && span.micros >= 0 => Ok(span),
        _ => Err(FluxError::BadDatetime(format!(
            "invalid flux.default_grace_period {}: expected a non-negative interval such as '7 days'",
            shown(s)
        ))),
    }
    })
}

pub static IDEMPOTENCY_TTL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"7 days"));

pub static ACTOR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

pub static CACHE_TENANTS: GucSetting<i32> = GucSetting::<i32>::new(10_000);

pub static ALERT_NOTIFY: GucSetting<bool> = GucSetting::<bool>::new(true);

pub fn cache_tenants() -> usize {
    CACHE_TENANTS.get().max(1) as usize
}

pub fn init_metering() {
    GucRegistry::define_string_guc(
        c"flux.actor",
        c"Who the audit log names for changes made in this session (default: the role).",
        c"Set it to attribute changes to something other than the database role, such as a billing event id or an application user. Only superusers and members of flux_admin may set it; flux.audit_log.role always records the real role.",
        &ACTOR,
        // The audit log's signature: not the caller's to forge (superusers
        // and flux_admin only, like flux.now).
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"flux.alert_notify",
        c"Whether a consume that crosses a usage alert threshold also sends NOTIFY flux_usage.",
        c"On by default. The flux.usage_alerts row is written either way. Off for a server whose NOTIFY queue other roles can fill (a full queue makes the crossing consume fail at commit), or where no one listens; applications then poll flux.usage_alerts. Only superusers and members of flux_admin may set it.",
        &ALERT_NOTIFY,
        // A tenant must not silence its own alerts.
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"flux.cache_tenants",
        c"How many tenants each backend keeps in its decision cache.",
        c"The catalogue is cached whole; tenants are kept in a bounded, least-recently-used cache of this size.",
        &CACHE_TENANTS,
        1,
        100_000_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"flux.idempotency_ttl",
        c"How long flux_consume remembers an idempotency key.",
        c"An interval, default 7 days. A key older than this counts as new; flux_prune_usage_keys() deletes such keys.",
        &IDEMPOTENCY_TTL,
        GucContext::Userset,
        GucFlags::default(),
    );
}

pub fn idempotency_ttl() -> FluxResult<Span> {
    let s = string_setting(&IDEMPOTENCY_TTL).unwrap_or_else(|| "7 days".to_string());
    match parse_span(&s) {
        Some(span) if span.months >= 0 && span.days >= 0 && span.micros >= 0 => Ok(span),
        _ => Err(FluxError::BadDatetime(format!(
            "invalid flux.idempotency_ttl {}: expected a non-negative interval such as '7 days'",
            shown(&s)
        ))),
    }
}
