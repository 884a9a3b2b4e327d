\set t random(1, 1000)
BEGIN;
SELECT secret FROM bench_keys WHERE t = :t;
UPDATE bench_counters SET n = n + 1 WHERE id = :t;
COMMIT;
