-- Who may do what: PUBLIC reads and decides; flux_admin administers.
CREATE EXTENSION flux_entitlements;
\set VERBOSITY terse
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
SELECT flux_define_feature('export');
SELECT flux_define_plan('pro');
SELECT flux_grant('pro', 'export');
SELECT flux_subscribe('acme', 'pro');
CREATE ROLE flux_regress_app;
CREATE ROLE flux_regress_ops;
GRANT flux_admin TO flux_regress_ops;

SET ROLE flux_regress_app;
SELECT flux_check('acme', 'export'), (flux_decide('acme', 'export')).reason;
SELECT count(*) FROM flux_entitlements('acme');
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

SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = 'flux_admin';
DROP EXTENSION flux_entitlements;
DROP ROLE flux_regress_app;
DROP ROLE flux_regress_ops;
