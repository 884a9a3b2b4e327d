-- Plan + addons + overrides, and what applies when.
\i tests/pg_regress/common/setup.sql
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_feature('sso');
SELECT flux_define_feature('reports');
SELECT flux_define_plan('free', rank => 0, is_default => true);
SELECT flux_define_plan('starter', rank => 1);
SELECT flux_define_plan('enterprise', rank => 3);
SELECT flux_grant('free', 'seats', 1);
SELECT flux_grant('starter', 'seats', 3);
SELECT flux_grant('enterprise', 'seats');
SELECT flux_grant('enterprise', 'sso');
SELECT flux_grant('starter', 'reports', value => '["csv"]');
SELECT flux_define_addon('seat_pack');
SELECT flux_grant_addon('seat_pack', 'seats', 5);
SELECT flux_define_addon('unlimited_seats');
SELECT flux_grant_addon('unlimited_seats', 'seats');
SELECT flux_define_addon('sso_addon');
SELECT flux_grant_addon('sso_addon', 'sso');
SET flux.now = '2026-11-10 00:00+00';
SELECT flux_subscribe('acme', 'starter');

-- Addon limits add up: 3 + 2 x 5.
SELECT flux_attach_addon('acme', 'seat_pack', 2);
SELECT "limit", message FROM flux_decide('acme', 'seats');
SELECT flux_attach_addon('acme', 'seat_pack', 4);
SELECT "limit" FROM flux_decide('acme', 'seats');
-- NULL (unlimited) wins.
SELECT flux_attach_addon('acme', 'unlimited_seats');
SELECT "limit", message FROM flux_decide('acme', 'seats');
SELECT flux_attach_addon('acme', 'unlimited_seats', 0);
SELECT "limit" FROM flux_decide('acme', 'seats');
-- An addon grants what the plan does not.
SELECT flux_check('acme', 'sso');
SELECT flux_attach_addon('acme', 'sso_addon');
SELECT flux_check('acme', 'sso');
-- Addons count only while the subscription is live.
UPDATE flux.tenants SET status = 'canceled' WHERE id = 'acme';
SELECT allowed, reason, plan, "limit" FROM flux_decide('acme', 'seats');
SELECT allowed, reason FROM flux_decide('acme', 'sso');
UPDATE flux.tenants SET status = 'active' WHERE id = 'acme';
SELECT flux_attach_addon('acme', 'sso_addon', 0);
SELECT flux_attach_addon('acme', 'seat_pack', -1);
SELECT flux_attach_addon('acme', 'nope', 1);

-- Overrides: a time-boxed grant ...
SELECT flux_override('acme', 'sso', starts_at => '2026-11-15', expires_at => '2026-12-15', reason => 'security review');
SELECT allowed, reason FROM flux_decide('acme', 'sso');
SET flux.now = '2026-11-15 00:00+00';
SELECT allowed, reason, message FROM flux_decide('acme', 'sso');
SET flux.now = '2026-12-15 00:00+00';
SELECT allowed, reason FROM flux_decide('acme', 'sso');
SET flux.now = '2026-11-20 00:00+00';
-- ... a limit that replaces plan + addons (NULL = unlimited) ...
SELECT flux_override('acme', 'seats', "limit" => 50, reason => 'enterprise deal');
SELECT "limit", message FROM flux_decide('acme', 'seats');
SELECT flux_override('acme', 'seats', "limit" => NULL);
SELECT "limit" FROM flux_decide('acme', 'seats');
-- ... a revocation, even of what the plan grants ...
SELECT flux_override('acme', 'reports', enabled => false, reason => 'abuse');
SELECT allowed, reason, message, upgrade_plans FROM flux_decide('acme', 'reports');
SELECT flux_value('acme', 'reports');
DELETE FROM flux.overrides WHERE tenant = 'acme' AND feature = 'reports';
SELECT flux_value('acme', 'reports');
-- ... a value override ...
SELECT flux_override('acme', 'reports', value => '["csv","pdf"]');
SELECT flux_value('acme', 'reports');
-- ... and overrides apply whatever the subscription state.
UPDATE flux.tenants SET status = 'paused' WHERE id = 'acme';
SELECT allowed, reason, "limit" FROM flux_decide('acme', 'seats');
SELECT allowed, reason FROM flux_decide('acme', 'sso');
-- Bad overrides.
SELECT flux_override('acme', 'sso', starts_at => '2026-12-01', expires_at => '2026-11-01');
SELECT flux_override('nobody', 'sso');
SELECT flux_override('acme', 'sso', "limit" => 3);
SELECT feature, enabled, "limit", reason FROM flux.overrides ORDER BY feature;
RESET flux.now;
DROP EXTENSION flux_entitlements;
