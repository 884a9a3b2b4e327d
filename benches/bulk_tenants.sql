-- Bulk load of tenants :prefix:from .. :prefix:to, plan :plan_expr (an SQL
-- expression of i), status active, in one transaction.
--   psql -v prefix=c -v from=1 -v to=100000 -v plan_expr="'p' || (i % 10 + 1)" -f benches/bulk_tenants.sql
-- The user triggers of flux.tenants (validation, the audit log and its NOTIFY
-- per row, cache invalidation) are off for the load and then put back exactly
-- as they were, trigger by trigger: ENABLE TRIGGER USER would turn an ENABLE
-- ALWAYS trigger (one that fires on a logical subscriber too) into a plain
-- one. A failure rolls the whole load back, trigger states included. No
-- session is warm during the set-up; the benches connect afterwards.
BEGIN;
CREATE TEMP TABLE bench_saved_triggers ON COMMIT DROP AS
    SELECT tgname::text AS name, tgenabled AS state
      FROM pg_trigger WHERE tgrelid = 'flux.tenants'::regclass AND NOT tgisinternal;
SELECT format('ALTER TABLE flux.tenants DISABLE TRIGGER %I', name) FROM bench_saved_triggers WHERE state <> 'D' \gexec
INSERT INTO flux.tenants (id, plan)
    SELECT :'prefix' || i, :plan_expr FROM generate_series(:from::int, :to::int) i;
SELECT format('ALTER TABLE flux.tenants %s TRIGGER %I',
              CASE state WHEN 'A' THEN 'ENABLE ALWAYS' WHEN 'R' THEN 'ENABLE REPLICA' ELSE 'ENABLE' END, name)
  FROM bench_saved_triggers WHERE state <> 'D' \gexec
DO $$
DECLARE wrong text;
BEGIN
    SELECT string_agg(format('%s: %s, was %s', s.name, t.tgenabled, s.state), '; ') INTO wrong
      FROM bench_saved_triggers s
      LEFT JOIN pg_trigger t ON t.tgrelid = 'flux.tenants'::regclass AND t.tgname = s.name
     WHERE t.tgenabled IS DISTINCT FROM s.state;
    IF wrong IS NOT NULL THEN
        RAISE EXCEPTION 'bulk_tenants.sql: trigger states of flux.tenants not restored (%)', wrong;
    END IF;
END $$;
COMMIT;
VACUUM ANALYZE flux.tenants;
