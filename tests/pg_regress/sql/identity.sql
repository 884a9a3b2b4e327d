-- Identity: the session tenant, PostgREST claims and API keys, as a role
-- with no grant on the flux tables.
\i tests/pg_regress/common/setup.sql
SELECT flux_define_feature('export');
SELECT flux_define_plan('pro');
SELECT flux_grant('pro', 'export');
SELECT flux_subscribe('acme', 'pro');
SELECT flux_subscribe('globex', 'pro');
CREATE ROLE flux_regress_web;

-- Keys: shown once, stored hashed.
SET flux.now = '2026-11-22 12:00+00';
SELECT flux_create_api_key('acme', 'ci', expires_at => '2026-12-01 00:00+00') AS key \gset
SELECT :'key' ~ '^flux_[0-9a-f]{12}_[0-9a-f]{64}$' AS well_formed;
SELECT count(*) AS stored, bool_and(length(secret_hash) = 32) AS hashed,
       bool_and(position(substr(:'key', 19) IN encode(secret_hash, 'hex')) = 0) AS no_secret_stored
  FROM flux.api_keys;
SELECT try($$SELECT flux_create_api_key('nobody', 'x')$$);

SET ROLE flux_regress_web;
-- Authenticate: sets flux.tenant for this transaction only.
BEGIN;
SELECT flux_authenticate(:'key') AS tenant;
SELECT current_setting('flux.tenant') AS tenant, flux_current_tenant(), flux_check('export');
COMMIT;
SELECT coalesce(current_setting('flux.tenant', true), '') = '' AS cleared_after_commit;
-- Unknown, malformed, tampered: the same error.
SELECT try($$SELECT flux_authenticate('flux_000000000000_' || repeat('0', 64))$$);
SELECT try($$SELECT flux_authenticate('not a key')$$);
SELECT try(format('SELECT flux_authenticate(%L)', overlay(:'key' placing CASE WHEN substr(:'key', 30, 1) = 'f' THEN '0' ELSE 'f' END from 30 for 1)));
SELECT try($$SELECT flux_authenticate(NULL)$$);
-- The role cannot read the keys, create or revoke them.
SELECT try($$SELECT * FROM flux.api_keys$$);
SELECT try($$SELECT flux_create_api_key('acme', 'mine')$$);
SELECT try(format('SELECT flux_revoke_api_key(%L)', substr(:'key', 6, 12)));
RESET ROLE;

-- Expired keys stop working at expires_at; revoked keys at once.
SET flux.now = '2026-12-01 00:00+00';
SELECT try(format('SELECT flux_authenticate(%L)', :'key'));
SET flux.now = '2026-11-22 12:00+00';
SELECT try(format('SELECT flux_authenticate(%L)', :'key'));
SELECT flux_revoke_api_key(substr(:'key', 6, 12));
SELECT try(format('SELECT flux_authenticate(%L)', :'key'));
SELECT try($$SELECT flux_revoke_api_key('nope')$$);
SELECT revoked_at FROM flux.api_keys;

-- PostgREST claims: request.jwt.claims names the tenant when flux.tenant is unset.
SET ROLE flux_regress_web;
SET request.jwt.claims = '{"role": "authenticated", "tenant_id": "globex"}';
SELECT flux_current_tenant(), flux_check('export');
SET flux.jwt_tenant_claim = 'org_id';
SET request.jwt.claims = '{"org_id": 7}';
SELECT flux_current_tenant();
SET request.jwt.claims = '{"org_id": ["a"]}';
SELECT flux_current_tenant() IS NULL AS not_a_string;
SET request.jwt.claims = '{broken';
SELECT flux_current_tenant() IS NULL AS malformed;
-- flux.tenant wins over claims.
SET flux.tenant = 'acme';
SELECT flux_current_tenant();
RESET flux.tenant;
RESET request.jwt.claims;
RESET flux.jwt_tenant_claim;
-- What the role may not do.
SELECT try($$SELECT count(*) FROM flux.tenants$$);
SELECT try($$UPDATE flux.tenants SET plan = 'pro'$$);
SELECT try($$SELECT flux_subscribe('acme', 'pro')$$);
SELECT try($$SELECT flux_override('acme', 'export')$$);
SELECT try($$SELECT flux_grant('pro', 'export')$$);
SELECT try($$SELECT flux_set_flag('export')$$);
SELECT try($$SELECT flux_protect('pg_class', 'export')$$);
-- ... and what it may: act for its own tenant, not for another one.
SET flux.tenant = 'acme';
SELECT flux_check('acme', 'export'), (flux_decide('acme', 'export')).reason, flux_usage('acme', 'export') IS NULL;
SELECT flux_check('globex', 'export') AS other_tenant;
SELECT try($$SELECT flux_decide('globex', 'export')$$);
RESET flux.tenant;
RESET ROLE;
RESET flux.now;
DROP EXTENSION flux_entitlements;
DROP ROLE flux_regress_web;
DROP FUNCTION try(text);
