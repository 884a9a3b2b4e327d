-- flux_limit_report's bench: 1M tenants on three plans, 200k counter rows
-- (100k seats, 100k calls of the current month), used at random up to 1.2x
-- the plan's limit. Set up in bulk (benches/bulk_tenants.sql).
DROP EXTENSION IF EXISTS flux_entitlements CASCADE;
CREATE EXTENSION flux_entitlements;
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_feature('calls', 'metered');
SELECT flux_define_plan('p' || i, rank => i) FROM generate_series(1, 3) i;
SELECT flux_grant('p' || i, 'seats', 10 * i) FROM generate_series(1, 3) i;
SELECT flux_grant('p' || i, 'calls', 1000 * i, 'month') FROM generate_series(1, 3) i;
\set prefix r
\set from 1
\set to 1000000
\set plan_expr '''p'' || (i % 3 + 1)'
\i benches/bulk_tenants.sql
INSERT INTO flux.usage (tenant, feature, period_start, used)
    SELECT 'r' || i, 'seats', '-infinity', (random() * 12 * (i % 3 + 1))::bigint
      FROM generate_series(1, 1000000, 10) i;
INSERT INTO flux.usage (tenant, feature, period_start, used)
    SELECT 'r' || i, 'calls', date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
           (random() * 1200 * (i % 3 + 1))::bigint
      FROM generate_series(5, 1000000, 10) i;
ANALYZE;
