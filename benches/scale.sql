-- Warm check latency: the same backend checks every tenant twice; the second
-- pass is timed (every tenant cached). Prints microseconds per check.
\set QUIET on
SET flux.cache_tenants = 2000000;
SELECT count(*) FILTER (WHERE flux_check('s' || i, 'export')) FROM generate_series(1, :n) i \g /dev/null
SELECT clock_timestamp() AS t0 \gset
SELECT count(*) FILTER (WHERE flux_check('s' || i, 'export')) FROM generate_series(1, :n) i \g /dev/null
SELECT round(extract(epoch FROM clock_timestamp() - :'t0') * 1e6 / :n, 3) AS us_per_check;
