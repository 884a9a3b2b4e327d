SELECT count(*) FROM bench_rls;
