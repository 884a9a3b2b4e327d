\set t random(1, 1000)
BEGIN;
UPDATE bench_counters SET n = n + 1 WHERE id = :t;
INSERT INTO bench_ledger (t, amount) VALUES (:t, -1);
COMMIT;
