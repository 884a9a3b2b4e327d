-- Plain INSERT / UPDATE / DELETE get the same validation as the functions.
\i tests/pg_regress/common/setup.sql
INSERT INTO flux.features (key, kind) VALUES ('export', 'boolean'), ('api', 'metered'), ('seats', 'limit');
INSERT INTO flux.plans (key, rank, is_default) VALUES ('free', 0, true), ('pro', 2, false);
INSERT INTO flux.grants (plan, feature) VALUES ('pro', 'export');
INSERT INTO flux.grants (plan, feature, "limit") VALUES ('pro', 'api', 1000);
SELECT plan, feature, "limit", period FROM flux.grants ORDER BY feature;
INSERT INTO flux.tenants (id, plan) VALUES ('acme', 'pro');
SELECT flux_check('acme', 'export');

-- The same errors as the functions.
INSERT INTO flux.features (key, kind) VALUES ('x', 'toggle');
INSERT INTO flux.grants (plan, feature, "limit", period) VALUES ('pro', 'api', 10, 'fortnight');
INSERT INTO flux.grants (plan, feature) VALUES ('gold', 'export');
INSERT INTO flux.grants (plan, feature, "limit") VALUES ('pro', 'seats', -3);
INSERT INTO flux.plans (key, is_default) VALUES ('free2', true);
UPDATE flux.plans SET is_default = true WHERE key = 'pro';
INSERT INTO flux.tenants (id, plan, status) VALUES ('t2', 'pro', 'expired');
INSERT INTO flux.tenants (id, plan) VALUES ('t3', 'platinum');
INSERT INTO flux.tenants (id, plan, status) VALUES ('t4', 'pro', 'trialing');
UPDATE flux.tenants SET current_period_start = '2026-12-01', current_period_end = '2026-11-01' WHERE id = 'acme';

-- Nothing half-written: one bad row fails the whole statement.
INSERT INTO flux.tenants (id, plan) VALUES ('ok1', 'pro'), ('ok2', 'pro'), ('bad', 'nope');
SELECT count(*) FROM flux.tenants WHERE id LIKE 'ok%';

-- past_due_since follows status, from the clock (flux.now here).
SET flux.now = '2026-11-05 12:00+00';
UPDATE flux.tenants SET status = 'past_due' WHERE id = 'acme';
SELECT status, past_due_since FROM flux.tenants WHERE id = 'acme';
SET flux.now = '2026-11-06 12:00+00';
UPDATE flux.tenants SET plan = 'pro' WHERE id = 'acme';   -- still past_due: unchanged
SELECT past_due_since FROM flux.tenants WHERE id = 'acme';
UPDATE flux.tenants SET status = 'active' WHERE id = 'acme';
SELECT past_due_since FROM flux.tenants WHERE id = 'acme';
-- Inserting a past_due tenant with an explicit past_due_since keeps it (as pg_restore does).
INSERT INTO flux.tenants (id, plan, status, past_due_since) VALUES ('late', 'pro', 'past_due', '2026-10-01 00:00+00');
SELECT past_due_since FROM flux.tenants WHERE id = 'late';
RESET flux.now;

-- Deleting a plan that tenants are on is refused, with a way out.
DELETE FROM flux.plans WHERE key = 'pro';
SELECT count(*) FROM flux.plans WHERE key = 'pro';
-- Deleting a plan nobody is on removes its grants too.
INSERT INTO flux.plans (key) VALUES ('legacy');
INSERT INTO flux.grants (plan, feature) VALUES ('legacy', 'export');
DELETE FROM flux.plans WHERE key = 'legacy';
SELECT count(*) FROM flux.grants WHERE plan = 'legacy';
-- Renaming a plan carries its grants and tenants along.
UPDATE flux.plans SET key = 'professional' WHERE key = 'pro';
SELECT id, plan FROM flux.tenants ORDER BY id;
SELECT plan, feature FROM flux.grants ORDER BY feature;
SELECT flux_check('acme', 'export');
-- An addon that tenants hold cannot be deleted.
INSERT INTO flux.addons (key) VALUES ('pack');
INSERT INTO flux.tenant_addons (tenant, addon, quantity) VALUES ('acme', 'pack', 2);
INSERT INTO flux.tenant_addons (tenant, addon, quantity) VALUES ('late', 'pack', 0);
DELETE FROM flux.addons WHERE key = 'pack';
-- Deleting a tenant removes its addons and overrides.
INSERT INTO flux.overrides (tenant, feature) VALUES ('acme', 'seats');
DELETE FROM flux.tenants WHERE id = 'acme';
SELECT (SELECT count(*) FROM flux.tenant_addons) AS addons, (SELECT count(*) FROM flux.overrides) AS overrides;
DROP EXTENSION flux_entitlements;
