SELECT count(*) FROM bench_rows WHERE flux_check(tenant_id, 'export');
