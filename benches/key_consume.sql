\set t random(1, 1000)
BEGIN;
SELECT flux_authenticate(secret) FROM bench_keys WHERE t = :t;
SELECT allowed FROM flux_consume('t' || :t, 'api_calls');
COMMIT;
