-- Every reason, in the contract's order, with upgrade_plans and messages.
\i tests/pg_regress/common/setup.sql
SELECT flux_define_feature('export');
SELECT flux_define_feature('sso');
SELECT flux_define_feature('beta');
SELECT flux_define_plan('free', rank => 0, is_default => true);
SELECT flux_define_plan('starter', rank => 1);
SELECT flux_define_plan('pro', rank => 2);
SELECT flux_define_plan('enterprise', rank => 3);
SELECT flux_grant('enterprise', 'export');
SELECT flux_grant('pro', 'export');
SELECT flux_grant('enterprise', 'sso');
SELECT flux_subscribe('starter_co', 'starter');
SELECT flux_subscribe('pro_co', 'pro');
SELECT flux_subscribe('gone_co', 'pro', 'canceled');

-- unknown_feature wins over unknown_tenant.
SELECT allowed, reason, message FROM flux_decide('nobody', 'nothing');
SELECT allowed, reason, message FROM flux_decide('nobody', 'export');
-- subscription_inactive before not_in_plan.
SELECT allowed, reason, message, upgrade_plans FROM flux_decide('gone_co', 'export');
-- not_in_plan names the plans, by rank.
SELECT allowed, reason, message, upgrade_plans FROM flux_decide('starter_co', 'export');
SELECT allowed, reason, message, upgrade_plans FROM flux_decide('pro_co', 'sso');
SELECT allowed, reason, message, upgrade_plans FROM flux_decide('pro_co', 'beta');
-- ok.
SELECT * FROM flux_decide('pro_co', 'export', 'user-7');
-- Upgrades and downgrades apply to the next statement.
SELECT flux_subscribe('starter_co', 'pro');
SELECT flux_check('starter_co', 'export');
UPDATE flux.tenants SET plan = 'starter' WHERE id = 'starter_co';
SELECT flux_check('starter_co', 'export');
-- flux_check never raises for unknown keys; NULL in, NULL out.
SELECT flux_check('nobody', 'export'), flux_check('pro_co', 'nothing'),
       flux_check(NULL, 'export') IS NULL AS null_tenant, flux_check('pro_co', NULL) IS NULL AS null_feature;
SELECT flux_decide(NULL, 'export') IS NULL AS decide_null;
-- Garbage input: huge, empty, unicode.
SELECT flux_check(repeat('x', 1000000), 'export'), flux_check('', ''), flux_check('日本語', '🚀');
SELECT reason, length(message) < 200 AS short_message FROM flux_decide('acme', repeat('y', 1000000));
-- flux_entitlements: one row per feature, by key.
SELECT feature, allowed, reason FROM flux_entitlements('pro_co');
SELECT count(*) FROM flux_entitlements('nobody') WHERE reason = 'unknown_tenant';
-- flux_check(feature) uses the session's tenant.
SELECT flux_current_tenant() IS NULL AS no_tenant, flux_check('export') IS NULL AS no_answer;
SET flux.tenant = 'pro_co';
SELECT flux_current_tenant(), flux_check('export');
RESET flux.tenant;
SET request.jwt.claims = '{"sub": "u1", "tenant_id": "starter_co"}';
SELECT flux_current_tenant(), flux_check('export');
SET flux.jwt_tenant_claim = 'org';
SELECT flux_current_tenant() IS NULL AS missing_claim;
SET request.jwt.claims = 'not json';
SELECT flux_current_tenant() IS NULL AS malformed_claims;
RESET request.jwt.claims;
RESET flux.jwt_tenant_claim;
-- A bad clock setting is named.
SET flux.now = 'tomorrowish';
SELECT flux_check('pro_co', 'export');
RESET flux.now;
DROP EXTENSION flux_entitlements;
