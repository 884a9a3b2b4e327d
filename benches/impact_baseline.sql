-- The same tenants by hand, for plan grants only (no addons, overrides,
-- lifecycle or scheduled changes): what flux_plan_impact is measured against.
SELECT count(*) FROM flux.usage u
  JOIN flux.tenants t ON t.id = u.tenant
 WHERE t.plan = 'p2' AND u.feature = 'calls' AND u.used > 500
   AND u.period_start = date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
