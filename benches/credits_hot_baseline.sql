BEGIN;
UPDATE bench_counters SET n = n + 1 WHERE id = 1;
INSERT INTO bench_ledger (t, amount) VALUES (1, -1);
COMMIT;
