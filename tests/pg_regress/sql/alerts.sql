-- Usage alerts and billable usage (0.2). flux_alert sets thresholds as
-- fractions of a limit; the first consume in a period that takes a tenant
-- to or past one writes one flux.usage_alerts row and NOTIFY flux_usage,
-- in its own transaction. flux.billable_usage is what an invoice needs.
SET client_min_messages = warning;
DROP ROLE IF EXISTS alerts_app;
RESET client_min_messages;
\i tests/pg_regress/common/setup.sql
CREATE ROLE alerts_app LOGIN;

SELECT flux_define_feature('api_calls', 'metered');
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_feature('builds', 'metered');
SELECT flux_define_feature('export');
SELECT flux_define_feature('calls', 'rate');
SELECT flux_define_feature('credits', 'credits');
SELECT flux_define_plan('pro', rank => 1);
SELECT flux_define_plan('enterprise', rank => 2);
SELECT flux_grant('pro', 'api_calls', 1000, 'month');
SELECT flux_grant('pro', 'seats', 10);
SELECT flux_grant('pro', 'builds', 100, 'billing_period');
SELECT flux_grant('enterprise', 'api_calls', 5000, 'month');
SELECT flux_grant('enterprise', 'seats');
SELECT flux_set_overage('pro', 'api_calls', cap => 500);
SET flux.now = '2026-11-20 12:00+00';
SELECT flux_subscribe('acme', 'pro');
SELECT flux_subscribe('globex', 'pro');
SELECT flux_subscribe('initech', 'enterprise');

-- 1. Thresholds: 80%, the limit, and 150% (past it, under the soft limit).
-- 0.80 and 0.8 are one threshold.
SELECT flux_alert('api_calls', 0.80);
SELECT flux_alert('api_calls', 0.8);
SELECT flux_alert('api_calls', 1);
SELECT flux_alert('api_calls', 1.5);
SELECT flux_alert('seats', 0.8);
SELECT feature, threshold FROM flux.alerts ORDER BY feature, threshold;

-- 2. Under 80%: nothing. The consume that reaches it writes one row.
SELECT used FROM flux_consume('acme', 'api_calls', 700);
SELECT used FROM flux_consume('acme', 'api_calls', 150);
SELECT tenant, feature, period_start, threshold, used, "limit", at, processed_at FROM flux.usage_alerts;
-- Further consumes past it write nothing more.
SELECT used FROM flux_consume('acme', 'api_calls', 100);
SELECT count(*) FROM flux.usage_alerts;

-- 3. A rolled-back consume that crosses the limit leaves no row (and no
-- notification); the committed one after it writes it.
BEGIN;
SELECT used FROM flux_consume('acme', 'api_calls', 300);
SELECT threshold, used FROM flux.usage_alerts WHERE tenant = 'acme' ORDER BY threshold;
ROLLBACK;
SELECT threshold, used FROM flux.usage_alerts WHERE tenant = 'acme' ORDER BY threshold;
SELECT used, overage, message FROM flux_consume('acme', 'api_calls', 200);
SELECT threshold, used, "limit" FROM flux.usage_alerts WHERE tenant = 'acme' ORDER BY threshold;

-- 4. One consume past two thresholds writes both.
SELECT used, overage FROM flux_consume('globex', 'api_calls', 1100);
SELECT threshold, used FROM flux.usage_alerts WHERE tenant = 'globex' ORDER BY threshold;
-- ... and the third, past the limit, up to the cap.
SELECT used, overage FROM flux_consume('globex', 'api_calls', 400);
SELECT threshold, used FROM flux.usage_alerts WHERE tenant = 'globex' ORDER BY threshold;

-- 5. Once per period: a limit feature's count never resets, so a seat
-- freed and taken again does not alert twice.
SELECT used FROM flux_consume('acme', 'seats', 8);
SELECT flux_release('acme', 'seats', 3);
SELECT used FROM flux_consume('acme', 'seats', 3);
SELECT tenant, feature, period_start, threshold, used FROM flux.usage_alerts WHERE feature = 'seats';
-- An idempotent replay is not a new consume.
SELECT used FROM flux_consume('initech', 'api_calls', 3999, 'req-1');
SELECT used FROM flux_consume('initech', 'api_calls', 1, 'req-2');
SELECT used FROM flux_consume('initech', 'api_calls', 1, 'req-2');
SELECT threshold, used, "limit" FROM flux.usage_alerts WHERE tenant = 'initech';
-- Unlimited (enterprise seats): no alert.
SELECT used FROM flux_consume('initech', 'seats', 1000);
SELECT count(*) FROM flux.usage_alerts WHERE tenant = 'initech' AND feature = 'seats';
-- A hold counts as use.
SELECT flux_subscribe('hooli', 'pro');
SELECT allowed, used FROM flux_hold('hooli', 'api_calls', 900);
SELECT threshold, used FROM flux.usage_alerts WHERE tenant = 'hooli';

-- 6. A new month is a new period: the thresholds alert again.
SET flux.now = '2026-12-02 09:00+00';
SELECT used FROM flux_consume('acme', 'api_calls', 900);
SELECT period_start, threshold, used FROM flux.usage_alerts WHERE tenant = 'acme' AND feature = 'api_calls'
 ORDER BY period_start, threshold;

-- 7. Reading alerts exactly once: a worker claims unprocessed rows with
-- SKIP LOCKED (concurrent workers take different rows) and marks them in
-- the same statement; handled rows are not returned again.
WITH next AS (
    SELECT tenant, feature, period_start, threshold FROM flux.usage_alerts
     WHERE processed_at IS NULL ORDER BY at, tenant, feature, threshold LIMIT 4
       FOR UPDATE SKIP LOCKED)
UPDATE flux.usage_alerts a SET processed_at = '2026-12-02 09:05+00'
  FROM next
 WHERE (a.tenant, a.feature, a.period_start, a.threshold) = (next.tenant, next.feature, next.period_start, next.threshold)
RETURNING a.tenant, a.feature, a.threshold, a.used;
SELECT count(*) FILTER (WHERE processed_at IS NULL) AS waiting, count(*) AS total FROM flux.usage_alerts;

-- 8. flux_alert_clear: no more alerts at that threshold; written ones stay.
SELECT flux_alert_clear('api_calls', 1.50);
SELECT flux_alert_clear('api_calls', 1.5);
SELECT used FROM flux_consume('acme', 'api_calls', 200);
SELECT used FROM flux_consume('acme', 'api_calls', 300);
SELECT threshold, used FROM flux.usage_alerts WHERE tenant = 'acme' AND period_start = '2026-12-01' ORDER BY threshold;
SELECT count(*) FROM flux.usage_alerts WHERE threshold = 1.5;

-- 9. The billable view at the start of December: November is closed
-- (acme: 1,150 of 1,000 included, 150 over), December is current. A
-- hold past its ttl is not counted (hooli).
SELECT tenant, feature, period_start, period_end, included, used, overage, plan
  FROM flux.billable_usage WHERE feature = 'api_calls' ORDER BY tenant, period_start;
-- A limit feature's count is standing: its row is the count now.
SELECT tenant, feature, period_start, period_end, included, used, overage
  FROM flux.billable_usage WHERE feature = 'seats' ORDER BY tenant;
-- A plan change mid-period: the current period is billed on the plan the
-- tenant has (globex upgrades: 5,000 included, nothing over).
SELECT used FROM flux_consume('globex', 'api_calls', 1200);
SELECT included, used, overage FROM flux.billable_usage
 WHERE tenant = 'globex' AND period_start = '2026-12-01';
SELECT flux_subscribe('globex', 'enterprise');
SELECT included, used, overage, plan FROM flux.billable_usage
 WHERE tenant = 'globex' AND period_start = '2026-12-01';
-- A billing-period quota follows the subscription's dates.
SELECT flux_subscribe('umbrella', 'pro', current_period_start => '2026-11-15', current_period_end => '2026-12-15');
SELECT used FROM flux_consume('umbrella', 'builds', 90);
SELECT allowed, reason FROM flux_consume('umbrella', 'builds', 20);
SELECT period_start, period_end, included, used, overage FROM flux.billable_usage WHERE tenant = 'umbrella';

-- 10. Audited: who set and cleared which threshold.
SELECT action, key, new ->> 'threshold' AS threshold FROM flux.audit_log WHERE entity = 'alerts' ORDER BY id;

-- 11. Bad input: nothing written.
SELECT try($$SELECT flux_alert('api_calls', 0)$$);
SELECT try($$SELECT flux_alert('api_calls', -0.5)$$);
SELECT try($$SELECT flux_alert('api_calls', 10.0001)$$);
SELECT try($$SELECT flux_alert('api_calls', 'NaN')$$);
SELECT try($$SELECT flux_alert('api_calls', 'Infinity')$$);
SELECT try($$SELECT flux_alert('api_calls', 0.33333)$$);
SELECT try($$SELECT flux_alert('api_calls', NULL)$$);
SELECT try($$SELECT flux_alert(NULL, 0.5)$$);
SELECT try($$SELECT flux_alert('export', 0.5)$$);
SELECT try($$SELECT flux_alert('calls', 0.5)$$);
SELECT try($$SELECT flux_alert('credits', 0.5)$$);
SELECT try($$SELECT flux_alert('nothing', 0.5)$$);
SELECT try($$INSERT INTO flux.alerts (feature, threshold) VALUES ('api_calls', 12)$$);
SELECT try($$INSERT INTO flux.alerts (feature, threshold) VALUES ('export', 0.5)$$);
SELECT try($$INSERT INTO flux.alerts (feature, threshold) VALUES ('api_calls', 0.80)$$);
SELECT feature, threshold FROM flux.alerts ORDER BY feature, threshold;
-- A feature with thresholds keeps a kind that has a limit.
SELECT flux_define_feature('exports', 'metered');
SELECT flux_alert('exports', 0.5);
SELECT try($$SELECT flux_define_feature('exports', 'rate')$$);
SELECT try($$UPDATE flux.features SET kind = 'boolean' WHERE key = 'exports'$$);
SELECT flux_define_feature('exports', 'limit');
SELECT flux_alert_clear('exports', 0.5);
SELECT flux_define_feature('exports', 'boolean');
-- 10 (ten times the limit) is the largest threshold.
SELECT flux_alert('builds', 10);
SELECT flux_alert_clear('builds', 10);

-- 12. An application role: its consumes alert, but it can neither set
-- thresholds nor read or mark anyone's alerts.
SET ROLE alerts_app;
SET flux.tenant = 'hooli';
SELECT used FROM flux_consume('hooli', 'api_calls', 200);
SELECT try($$SELECT flux_alert('api_calls', 0.1)$$);
SELECT try($$SELECT count(*) FROM flux.usage_alerts$$);
SELECT try($$UPDATE flux.usage_alerts SET processed_at = now()$$);
SELECT try($$SELECT count(*) FROM flux.billable_usage$$);
SELECT try($$SELECT count(*) FROM flux._billable_usage()$$);
SELECT try($$INSERT INTO flux.alerts VALUES ('api_calls', 0.1)$$);
-- Nor silence its own notifications.
SELECT try($$SET flux.alert_notify = off$$);
RESET flux.tenant;
RESET ROLE;
SELECT threshold, used FROM flux.usage_alerts WHERE tenant = 'hooli' ORDER BY threshold;

RESET flux.now;
DROP EXTENSION flux_entitlements CASCADE;
DROP ROLE alerts_app;
