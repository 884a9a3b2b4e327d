-- Callers (0.2): a decision charged to the tenant, to the API key that
-- called and to the user (subject) inside the tenant, in one step. Keys get
-- scopes (not_permitted) and allowances of their own (flux_key_limit);
-- subjects get theirs from the grant (subject_limit).
-- Roles are cluster-wide: all are named callers_* and dropped at the end
-- (and first, should an earlier run have died half-way). API key secrets are
-- random: they are kept in psql variables (\gset) and never printed, and
-- key ids are shown as the key's name.
SET client_min_messages = warning;
DROP ROLE IF EXISTS callers_app;
DROP ROLE IF EXISTS callers_svc;
RESET client_min_messages;
\i tests/pg_regress/common/setup.sql
CREATE ROLE callers_app LOGIN;
CREATE ROLE callers_svc;
GRANT flux_service TO callers_svc;

SELECT flux_define_feature('export', 'metered');
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_feature('api', 'rate');
SELECT flux_define_feature('uploads', 'metered');
SELECT flux_define_feature('sso');
SELECT flux_define_feature('beta');
SELECT flux_define_feature('reports');
SELECT flux_define_plan('pro', rank => 1);
SELECT flux_define_plan('enterprise', rank => 2);
SELECT flux_grant('pro', 'export', 10, 'day');
SELECT flux_grant('pro', 'seats', 5);
SELECT flux_grant('pro', 'api', 100, '1 minute');
SELECT flux_grant('pro', 'uploads', 10, 'day', subject_limit => 3);
SELECT flux_grant('pro', 'sso');
SELECT flux_grant('pro', 'beta');
SELECT flux_grant('enterprise', 'reports');
-- The kill switch of beta is off: feature_disabled for everyone.
SELECT flux_set_flag('beta', false);
SET flux.now = '2026-11-20 12:00+00';
SELECT flux_subscribe('acme', 'pro');
SELECT flux_subscribe('globex', 'pro');

-- 1. Scopes. "ci pipeline" may use export, api, seats and beta only; "app"
-- (no scopes) every feature. An unknown feature in scopes is refused
-- (23503) and no key is created.
SELECT flux_create_api_key('acme', 'ci pipeline', scopes => ARRAY['export', 'api', 'seats', 'beta']) AS ci \gset
SELECT flux_create_api_key('acme', 'app') AS app \gset
SELECT flux_create_api_key('globex', 'billing') AS billing \gset
SELECT id AS ci_id FROM flux.api_keys WHERE name = 'ci pipeline' \gset
SELECT id AS app_id FROM flux.api_keys WHERE name = 'app' \gset
SELECT id AS billing_id FROM flux.api_keys WHERE name = 'billing' \gset
SELECT try($$SELECT flux_create_api_key('acme', 'typo', scopes => ARRAY['export', 'exprot'])$$);
SELECT tenant, name, scopes FROM flux.api_keys ORDER BY tenant, name;
-- Scopes are validated on UPDATE too.
SELECT try(format('UPDATE flux.api_keys SET scopes = ARRAY[%L] WHERE id = %L', 'nope', :'ci_id'));

-- 2. With no key current, nothing changes: api_key stays NULL.
SELECT flux_current_api_key() IS NULL AS no_key;
SELECT reason, api_key, overage, balance, hold_id FROM flux_decide('acme', 'sso');

-- 3. flux_authenticate makes the key current for the transaction: its
-- tenant in flux.tenant, its id in flux.api_key and flux_current_api_key().
BEGIN;
SELECT flux_authenticate(:'ci') AS tenant;
SELECT flux_current_api_key() = :'ci_id' AS ci_current,
       current_setting('flux.api_key') = :'ci_id' AS setting,
       flux_current_tenant();
-- A feature outside the scopes is not_permitted, and the decision names the key.
SELECT allowed, reason, message, api_key = :'ci_id' AS ci_key, overage, balance, hold_id
  FROM flux_decide('acme', 'sso');
-- The order of reasons: unknown_feature and unknown_tenant come first ...
SELECT reason, message FROM flux_decide('acme', 'nope');
SELECT reason, message FROM flux_decide('nobody', 'sso');
-- ... not_permitted before feature_disabled and not_in_plan ...
SELECT reason, message FROM flux_decide('acme', 'reports');
-- ... and a feature in scope goes on to the other reasons.
SELECT reason, message FROM flux_decide('acme', 'beta');
SELECT allowed, reason, api_key = :'ci_id' AS ci_key FROM flux_decide('acme', 'export');
-- flux_check (both forms), flux_entitlements and flux_consume apply it too.
SELECT flux_check('acme', 'sso') AS tenant_sso, flux_check('sso') AS sso,
       flux_check('acme', 'export') AS tenant_export, flux_check('export') AS export;
SELECT feature, allowed, reason, api_key = :'ci_id' AS ci_key FROM flux_entitlements('acme') ORDER BY feature;
SELECT allowed, reason, message FROM flux_consume('acme', 'uploads');
SELECT count(*) AS uploads_recorded FROM flux.usage WHERE feature = 'uploads';
COMMIT;
-- The key is current for the transaction only: gone after COMMIT ...
SELECT flux_current_api_key() IS NULL AS no_key, flux_current_tenant() IS NULL AS no_tenant,
       flux_check('acme', 'sso') AS sso;
-- ... and after ROLLBACK.
BEGIN;
SELECT flux_authenticate(:'ci') AS tenant;
SELECT flux_check('acme', 'sso') AS sso;
ROLLBACK;
SELECT flux_current_api_key() IS NULL AS no_key, flux_check('acme', 'sso') AS sso;
-- The key without scopes: every feature, the tenant's reasons.
BEGIN;
SELECT flux_authenticate(:'app') AS tenant;
SELECT feature, allowed, reason, api_key = :'app_id' AS app_key FROM flux_entitlements('acme') ORDER BY feature;
COMMIT;

-- 4. A metered allowance of the key: 2 exports a day, inside the tenant's 10.
SELECT flux_key_limit(:'ci_id', 'export', 2, 'day');
BEGIN;
SELECT flux_authenticate(:'ci') AS tenant;
SELECT allowed, reason, "limit", used, remaining, resets_at, message FROM flux_consume('acme', 'export');
SELECT allowed, reason, "limit", used, remaining, resets_at, message FROM flux_consume('acme', 'export');
-- The key is full while the tenant has room: refused, naming the key, and
-- neither counter moves.
SELECT allowed, reason, "limit", used, remaining, resets_at, message FROM flux_consume('acme', 'export');
SELECT allowed, reason, "limit", used, remaining, message FROM flux_decide('acme', 'export');
SELECT flux_check('export') AS export;
SELECT flux_usage('acme', 'export') AS tenant_used, flux_key_usage(:'ci_id', 'export') AS key_used;
COMMIT;
-- Without the key, the tenant still has 8 left.
SELECT allowed, "limit", used, remaining FROM flux_decide('acme', 'export');
-- The next day (UTC) the key's allowance resets with the tenant's.
SET flux.now = '2026-11-21 09:00+00';
BEGIN;
SELECT flux_authenticate(:'ci') AS tenant;
SELECT flux_key_usage(:'ci_id', 'export') AS key_used;
SELECT allowed, reason, "limit", used, remaining, resets_at, message FROM flux_consume('acme', 'export');
COMMIT;
SELECT feature, period_start, used FROM flux.usage WHERE feature = 'export' ORDER BY period_start;
SELECT caller = 'key:' || :'ci_id' AS ci_key, feature, period_start, used
  FROM flux.caller_usage WHERE feature = 'export' ORDER BY caller, period_start;
-- An idempotency key under the key: the repeat records nothing more on
-- either counter.
BEGIN;
SELECT flux_authenticate(:'ci') AS tenant;
SELECT allowed, used FROM flux_consume('acme', 'export', 1, 'req-1');
SELECT allowed, used FROM flux_consume('acme', 'export', 1, 'req-1');
SELECT flux_usage('acme', 'export') AS tenant_used, flux_key_usage(:'ci_id', 'export') AS key_used;
ROLLBACK;

-- 5. A limit allowance: the key may hold 4 seats, the tenant 5. The tenant
-- already holds 3 (no key): the decision reports the tighter allowance,
-- the tenant's (2 left) rather than the key's (4 left).
SELECT flux_key_limit(:'ci_id', 'seats', 4);
SELECT allowed, used FROM flux_consume('acme', 'seats', 3);
BEGIN;
SELECT flux_authenticate(:'ci') AS tenant;
SELECT allowed, reason, "limit", used, remaining, message FROM flux_decide('acme', 'seats');
SELECT allowed, reason, "limit", used, remaining, message FROM flux_consume('acme', 'seats', 2);
-- Both or neither: the tenant is full while the key has room (2 of 4):
-- refused, and the key's counter is not charged.
SELECT allowed, reason, "limit", used, remaining, message FROM flux_consume('acme', 'seats');
SELECT caller = 'key:' || :'ci_id' AS ci_key, feature, used FROM flux.caller_usage WHERE feature = 'seats';
SELECT flux_usage('acme', 'seats') AS tenant_used, flux_key_usage(:'ci_id', 'seats') AS key_used;
COMMIT;
-- An allowance below what the key holds: the key's own view is the tighter.
SELECT flux_key_limit(:'ci_id', 'seats', 1);
BEGIN;
SELECT flux_authenticate(:'ci') AS tenant;
SELECT allowed, reason, "limit", used, remaining, message FROM flux_decide('acme', 'seats');
ROLLBACK;

-- 6. A rate allowance: 2 calls per minute for the key, 100 for the tenant.
SELECT flux_key_limit(:'ci_id', 'api', 2, '1 minute');
SET flux.now = '2026-11-21 10:00+00';
BEGIN;
SELECT flux_authenticate(:'ci') AS tenant;
SELECT allowed, reason, "limit", used, remaining, message FROM flux_consume('acme', 'api');
SELECT allowed, reason, "limit", used, remaining, message FROM flux_consume('acme', 'api');
SELECT allowed, reason, "limit", used, remaining, retry_after, message FROM flux_consume('acme', 'api');
SELECT flux_key_usage(:'ci_id', 'api') AS key_calls, flux_usage('acme', 'api') AS tenant_calls;
COMMIT;
-- 30 s later one more call fits.
SET flux.now = '2026-11-21 10:00:30+00';
BEGIN;
SELECT flux_authenticate(:'ci') AS tenant;
SELECT allowed, reason, used, remaining FROM flux_consume('acme', 'api');
SELECT allowed, reason, retry_after FROM flux_consume('acme', 'api');
COMMIT;
SELECT flux_usage('acme', 'api') AS tenant_calls;

-- 7. Without an allowance the key's usage is still counted (usage tracking).
BEGIN;
SELECT flux_authenticate(:'app') AS tenant;
SELECT allowed, reason, "limit", used, remaining, message FROM flux_consume('acme', 'export', 2);
COMMIT;
SELECT flux_key_usage(:'app_id', 'export') AS app_export, flux_key_usage(:'app_id', 'seats') AS app_seats,
       flux_key_usage(:'app_id', 'sso') IS NULL AS boolean_is_null,
       flux_key_usage(:'ci_id', 'export') AS ci_export;

-- 8. Removing an allowance (limit NULL): the key goes back to the tenant's.
SELECT flux_key_limit(:'ci_id', 'seats', NULL);
SELECT flux_key_limit(:'ci_id', 'seats', NULL);
SELECT feature, "limit", period FROM flux.key_limits ORDER BY feature;
BEGIN;
SELECT flux_authenticate(:'ci') AS tenant;
SELECT allowed, reason, "limit", used, remaining, message FROM flux_decide('acme', 'seats');
COMMIT;

-- 9. A key applies to its own tenant only. With ci (acme's) current, a
-- superuser or a flux_service member deciding for globex gets globex's
-- decision: no scope, no key allowance, no api_key, no key counter.
BEGIN;
SELECT flux_authenticate(:'ci') AS tenant;
SELECT allowed, reason, api_key FROM flux_decide('globex', 'sso');
SELECT flux_check('globex', 'sso') AS globex_sso;
SELECT allowed, reason, used, api_key FROM flux_consume('globex', 'export');
ROLLBACK;
SET ROLE callers_svc;
BEGIN;
SELECT flux_authenticate(:'ci') AS tenant;
SELECT allowed, reason, api_key FROM flux_decide('globex', 'sso');
SELECT allowed, reason, api_key = :'ci_id' AS ci_key FROM flux_decide('acme', 'sso');
SELECT allowed, reason, used, api_key FROM flux_consume('globex', 'export');
COMMIT;
RESET ROLE;
SELECT count(*) AS globex_key_rows FROM flux.caller_usage WHERE tenant = 'globex';
SELECT flux_usage('globex', 'export') AS globex_export;

-- 10. Subjects: each user of acme may upload 3 a day (subject_limit),
-- inside acme's 10.
SET flux.now = '2026-11-21 12:00+00';
SELECT allowed, reason, "limit", used, remaining, subject, message
  FROM flux_consume('acme', 'uploads', 1, NULL, 'alice');
SELECT allowed, reason, "limit", used, remaining, subject, message
  FROM flux_consume('acme', 'uploads', 2, NULL, 'alice');
SELECT allowed, reason, "limit", used, remaining, subject, message
  FROM flux_consume('acme', 'uploads', 1, NULL, 'alice');
SELECT allowed, reason, "limit", used, remaining, subject FROM flux_consume('acme', 'uploads', 1, NULL, 'bob');
-- The subject's view and the tenant's.
SELECT flux_usage('acme', 'uploads') AS tenant_used, flux_usage('acme', 'uploads', 'alice') AS alice,
       flux_usage('acme', 'uploads', 'bob') AS bob, flux_usage('acme', 'uploads', 'carol') AS carol;
SELECT allowed, reason, "limit", used, remaining, subject, message FROM flux_decide('acme', 'uploads', 'alice');
SELECT allowed, reason, "limit", used, remaining, subject FROM flux_decide('acme', 'uploads', 'bob');
SELECT allowed, reason, "limit", used, remaining, subject FROM flux_decide('acme', 'uploads');
SELECT caller, used FROM flux.caller_usage WHERE feature = 'uploads' ORDER BY caller;
-- Both or neither: the tenant fills up (6 more without a subject); bob has
-- room (1 of 3) but is refused, and his counter stays at 1.
SELECT allowed, used FROM flux_consume('acme', 'uploads', 6);
SELECT allowed, reason, "limit", used, remaining, subject, message
  FROM flux_consume('acme', 'uploads', 1, NULL, 'bob');
SELECT caller, used FROM flux.caller_usage WHERE feature = 'uploads' ORDER BY caller;
-- The next day both reset.
SET flux.now = '2026-11-22 00:00+00';
SELECT allowed, reason, used, remaining, subject FROM flux_consume('acme', 'uploads', 1, NULL, 'alice');
-- The current subject: flux.subject, for flux_check(feature) with the
-- current tenant.
SELECT allowed, used FROM flux_consume('acme', 'uploads', 2, NULL, 'alice');
SET flux.tenant = 'acme';
SET flux.subject = 'alice';
SELECT flux_current_subject(), flux_check('uploads') AS alice_uploads;
SET flux.subject = 'carol';
SELECT flux_current_subject(), flux_check('uploads') AS carol_uploads;
RESET flux.subject;
-- ... else the sub claim of request.jwt.claims (as PostgREST sets it) ...
SET request.jwt.claims = '{"sub": "alice", "tenant_id": "acme"}';
SELECT flux_current_subject(), flux_check('uploads') AS alice_uploads;
-- ... or the claim flux.jwt_subject_claim names ...
SET flux.jwt_subject_claim = 'user_id';
SELECT flux_current_subject() IS NULL AS no_user_id;
SET request.jwt.claims = '{"sub": "alice", "user_id": "carol"}';
SELECT flux_current_subject(), flux_check('uploads') AS carol_uploads;
RESET flux.jwt_subject_claim;
-- ... and flux.subject wins over the claims.
SET flux.subject = 'bob';
SELECT flux_current_subject();
RESET flux.subject;
RESET request.jwt.claims;
RESET flux.tenant;
SELECT flux_current_subject() IS NULL AS no_subject;
-- Key and subject together: one consume charges the tenant, the key and the subject.
BEGIN;
SELECT flux_authenticate(:'app') AS tenant;
SELECT allowed, used, remaining, subject, api_key = :'app_id' AS app_key
  FROM flux_consume('acme', 'uploads', 1, NULL, 'bob');
SELECT flux_usage('acme', 'uploads') AS tenant_used, flux_usage('acme', 'uploads', 'bob') AS bob,
       flux_key_usage(:'app_id', 'uploads') AS app_key_used;
COMMIT;

-- 11. Validation: bad allowances are refused with a clear message.
SELECT try(format('SELECT flux_key_limit(%L, %L, 1)', :'ci_id', 'sso'));
SELECT try($$SELECT flux_key_limit('000000000000', 'export', 1, 'day')$$);
SELECT try(format('SELECT flux_key_limit(%L, %L, 1)', :'ci_id', 'nope'));
SELECT try(format('SELECT flux_key_limit(%L, %L, 1, %L)', :'ci_id', 'export', 'fortnight'));
SELECT try(format('SELECT flux_key_limit(%L, %L, 1, %L)', :'ci_id', 'seats', 'day'));
SELECT try(format('SELECT flux_key_limit(%L, %L, 1)', :'ci_id', 'api'));
SELECT try(format('SELECT flux_key_limit(%L, %L, -1)', :'ci_id', 'seats'));
SELECT try($$SELECT flux_grant('pro', 'sso', subject_limit => 1)$$);
-- A metered allowance without a period is monthly, as for flux_grant.
SELECT flux_key_limit(:'app_id', 'export', 100);
SELECT feature, "limit", period FROM flux.key_limits WHERE key_id = :'app_id';
SELECT flux_key_limit(:'app_id', 'export', NULL);

-- 12. The audit log: allowances (entity key_limits) and scope changes.
UPDATE flux.api_keys SET scopes = ARRAY['export', 'api'] WHERE id = :'ci_id';
UPDATE flux.api_keys SET scopes = ARRAY['sso'] WHERE id = :'app_id';
UPDATE flux.api_keys SET scopes = NULL WHERE id = :'app_id';
-- An UPDATE that changes nothing writes no entry.
UPDATE flux.api_keys SET scopes = NULL WHERE id = :'app_id';
SELECT action, entity, replace(replace(key, :'ci_id', 'ci'), :'app_id', 'app') AS key,
       old - 'key_id' AS old, new - 'key_id' AS new
  FROM flux.audit_log WHERE entity = 'key_limits' ORDER BY id;
SELECT action, (SELECT name FROM flux.api_keys k WHERE k.id = a.key) AS key_name,
       old -> 'scopes' AS old_scopes, new -> 'scopes' AS new_scopes
  FROM flux.audit_log a WHERE entity = 'api_keys' ORDER BY id;

-- 13. An application role with no grants on flux cannot forge, shed or
-- inspect a key. It reads two tables of its own that flux_protect guards
-- (docs by sso, files by uploads).
CREATE TABLE callers_docs (tenant_id text, body text);
CREATE TABLE callers_files (tenant_id text, body text);
INSERT INTO callers_docs VALUES ('acme', 'acme doc'), ('globex', 'globex doc');
INSERT INTO callers_files VALUES ('acme', 'acme file'), ('globex', 'globex file');
SELECT flux_protect('callers_docs', 'sso');
SELECT flux_protect('callers_files', 'uploads');
GRANT SELECT ON callers_docs, callers_files TO callers_app;
SET ROLE callers_app;
-- It may not make a key current by hand ...
SELECT try(format('SET flux.api_key = %L', :'ci_id'));
SELECT try(format('SELECT set_config(%L, %L, true)', 'flux.api_key', :'ci_id'));
SELECT flux_current_api_key() IS NULL AS no_key;
BEGIN;
SELECT flux_authenticate(:'ci') AS tenant;
-- ... nor shed the one it authenticated with.
SELECT try('RESET flux.api_key');
SELECT try($$SET LOCAL flux.api_key = ''$$);
SELECT try($$SELECT set_config('flux.api_key', '', true)$$);
SELECT flux_current_api_key() = :'ci_id' AS still_ci;
-- The scopes apply to flux_check(feature) for the tenant the key set.
SELECT flux_check('sso') AS sso, flux_check('export') AS export, flux_check('acme', 'sso') AS acme_sso;
SELECT allowed, reason, api_key = :'ci_id' AS ci_key FROM flux_consume('acme', 'export');
SELECT flux_key_usage(:'ci_id', 'export') AS own_key_used;
-- ... and to the policies of flux_protect: sso is outside ci's scopes.
SELECT count(*) AS docs_seen FROM callers_docs;
-- Admin and other tenants' keys stay out of reach.
SELECT try(format('SELECT flux_key_limit(%L, %L, 100, %L)', :'ci_id', 'export', 'day'));
-- Nor read every tenant's pressure on its limits (flux_limit_report is admin only).
SELECT try('SELECT count(*) FROM flux_limit_report()');
SELECT try('SELECT count(*) FROM flux.caller_usage');
SELECT try('SELECT count(*) FROM flux.key_limits');
SELECT try(format('SELECT flux_key_usage(%L, %L)', :'billing_id', 'export'));
SELECT try($$SELECT flux_usage('globex', 'uploads', 'alice')$$);
COMMIT;
SELECT flux_current_api_key() IS NULL AS no_key;
-- With the unscoped key, flux_check(feature) uses the current subject too:
-- alice has used her 3 uploads today, carol none.
BEGIN;
SELECT flux_authenticate(:'app') AS tenant;
SET LOCAL flux.subject = 'alice';
SELECT flux_current_subject(), flux_check('uploads') AS alice_uploads;
SELECT allowed, reason, subject, api_key = :'app_id' AS app_key FROM flux_consume('acme', 'uploads', 1, NULL, flux_current_subject());
-- The policies use the subject and the key too: app may read acme's docs,
-- and alice, out of uploads, not acme's files.
SELECT body FROM callers_docs;
SELECT body FROM callers_files;
SET LOCAL flux.subject = 'carol';
SELECT flux_current_subject(), flux_check('uploads') AS carol_uploads;
SELECT body FROM callers_files;
COMMIT;
RESET ROLE;

-- 15. Releasing a seat gives it back to every counter that took it: the
-- tenant's, the current key's and (given) the subject's. Desks: 5 for
-- acme, 2 per subject, 3 for the app key.
SELECT flux_define_feature('desks', 'limit');
SELECT flux_grant('pro', 'desks', 5, subject_limit => 2);
SELECT flux_key_limit(:'app_id', 'desks', 3);
BEGIN;
SELECT flux_authenticate(:'app') AS tenant;
SELECT allowed, used FROM flux_consume('acme', 'desks', 2, NULL, 'alice');
SELECT allowed, reason, message FROM flux_consume('acme', 'desks', 1, NULL, 'alice');
SELECT flux_release('acme', 'desks', 1, 'alice') AS tenant_holds;
SELECT flux_key_usage(:'app_id', 'desks') AS app_holds, flux_usage('acme', 'desks', 'alice') AS alice_holds;
-- The freed desk fits again, for alice and under the key.
SELECT allowed, used FROM flux_consume('acme', 'desks', 1, NULL, 'alice');
COMMIT;
-- A subject's rate: 2 pings a minute each, 100 for acme; flux_usage for
-- the subject counts the subject's calls.
SELECT flux_define_feature('pings', 'rate');
SELECT flux_grant('pro', 'pings', 100, '1 minute', subject_limit => 2);
SELECT allowed, used FROM flux_consume('acme', 'pings', 1, NULL, 'alice');
SELECT flux_usage('acme', 'pings', 'alice') AS alice_pings, flux_usage('acme', 'pings') AS acme_pings;
SELECT allowed, used FROM flux_consume('acme', 'pings', 1, NULL, 'alice');
SELECT allowed, reason, message FROM flux_consume('acme', 'pings', 1, NULL, 'alice');
SELECT flux_usage('acme', 'pings', 'alice') AS alice_pings;
-- A negative subject_limit is named.
SELECT try($$SELECT flux_grant('pro', 'desks', 5, subject_limit => -1)$$);

-- 14. Nor can it forge a key before flux is loaded: in a new session, a
-- flux.api_key set before the first flux call is dropped with a warning
-- when the extension's settings are defined.
\c - callers_app
SET flux.api_key = :'ci_id';
SET flux.tenant = 'acme';
SELECT flux_current_api_key() IS NULL AS no_key, flux_check('sso') AS sso;
\c - postgres
DROP TABLE callers_docs, callers_files;
DROP EXTENSION flux_entitlements CASCADE;
DROP FUNCTION try(text);
DROP ROLE callers_app;
DROP ROLE callers_svc;
