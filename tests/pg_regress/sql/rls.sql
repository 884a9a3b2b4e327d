-- flux_protect: rows of the session's tenant only, and only while it is
-- entitled; decided once per statement; for a role with no flux grants.
\i tests/pg_regress/common/setup.sql
SELECT flux_define_feature('reports');
SELECT flux_define_plan('starter', rank => 1);
SELECT flux_define_plan('pro', rank => 2);
SELECT flux_grant('pro', 'reports');
SELECT flux_subscribe('acme', 'pro');
SELECT flux_subscribe('globex', 'pro');
SELECT flux_subscribe('initech', 'starter');
CREATE TABLE reports (id serial PRIMARY KEY, tenant_id text NOT NULL, title text);
CREATE INDEX reports_tenant ON reports (tenant_id);
INSERT INTO reports (tenant_id, title)
SELECT t, t || ' report ' || i FROM unnest(ARRAY['acme', 'globex', 'initech']) t, generate_series(1, 3) i;
SELECT flux_protect('reports', 'reports');
SELECT polname, polpermissive, polcmd FROM pg_policy WHERE polrelid = 'reports'::regclass ORDER BY 1;
CREATE ROLE flux_regress_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON reports TO flux_regress_app;
GRANT USAGE ON SEQUENCE reports_id_seq TO flux_regress_app;

SET ROLE flux_regress_app;
-- No tenant: nothing.
SELECT count(*) FROM reports;
-- flux.tenant: that tenant's rows only.
SET flux.tenant = 'acme';
SELECT tenant_id, count(*) FROM reports GROUP BY 1;
-- Writes: only as the session's tenant.
INSERT INTO reports (tenant_id, title) VALUES ('acme', 'new');
SELECT try($$INSERT INTO reports (tenant_id, title) VALUES ('globex', 'forged')$$);
SELECT try($$UPDATE reports SET tenant_id = 'globex' WHERE tenant_id = 'acme'$$);
UPDATE reports SET title = title || '!' WHERE true;
DELETE FROM reports WHERE title = 'new!';
SELECT count(*) FROM reports WHERE title LIKE '%!';
-- An unentitled tenant sees nothing of its own rows and cannot add any.
SET flux.tenant = 'initech';
SELECT count(*) FROM reports;
SELECT try($$INSERT INTO reports (tenant_id, title) VALUES ('initech', 'x')$$);
-- PostgREST-style claims.
RESET flux.tenant;
SET request.jwt.claims = '{"tenant_id": "globex"}';
SELECT tenant_id, count(*) FROM reports GROUP BY 1;
RESET request.jwt.claims;
RESET ROLE;

-- A downgrade hides rows on the next statement; an upgrade shows them.
UPDATE flux.tenants SET plan = 'starter' WHERE id = 'globex';
SET ROLE flux_regress_app;
SET flux.tenant = 'globex';
SELECT count(*) FROM reports;
RESET ROLE;
SELECT flux_subscribe('globex', 'pro');
SET ROLE flux_regress_app;
SELECT count(*) FROM reports;
RESET ROLE;

-- The entitlement is a one-time filter (once per statement) and the tenant
-- index is still used.
SET enable_seqscan = off;
SET ROLE flux_regress_app;
EXPLAIN (COSTS OFF) SELECT count(*) FROM reports;
RESET ROLE;
RESET enable_seqscan;

-- The table's owner is not subject to the policies unless force => true
-- (superusers and BYPASSRLS roles always are).
RESET flux.tenant;
CREATE ROLE flux_regress_owner;
ALTER TABLE reports OWNER TO flux_regress_owner;
SET ROLE flux_regress_owner;
SELECT count(*) AS owner_sees FROM reports;
RESET ROLE;
SELECT flux_protect('reports', 'reports', force => true);
SET ROLE flux_regress_owner;
SELECT count(*) AS owner_sees_when_forced FROM reports;
SET flux.tenant = 'acme';
SELECT count(*) AS owner_as_acme FROM reports;
RESET flux.tenant;
RESET ROLE;
-- Idempotent, and a second feature ANDs with the first.
SELECT flux_define_feature('archive');
SELECT flux_grant('pro', 'archive');
SELECT flux_protect('reports', 'archive');
SELECT polname FROM pg_policy WHERE polrelid = 'reports'::regclass ORDER BY 1;
SELECT try($$SELECT flux_protect('reports', 'nope')$$);
SELECT try($$SELECT flux_protect('reports', 'reports', 'org_id')$$);
DROP TABLE reports;
DROP ROLE flux_regress_app;
DROP ROLE flux_regress_owner;
DROP EXTENSION flux_entitlements;
DROP FUNCTION try(text);
