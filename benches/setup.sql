-- Bench catalogue: 1,000 tenants on pro, a boolean, a metered and a limit feature.
DROP EXTENSION IF EXISTS flux_entitlements CASCADE;
CREATE EXTENSION flux_entitlements;
SELECT flux_define_feature('export');
SELECT flux_define_feature('api_calls', 'metered');
SELECT flux_define_plan('free', rank => 0, is_default => true);
SELECT flux_define_plan('pro', rank => 2);
SELECT flux_grant('pro', 'export');
SELECT flux_grant('pro', 'api_calls', NULL, 'month');
SELECT count(flux_subscribe('t' || i, 'pro')) FROM generate_series(1, 1000) i;
-- Callers: a metered feature with an allowance per subject (a consume
-- charges the subject's counter and the tenant's), and an API key per
-- tenant (a consume under it charges the key's and the tenant's).
SELECT flux_define_feature('member_calls', 'metered');
SELECT flux_grant('pro', 'member_calls', NULL, 'month', subject_limit => 1000000000);
DROP TABLE IF EXISTS bench_keys;
CREATE TABLE bench_keys AS SELECT i AS t, flux_create_api_key('t' || i, 'bench') AS secret FROM generate_series(1, 1000) i;
ALTER TABLE bench_keys ADD PRIMARY KEY (t);
-- Baselines: a plain counter table updated by primary key.
DROP TABLE IF EXISTS bench_counters;
CREATE TABLE bench_counters (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0);
INSERT INTO bench_counters (id) SELECT i FROM generate_series(1, 1000) i;
-- Per-row: rows with 1,000 distinct tenants.
DROP TABLE IF EXISTS bench_rows;
CREATE TABLE bench_rows AS SELECT i AS id, 't' || (i % 1000 + 1) AS tenant_id FROM generate_series(1, :rows) i;
ANALYZE;
-- Credits: a pool with a large monthly allowance and a top-up per tenant;
-- chat (metered, unlimited) costs 1 credit: a consume records chat's
-- counter, draws from the pool and writes one ledger row.
SELECT flux_define_feature('ai_credits', 'credits');
SELECT flux_define_feature('chat', 'metered');
SELECT flux_grant('pro', 'ai_credits', 1000000000000, 'month');
SELECT flux_grant('pro', 'chat', NULL, 'month');
SELECT flux_set_cost('chat', 'ai_credits', 1);
-- Baseline of a priced consume: the counter's UPDATE plus a ledger INSERT.
DROP TABLE IF EXISTS bench_ledger;
CREATE TABLE bench_ledger (id bigserial PRIMARY KEY, t int NOT NULL, amount bigint NOT NULL, at timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON bench_ledger (t, at);
ANALYZE;
-- Holds: a metered feature that has had a hold (flux.held_features), whose
-- consumes then also ask whether a hold on the counter has expired.
SELECT flux_define_feature('held_calls', 'metered');
SELECT flux_grant('pro', 'held_calls', NULL, 'month');
SELECT flux_release_hold((flux_hold('t1', 'held_calls', 1)).hold_id);
ANALYZE;
-- Alerts: a quota with thresholds far above any use (a consume crosses
-- none) against the same quota without them; and a one-seat limit alerting
-- at the limit (the bench script frees the seat and deletes the alert, so
-- each consume crosses it again) against the same limit without one.
SELECT flux_define_feature('quota_alerted', 'metered');
SELECT flux_define_feature('quota_plain', 'metered');
SELECT flux_grant('pro', 'quota_alerted', 1000000000000000, 'month');
SELECT flux_grant('pro', 'quota_plain', 1000000000000000, 'month');
SELECT flux_alert('quota_alerted', 0.8);
SELECT flux_alert('quota_alerted', 1);
SELECT flux_define_feature('seat_alerted', 'limit');
SELECT flux_define_feature('seat_plain', 'limit');
SELECT flux_grant('pro', 'seat_alerted', 1);
SELECT flux_grant('pro', 'seat_plain', 1);
SELECT flux_alert('seat_alerted', 1);
ANALYZE;
