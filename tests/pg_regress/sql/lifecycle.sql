-- The subscription lifecycle, crossing boundaries with flux.now.
\i tests/pg_regress/common/setup.sql
SELECT flux_define_feature('export');
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_plan('free', rank => 0, is_default => true);
SELECT flux_define_plan('pro', rank => 2);
SELECT flux_define_plan('team', rank => 3, grace_period => '3 days');
SELECT flux_grant('pro', 'export');
SELECT flux_grant('team', 'export');
SELECT flux_grant('free', 'seats', 1);
SELECT flux_grant('pro', 'seats', 10);
SET flux.now = '2026-11-01 00:00+00';

-- Trialing: live until trial_ends_at, then the default plan.
SELECT flux_subscribe('t_trial', 'pro', 'trialing', trial_ends_at => '2026-11-15 00:00+00');
SELECT allowed, reason, plan FROM flux_decide('t_trial', 'export');
SET flux.now = '2026-11-14 23:59:59+00';
SELECT allowed, reason, plan FROM flux_decide('t_trial', 'export');
SET flux.now = '2026-11-15 00:00+00';
SELECT allowed, reason, plan, message FROM flux_decide('t_trial', 'export');
SELECT allowed, plan, "limit" FROM flux_decide('t_trial', 'seats');
-- The trial converts: a plain UPDATE is enough.
UPDATE flux.tenants SET status = 'active' WHERE id = 't_trial';
SELECT allowed, reason, plan FROM flux_decide('t_trial', 'export');

-- Cancel at period end: live until current_period_end.
SET flux.now = '2026-11-01 00:00+00';
SELECT flux_subscribe('t_cancel', 'pro', current_period_end => '2026-12-01 00:00+00', cancel_at_period_end => true);
SELECT allowed, reason FROM flux_decide('t_cancel', 'export');
SET flux.now = '2026-12-01 00:00+00';
SELECT allowed, reason, message FROM flux_decide('t_cancel', 'export');
-- Without cancel_at_period_end a past period end does not end access.
UPDATE flux.tenants SET cancel_at_period_end = false WHERE id = 't_cancel';
SELECT allowed, reason FROM flux_decide('t_cancel', 'export');

-- past_due: past_due_since is set from the clock; grace from the setting (7 days) ...
SET flux.now = '2026-11-01 00:00+00';
SELECT flux_subscribe('t_due', 'pro');
UPDATE flux.tenants SET status = 'past_due' WHERE id = 't_due';
SELECT past_due_since FROM flux.tenants WHERE id = 't_due';
SET flux.now = '2026-11-07 23:59+00';
SELECT allowed, reason FROM flux_decide('t_due', 'export');
SET flux.now = '2026-11-08 00:00+00';
SELECT allowed, reason, message FROM flux_decide('t_due', 'export');
-- ... the setting can change it ...
SET flux.default_grace_period = '10 days';
SELECT allowed, reason FROM flux_decide('t_due', 'export');
RESET flux.default_grace_period;
-- ... grace_until overrides it ...
UPDATE flux.tenants SET grace_until = '2026-11-20 00:00+00' WHERE id = 't_due';
SELECT allowed, reason FROM flux_decide('t_due', 'export');
-- ... and leaving past_due clears both.
UPDATE flux.tenants SET status = 'active' WHERE id = 't_due';
SELECT past_due_since, grace_until FROM flux.tenants WHERE id = 't_due';
-- The plan's grace_period wins over the setting.
SET flux.now = '2026-11-01 00:00+00';
SELECT flux_subscribe('t_team', 'team', 'past_due');
SET flux.now = '2026-11-03 23:59+00';
SELECT allowed, reason FROM flux_decide('t_team', 'export');
SET flux.now = '2026-11-04 00:00+00';
SELECT allowed, reason FROM flux_decide('t_team', 'export');

-- canceled and paused: the default plan's grants only.
SELECT flux_subscribe('t_canceled', 'pro', 'canceled');
SELECT flux_subscribe('t_paused', 'pro', 'paused');
SELECT d.tenant, d.allowed, d.reason, d.plan, d.message
  FROM unnest(ARRAY['t_canceled', 't_paused']) t, flux_decide(t, 'export') d;
SELECT d.tenant, d.allowed, d.plan, d."limit"
  FROM unnest(ARRAY['t_canceled', 't_paused']) t, flux_decide(t, 'seats') d;

-- A trialing tenant needs a trial end.
SELECT flux_subscribe('t_bad', 'pro', 'trialing');
SELECT flux_subscribe('t_bad', 'pro', 'lapsed');
SELECT count(*) FROM flux.tenants WHERE id = 't_bad';

-- With no default plan, a lapsed subscription gets nothing.
UPDATE flux.plans SET is_default = false WHERE key = 'free';
SELECT allowed, reason, plan, message FROM flux_decide('t_canceled', 'seats');
RESET flux.now;
DROP EXTENSION flux_entitlements;
