-- Who may do what: PUBLIC reads and decides; flux_admin administers.
\i tests/pg_regress/common/setup.sql
SELECT flux_define_feature('export');
SELECT flux_define_plan('pro');
SELECT flux_grant('pro', 'export');
SELECT flux_subscribe('acme', 'pro');
CREATE ROLE flux_regress_app;
CREATE ROLE flux_regress_ops;
CREATE ROLE flux_regress_backend;
GRANT flux_admin TO flux_regress_ops;
GRANT flux_service TO flux_regress_backend;

SET ROLE flux_regress_app;
-- It acts for its current tenant only (flux.tenant, an API key or a JWT claim).
SET flux.tenant = 'acme';
SELECT flux_check('acme', 'export'), (flux_decide('acme', 'export')).reason;
SELECT count(*) FROM flux_entitlements('acme');
RESET flux.tenant;
SELECT flux_check('acme', 'export') AS no_current_tenant;
SELECT flux_decide('acme', 'export');
-- It may not move the clock or sign changes with another name.
SET flux.now = '2031-01-01';
SET flux.actor = 'someone else';
-- An application role cannot change its own plan or grant itself features.
SELECT flux_subscribe('acme', 'pro');
SELECT flux_grant('pro', 'export');
SELECT flux_override('acme', 'export');
UPDATE flux.tenants SET plan = 'pro' WHERE id = 'acme';
INSERT INTO flux.overrides (tenant, feature) VALUES ('acme', 'export');
DELETE FROM flux.grants;
RESET ROLE;

-- A member of flux_admin can.
SET ROLE flux_regress_ops;
SELECT flux_define_feature('sso');
SELECT flux_grant('pro', 'sso');
UPDATE flux.tenants SET status = 'active' WHERE id = 'acme';
SELECT flux_check('acme', 'sso');
RESET ROLE;

-- A trusted backend (flux_service) acts for any tenant.
SET ROLE flux_regress_backend;
SELECT flux_check('acme', 'export'), (flux_decide('acme', 'export')).reason;
SELECT used FROM flux_consume('acme', 'export');
SET flux.now = '2031-01-01';
RESET ROLE;

-- The roles, and who owns flux: never a superuser.
SELECT rolname, rolcanlogin, rolsuper FROM pg_roles
 WHERE rolname IN ('flux_admin', 'flux_service', 'flux_owner') ORDER BY rolname;
SELECT nspowner::regrole AS owner FROM pg_namespace WHERE nspname = 'flux';
SELECT count(*) AS not_owned_by_flux_owner FROM pg_class
 WHERE relnamespace = 'flux'::regnamespace AND relowner <> 'flux_owner'::regrole;
-- No internal function is executable by an application role.
SELECT p.oid::regprocedure AS executable_by_app FROM pg_proc p
 WHERE p.pronamespace = 'flux'::regnamespace
   AND has_function_privilege('flux_regress_app', p.oid, 'EXECUTE');
DROP EXTENSION flux_entitlements;
DROP ROLE flux_regress_app;
DROP ROLE flux_regress_ops;
DROP ROLE flux_regress_backend;
