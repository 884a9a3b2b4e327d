-- Metering: quotas that reset, seats, rate limits, idempotency, rollback.
\i tests/pg_regress/common/setup.sql
SELECT flux_define_feature('export', 'metered');
SELECT flux_define_feature('api_calls', 'metered');
SELECT flux_define_feature('reports', 'metered');
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_feature('api_rate', 'rate');
SELECT flux_define_feature('sso');
SELECT flux_define_plan('free', rank => 0, is_default => true);
SELECT flux_define_plan('pro', rank => 2);
SELECT flux_define_plan('enterprise', rank => 3);
SELECT flux_grant('pro', 'export', 50, 'day');
SELECT flux_grant('enterprise', 'export', NULL, 'day');
SELECT flux_grant('pro', 'api_calls', 1000, 'month');
SELECT flux_grant('pro', 'reports', 2, 'week');
SELECT flux_grant('enterprise', 'api_calls', 5, 'billing_period');
SELECT flux_grant('free', 'seats', 1);
SELECT flux_grant('pro', 'seats', 3);
SELECT flux_grant('pro', 'api_rate', 6, '1 minute');
SELECT flux_grant('pro', 'sso');
SELECT flux_define_addon('seat_pack');
SELECT flux_grant_addon('seat_pack', 'seats', 2);
SET flux.now = '2026-11-22 10:00+00';
SELECT flux_subscribe('acme', 'pro');
SELECT flux_subscribe('megacorp', 'enterprise', current_period_start => '2026-11-15 10:00+00');

-- 50 exports a day on Pro.
SELECT allowed, reason, used, remaining, resets_at, message FROM flux_consume('acme', 'export', 49);
SELECT allowed, reason, used, remaining, message FROM flux_consume('acme', 'export');
SELECT allowed, reason, used, remaining, resets_at, message FROM flux_consume('acme', 'export');
SELECT flux_check('acme', 'export'), flux_usage('acme', 'export');
SELECT allowed, reason, "limit", used, remaining, message FROM flux_decide('acme', 'export');
-- It resets at midnight UTC; yesterday's usage stays as history.
SET flux.now = '2026-11-23 00:00+00';
SELECT flux_check('acme', 'export'), flux_usage('acme', 'export');
SELECT allowed, used, remaining, message FROM flux_consume('acme', 'export', 45);
-- An amount that does not fit records nothing.
SELECT allowed, reason, used, message FROM flux_consume('acme', 'export', 10);
SELECT feature, period_start, used FROM flux.usage WHERE tenant = 'acme' ORDER BY 1, 2;
-- Unlimited on Enterprise: recorded (it is billing data), never refused.
SELECT allowed, reason, "limit", used, remaining, message FROM flux_consume('megacorp', 'export', 100000);

-- Rollback: recorded usage goes with the caller's transaction.
BEGIN;
SELECT used FROM flux_consume('acme', 'export', 5);
ROLLBACK;
SELECT flux_usage('acme', 'export');

-- Idempotency keys: a repeat returns the first decision and records nothing more.
SELECT allowed, used, message FROM flux_consume('acme', 'export', 2, 'req-1');
SELECT allowed, used, message FROM flux_consume('acme', 'export', 2, 'req-1');
SELECT allowed, used, message FROM flux_consume('acme', 'export', 2, 'req-2');
SELECT flux_usage('acme', 'export');
-- ... the same key for another feature is another request.
SELECT allowed, used FROM flux_consume('acme', 'api_calls', 1, 'req-1');
SELECT count(*) FROM flux.usage_keys;
SELECT flux_prune_usage_keys();
SET flux.idempotency_ttl = '0 seconds';
SELECT flux_prune_usage_keys() >= 3 AS pruned;
RESET flux.idempotency_ttl;

-- Monthly: resets on the 1st.
SET flux.now = '2026-11-30 23:59:59+00';
SELECT used, resets_at, message FROM flux_consume('acme', 'api_calls', 10);
SET flux.now = '2026-12-01 00:00+00';
SELECT used, resets_at FROM flux_consume('acme', 'api_calls', 1);
-- Weekly: ISO weeks start on Monday (2026-12-07).
SET flux.now = '2026-12-06 23:00+00';
SELECT used, resets_at FROM flux_consume('acme', 'reports', 2);
SELECT reason, message FROM flux_consume('acme', 'reports');
SET flux.now = '2026-12-07 00:00+00';
SELECT allowed, used FROM flux_consume('acme', 'reports');
-- Billing period: anchored on current_period_start (the 15th, 10:00).
SET flux.now = '2026-12-15 09:59+00';
SELECT used, resets_at FROM flux_consume('megacorp', 'api_calls', 5);
SELECT reason, message FROM flux_consume('megacorp', 'api_calls');
SET flux.now = '2026-12-15 10:00+00';
SELECT allowed, used, resets_at FROM flux_consume('megacorp', 'api_calls');
-- ... or to current_period_end when it is set.
UPDATE flux.tenants SET current_period_start = '2026-12-10', current_period_end = '2026-12-20' WHERE id = 'megacorp';
SELECT used, resets_at FROM flux_consume('megacorp', 'api_calls');

-- Seats: a non-resetting allowance, consumed and released.
SELECT used, remaining, message FROM flux_consume('acme', 'seats', 3);
SELECT allowed, reason, used, message FROM flux_consume('acme', 'seats');
SELECT flux_release('acme', 'seats');
SELECT allowed, used, remaining FROM flux_consume('acme', 'seats');
-- An addon adds two seats per pack.
SELECT flux_attach_addon('acme', 'seat_pack');
SELECT "limit", used, remaining FROM flux_decide('acme', 'seats');
-- A downgrade lowers the limit at once; what is used stays.
UPDATE flux.tenants SET plan = 'free' WHERE id = 'acme';
SELECT allowed, reason, "limit", used, remaining, message FROM flux_decide('acme', 'seats');
SELECT flux_release('acme', 'seats', 10);
UPDATE flux.tenants SET plan = 'pro' WHERE id = 'acme';

-- Rate limit: 6 a minute, a burst of 6, then one every 10 seconds.
SET flux.now = '2026-12-20 12:00:00+00';
SELECT i, d.allowed, d.used, d.remaining FROM generate_series(1, 6) i, LATERAL flux_consume('acme', 'api_rate', 1 + 0 * i) d;
SELECT allowed, reason, used, remaining, retry_after, message FROM flux_consume('acme', 'api_rate');
SELECT flux_check('acme', 'api_rate'), flux_usage('acme', 'api_rate');
SET flux.now = '2026-12-20 12:00:10+00';
SELECT allowed, used FROM flux_consume('acme', 'api_rate');
SELECT allowed, reason, retry_after FROM flux_consume('acme', 'api_rate');
SET flux.now = '2026-12-20 12:01:10+00';
SELECT allowed, used, remaining FROM flux_consume('acme', 'api_rate', 6);
SELECT reason, retry_after FROM flux_consume('acme', 'api_rate', 7);

-- Boolean features: consume records nothing and answers whether entitled.
SELECT allowed, reason, used FROM flux_consume('acme', 'sso');
-- Unknown keys: the decision with its reason, nothing recorded.
SELECT allowed, reason FROM flux_consume('nobody', 'export');
SELECT allowed, reason FROM flux_consume('acme', 'nothing');
SELECT count(*) FROM flux.usage WHERE tenant = 'nobody' OR feature IN ('sso', 'nothing');
-- Bad amounts are named.
SELECT try($$SELECT flux_consume('acme', 'export', 0)$$);
SELECT try($$SELECT flux_consume('acme', 'export', -5)$$);
SELECT try($$SELECT flux_release('acme', 'export')$$);
SELECT try($$SELECT flux_release('nobody', 'seats')$$);

-- flux_enforce_limit: seats as rows of an application table.
CREATE TABLE members (id serial PRIMARY KEY, tenant_id text NOT NULL, name text);
SELECT flux_enforce_limit('members', 'seats');
SET flux.now = '2026-12-20 12:00:00+00';
SELECT "limit" FROM flux_decide('acme', 'seats');
INSERT INTO members (tenant_id, name) VALUES ('acme', 'ann'), ('acme', 'bob'), ('acme', 'cy'), ('acme', 'dee'), ('acme', 'eve');
SELECT try($$INSERT INTO members (tenant_id, name) VALUES ('acme', 'fay')$$);
-- Downgrade-safe: existing rows stay, new ones are refused with a way out.
UPDATE flux.tenants SET plan = 'free' WHERE id = 'acme';
SELECT count(*) FROM members WHERE tenant_id = 'acme';
SELECT try($$INSERT INTO members (tenant_id, name) VALUES ('acme', 'fay')$$);
UPDATE members SET name = 'ann b.' WHERE name = 'ann';
-- Moving a row to a tenant at its limit is an insert for that tenant.
SELECT flux_subscribe('initech', 'free');
INSERT INTO members (tenant_id, name) VALUES ('initech', 'ed');
SELECT try($$UPDATE members SET tenant_id = 'initech' WHERE name = 'bob'$$);
SELECT try($$INSERT INTO members (tenant_id, name) VALUES ('nobody', 'x')$$);
SELECT try($$SELECT flux_enforce_limit('members', 'sso')$$);
SELECT try($$SELECT flux_enforce_limit('members', 'seats', 'org_id')$$);

-- An application role can consume but not rewrite its usage.
CREATE ROLE flux_regress_meter;
GRANT INSERT, SELECT ON members TO flux_regress_meter;
SET ROLE flux_regress_meter;
SET flux.tenant = 'megacorp';
SELECT allowed, used FROM flux_consume('megacorp', 'export');
RESET flux.tenant;
SELECT try($$UPDATE flux.usage SET used = 0$$);
SELECT try($$DELETE FROM flux.rate_state$$);
SELECT try($$SELECT * FROM flux.usage_keys$$);
RESET ROLE;
DROP TABLE members;
DROP ROLE flux_regress_meter;
RESET flux.now;
DROP EXTENSION flux_entitlements;
DROP FUNCTION try(text);
