-- Billing sync: Stripe's own fixture objects (tests/pg_regress/data/stripe,
-- from Stripe's published fixtures), changed only where a story needs it.
\i tests/pg_regress/common/setup.sql
\set sub_fixture `cat tests/pg_regress/data/stripe/subscription.json`
\set evt_fixture `cat tests/pg_regress/data/stripe/event.json`
\set inv_fixture `cat tests/pg_regress/data/stripe/invoice.json`
CREATE TEMP TABLE fx AS SELECT :'sub_fixture'::jsonb AS sub, :'evt_fixture'::jsonb AS evt, :'inv_fixture'::jsonb AS inv;
-- An event around an object, from the event fixture.
CREATE FUNCTION ev(id text, type text, created bigint, obj jsonb) RETURNS jsonb LANGUAGE sql AS $$
  SELECT jsonb_set(jsonb_set(jsonb_set(jsonb_set((SELECT evt FROM fx),
         '{id}', to_jsonb(id)), '{type}', to_jsonb(type)), '{created}', to_jsonb(created)), '{data,object}', obj) $$;
-- The subscription fixture with a status, items (price id or lookup key, quantity) and metadata;
-- its items' period is set to a month from 2026-11-18 (the fixture's ends before it starts).
CREATE FUNCTION sub(status text, items jsonb, meta jsonb DEFAULT '{"tenant_id": "acme"}') RETURNS jsonb LANGUAGE sql AS $$
  SELECT (SELECT sub FROM fx) || jsonb_build_object('status', status, 'metadata', meta, 'cancel_at_period_end', false,
         'trial_end', 1896000000,
         'items', jsonb_build_object('object', 'list', 'data',
            (SELECT jsonb_agg((SELECT sub -> 'items' -> 'data' -> 0 FROM fx)
                              || jsonb_build_object('quantity', coalesce((i ->> 'quantity')::int, 1),
                                   'current_period_start', 1795000000, 'current_period_end', 1797592000,
                                   'price', (SELECT sub -> 'items' -> 'data' -> 0 -> 'price' FROM fx)
                                            || jsonb_build_object('id', i ->> 'price', 'lookup_key', i -> 'lookup_key')))
               FROM jsonb_array_elements(items) i))) $$;
CREATE FUNCTION state(t text) RETURNS TABLE (plan text, status text, trial_ends_at timestamptz,
    current_period_start timestamptz, current_period_end timestamptz, cancel_at_period_end boolean,
    billing_customer text, addons text) LANGUAGE sql AS $$
  SELECT plan, status, trial_ends_at, current_period_start, current_period_end, cancel_at_period_end, billing_customer,
         (SELECT string_agg(addon || ' x' || quantity, ', ') FROM flux.tenant_addons WHERE tenant = t)
    FROM flux.tenants WHERE id = t $$;

SELECT flux_define_feature('export');
SELECT flux_define_feature('sso');
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_plan('free', rank => 0, is_default => true);
SELECT flux_define_plan('pro', rank => 2);
SELECT flux_define_plan('enterprise', rank => 3);
SELECT flux_grant('pro', 'export');
SELECT flux_grant('enterprise', 'export');
SELECT flux_grant('enterprise', 'sso');
SELECT flux_grant('free', 'seats', 1);
SELECT flux_grant('pro', 'seats', 5);
SELECT flux_define_addon('seat_pack');
SELECT flux_grant_addon('seat_pack', 'seats', 10);
-- Prices: the fixture's price id is Pro; enterprise and the seat pack by id; a lookup key too.
SELECT flux_map_price('price_1PgafmB7WZ01zgkW6dKueIc5', plan => 'pro');
SELECT flux_map_price('price_enterprise', plan => 'enterprise');
SELECT flux_map_price('price_seats', addon => 'seat_pack');
SELECT flux_map_price('pro_monthly', plan => 'pro');
SELECT try($$SELECT flux_map_price('price_x')$$);
SELECT try($$SELECT flux_map_price('price_x', plan => 'pro', addon => 'seat_pack')$$);
SELECT try($$SELECT flux_map_price('price_x', plan => 'gold')$$);
SET flux.now = '2026-11-22 12:00+00';

-- A trial starts: the tenant is created from metadata.tenant_id.
SELECT flux_apply_stripe_event(ev('evt_1', 'customer.subscription.created', 1000,
       sub('trialing', '[{"price": "price_1PgafmB7WZ01zgkW6dKueIc5"}]')));
SELECT * FROM state('acme');
SELECT flux_check('acme', 'export');
-- The same event again: a duplicate, nothing changes, still recorded.
SELECT flux_apply_stripe_event(ev('evt_1', 'customer.subscription.created', 1000,
       sub('active', '[{"price": "price_enterprise"}]')));
SELECT id, type, tenant, outcome, deliveries FROM flux.billing_events;
SELECT plan, status FROM state('acme');
-- The trial converts, with a seat addon.
SELECT flux_apply_stripe_event(ev('evt_2', 'customer.subscription.updated', 2000,
       sub('active', '[{"price": "price_1PgafmB7WZ01zgkW6dKueIc5"}, {"price": "price_seats", "quantity": 2}]')));
SELECT plan, status, trial_ends_at, addons FROM state('acme');
SELECT "limit" FROM flux_decide('acme', 'seats');
-- An older event arriving late is stale: nothing changes.
SELECT flux_apply_stripe_event(ev('evt_0', 'customer.subscription.updated', 1500,
       sub('canceled', '[{"price": "price_1PgafmB7WZ01zgkW6dKueIc5"}]')));
SELECT plan, status, addons FROM state('acme');
-- A payment fails: past_due from the clock, within grace.
SELECT flux_apply_stripe_event(ev('evt_3', 'invoice.payment_failed', 3000,
       (SELECT inv FROM fx) || '{"parent": {"type": "subscription_details", "subscription_details": {"subscription": "sub_1Pgc6rB7WZ01zgkWNy0Cn5nw", "metadata": {"tenant_id": "acme"}}}}'));
SELECT status, past_due_since FROM flux.tenants WHERE id = 'acme';
SELECT allowed, reason FROM flux_decide('acme', 'export');
SET flux.now = '2026-12-01 00:00+00';
SELECT allowed, reason, plan FROM flux_decide('acme', 'export');
-- An upgrade, and the invoice is paid: active again.
SELECT flux_apply_stripe_event(ev('evt_4', 'customer.subscription.updated', 4000,
       sub('past_due', '[{"price": "price_enterprise"}]')));
SELECT flux_apply_stripe_event(ev('evt_5', 'invoice.paid', 4100,
       (SELECT inv FROM fx) || '{"parent": {"type": "subscription_details", "subscription_details": {"subscription": "sub_1Pgc6rB7WZ01zgkWNy0Cn5nw", "metadata": {"tenant_id": "acme"}}}}'));
SELECT plan, status, addons FROM state('acme');
SELECT flux_check('acme', 'sso');
-- A price with no mapping: unmapped, nothing about the tenant changes.
SELECT flux_apply_stripe_event(ev('evt_6', 'customer.subscription.updated', 5000,
       sub('active', '[{"price": "price_unknown"}]')));
SELECT plan, status FROM state('acme');
-- The older API shape: periods on the subscription, the price found by lookup_key.
SELECT flux_apply_stripe_event(ev('evt_7', 'customer.subscription.updated', 6000,
       (sub('active', '[{"price": "price_old", "lookup_key": "pro_monthly"}]') #- '{items,data,0,current_period_start}'
                                                                              #- '{items,data,0,current_period_end}')
       || '{"current_period_start": 1800000000, "current_period_end": 1802592000}'));
SELECT plan, status, current_period_start, current_period_end, addons FROM state('acme');
-- Types we do not act on are recorded and ignored.
SELECT flux_apply_stripe_event(ev('evt_8', 'customer.created', 6100, '{"id": "cus_1"}'));
-- Cancellation.
SELECT flux_apply_stripe_event(ev('evt_9', 'customer.subscription.deleted', 7000,
       sub('canceled', '[{"price": "price_1PgafmB7WZ01zgkW6dKueIc5"}]')));
SELECT plan, status FROM state('acme');
SELECT allowed, reason, plan FROM flux_decide('acme', 'export');
-- Without metadata, the customer id finds the tenant; an unknown customer is unmapped.
SELECT flux_apply_stripe_event(ev('evt_10', 'customer.subscription.updated', 8000,
       sub('active', '[{"price": "price_1PgafmB7WZ01zgkW6dKueIc5"}]', '{}')));
SELECT plan, status FROM state('acme');
SELECT flux_apply_stripe_event(ev('evt_11', 'customer.subscription.updated', 8000,
       sub('active', '[{"price": "price_1PgafmB7WZ01zgkW6dKueIc5"}]', '{}') || '{"customer": "cus_nobody", "id": "sub_other"}'));
-- A new tenant from a new subscription.
SELECT flux_apply_stripe_event(ev('evt_12', 'customer.subscription.created', 9000,
       sub('active', '[{"price": "price_enterprise"}]', '{"tenant_id": "newco"}') || '{"customer": "cus_new", "id": "sub_new"}'));
SELECT plan, status, billing_customer FROM state('newco');
SELECT id, outcome, tenant, deliveries FROM flux.billing_events ORDER BY created, id;
-- Changes are attributed to the event in the audit log.
SELECT actor, entity, action FROM flux.audit_log WHERE actor LIKE 'evt_%' ORDER BY id LIMIT 4;

-- Malformed events say what is missing; huge and deep payloads are refused.
SELECT try($$SELECT flux_apply_stripe_event('{"type": "x", "created": 1, "data": {"object": {}}}')$$);
SELECT try($$SELECT flux_apply_stripe_event('{"id": "e", "type": "x", "data": {"object": {}}}')$$);
SELECT try($$SELECT flux_apply_stripe_event('{"id": "e", "type": "x", "created": "yesterday", "data": {"object": {}}}')$$);
SELECT try($$SELECT flux_apply_stripe_event('{"id": "e", "type": "x", "created": 1, "data": {}}')$$);
SELECT try($$SELECT flux_apply_stripe_event('[1, 2]')$$);
SELECT try($$SELECT flux_apply_stripe_event(ev('evt_x', 'customer.subscription.updated', 1, sub('sleeping', '[]')))$$);
SELECT left(try(format('SELECT flux_apply_stripe_event(%L::jsonb)', repeat('[', 5000) || repeat(']', 5000))), 60);
SELECT try(format('SELECT flux_apply_stripe_event(%L)', ev('evt_big', 'customer.created', 1, jsonb_build_object('pad', repeat('x', 1000000)))));
SELECT count(*) AS events FROM flux.billing_events;

-- Subscription schedules (Stripe's plan change at a later date): the next
-- phase's mapped price schedules the move at its start_date; released or
-- canceled drops the change still to come.
SET flux.now = '2026-11-20 00:00+00';
SELECT flux_subscribe('wayne', 'pro', current_period_start => '2026-11-18', current_period_end => '2026-12-18');
SELECT flux_apply_stripe_event(ev('evt_w2', 'subscription_schedule.created', 1795000100,
       '{"id": "sub_sched_1", "object": "subscription_schedule", "status": "active",
         "metadata": {"tenant_id": "wayne"}, "subscription": "sub_1Pgc6rB7WZ01zgkWNy0Cn5nw",
         "current_phase": {"start_date": 1795000000, "end_date": 1797592000},
         "phases": [{"start_date": 1795000000, "end_date": 1797592000, "items": [{"price": "price_1PgafmB7WZ01zgkW6dKueIc5", "quantity": 1}]},
                    {"start_date": 1797592000, "end_date": null, "items": [{"price": {"id": "price_enterprise"}, "quantity": 1}]}]}'));
SELECT plan, scheduled_plan, scheduled_at FROM flux.tenants WHERE id = 'wayne';
SELECT allowed, plan, message FROM flux_decide('wayne', 'sso');
SET flux.now = '2026-12-18 12:00+00';
SELECT allowed, plan FROM flux_decide('wayne', 'sso');
SET flux.now = '2026-11-20 00:00+00';
-- An older delivery is stale; a release drops the change.
SELECT flux_apply_stripe_event(ev('evt_w0', 'subscription_schedule.updated', 1795000050,
       '{"id": "sub_sched_1", "status": "active", "metadata": {"tenant_id": "wayne"}, "phases": []}'));
SELECT flux_apply_stripe_event(ev('evt_w3', 'subscription_schedule.released', 1795000200,
       '{"id": "sub_sched_1", "status": "released", "metadata": {"tenant_id": "wayne"}, "phases": []}'));
SELECT plan, scheduled_plan, scheduled_at FROM flux.tenants WHERE id = 'wayne';
SELECT flux_apply_stripe_event(ev('evt_w4', 'subscription_schedule.updated', 1795000300,
       '{"id": "sub_sched_2", "status": "active", "metadata": {"tenant_id": "nobody"}, "phases": []}'));
RESET flux.now;

-- Signatures (vectors computed with Python's hmac; secret whsec_flux_regress).
SET flux.now = '2026-11-18 11:08:20+00';   -- 100 s after t = 1795000000
SELECT flux_verify_stripe_signature('{"id":"evt_sig","type":"invoice.paid"}',
       't=1795000000,v1=920ce884b9586c7d86059c178ad8a78c2e23be9aebe4e8702bbe71d20d4e7361', 'whsec_flux_regress') AS valid,
       flux_verify_stripe_signature('{"id":"evt_sig","type":"invoice.paid"}',
       't=1795000000,v1=0000000000000000000000000000000000000000000000000000000000000000,v1=920ce884b9586c7d86059c178ad8a78c2e23be9aebe4e8702bbe71d20d4e7361', 'whsec_flux_regress') AS second_v1,
       flux_verify_stripe_signature('{"id":"evt_sig","type":"invoice.paid"}',
       't=1795000000,v1=920ce884b9586c7d86059c178ad8a78c2e23be9aebe4e8702bbe71d20d4e7361', 'whsec_wrong') AS wrong_secret,
       flux_verify_stripe_signature('{"id":"evt_sig","type":"invoice.failed"}',
       't=1795000000,v1=920ce884b9586c7d86059c178ad8a78c2e23be9aebe4e8702bbe71d20d4e7361', 'whsec_flux_regress') AS tampered;
SET flux.now = '2026-11-18 11:11:41+00';   -- 301 s after
SELECT flux_verify_stripe_signature('{"id":"evt_sig","type":"invoice.paid"}',
       't=1795000000,v1=920ce884b9586c7d86059c178ad8a78c2e23be9aebe4e8702bbe71d20d4e7361', 'whsec_flux_regress') AS expired,
       flux_verify_stripe_signature('{"id":"evt_sig","type":"invoice.paid"}',
       't=1795000000,v1=920ce884b9586c7d86059c178ad8a78c2e23be9aebe4e8702bbe71d20d4e7361', 'whsec_flux_regress', '10 minutes') AS wider_tolerance;
RESET flux.now;
DROP EXTENSION flux_entitlements;
DROP FUNCTION try(text);
DROP FUNCTION ev(text, text, bigint, jsonb), sub(text, jsonb, jsonb), state(text);
