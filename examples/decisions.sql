-- Real decisions from the example catalogue.
\pset footer off
\echo
\echo '== Who may export? (export: Pro 50/day, Enterprise unlimited)'
SELECT t.id AS tenant, t.plan, t.status, d.allowed, d.reason, d.message
  FROM flux.tenants t, flux_decide(t.id, 'export') d
 ORDER BY t.id;

\echo '== Seats, with addons and the free fallback'
SELECT t.id AS tenant, d.plan AS applied_plan, d."limit" AS seats, d.message
  FROM flux.tenants t, flux_decide(t.id, 'seats') d
 ORDER BY t.id;

\echo '== The analytics dashboard: Pro and Enterprise only, rolled out to 20%, acme allow-listed'
SELECT t.id AS tenant, t.plan, d.allowed, d.reason, d.message
  FROM flux.tenants t, flux_decide(t.id, 'analytics') d
 WHERE t.plan IN ('pro', 'enterprise') ORDER BY t.id;

\echo '== Everything initech has (starter + an SSO promotion)'
SELECT feature, allowed, reason, "limit", message FROM flux_entitlements('initech');

\echo '== Metering: consume checks and records in one step'
SELECT tenant, feature, allowed, reason, used, remaining, resets_at, message
  FROM (VALUES ('globex', 'export', 1), ('soylent', 'export', 1), ('oscorp', 'seats', 1),
               ('initech', 'api_calls', 5), ('initech', 'api_calls', 10)) AS r(t, f, n),
       LATERAL flux_consume(t, f, n);

\echo '== Configuration values and unknown keys'
SELECT flux_value('acme', 'reports') AS acme_report_formats,
       flux_check('acme', 'sso') AS acme_sso,
       flux_check('nobody', 'export') AS unknown_tenant,
       (flux_decide('acme', 'exprot')).message AS typo;

\echo '== Callers: a CI key for globex that may only export, twice a day (flux_authenticate in the transaction)'
SELECT flux_create_api_key('globex', 'ci pipeline', scopes => ARRAY['export']) AS ci_key \gset
SELECT flux_key_limit(id, 'export', 2, 'day') FROM flux.api_keys WHERE tenant = 'globex' AND name = 'ci pipeline' \g /dev/null
BEGIN;
SELECT flux_authenticate(:'ci_key') AS authenticated_tenant;
SELECT n AS call, d.allowed, d.reason, d.used, d."limit", d.message
  FROM generate_series(1, 3) n, LATERAL flux_consume('globex', 'export', 1, 'build-' || n) d;
SELECT reason, message FROM flux_decide('globex', 'sso');
COMMIT;

\echo '== Insights: what this demo decided, counted in shared memory (the demo server preloads the library)'
SELECT feature, plan, reason, decisions FROM flux_decision_stats() ORDER BY decisions DESC, feature, plan LIMIT 8;
SELECT tenant, feature, reason, denials FROM flux_denials() ORDER BY denials DESC, tenant, feature LIMIT 5;
