UPDATE bench_counters SET n = n + 1 WHERE id = 1;
