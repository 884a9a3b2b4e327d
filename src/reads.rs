//! The read functions of the contract: flux_check, flux_decide,
//! flux_entitlements and flux_value. They take the entitle step
//! (entitle.rs), add usage figures (usage/) and never write.

use crate::backend::Text;
use crate::decision::steady_window;
use crate::entitle::{entitle, entitle_with, to_composite};
use crate::error::{FluxResult, OrRaise};
use crate::model::Decision;
use crate::{access, cache, gucs, identity, stats, usage};
use pgrx::prelude::*;
use pgrx::FromDatum;

/// Decide for one tenant and feature, with usage figures: would one more
/// unit pass? Reads only.
pub fn decide_one(tenant: &str, feature: &str, subject: Option<&str>) -> FluxResult<Decision> {
    let mut x = entitle(tenant, feature, subject)?;
    usage::observe(&mut x, 1)?;
    Ok(x.d)
}

/// Only whether it is allowed: no message is built (flux_check, policies).
/// Answers that read no usage are remembered (cache/answers.rs): answers of
/// the tenant alone, so a decision with a current API key (its scopes and
/// allowances) or for a subject (its rollout bucket, its allowance) is
/// made anew, from the cached facts.
pub fn allowed(tenant: &str, feature: &str, subject: Option<&str>) -> FluxResult<bool> {
    let tenant_alone = subject.is_none() && gucs::api_key_bytes().is_none();
    if tenant_alone {
        if let Some((a, mark)) = cache::answer(tenant.as_bytes(), feature.as_bytes())? {
            if !stats::enabled() || stats::rechecked(mark) {
                return Ok(a);
            }
        }
    }
    decide_allowed(tenant, feature, subject, tenant_alone)
}

/// `allowed` past the answer table: decide, and remember the answer.
fn decide_allowed(
    tenant: &str,
    feature: &str,
    subject: Option<&str>,
    remember: bool,
) -> FluxResult<bool> {
    let mut x = entitle_with(tenant, feature, subject, false)?;
    let read_usage = usage::observe(&mut x, 1)?;
    // Counted, and the answer kept with what it counts as (stats/local.rs).
    let mark = stats::checked(&x.d, remember);
    if !read_usage && remember {
        let window = steady_window(x.tenant(), &x.ctx);
        cache::remember(
            &x.facts,
            tenant,
            feature,
            x.d.allowed,
            mark,
            x.ctx.now,
            gucs::clock_is_set(),
            window,
        );
    }
    Ok(x.d.allowed)
}

// flux_check(tenant, feature) is the per-row hot path, so its entry point is
// written by hand. pgrx's generated one (argument iterator, guard, memory
// context switch) cost 9 ns of a 38 ns warm check, measured over 1M rows.
// A kept answer is returned by code that cannot raise or call into
// PostgreSQL (cache::answer_ready); everything else takes the guarded path.
// The SQL is exactly what pgrx generated for the released 0.1.0.
pgrx::extension_sql!(
    r#"
CREATE  FUNCTION "flux_check"(
	"tenant" TEXT, /* & str */
	"feature" TEXT /* & str */
) RETURNS bool /* bool */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'flux_check_wrapper';
"#,
    name = "flux_check_tenant_feature",
);

#[doc(hidden)]
#[no_mangle]
pub extern "C" fn pg_finfo_flux_check_wrapper() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// May `tenant` use `feature` right now? Never raises for unknown keys.
///
/// # Safety
/// Called by PostgreSQL's function manager for the SQL function above
/// (STRICT: both text arguments are present).
#[doc(hidden)]
#[no_mangle]
pub unsafe extern "C-unwind" fn flux_check_wrapper(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: the call frame holds the two arguments of the signature.
    let (t, f) = unsafe {
        let args = (*fcinfo).args.as_slice(2);
        (args[0].value, args[1].value)
    };
    // SAFETY: both are non-null text datums (STRICT), read in place.
    if let (Some(t), Some(f)) = unsafe { (Text::inline(t), Text::inline(f)) } {
        // Nothing on this path panics; should it, the full path answers.
        // Another tenant's answer only for a trusted role (access.rs).
        // A current API key's scopes and allowances are decided on the
        // full path.
        let kept = std::panic::catch_unwind(|| match access::may_act_for_fast(t.bytes()) {
            Some(true) if gucs::api_key_bytes().is_none() => {
                let (allowed, mark) = cache::answer_ready(t.bytes(), f.bytes())?;
                // Counted as the decision behind it, or decided anew.
                (!stats::enabled() || stats::rechecked(mark)).then_some(allowed)
            }
            Some(true) => None,
            Some(false) => Some(false),
            None => None,
        });
        if let Ok(Some(allowed)) = kept {
            return pg_sys::Datum::from(allowed);
        }
    }
    // SAFETY: the same call frame, passed on.
    unsafe { flux_check_full(fcinfo) }
}

/// flux_check's full path: reads pending invalidations, reloads, decides.
#[pg_guard]
unsafe extern "C-unwind" fn flux_check_full(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: as in flux_check_wrapper; Text detoasts what is not inline.
    let (tenant, feature) = unsafe {
        let args = (*fcinfo).args.as_slice(2);
        (
            Text::from_datum(args[0].value, false),
            Text::from_datum(args[1].value, false),
        )
    };
    let (Some(tenant), Some(feature)) = (tenant, feature) else {
        crate::error::FluxError::Internal("flux_check called with NULL".into()).raise();
    };
    let allowed = (|| {
        // Never raises for another tenant: a policy evaluated over other
        // tenants' rows answers false for them.
        if !access::may_act_for(tenant.as_str()?) {
            return Ok(false);
        }
        allowed(tenant.as_str()?, feature.as_str()?, None)
    })()
    .or_raise();
    pg_sys::Datum::from(allowed)
}

/// flux_check for the session's tenant (flux_current_tenant()), subject
/// (flux_current_subject()) and API key (flux_current_api_key()).
#[pg_extern(name = "flux_check", stable, strict, parallel_safe)]
fn flux_check_current(feature: Text) -> Option<bool> {
    let tenant = identity::current_tenant()?;
    let subject = identity::current_subject();
    Some((|| allowed(&tenant, feature.as_str()?, subject.as_deref()))().or_raise())
}

/// The full decision: allowed, reason, message and the figures behind it.
#[pg_extern(stable, parallel_safe)]
fn flux_decide(
    tenant: Option<&str>,
    feature: Option<&str>,
    subject: default!(Option<&str>, "NULL"),
) -> Option<pgrx::composite_type!('static, "flux.decision")> {
    let (tenant, feature) = (tenant?, feature?);
    access::require_act_for("flux_decide", tenant).or_raise();
    let d = decide_one(tenant, feature, subject).or_raise();
    // The same decision flux_check makes, when it is the tenant's alone.
    stats::checked(&d, subject.is_none() && gucs::api_key_bytes().is_none());
    Some(to_composite(d))
}

/// One decision per feature, ordered by feature key.
#[pg_extern(stable, strict, parallel_safe)]
fn flux_entitlements(
    tenant: &str,
) -> SetOfIterator<'static, pgrx::composite_type!('static, "flux.decision")> {
    access::require_act_for("flux_entitlements", tenant).or_raise();
    let keys = cache::catalogue().or_raise().keys().to_vec();
    let rows: Vec<_> = keys
        .iter()
        .map(|k| to_composite(decide_one(tenant, k, None).or_raise()))
        .collect();
    SetOfIterator::new(rows)
}

// flux_value returns the grant value as stored: jsonb made from its text by
// jsonb_in, never parsed in Rust (where a deeply nested document would hit
// the parser's recursion limit). Written by hand (finalize.sql declares it)
// because pgrx would go through serde for a jsonb result.
#[doc(hidden)]
#[no_mangle]
pub extern "C" fn pg_finfo_flux_value_wrapper() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// The effective grant value when the tenant is entitled, else NULL.
///
/// # Safety
/// Called by PostgreSQL's function manager for flux_value(text, text)
/// (STRICT: both text arguments are present).
#[doc(hidden)]
#[no_mangle]
pub unsafe extern "C-unwind" fn flux_value_wrapper(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: the same call frame, passed on.
    unsafe { flux_value_full(fcinfo) }
}

#[pg_guard]
unsafe extern "C-unwind" fn flux_value_full(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: the call frame holds the two text arguments of the signature
    // (non-null: STRICT); Text detoasts what is not inline.
    let (tenant, feature) = unsafe {
        let args = (*fcinfo).args.as_slice(2);
        (
            Text::from_datum(args[0].value, false),
            Text::from_datum(args[1].value, false),
        )
    };
    let value = (|| -> FluxResult<Option<std::ffi::CString>> {
        let (Some(tenant), Some(feature)) = (tenant, feature) else {
            return Ok(None);
        };
        let tenant = tenant.as_str()?;
        access::require_act_for("flux_value", tenant)?;
        let d = decide_one(tenant, feature.as_str()?, None)?;
        match d.value.filter(|_| d.allowed) {
            None => Ok(None),
            Some(v) => std::ffi::CString::new(v).map(Some).map_err(|_| {
                crate::error::FluxError::BadEncoding("a grant value contains a NUL byte".into())
            }),
        }
    })()
    .or_raise();
    match value {
        // SAFETY: jsonb's input function reads a NUL-terminated string that
        // outlives the call and returns a jsonb palloc'd in the function's
        // context (it raises for text that is not json).
        Some(text) => unsafe {
            let (mut input, mut ioparam) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
            pg_sys::getTypeInputInfo(pg_sys::JSONBOID, &mut input, &mut ioparam);
            pg_sys::OidInputFunctionCall(input, text.as_ptr() as *mut _, ioparam, -1)
        },
        None => {
            // SAFETY: the call frame of this call.
            unsafe { (*fcinfo).isnull = true };
            pg_sys::Datum::from(0)
        }
    }
}

#[pg_schema]
mod flux {
    use super::*;

    /// How many tenants this backend's decision cache holds (bounded by
    /// flux.cache_tenants).
    #[pg_extern(volatile, parallel_unsafe)]
    fn _cached_tenants() -> i64 {
        cache::cached_tenants() as i64
    }
}
