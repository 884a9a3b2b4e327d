\set t random(1, 1000)
UPDATE bench_counters SET n = n + 1 WHERE id = :t;
