-- Soft limits (0.2): a plan's grant of a limit or metered feature may let
-- consumes go past the limit, up to a cap (or with none); the decision's
-- overage reports the units past the limit this period, and its message
-- says so. What made the limit (the plan, addons, an override) is the
-- included amount; whether it is soft, and the cap, are the plan grant's.
SET client_min_messages = warning;
DROP ROLE IF EXISTS overage_app;
RESET client_min_messages;
\i tests/pg_regress/common/setup.sql
CREATE ROLE overage_app LOGIN;

SELECT flux_define_feature('api_calls', 'metered');
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_feature('export');
SELECT flux_define_feature('calls', 'rate');
SELECT flux_define_plan('pro', rank => 1);
SELECT flux_define_plan('enterprise', rank => 2);
SELECT flux_grant('pro', 'api_calls', 1000, 'month');
SELECT flux_grant('enterprise', 'api_calls', 1000, 'month');
SELECT flux_grant('enterprise', 'seats', 10);
SELECT flux_grant('enterprise', 'export');
SELECT flux_grant('enterprise', 'calls', 10, '1 minute');
SET flux.now = '2026-12-01 10:00+00';
SELECT flux_subscribe('acme', 'enterprise');
SELECT flux_subscribe('globex', 'enterprise');

-- 1. A soft API quota with a cap of 500: 1,200 is allowed, 200 over.
SELECT flux_set_overage('enterprise', 'api_calls', cap => 500);
SELECT plan, feature, "limit", overage, overage_cap FROM flux.grants WHERE feature = 'api_calls' ORDER BY plan;
SELECT allowed, used, remaining, overage, message FROM flux_consume('acme', 'api_calls', 1200);
SELECT flux_check('acme', 'api_calls');
-- Up to the cap, and not one past it.
SELECT allowed, used, overage FROM flux_consume('acme', 'api_calls', 300);
SELECT allowed, reason, used, overage, message FROM flux_consume('acme', 'api_calls');
SELECT flux_check('acme', 'api_calls');
SELECT allowed, reason, overage, remaining FROM flux_decide('acme', 'api_calls');
-- Under the limit a soft grant reports 0 over; a hard one, NULL.
SELECT overage, message FROM flux_decide('globex', 'api_calls');
SELECT flux_subscribe('initech', 'pro');
SELECT overage FROM flux_decide('initech', 'api_calls');

-- 2. No cap: past the limit without end.
SELECT flux_set_overage('enterprise', 'api_calls');
SELECT allowed, used, overage, remaining, message FROM flux_consume('acme', 'api_calls', 5000);

-- 3. An override or addons set the included amount; the grant stays soft.
SELECT flux_override('globex', 'api_calls', "limit" => 100);
SELECT allowed, "limit", used, overage, message FROM flux_consume('globex', 'api_calls', 150);

-- 4. A limit feature (seats) soft by 2.
SELECT flux_set_overage('enterprise', 'seats', cap => 2);
SELECT allowed, used, overage FROM flux_consume('acme', 'seats', 12);
SELECT allowed, reason FROM flux_consume('acme', 'seats');
SELECT flux_release('acme', 'seats', 3);
SELECT overage, message FROM flux_decide('acme', 'seats');

-- 5. A downgrade to a hard plan stops overage at once.
SELECT flux_subscribe('acme', 'pro');
SELECT allowed, reason, overage, message FROM flux_consume('acme', 'api_calls');
SELECT flux_check('acme', 'api_calls');

-- 6. Hard again.
SELECT flux_set_overage('enterprise', 'api_calls', false);
SELECT overage, overage_cap FROM flux.grants WHERE plan = 'enterprise' AND feature = 'api_calls';
SELECT allowed, reason, overage FROM flux_consume('globex', 'api_calls');

-- 7. Audited as a change of the grant.
SELECT action, key, old ->> 'overage' AS was, new ->> 'overage' AS now, new ->> 'overage_cap' AS cap
  FROM flux.audit_log WHERE entity = 'grants' AND action = 'update' ORDER BY id;

-- 8. Bad input: nothing written.
SELECT try($$SELECT flux_set_overage('enterprise', 'export')$$);
SELECT try($$SELECT flux_set_overage('enterprise', 'calls')$$);
SELECT try($$SELECT flux_set_overage('enterprise', 'api_calls', cap => -1)$$);
SELECT try($$SELECT flux_set_overage('pro', 'seats')$$);
SELECT try($$SELECT flux_set_overage('gold', 'api_calls')$$);
SELECT try($$SELECT flux_set_overage('pro', 'nothing')$$);
SELECT try($$SELECT flux_set_overage('pro', 'api_calls', NULL)$$);
SELECT try($$UPDATE flux.grants SET overage_cap = 5 WHERE plan = 'pro' AND feature = 'api_calls'$$);
SELECT try($$UPDATE flux.grants SET overage = true WHERE plan = 'enterprise' AND feature = 'export'$$);
SELECT count(*) FROM flux.grants WHERE overage;

-- 9. An application role cannot make its own plan soft.
SET ROLE overage_app;
SELECT try($$SELECT flux_set_overage('pro', 'api_calls')$$);
SELECT try($$UPDATE flux.grants SET overage = true$$);
RESET ROLE;

RESET flux.now;
DROP EXTENSION flux_entitlements CASCADE;
DROP ROLE overage_app;
