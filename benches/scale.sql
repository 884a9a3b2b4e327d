-- Warm check latency: one backend makes :checks checks over the first
-- min(:n, :checks) tenants twice; the second pass is timed (all cached).
-- Prints microseconds per check.
\set QUIET on
SET flux.cache_tenants = 2000000;
SELECT count(*) FILTER (WHERE flux_check('s' || (i % :n + 1), 'export')) FROM generate_series(1, :checks) i \g /dev/null
SELECT clock_timestamp() AS t0 \gset
SELECT count(*) FILTER (WHERE flux_check('s' || (i % :n + 1), 'export')) FROM generate_series(1, :checks) i \g /dev/null
SELECT round(extract(epoch FROM clock_timestamp() - :'t0') * 1e6 / :checks, 3) AS us_per_check;
