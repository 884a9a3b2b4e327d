-- The audit log: who changed what, in the same transaction as the change.
\i tests/pg_regress/common/setup.sql
SELECT flux_define_feature('sso');
SELECT flux_define_plan('pro');
SELECT flux_grant('pro', 'sso');
SELECT flux_subscribe('acme', 'pro');
SELECT entity, key, action, actor, tenant FROM flux.audit_log ORDER BY id;

-- "Who gave acme SSO, and when?"
CREATE ROLE flux_regress_support;
GRANT flux_admin TO flux_regress_support;
SET ROLE flux_regress_support;
SELECT flux_override('acme', 'sso', reason => 'security review');
RESET ROLE;
SELECT actor, action, entity, key, new ->> 'reason' AS reason, new ->> 'enabled' AS enabled
  FROM flux_history('acme') WHERE entity = 'overrides';
-- A rolled-back change leaves nothing.
BEGIN;
SELECT flux_override('acme', 'sso', enabled => false);
ROLLBACK;
SELECT count(*) FROM flux.audit_log WHERE entity = 'overrides';
-- Updates record old and new; an update that changes nothing records nothing.
UPDATE flux.tenants SET status = 'past_due' WHERE id = 'acme';
UPDATE flux.tenants SET status = 'past_due' WHERE id = 'acme';
SELECT action, old ->> 'status' AS was, new ->> 'status' AS now FROM flux_history('acme') WHERE entity = 'tenants';
-- flux.actor attributes a change to something other than the role.
SET flux.actor = 'evt_1NtVvk2eZvKYlo2C';
SELECT flux_subscribe('acme', 'pro');
RESET flux.actor;
SELECT actor, action FROM flux.audit_log ORDER BY id DESC LIMIT 1;
-- Deletes, and keys of composite rows.
SELECT flux_revoke('pro', 'sso');
SELECT action, entity, key FROM flux.audit_log ORDER BY id DESC LIMIT 1;
-- API keys are audited without their hash.
SELECT flux_create_api_key('acme', 'ci') IS NOT NULL AS created;
SELECT entity, new ? 'secret_hash' AS has_hash, new ->> 'name' AS name FROM flux.audit_log WHERE entity = 'api_keys';
-- Only flux_admin and the owner read it.
CREATE ROLE flux_regress_nobody;
SET ROLE flux_regress_nobody;
SELECT count(*) FROM flux.audit_log;
SELECT count(*) FROM flux_history('acme');
RESET ROLE;
DROP EXTENSION flux_entitlements;
DROP ROLE flux_regress_support;
DROP ROLE flux_regress_nobody;
