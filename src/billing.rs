//! Billing sync (Stripe): subscription and invoice events drive tenants'
//! plans, statuses, periods and addons in the transaction that records the
//! webhook; and Stripe's webhook signature scheme.
//!
//! Parsing and the rules are plain Rust (unit-tested); `apply` writes with
//! SPI. Events arrive as text (the SQL wrapper casts the jsonb), so a 1 MB or
//! deeply nested payload is a parse error (22023), never a crash.

use crate::error::{shown, FluxError, FluxResult, OrRaise};
use crate::store::{self, ensure_writable};
use hmac::{Hmac, Mac};
use pgrx::prelude::*;
use serde_json::Value;
use sha2::Sha256;
use subtle::{Choice, ConstantTimeEq};

fn malformed(what: &str) -> FluxError {
    FluxError::InvalidValue(format!("malformed Stripe event: {what}"))
}

/// The parts of an event every outcome needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: String,
    pub kind: String,
    /// Unix seconds.
    pub created: i64,
    pub object: Value,
}

pub fn parse_event(text: &str) -> FluxResult<Event> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| malformed(&format!("not valid JSON ({e})")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| malformed("the event is not a JSON object"))?;
    let string = |k: &str| match obj.get(k) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(_) => Err(malformed(&format!("\"{k}\" must be a non-empty string"))),
        None => Err(malformed(&format!("\"{k}\" is missing"))),
    };
    let id = string("id")?;
    let kind = string("type")?;
    let created = match obj.get("created") {
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| malformed("\"created\" must be an integer (Unix seconds)"))?,
        Some(_) => return Err(malformed("\"created\" must be an integer (Unix seconds)")),
        None => return Err(malformed("\"created\" is missing")),
    };
    let object = match obj.get("data").and_then(|d| d.get("object")) {
        Some(o @ Value::Object(_)) => o.clone(),
        Some(_) => return Err(malformed("\"data.object\" must be an object")),
        None => return Err(malformed("\"data.object\" is missing")),
    };
    Ok(Event {
        id,
        kind,
        created,
        object,
    })
}

/// Stripe subscription status -> flux status.
pub fn map_status(stripe: &str) -> Option<&'static str> {
    Some(match stripe {
        "trialing" => "trialing",
        "active" => "active",
        "past_due" => "past_due",
        "unpaid" => "canceled",
        "incomplete" => "paused",
        "incomplete_expired" => "canceled",
        "paused" => "paused",
        "canceled" => "canceled",
        _ => return None,
    })
}

/// One subscription item: its price (id and lookup key) and quantity.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub price: String,
    pub lookup_key: Option<String>,
    pub quantity: i64,
    pub period_start: Option<i64>,
    pub period_end: Option<i64>,
}

/// What a subscription object says.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub id: String,
    pub customer: Option<String>,
    pub tenant: Option<String>,
    pub status: String,
    pub trial_end: Option<i64>,
    pub period_start: Option<i64>,
    pub period_end: Option<i64>,
    pub cancel_at_period_end: bool,
    pub items: Vec<Item>,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn int_at(v: &Value, path: &[&str]) -> Option<i64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_i64()
}

/// The customer id, whether expanded into an object or not.
fn customer_of(o: &Value) -> Option<String> {
    match o.get("customer") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(c @ Value::Object(_)) => str_at(c, &["id"]).map(str::to_string),
        _ => None,
    }
}

fn tenant_from_metadata(meta: Option<&Value>) -> Option<String> {
    match meta?.get("tenant_id")? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub fn parse_subscription(o: &Value) -> FluxResult<Subscription> {
    let id = str_at(o, &["id"])
        .ok_or_else(|| malformed("the subscription has no \"id\""))?
        .to_string();
    let stripe_status =
        str_at(o, &["status"]).ok_or_else(|| malformed("the subscription has no \"status\""))?;
    let status = map_status(stripe_status)
        .ok_or_else(|| {
            FluxError::InvalidValue(format!(
                "unknown Stripe subscription status {}: expected trialing, active, past_due, unpaid, incomplete, incomplete_expired, paused or canceled",
                shown(stripe_status)
            ))
        })?
        .to_string();
    let mut items = Vec::new();
    if let Some(data) = o
        .get("items")
        .and_then(|i| i.get("data"))
        .and_then(Value::as_array)
    {
        for it in data {
            let price = match it.get("price") {
                Some(Value::String(p)) => p.clone(),
                Some(p) => str_at(p, &["id"]).unwrap_or_default().to_string(),
                None => String::new(),
            };
            items.push(Item {
                price,
                lookup_key: str_at(it, &["price", "lookup_key"]).map(str::to_string),
                quantity: int_at(it, &["quantity"]).unwrap_or(1),
                period_start: int_at(it, &["current_period_start"]),
                period_end: int_at(it, &["current_period_end"]),
            });
        }
    }
    // Current API versions put the period on the items, older ones on the
    // subscription.
    let period_start = items
        .iter()
        .find_map(|i| i.period_start)
        .or_else(|| int_at(o, &["current_period_start"]));
    let period_end = items
        .iter()
        .find_map(|i| i.period_end)
        .or_else(|| int_at(o, &["current_period_end"]));
    Ok(Subscription {
        id,
        customer: customer_of(o),
        tenant: tenant_from_metadata(o.get("metadata")),
        status,
        trial_end: int_at(o, &["trial_end"]),
        period_start,
        period_end,
        cancel_at_period_end: o
            .get("cancel_at_period_end")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        items,
    })
}

/// An invoice's subscription id and tenant metadata, from the current API
/// shape (`parent.subscription_details`) or the older one (`subscription`,
/// `subscription_details`).
pub fn invoice_subscription(o: &Value) -> (Option<String>, Option<String>) {
    let details = o
        .get("parent")
        .and_then(|p| p.get("subscription_details"))
        .or_else(|| o.get("subscription_details"));
    let sub = details
        .and_then(|d| match d.get("subscription") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(s @ Value::Object(_)) => str_at(s, &["id"]).map(str::to_string),
            _ => None,
        })
        .or_else(|| str_at(o, &["subscription"]).map(str::to_string));
    let tenant = tenant_from_metadata(details.and_then(|d| d.get("metadata")));
    (sub, tenant)
}

type HmacSha256 = Hmac<Sha256>;

/// Stripe's `Stripe-Signature` scheme: `t=<unix seconds>,v1=<hex>[,v1=...]`;
/// valid when one v1 is HMAC-SHA256(secret, "<t>.<payload>") (compared in
/// constant time) and t is within `tolerance` seconds of `now`.
pub fn verify_signature(
    payload: &str,
    header: &str,
    secret: &str,
    now: i64,
    tolerance: i64,
) -> bool {
    let mut t: Option<i64> = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse().ok(),
            Some(("v1", v)) => signatures.push(v.to_string()),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    if (now - t).abs() > tolerance || secret.is_empty() {
        return false;
    }
    let Ok(mut mac) = HmacSha256::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload.as_bytes());
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // Every candidate is compared, in time independent of where it differs.
    signatures
        .iter()
        .fold(Choice::from(0), |found, s| {
            found | s.as_bytes().ct_eq(expected.as_bytes())
        })
        .into()
}

// ---- applying an event ------------------------------------------------------

/// The tenant an event is about: metadata.tenant_id, else the tenant whose
/// billing_customer is the customer.
fn resolve_tenant(
    meta: Option<&str>,
    customer: Option<&str>,
) -> FluxResult<Option<(String, bool)>> {
    if let Some(t) = meta {
        let exists = store::one::<i32>(
            "SELECT 1 FROM flux.tenants WHERE id OPERATOR(pg_catalog.=) $1",
            &[t.into()],
        )?
        .is_some();
        return Ok(Some((t.to_string(), exists)));
    }
    if let Some(c) = customer {
        if let Some(t) = store::one::<String>(
            "SELECT id FROM flux.tenants WHERE billing_customer OPERATOR(pg_catalog.=) $1",
            &[c.into()],
        )? {
            return Ok(Some((t, true)));
        }
    }
    Ok(None)
}

/// Not older than the last event applied to this subscription? Locks the
/// subscription's row, so events for one subscription apply one at a time.
fn is_stale(subscription: &str, created: i64) -> FluxResult<bool> {
    store::exec(
        "INSERT INTO flux.billing_subscriptions (id) VALUES ($1) ON CONFLICT (id) DO NOTHING",
        &[subscription.into()],
    )?;
    let last = store::one_mut::<i64>(
        "SELECT last_event_created FROM flux.billing_subscriptions \
         WHERE id OPERATOR(pg_catalog.=) $1 FOR UPDATE",
        &[subscription.into()],
    )?;
    Ok(last.is_some_and(|l| created < l))
}

fn mark_applied(subscription: &str, tenant: &str, created: i64) -> FluxResult<()> {
    store::exec(
        "UPDATE flux.billing_subscriptions SET last_event_created = $2, tenant = $3 \
         WHERE id OPERATOR(pg_catalog.=) $1",
        &[subscription.into(), created.into(), tenant.into()],
    )
}

fn ts(secs: Option<i64>) -> Option<String> {
    secs.map(|s| s.to_string())
}

fn apply_subscription(ev: &Event, deleted: bool) -> FluxResult<(&'static str, Option<String>)> {
    let mut sub = parse_subscription(&ev.object)?;
    if deleted {
        sub.status = "canceled".into();
    }
    let Some((tenant, _)) = resolve_tenant(sub.tenant.as_deref(), sub.customer.as_deref())? else {
        return Ok(("unmapped", None));
    };
    if is_stale(&sub.id, ev.created)? {
        return Ok(("stale", Some(tenant)));
    }
    // Look again under the subscription's lock: a concurrent event for it
    // may have created the tenant meanwhile (and committed, as we waited),
    // which an INSERT would then collide with.
    let Some((tenant, exists)) = resolve_tenant(sub.tenant.as_deref(), sub.customer.as_deref())?
    else {
        return Ok(("unmapped", None));
    };
    // Which items map to a plan, which to an addon.
    let mut plan = None;
    let mut addons: Vec<(String, i64)> = Vec::new();
    for it in &sub.items {
        let _path = crate::privilege::Pinned::enter();
        let mapped = Spi::connect(|c| {
            let t = c.select(
                "SELECT plan, addon FROM flux.billing_prices \
                 WHERE price OPERATOR(pg_catalog.=) $1 OR price OPERATOR(pg_catalog.=) $2 \
                 ORDER BY price OPERATOR(pg_catalog.=) $1 DESC LIMIT 1",
                Some(1),
                &[it.price.as_str().into(), it.lookup_key.as_deref().into()],
            )?;
            if t.is_empty() {
                Ok::<_, pgrx::spi::SpiError>(None)
            } else {
                let t = t.first();
                Ok(Some((t.get::<String>(1)?, t.get::<String>(2)?)))
            }
        })?;
        match mapped {
            Some((Some(p), _)) => plan = plan.or(Some(p)),
            Some((None, Some(a))) => addons.push((a, it.quantity)),
            _ => {}
        }
    }
    let Some(plan) = plan else {
        return Ok(("unmapped", Some(tenant)));
    };
    let trial = if sub.status == "trialing" {
        ts(sub.trial_end)
    } else {
        None
    };
    // A plan other than the one in force replaces a scheduled change (the
    // billing system moved the tenant); the same plan keeps it.
    let schedule = if store::flux_has_column(c"tenants", c"scheduled_plan") {
        // (IS NOT DISTINCT FROM, spelled out with the qualified =; a
        // mapped plan is never NULL.)
        const KEEPS: &str =
            "coalesce($2 OPERATOR(pg_catalog.=) CASE WHEN scheduled_at OPERATOR(pg_catalog.<=) flux._clock() \
             THEN scheduled_plan ELSE plan END, false)";
        format!(
            ", scheduled_plan = CASE WHEN {KEEPS} THEN scheduled_plan END, \
               scheduled_at = CASE WHEN {KEEPS} THEN scheduled_at END"
        )
    } else {
        String::new()
    };
    let update = format!(
        "UPDATE flux.tenants SET plan = $2, status = $3, \
             trial_ends_at = pg_catalog.to_timestamp($4::pg_catalog.int8), \
             current_period_start = coalesce(pg_catalog.to_timestamp($5::pg_catalog.int8), current_period_start), \
             current_period_end = pg_catalog.to_timestamp($6::pg_catalog.int8), cancel_at_period_end = $7, \
             billing_customer = coalesce($8, billing_customer){schedule} WHERE id OPERATOR(pg_catalog.=) $1"
    );
    let sql = if exists {
        update.as_str()
    } else {
        "INSERT INTO flux.tenants (id, plan, status, trial_ends_at, current_period_start, current_period_end, \
             cancel_at_period_end, billing_customer) \
         VALUES ($1, $2, $3, pg_catalog.to_timestamp($4::pg_catalog.int8), \
             coalesce(pg_catalog.to_timestamp($5::pg_catalog.int8), flux._clock()), \
             pg_catalog.to_timestamp($6::pg_catalog.int8), $7, $8)"
    };
    store::exec(
        sql,
        &[
            tenant.as_str().into(),
            plan.as_str().into(),
            sub.status.as_str().into(),
            trial.as_deref().into(),
            ts(sub.period_start).as_deref().into(),
            ts(sub.period_end).as_deref().into(),
            sub.cancel_at_period_end.into(),
            sub.customer.as_deref().into(),
        ],
    )?;
    // Addons on the subscription set their quantity; billing-mapped addons
    // no longer on it are detached (addons attached by hand are left alone).
    let on: Vec<String> = addons.iter().map(|a| a.0.clone()).collect();
    for (addon, quantity) in &addons {
        let q = i32::try_from(*quantity).unwrap_or(i32::MAX);
        if q > 0 {
            store::exec(
                "INSERT INTO flux.tenant_addons (tenant, addon, quantity) VALUES ($1, $2, $3) \
                 ON CONFLICT (tenant, addon) DO UPDATE SET quantity = EXCLUDED.quantity",
                &[tenant.as_str().into(), addon.as_str().into(), q.into()],
            )?;
        }
    }
    store::exec(
        "DELETE FROM flux.tenant_addons ta \
         WHERE ta.tenant OPERATOR(pg_catalog.=) $1 AND NOT (ta.addon OPERATOR(pg_catalog.=) ANY ($2)) \
           AND EXISTS (SELECT 1 FROM flux.billing_prices bp WHERE bp.addon OPERATOR(pg_catalog.=) ta.addon)",
        &[tenant.as_str().into(), on.into()],
    )?;
    mark_applied(&sub.id, &tenant, ev.created)?;
    Ok(("applied", Some(tenant)))
}

/// The plan a price (id or lookup key) is mapped to, if any.
fn plan_of_price(price: &str, lookup_key: Option<&str>) -> FluxResult<Option<String>> {
    let _path = crate::privilege::Pinned::enter();
    store::one::<String>(
        "SELECT plan FROM flux.billing_prices \
         WHERE (price OPERATOR(pg_catalog.=) $1 OR price OPERATOR(pg_catalog.=) $2) AND plan IS NOT NULL \
         ORDER BY price OPERATOR(pg_catalog.=) $1 DESC LIMIT 1",
        &[price.into(), lookup_key.into()],
    )
}

/// A schedule's phase: its start (Unix seconds) and its items' prices (id,
/// lookup key).
pub type Phase = (i64, Vec<(String, Option<String>)>);

/// The next phase of a subscription schedule: its start (Unix seconds) and
/// the plan its first mapped price maps to. The phase after the current
/// one (`current_phase.start_date`), else the first starting after the
/// event.
pub fn next_phase(o: &Value, created: i64) -> Vec<Phase> {
    let after = int_at(o, &["current_phase", "start_date"]).unwrap_or(created);
    let mut phases: Vec<Phase> = o
        .get("phases")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .filter_map(|p| {
                    let start = int_at(p, &["start_date"])?;
                    let prices = p
                        .get("items")
                        .and_then(Value::as_array)
                        .map(|items| {
                            items
                                .iter()
                                .map(|it| match it.get("price") {
                                    Some(Value::String(s)) => (s.clone(), None),
                                    Some(p) => (
                                        str_at(p, &["id"]).unwrap_or_default().to_string(),
                                        str_at(p, &["lookup_key"]).map(str::to_string),
                                    ),
                                    None => (String::new(), None),
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    Some((start, prices))
                })
                .filter(|(start, _)| *start > after)
                .collect()
        })
        .unwrap_or_default();
    phases.sort_by_key(|p| p.0);
    phases.truncate(1);
    phases
}

/// subscription_schedule.* (Stripe's way of changing a plan at a later
/// date): an active or not yet started schedule whose next phase maps to a
/// plan schedules the move at that phase's start (flux_schedule_change's
/// columns); a schedule released, canceled, completed or aborted, or one
/// with no next phase, drops a change still to come. The phase itself is
/// applied by the customer.subscription.updated event Stripe sends then.
fn apply_schedule(ev: &Event) -> FluxResult<(&'static str, Option<String>)> {
    let o = &ev.object;
    let id = str_at(o, &["id"]).ok_or_else(|| malformed("the schedule has no \"id\""))?;
    let status = str_at(o, &["status"]).unwrap_or("active");
    let Some((tenant, true)) = resolve_tenant(
        tenant_from_metadata(o.get("metadata")).as_deref(),
        customer_of(o).as_deref(),
    )?
    else {
        return Ok(("unmapped", None));
    };
    if !store::flux_has_column(c"tenants", c"scheduled_plan") {
        return Ok(("ignored", Some(tenant)));
    }
    if is_stale(id, ev.created)? {
        return Ok(("stale", Some(tenant)));
    }
    let mut next = None;
    if matches!(status, "active" | "not_started") {
        for (start, prices) in next_phase(o, ev.created) {
            for (price, lookup_key) in prices {
                if let Some(plan) = plan_of_price(&price, lookup_key.as_deref())? {
                    next = Some((start, plan));
                    break;
                }
            }
        }
    }
    let clock = crate::gucs::clock()?;
    match next {
        Some((start, plan))
            if start.saturating_sub(946_684_800).saturating_mul(1_000_000) > clock =>
        {
            // Unix seconds to PostgreSQL's epoch (2000-01-01).
            store::exec(
                "UPDATE flux.tenants SET \
                     plan = CASE WHEN scheduled_at OPERATOR(pg_catalog.<=) flux._clock() THEN scheduled_plan ELSE plan END, \
                     scheduled_plan = $2, scheduled_at = pg_catalog.to_timestamp($3::pg_catalog.int8) \
                 WHERE id OPERATOR(pg_catalog.=) $1",
                &[tenant.as_str().into(), plan.as_str().into(), start.into()],
            )?;
        }
        Some(_) => return Ok(("stale", Some(tenant))),
        None => {
            store::exec(
                "UPDATE flux.tenants SET scheduled_plan = NULL, scheduled_at = NULL \
                 WHERE id OPERATOR(pg_catalog.=) $1 AND scheduled_at OPERATOR(pg_catalog.>) flux._clock()",
                &[tenant.as_str().into()],
            )?;
        }
    }
    mark_applied(id, &tenant, ev.created)?;
    Ok(("applied", Some(tenant)))
}

fn apply_invoice(ev: &Event, paid: bool) -> FluxResult<(&'static str, Option<String>)> {
    let (subscription, meta) = invoice_subscription(&ev.object);
    let customer = customer_of(&ev.object);
    let Some((tenant, true)) = resolve_tenant(meta.as_deref(), customer.as_deref())? else {
        return Ok(("unmapped", None));
    };
    if let Some(s) = &subscription {
        if is_stale(s, ev.created)? {
            return Ok(("stale", Some(tenant)));
        }
    }
    // A failed payment makes a live subscription past_due (its grace starts
    // from the clock); a paid invoice makes a past_due one active again.
    let sql = if paid {
        "UPDATE flux.tenants SET status = 'active' \
         WHERE id OPERATOR(pg_catalog.=) $1 AND status OPERATOR(pg_catalog.=) 'past_due'"
    } else {
        "UPDATE flux.tenants SET status = 'past_due' \
         WHERE id OPERATOR(pg_catalog.=) $1 \
           AND status OPERATOR(pg_catalog.=) ANY (ARRAY['active', 'trialing'])"
    };
    store::exec(sql, &[tenant.as_str().into()])?;
    if let Some(s) = &subscription {
        mark_applied(s, &tenant, ev.created)?;
    }
    Ok(("applied", Some(tenant)))
}

/// Apply one webhook event; returns applied, duplicate, stale, unmapped or
/// ignored. Every event is recorded in flux.billing_events.
pub fn apply(text: &str) -> FluxResult<&'static str> {
    ensure_writable("flux_apply_stripe_event")?;
    let ev = parse_event(text)?;
    // A unique key, not read-then-insert: a second delivery of the same
    // event (even at the same moment) waits for the first and counts as a
    // duplicate.
    let first = store::one_mut::<bool>(
        "INSERT INTO flux.billing_events AS b (id, type, created) \
         VALUES ($1, $2, pg_catalog.to_timestamp($3::pg_catalog.int8)) \
         ON CONFLICT (id) DO UPDATE SET deliveries = b.deliveries OPERATOR(pg_catalog.+) 1 \
         RETURNING b.deliveries OPERATOR(pg_catalog.=) 1",
        &[
            ev.id.as_str().into(),
            ev.kind.as_str().into(),
            ev.created.into(),
        ],
    )?
    .unwrap_or(false);
    if !first {
        return Ok("duplicate");
    }
    // Changes made by this event are attributed to it in the audit log.
    let previous_actor = crate::gucs::string_setting(&crate::gucs::ACTOR).unwrap_or_default();
    crate::identity::set_local("flux.actor", &ev.id)?;
    let result = match ev.kind.as_str() {
        "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.paused"
        | "customer.subscription.resumed" => apply_subscription(&ev, false),
        "customer.subscription.deleted" => apply_subscription(&ev, true),
        "invoice.payment_failed" => apply_invoice(&ev, false),
        "invoice.paid" => apply_invoice(&ev, true),
        "subscription_schedule.created"
        | "subscription_schedule.updated"
        | "subscription_schedule.released"
        | "subscription_schedule.canceled"
        | "subscription_schedule.completed"
        | "subscription_schedule.aborted" => apply_schedule(&ev),
        _ => Ok(("ignored", None)),
    };
    crate::identity::set_local("flux.actor", &previous_actor)?;
    let (outcome, tenant) = result?;
    store::exec(
        "UPDATE flux.billing_events SET outcome = $2, tenant = $3 WHERE id OPERATOR(pg_catalog.=) $1",
        &[
            ev.id.as_str().into(),
            outcome.into(),
            tenant.as_deref().into(),
        ],
    )?;
    Ok(outcome)
}

#[pg_schema]
mod flux {
    use super::*;

    /// The body of flux_apply_stripe_event (the event as jsonb text).
    #[pg_extern(volatile, parallel_unsafe)]
    fn _apply_stripe_event(event: Option<&str>) -> String {
        let event = event
            .ok_or_else(|| malformed("the event is NULL"))
            .or_raise();
        apply(event).or_raise().to_string()
    }
}

/// Map a Stripe price id or lookup_key to a plan or to an addon (exactly one).
#[pg_extern(volatile, parallel_unsafe)]
fn flux_map_price(
    price: Option<&str>,
    plan: default!(Option<&str>, "NULL"),
    addon: default!(Option<&str>, "NULL"),
) {
    (|| -> FluxResult<()> {
        let price = crate::validate::need(price, "price")?;
        crate::validate::check_key("price", price)?;
        ensure_writable("flux_map_price")?;
        match (plan, addon) {
            (Some(p), None) => crate::validate::require_plan(p)?,
            (None, Some(a)) => crate::validate::require_addon(a)?,
            _ => {
                return Err(FluxError::InvalidValue(format!(
                    "price {} must map to exactly one of plan or addon",
                    shown(price)
                )))
            }
        }
        store::exec(
            "INSERT INTO flux.billing_prices (price, plan, addon) VALUES ($1, $2, $3) \
             ON CONFLICT (price) DO UPDATE SET plan = EXCLUDED.plan, addon = EXCLUDED.addon",
            &[price.into(), plan.into(), addon.into()],
        )
    })()
    .or_raise()
}

/// Stripe's webhook signature check; false outside the tolerance window.
#[pg_extern(stable, parallel_safe)]
fn flux_verify_stripe_signature(
    payload: Option<&str>,
    signature_header: Option<&str>,
    secret: Option<&str>,
    tolerance: default!(Option<pgrx::datum::Interval>, "'5 minutes'"),
) -> bool {
    let (Some(payload), Some(header), Some(secret)) = (payload, signature_header, secret) else {
        return false;
    };
    let tolerance = tolerance
        .map(crate::gucs::span_of)
        .map(|s| (s.days as i64) * 86_400 + s.micros / 1_000_000 + (s.months as i64) * 30 * 86_400)
        .unwrap_or(300);
    let now = crate::gucs::clock().or_raise();
    // PostgreSQL time counts from 2000-01-01; Stripe's from 1970-01-01.
    let unix = now.div_euclid(1_000_000) + 946_684_800;
    verify_signature(payload, header, secret, unix, tolerance)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // Computed independently with Python: hmac.new(b'whsec_test_secret',
    // b'1700000000.{"id":"evt_1"}', hashlib.sha256).hexdigest()
    const SIG: &str = "248a374f50f943a28b0f6ab50faf9a7e7e29b710fa26df9fb1618b9bf8ea9c9a";
    const BODY: &str = r#"{"id":"evt_1"}"#;

    #[test]
    fn signatures() {
        let header = format!("t=1700000000,v1={SIG}");
        assert!(verify_signature(
            BODY,
            &header,
            "whsec_test_secret",
            1_700_000_100,
            300
        ));
        // Several v1 entries: one match is enough.
        let two = format!("t=1700000000,v1={},v1={SIG},v0=abc", "0".repeat(64));
        assert!(verify_signature(
            BODY,
            &two,
            "whsec_test_secret",
            1_700_000_000,
            300
        ));
        assert!(!verify_signature(
            BODY,
            &header,
            "wrong",
            1_700_000_000,
            300
        ));
        assert!(!verify_signature(
            r#"{"id":"evt_2"}"#,
            &header,
            "whsec_test_secret",
            1_700_000_000,
            300
        ));
        assert!(!verify_signature(
            BODY,
            &header,
            "whsec_test_secret",
            1_700_000_301,
            300
        ));
        assert!(!verify_signature(
            BODY,
            "v1=abc",
            "whsec_test_secret",
            1_700_000_000,
            300
        ));
        assert!(!verify_signature(BODY, "", "", 0, 300));
    }

    #[test]
    fn events_must_have_their_parts() {
        assert!(parse_event(r#"{"id":"evt","type":"x","created":1,"data":{"object":{}}}"#).is_ok());
        for (text, missing) in [
            (
                r#"{"type":"x","created":1,"data":{"object":{}}}"#,
                "\"id\" is missing",
            ),
            (
                r#"{"id":"e","created":1,"data":{"object":{}}}"#,
                "\"type\" is missing",
            ),
            (
                r#"{"id":"e","type":"x","data":{"object":{}}}"#,
                "\"created\" is missing",
            ),
            (
                r#"{"id":"e","type":"x","created":"1","data":{"object":{}}}"#,
                "\"created\" must be an integer",
            ),
            (
                r#"{"id":"e","type":"x","created":1,"data":{}}"#,
                "\"data.object\" is missing",
            ),
            (
                r#"{"id":7,"type":"x","created":1,"data":{"object":{}}}"#,
                "\"id\" must be",
            ),
            ("[1]", "not a JSON object"),
        ] {
            let e = parse_event(text).unwrap_err().to_string();
            assert!(e.contains(missing), "{text}: {e}");
        }
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        assert!(parse_event(&deep)
            .unwrap_err()
            .to_string()
            .contains("not valid JSON"));
    }

    #[test]
    fn subscriptions_new_and_old_shapes() {
        let new = json!({"id": "sub_1", "customer": "cus_1", "status": "trialing", "trial_end": 10,
            "metadata": {"tenant_id": "acme"}, "cancel_at_period_end": false,
            "items": {"data": [{"price": {"id": "price_pro", "lookup_key": "pro_monthly"}, "quantity": 1,
                                "current_period_start": 100, "current_period_end": 200}]}});
        let s = parse_subscription(&new).unwrap();
        assert_eq!(
            (
                s.status.as_str(),
                s.tenant.as_deref(),
                s.period_start,
                s.period_end
            ),
            ("trialing", Some("acme"), Some(100), Some(200))
        );
        assert_eq!(s.items[0].lookup_key.as_deref(), Some("pro_monthly"));
        let old = json!({"id": "sub_1", "customer": {"id": "cus_1"}, "status": "unpaid",
            "current_period_start": 5, "current_period_end": 6, "items": {"data": [{"price": "price_x"}]}});
        let s = parse_subscription(&old).unwrap();
        assert_eq!(
            (
                s.status.as_str(),
                s.customer.as_deref(),
                s.period_start,
                s.items[0].price.as_str()
            ),
            ("canceled", Some("cus_1"), Some(5), "price_x")
        );
        assert!(parse_subscription(&json!({"id": "s", "status": "weird"})).is_err());
    }

    #[test]
    fn invoices_new_and_old_shapes() {
        let new = json!({"parent": {"subscription_details": {"subscription": "sub_1", "metadata": {"tenant_id": "acme"}}}});
        assert_eq!(
            invoice_subscription(&new),
            (Some("sub_1".into()), Some("acme".into()))
        );
        let old = json!({"subscription": "sub_2", "subscription_details": {"metadata": {"tenant_id": "t"}}});
        assert_eq!(
            invoice_subscription(&old),
            (Some("sub_2".into()), Some("t".into()))
        );
    }
}
