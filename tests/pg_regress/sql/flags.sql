-- Flags: kill switch, deterministic percentage rollouts, allow and deny
-- lists, decided before entitlement.
\i tests/pg_regress/common/setup.sql
SELECT flux_define_feature('analytics');
SELECT flux_define_plan('free', rank => 0, is_default => true);
SELECT flux_define_plan('starter', rank => 1);
SELECT flux_define_plan('pro', rank => 2);
SELECT flux_grant('pro', 'analytics');
SELECT flux_subscribe('t' || i, 'pro') FROM generate_series(1, 10000) i \g /dev/null
SELECT flux_subscribe('starter_co', 'starter');

-- No flag row: enabled at 100%.
SELECT count(*) FILTER (WHERE flux_check('t' || i, 'analytics')) AS allowed FROM generate_series(1, 10000) i;

-- "The analytics dashboard is only on Pro, and rolled out to 20% of users": one decision.
SELECT flux_set_flag('analytics', rollout_percent => 20);
SELECT count(*) FILTER (WHERE flux_check('t' || i, 'analytics')) BETWEEN 1900 AND 2100 AS about_20_percent
  FROM generate_series(1, 10000) i;
SELECT reason, count(*) FROM generate_series(1, 10000) i, flux_decide('t' || i, 'analytics') d
 GROUP BY 1 ORDER BY 1 \g /dev/null
CREATE TEMP TABLE at20 AS
  SELECT 't' || i AS tenant FROM generate_series(1, 10000) i WHERE flux_check('t' || i, 'analytics');

-- Monotonic: raising to 40% only adds tenants.
SELECT flux_set_flag('analytics', rollout_percent => 40);
CREATE TEMP TABLE at40 AS
  SELECT 't' || i AS tenant FROM generate_series(1, 10000) i WHERE flux_check('t' || i, 'analytics');
SELECT (SELECT count(*) FROM at40) BETWEEN 3850 AND 4150 AS about_40_percent,
       (SELECT count(*) FROM at20 WHERE tenant NOT IN (SELECT tenant FROM at40)) AS removed_by_raising;
-- 0.5%, 0% and 100%.
SELECT flux_set_flag('analytics', rollout_percent => 0.5);
SELECT count(*) FILTER (WHERE flux_check('t' || i, 'analytics')) BETWEEN 25 AND 75 AS about_half_a_percent
  FROM generate_series(1, 10000) i;
SELECT flux_set_flag('analytics', rollout_percent => 0);
SELECT count(*) FILTER (WHERE flux_check('t' || i, 'analytics')) AS at_0 FROM generate_series(1, 10000) i;
SELECT flux_set_flag('analytics', rollout_percent => 100);
SELECT count(*) FILTER (WHERE flux_check('t' || i, 'analytics')) AS at_100 FROM generate_series(1, 10000) i;

-- Order of reasons: the flag first, then the plan.
SELECT flux_set_flag('analytics', rollout_percent => 0);
SELECT reason, message FROM flux_decide('starter_co', 'analytics');
SELECT flux_set_flag('analytics', rollout_percent => 100);
SELECT reason, message FROM flux_decide('starter_co', 'analytics');

-- Allow list: in whatever the percentage (but the plan still decides after).
SELECT flux_set_flag('analytics', rollout_percent => 0);
SELECT flux_flag_allow('analytics', 't1');
SELECT flux_flag_allow('analytics', 'starter_co');
SELECT flux_check('t1', 'analytics') AS t1, flux_check('t2', 'analytics') AS t2,
       (flux_decide('starter_co', 'analytics')).reason AS starter_co;
-- Deny list: out whatever the percentage, and it wins over the allow list.
SELECT flux_set_flag('analytics', rollout_percent => 100);
SELECT flux_flag_deny('analytics', 't2');
SELECT flux_flag_deny('analytics', 't1');
SELECT flux_check('t1', 'analytics') AS t1, flux_check('t2', 'analytics') AS t2, flux_check('t3', 'analytics') AS t3;
SELECT reason, message FROM flux_decide('t2', 'analytics');
-- Clear takes an id off both lists.
SELECT flux_flag_clear('analytics', 't1');
SELECT flux_flag_clear('analytics', 't2');
SELECT flux_check('t1', 'analytics') AS t1, flux_check('t2', 'analytics') AS t2;
-- The kill switch wins over everything, the allow list included.
SELECT flux_flag_allow('analytics', 't1');
SELECT flux_set_flag('analytics', enabled => false);
SELECT reason, message FROM flux_decide('t1', 'analytics');
SELECT count(*) FILTER (WHERE flux_check('t' || i, 'analytics')) AS while_killed FROM generate_series(1, 10000) i;
SELECT flux_set_flag('analytics', enabled => true, rollout_percent => 50);

-- Per-subject bucketing inside one tenant: users of t5 split about in half.
SELECT count(*) FILTER (WHERE (flux_decide('t5', 'analytics', 'user-' || i)).allowed) BETWEEN 400 AND 600 AS about_half
  FROM generate_series(1, 1000) i;
-- ... the subject's id is looked up in the lists as well as the tenant's.
SELECT flux_set_flag('analytics', rollout_percent => 0);
SELECT flux_flag_allow('analytics', 'user-42');
SELECT (flux_decide('t5', 'analytics', 'user-42')).allowed AS allowed_user,
       (flux_decide('t5', 'analytics', 'user-43')).reason AS other_user;
SELECT flux_flag_deny('analytics', 't5');
SELECT (flux_decide('t5', 'analytics', 'user-42')).reason AS denied_tenant_wins;
SELECT message FROM flux_decide('t6', 'analytics', 'user-43');

-- Pinned buckets (the README's formula): the same ids land in the same
-- buckets in every session and every release.
SELECT flux_set_flag('analytics', rollout_percent => 73.0022);
SELECT flux_subscribe('acme', 'pro');
SELECT flux_set_flag('analytics', rollout_percent => 73.0021, salt => 'export');
SELECT flux_check('acme', 'analytics') AS bucket_730021_is_out_at_73_0021;
SELECT flux_set_flag('analytics', rollout_percent => 73.0022);
SELECT flux_check('acme', 'analytics') AS bucket_730021_is_in_at_73_0022;

-- Bad percentages and lists, named.
SELECT flux_set_flag('analytics', rollout_percent => 150);
SELECT flux_set_flag('analytics', rollout_percent => -1);
SELECT flux_set_flag('analytics', rollout_percent => 12.34567);
SELECT flux_set_flag('analytics', rollout_percent => 'NaN');
UPDATE flux.flags SET rollout_percent = 101 WHERE feature = 'analytics';
INSERT INTO flux.flag_lists (feature, id, list) VALUES ('analytics', 'x', 'maybe');
SELECT flux_flag_allow('nope', 't1');
SELECT flux_set_flag('analytics', rollout_percent => 12.25);
SELECT feature, enabled, rollout_percent, salt FROM flux.flags;
DROP EXTENSION flux_entitlements;
