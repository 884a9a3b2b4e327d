//! The audit log and change events: one row trigger on every flux table
//! that people edit, written in Rust so that it can record the role that
//! made the change (a SECURITY DEFINER trigger would only see its owner)
//! while the insert into flux.audit_log runs as the tables' owner (no role
//! gets a privilege to write the log itself).

use crate::error::FluxError;
use crate::privilege::AsOwner;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::{AllocatedByPostgres, PgTrigger, PgTriggerError};
use std::ffi::CStr;

/// The role running the statement (after SET ROLE), by name.
fn current_role() -> String {
    // SAFETY: GetUserId is backend-local state; GetUserNameFromId with
    // noerr = true returns NULL rather than raising for a dropped role.
    unsafe {
        let name = pg_sys::GetUserNameFromId(pg_sys::GetUserId(), true);
        if name.is_null() {
            String::new()
        } else {
            CStr::from_ptr(name).to_string_lossy().into_owned()
        }
    }
}

const AUDIT: &str = "WITH r AS (
        SELECT to_jsonb($5::record) - 'secret_hash' AS old, to_jsonb($6::record) - 'secret_hash' AS new
    ), k AS (
        SELECT old, new, coalesce(new, old) AS row FROM r WHERE old IS DISTINCT FROM new
    ), a AS (
        INSERT INTO flux.audit_log (actor, action, entity, key, tenant, old, new)
        SELECT $1, $2, $3,
               (SELECT string_agg(row ->> col, '/' ORDER BY n) FROM unnest($4::text[]) WITH ORDINALITY u(col, n)),
               CASE WHEN $3 IN ('tenants', 'flag_lists') THEN row ->> 'id' ELSE row ->> 'tenant' END,
               old, new
          FROM k
         WHERE pg_catalog.current_query() !~* '^\\s*copy\\s'
        RETURNING action, entity, key, tenant
    )
    SELECT pg_catalog.pg_notify('flux_changes',
               json_build_object('entity', entity, 'key', key, 'tenant', tenant, 'action', action)::text)
      FROM a";

#[pg_schema]
mod flux {
    use super::*;

    /// Trigger: append the change to flux.audit_log and announce it with
    /// NOTIFY flux_changes at commit. Arguments: the key columns. COPY (how
    /// pg_restore loads the tables and the log itself) is not recorded again.
    #[pg_trigger]
    fn _audit<'a>(
        trigger: &'a PgTrigger<'a>,
    ) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
        let actor = crate::gucs::string_setting(&crate::gucs::ACTOR).unwrap_or_else(current_role);
        let action = match trigger.op()? {
            pgrx::PgTriggerOperation::Insert => "insert",
            pgrx::PgTriggerOperation::Update => "update",
            pgrx::PgTriggerOperation::Delete => "delete",
            pgrx::PgTriggerOperation::Truncate => return Ok(None),
        };
        let entity = trigger.table_name()?;
        let keys = trigger.extra_args()?;
        let rowtype = {
            let rel = trigger.relation()?;
            // SAFETY: rd_rel is valid while the trigger's relation is open.
            unsafe { (*rel.rd_rel).reltype }
        };
        let row = |t: Option<PgHeapTuple<'_, AllocatedByPostgres>>| match t {
            // SAFETY: the datum is the row of the trigger's relation, typed
            // by that relation's row type.
            Some(t) => unsafe { DatumWithOid::new(t, rowtype) },
            None => DatumWithOid::null_oid(rowtype),
        };
        let (old, new) = (row(trigger.old()), row(trigger.new()));
        let result = (|| -> Result<(), FluxError> {
            let _owner = AsOwner::enter()?;
            Spi::connect_mut(|c| {
                c.update(
                    AUDIT,
                    None,
                    &[
                        actor.as_str().into(),
                        action.into(),
                        entity.as_str().into(),
                        keys.into(),
                        old,
                        new,
                    ],
                )
                .map(|_| ())
            })?;
            Ok(())
        })();
        if let Err(e) = result {
            e.raise();
        }
        Ok(None)
    }
}
