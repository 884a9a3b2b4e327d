-- Traffic benches (issue 16), database flux_traffic: 200 boolean features
-- f1..f200, 10 plans p1..p10 (p1 the default) and every plan x feature
-- granted (2,000 grants; plan pN enables f1..f(20 N), so p10 has all 200),
-- and :tenants tenants c1..cN, active, on plan p(i mod 10 + 1).
-- psql -v tenants=100000 -f benches/traffic_setup.sql
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS flux_entitlements CASCADE;
CREATE EXTENSION flux_entitlements;
SELECT count(flux_define_feature('f' || f)) FROM generate_series(1, 200) f;
SELECT count(flux_define_plan('p' || p, rank => p, is_default => p = 1)) FROM generate_series(1, 10) p;
SELECT count(flux_grant('p' || p, 'f' || f)) FROM generate_series(1, 10) p, generate_series(1, 200) f;
UPDATE flux.grants SET enabled = false WHERE substr(feature, 2)::int > 20 * substr(plan, 2)::int;
\set prefix c
\set from 1
\set to :tenants
\set plan_expr '''p'' || (i % 10 + 1)'
\ir bulk_tenants.sql
VACUUM ANALYZE flux.grants;

-- The webhook traffic of the churn rows: from one session, `rate` changes a
-- second to random tenants c:lo..c:hi on a fixed schedule (one transaction
-- each, committed at once) for `secs` seconds, alternating a plain UPDATE of
-- the period end (as a billing sync writes it) and flux_subscribe on the
-- tenant's own plan. A change that falls behind the schedule runs at once,
-- so a slow machine shows as an achieved rate below `rate`
-- (updates / elapsed) and as a lag. Returns the number of changes, the
-- seconds taken and the most any change started behind its schedule.
DROP PROCEDURE IF EXISTS bench_webhooks;
CREATE PROCEDURE bench_webhooks(rate int, secs float8, lo int, hi int, INOUT updates int DEFAULT 0,
                                INOUT elapsed float8 DEFAULT 0, INOUT max_lag float8 DEFAULT 0)
LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz := clock_timestamp();
    i int;
    ahead float8;
BEGIN
    updates := 0;
    max_lag := 0;
    WHILE updates < round(rate * secs) LOOP
        ahead := updates::float8 / rate - extract(epoch FROM clock_timestamp() - t0);
        IF ahead > 0 THEN PERFORM pg_sleep(ahead); ELSE max_lag := greatest(max_lag, -ahead); END IF;
        i := lo + floor(random() * (hi - lo + 1))::int;
        IF updates % 2 = 0 THEN
            UPDATE flux.tenants SET current_period_end = now() + interval '30 days' WHERE id = 'c' || i;
        ELSE
            PERFORM flux_subscribe('c' || i, 'p' || (i % 10 + 1), 'active', now() + interval '30 days');
        END IF;
        COMMIT;
        updates := updates + 1;
    END LOOP;
    ahead := secs - extract(epoch FROM clock_timestamp() - t0);
    IF ahead > 0 THEN PERFORM pg_sleep(ahead); END IF;
    elapsed := round(extract(epoch FROM clock_timestamp() - t0), 6);
    max_lag := round(max_lag::numeric, 3); -- plain decimals for bc (no 1e-05)
END $$;
