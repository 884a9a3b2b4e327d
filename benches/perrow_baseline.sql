SELECT count(*) FROM bench_rows WHERE tenant_id IS NOT NULL;
