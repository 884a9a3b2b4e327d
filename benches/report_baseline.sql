-- The same numbers by hand, for plan grants only (no addons, overrides,
-- lifecycle or default plan): what flux_limit_report is measured against.
SELECT count(*) FROM flux.usage u
  JOIN flux.tenants t ON t.id = u.tenant
  JOIN flux.grants g ON g.plan = t.plan AND g.feature = u.feature
 WHERE g."limit" > 0 AND u.used >= 0.8 * g."limit"
   AND (u.period_start = '-infinity'
        OR u.period_start = date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC');
