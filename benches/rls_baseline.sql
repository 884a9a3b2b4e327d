SELECT count(*) FROM bench_plain WHERE tenant_id = 't1';
