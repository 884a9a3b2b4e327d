-- RLS bench: 1M rows of one tenant (plus 100k of others) under flux_protect,
-- and an unprotected copy, both indexed on tenant_id; read by a login role
-- that has no grant on the flux tables.
DROP TABLE IF EXISTS bench_rls, bench_plain;
CREATE TABLE bench_rls (id bigint, tenant_id text NOT NULL, payload int);
INSERT INTO bench_rls SELECT i, CASE WHEN i <= 1000000 THEN 't1' ELSE 't' || (i % 999 + 2) END, i % 97
  FROM generate_series(1, 1100000) i;
CREATE INDEX ON bench_rls (tenant_id);
CREATE TABLE bench_plain AS SELECT * FROM bench_rls;
CREATE INDEX ON bench_plain (tenant_id);
VACUUM ANALYZE bench_rls;
VACUUM ANALYZE bench_plain;
SELECT flux_protect('bench_rls', 'export');
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'flux_bench_app') THEN CREATE ROLE flux_bench_app LOGIN; END IF;
END $$;
GRANT SELECT ON bench_rls, bench_plain TO flux_bench_app;
-- A trusted backend that acts for any tenant (flux_service): the check
-- bench runs as it too, to show what the per-role trust check costs.
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'flux_bench_service') THEN CREATE ROLE flux_bench_service LOGIN; END IF;
END $$;
GRANT flux_service TO flux_bench_service;
