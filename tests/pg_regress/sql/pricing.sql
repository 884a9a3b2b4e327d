-- Pricing changes (0.2): a scheduled downgrade before and after its
-- instant, a preview and the impact of a new limit against real decisions,
-- grandfathering by copy and move, and the pricing table.
SET client_min_messages = warning;
DROP ROLE IF EXISTS pricing_app;
RESET client_min_messages;
\i tests/pg_regress/common/setup.sql
CREATE ROLE pricing_app LOGIN;

SELECT flux_define_feature('seats', 'limit', 'Team members');
SELECT flux_define_feature('api_calls', 'metered', 'API requests');
SELECT flux_define_feature('export', 'boolean', 'CSV export');
SELECT flux_define_plan('free', 'Free', rank => 0, is_default => true);
SELECT flux_define_plan('starter', 'Starter', rank => 1);
SELECT flux_define_plan('pro', 'Pro', rank => 2, grace_period => '3 days');
SELECT flux_grant('free', 'seats', 1);
SELECT flux_grant('starter', 'seats', 3);
SELECT flux_grant('starter', 'api_calls', 1000, 'month');
SELECT flux_grant('pro', 'seats', 10);
SELECT flux_grant('pro', 'api_calls', 10000, 'month');
SELECT flux_grant('pro', 'export');
SELECT flux_set_overage('pro', 'api_calls', cap => 5000);
SELECT flux_define_addon('seat_pack', 'Five more seats');
SELECT flux_grant_addon('seat_pack', 'seats', 5);
SET flux.now = '2026-12-31 23:00+00';
SELECT flux_subscribe('acme', 'pro', current_period_start => '2026-12-01', current_period_end => '2027-01-01');
SELECT flux_subscribe('globex', 'pro', current_period_start => '2026-12-01', current_period_end => '2027-01-01');
SELECT flux_subscribe('initech', 'pro');
SELECT flux_attach_addon('globex', 'seat_pack', 1);
SELECT flux_override('initech', 'seats', "limit" => 50);
SELECT used FROM flux_consume('acme', 'seats', 5);
SELECT used FROM flux_consume('acme', 'api_calls', 1500);
SELECT used FROM flux_consume('globex', 'seats', 7);
SELECT used FROM flux_consume('initech', 'seats', 12);

-- 1. Preview acme's downgrade to starter: export goes, seats and API calls
-- shrink; 5 seats used, 3 after: 2 over.
SELECT * FROM flux_preview('acme', 'starter');
-- globex's seat pack counts after too (3 + 5 = 8 >= 7 used).
SELECT feature, limit_now, limit_after, used, over_by FROM flux_preview('globex', 'starter') WHERE feature = 'seats';

-- 2. Schedule it at the end of the period (the default).
SELECT flux_schedule_change('acme', 'starter');
SELECT plan, scheduled_plan, scheduled_at FROM flux.tenants WHERE id = 'acme';
-- Before the instant: pro, with the change said where it matters.
SELECT feature, allowed, plan, "limit", message FROM flux_entitlements('acme');
SELECT flux_check('acme', 'export');
-- 2027-01-01 00:00 by the clock: starter, with no job.
SET flux.now = '2027-01-01 00:00+00';
SELECT flux_check('acme', 'export');
SELECT feature, allowed, reason, plan, "limit", message FROM flux_entitlements('acme');
-- The preview agreed: starter's limits, 2 seats over.
SELECT allowed, reason, used, "limit" FROM flux_consume('acme', 'seats');
-- The row still says pro until its next write makes the change the plan.
SELECT plan, scheduled_plan FROM flux.tenants WHERE id = 'acme';
UPDATE flux.tenants SET status = 'active' WHERE id = 'acme';
SELECT plan, scheduled_plan, scheduled_at FROM flux.tenants WHERE id = 'acme';
SELECT action, old ->> 'plan' AS was, new ->> 'plan' AS now, new ->> 'scheduled_plan' AS scheduled
  FROM flux.audit_log WHERE entity = 'tenants' AND key = 'acme' ORDER BY id;

-- 3. A change can be cancelled before its instant, not after.
SET flux.now = '2027-01-10 00:00+00';
SELECT flux_schedule_change('globex', 'free', '2027-02-01');
SELECT flux_cancel_scheduled_change('globex');
SELECT flux_cancel_scheduled_change('globex');
SELECT flux_schedule_change('globex', 'starter', '2027-01-15');
SET flux.now = '2027-01-16 00:00+00';
SELECT try($$SELECT flux_cancel_scheduled_change('globex')$$);
SELECT plan FROM flux_decide('globex', 'seats');
-- Moving it back by hand after the instant: the stored plan (pro) is set
-- again, and the change in force (starter) is replaced.
SELECT flux_subscribe('globex', 'pro', current_period_start => '2027-01-01', current_period_end => '2027-02-01');
SELECT plan, scheduled_plan FROM flux.tenants WHERE id = 'globex';
SELECT plan FROM flux_decide('globex', 'seats');
-- A plan renamed keeps the changes scheduled from and to it.
SELECT flux_schedule_change('globex', 'starter', '2027-01-20');
BEGIN;
UPDATE flux.plans SET key = 'pro_v1' WHERE key = 'pro';
UPDATE flux.plans SET key = 'starter_v1' WHERE key = 'starter';
SELECT plan, scheduled_plan, scheduled_at FROM flux.tenants WHERE id = 'globex';
SET LOCAL flux.now = '2027-01-21 00:00+00';
UPDATE flux.plans SET key = 'pro' WHERE key = 'pro_v1';
SELECT plan, scheduled_plan, scheduled_at FROM flux.tenants WHERE id = 'globex';
ROLLBACK;
SELECT flux_cancel_scheduled_change('globex');
-- An explicit plan change replaces a change still pending.
SELECT flux_schedule_change('initech', 'starter', '2027-02-01');
SELECT flux_subscribe('initech', 'pro', status => 'active');
SELECT plan, scheduled_plan FROM flux.tenants WHERE id = 'initech';
SELECT flux_subscribe('initech', 'starter');
SELECT flux_subscribe('initech', 'pro');
SELECT flux_schedule_change('initech', 'free', '2027-03-01');
SELECT flux_subscribe('initech', 'starter');
SELECT plan, scheduled_plan FROM flux.tenants WHERE id = 'initech';
SELECT flux_subscribe('initech', 'pro');

-- 4. Impact of Pro's seats going from 10 to 6: who would be over? initech
-- has its own override (50) and is not affected.
SELECT flux_subscribe('hooli', 'pro');
SELECT flux_subscribe('umbrella', 'pro');
SELECT used FROM flux_consume('hooli', 'seats', 9);
SELECT used FROM flux_consume('umbrella', 'seats', 4);
SELECT * FROM flux_plan_impact('pro', 'seats', 6);
SELECT * FROM flux_plan_impact('pro', 'seats', NULL);
-- ... against the decisions once it is made.
BEGIN;
SELECT flux_grant('pro', 'seats', 6);
SELECT tenant, used, "limit", used - "limit" AS over_by
  FROM flux.tenants t, LATERAL flux_decide(t.id, 'seats') d
 WHERE d.plan = 'pro' AND used > "limit" ORDER BY tenant;
ROLLBACK;

-- 5. Grandfathering: Pro's customers keep 10 seats on a copy, Pro itself
-- goes to 6 for new customers.
SELECT flux_copy_plan('pro', 'pro_2026', 'Pro (2026)');
SELECT key, name, rank, is_default, grace_period, listed FROM flux.plans ORDER BY rank, key;
SELECT plan, feature, "limit", period, overage, overage_cap FROM flux.grants WHERE plan LIKE 'pro%' ORDER BY feature, plan;
SELECT flux_move_tenants('pro', 'pro_2026');
SELECT flux_grant('pro', 'seats', 6);
SELECT id, plan FROM flux.tenants ORDER BY id;
SELECT allowed, plan, "limit" FROM flux_decide('hooli', 'seats');
-- A grandfathered copy is not offered to others.
SELECT message, upgrade_plans FROM flux_decide('acme', 'export');
-- A move scheduled for later.
SELECT flux_move_tenants('pro_2026', 'pro', '2027-06-01');
SELECT id, plan, scheduled_plan, scheduled_at FROM flux.tenants WHERE scheduled_plan IS NOT NULL ORDER BY id;
SELECT count(*) FROM flux.audit_log WHERE entity = 'tenants' AND new ->> 'scheduled_plan' = 'pro';

-- 6. What the pricing page and psql see.
SELECT feature, plan, included FROM flux.plan_matrix;
SELECT feature, plan, included FROM flux.plan_matrix \crosstabview
SELECT jsonb_pretty(flux_pricing_table());

-- 7. Bad input: nothing written.
SELECT try($$SELECT flux_schedule_change('acme', 'gold')$$);
SELECT try($$SELECT flux_schedule_change('nobody', 'pro')$$);
SELECT try($$SELECT flux_schedule_change('hooli', 'pro')$$);
SELECT try($$SELECT flux_schedule_change('acme', 'starter', '2027-06-01')$$);
SELECT try($$SELECT flux_schedule_change('acme', 'pro', '2027-01-01')$$);
SELECT try($$SELECT flux_schedule_change('acme', NULL)$$);
SELECT try($$SELECT flux_schedule_change('acme', 'pro', 'infinity')$$);
SELECT try($$SELECT flux_move_tenants('pro', 'starter', 'infinity')$$);
SELECT try($$SELECT flux_cancel_scheduled_change('nobody')$$);
SELECT try($$SELECT flux_copy_plan('pro', 'starter')$$);
SELECT try($$SELECT flux_copy_plan('gold', 'gold_2026')$$);
SELECT try($$SELECT flux_copy_plan('pro', '')$$);
SELECT try($$SELECT flux_move_tenants('pro', 'pro')$$);
SELECT try($$SELECT flux_move_tenants('pro', 'gold')$$);
SELECT try($$SELECT flux_move_tenants('pro', 'starter', '2020-01-01')$$);
SELECT try($$SELECT * FROM flux_plan_impact('pro', 'export', 1)$$);
SELECT try($$SELECT * FROM flux_plan_impact('starter', 'export', 1)$$);
SELECT try($$SELECT * FROM flux_plan_impact('pro', 'seats', -1)$$);
SELECT try($$SELECT * FROM flux_preview('acme', 'gold')$$);
SELECT try($$SELECT * FROM flux_preview('nobody', 'pro')$$);
SELECT try($$UPDATE flux.tenants SET scheduled_plan = 'pro' WHERE id = 'acme'$$);
SELECT try($$DELETE FROM flux.plans WHERE key = 'pro'$$);

-- 8. An application role: its own preview and the pricing table, nothing else.
SET ROLE pricing_app;
SET flux.tenant = 'acme';
SELECT feature, allowed_now, allowed_after, over_by FROM flux_preview('acme', 'pro');
SELECT try($$SELECT * FROM flux_preview('hooli', 'pro')$$);
-- A grandfathered plan it is not on is not shown to it.
SELECT try($$SELECT * FROM flux_preview('acme', 'pro_2026')$$);
SELECT jsonb_array_length(flux_pricing_table() -> 'plans') AS plans;
SELECT try($$SELECT flux_schedule_change('acme', 'pro')$$);
SELECT try($$SELECT flux_cancel_scheduled_change('acme')$$);
SELECT try($$SELECT * FROM flux_plan_impact('pro', 'seats', 1)$$);
SELECT try($$SELECT flux_copy_plan('pro', 'mine')$$);
SELECT try($$SELECT flux_move_tenants('free', 'pro')$$);
SELECT try($$SELECT count(*) FROM flux.plan_matrix$$);
SELECT try($$SELECT flux._pricing_table()$$);
RESET flux.tenant;
RESET ROLE;

RESET flux.now;
DROP EXTENSION flux_entitlements CASCADE;
DROP ROLE pricing_app;
