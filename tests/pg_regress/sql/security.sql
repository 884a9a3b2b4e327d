-- Security (issue 14): no role gains privilege through flux, moves its
-- clock, signs changes with another name or acts for another tenant.
-- Replayed as an application role with no grants (sec_app), beside a
-- member of flux_admin (sec_ops) and a member of flux_service (sec_svc).
-- Roles are cluster-wide: all are named sec_* and dropped at the end (and
-- first, should an earlier run have died half-way).
\set VERBOSITY terse
SET client_min_messages = warning;
DROP SCHEMA IF EXISTS sec_app_s CASCADE;
DROP ROLE IF EXISTS sec_app;
DROP ROLE IF EXISTS sec_ops;
DROP ROLE IF EXISTS sec_svc;
RESET client_min_messages;
CREATE EXTENSION flux_entitlements;
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
-- 'ok', or the SQLSTATE of the error. No operator, cast or function is
-- resolved by name in these bodies, so a caller's search_path cannot
-- change what they answer.
CREATE FUNCTION sec_try(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE sql; RETURN 'ok';
EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $$;
-- The SQLSTATE of a refusal, and whether its message names the tenant and
-- the grant that would allow it.
CREATE FUNCTION sec_refused(sql text, tenant text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE sql; RETURN 'allowed';
EXCEPTION WHEN OTHERS THEN
    RETURN pg_catalog.concat_ws(' ', SQLSTATE,
        CASE WHEN pg_catalog.strpos(SQLERRM, tenant) OPERATOR(pg_catalog.>) 0
             THEN 'names the tenant' ELSE 'does NOT name the tenant' END,
        CASE WHEN pg_catalog.strpos(SQLERRM, 'flux_service') OPERATOR(pg_catalog.>) 0
             THEN 'and flux_service' ELSE 'and NOT flux_service' END);
END $$;

SELECT flux_define_feature('reports');
SELECT flux_define_feature('export');
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_feature('calls', 'metered');
SELECT flux_define_feature('api', 'metered');
SELECT flux_define_feature('rate', 'rate');
SELECT flux_define_plan('free', rank => 0, is_default => true);
SELECT flux_define_plan('pro', rank => 1);
SELECT flux_grant('pro', 'reports');
SELECT flux_grant('pro', 'export', value => '["csv", "pdf"]');
SELECT flux_grant('pro', 'seats', 3);
SELECT flux_grant('pro', 'calls', 100, 'day');
SELECT flux_grant('pro', 'api', 50, 'day');
SELECT flux_grant('pro', 'rate', 10, '1 minute');
SET flux.now = '2026-11-22 12:00+00';
SELECT flux_subscribe(t, 'pro') FROM unnest(ARRAY['acme', 'globex', 'org-0001', 'org-0001-attacker', 'org-01', '42', 'abc']) t;
SELECT flux_subscribe('trialco', 'pro', 'trialing', trial_ends_at => '2026-11-20 00:00+00');
SELECT flux_override('trialco', 'export', expires_at => '2026-11-25 00:00+00');
SELECT flux_create_api_key('acme', 'app') AS acme_key \gset
SELECT flux_create_api_key('acme', 'ci', expires_at => '2026-11-25 00:00+00') AS expiring_key \gset
SELECT flux_create_api_key('acme', 'old') AS revoked_key \gset
SELECT flux_revoke_api_key(id) FROM flux.api_keys WHERE name = 'old';
RESET flux.now;

CREATE ROLE sec_app LOGIN;
CREATE ROLE sec_ops LOGIN;
GRANT flux_admin TO sec_ops;
CREATE ROLE sec_svc LOGIN;
GRANT flux_service TO sec_svc;

-- 1. The owner of everything flux runs as is flux_owner: NOLOGIN, not a
-- superuser, nobody's member.
SELECT n.nspowner::regrole AS schema_owner, r.rolsuper, r.rolcanlogin, r.rolcreaterole
  FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner WHERE n.nspname = 'flux';
SELECT DISTINCT r.rolname AS relation_owner, r.rolsuper
  FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner
 WHERE c.relnamespace = 'flux'::regnamespace AND c.relkind <> 'c';
SELECT DISTINCT r.rolname AS internal_function_owner, r.rolsuper
  FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner
 WHERE p.pronamespace = 'flux'::regnamespace AND p.proname LIKE '\_%';
SELECT count(*) AS members_of_flux_owner FROM pg_auth_members WHERE roleid = 'flux_owner'::regrole;
SELECT rolname, rolsuper, rolcanlogin FROM pg_roles
 WHERE rolname IN ('flux_owner', 'flux_admin', 'flux_service') ORDER BY 1;
-- Whatever the extension made SECURITY DEFINER runs as a non-superuser
-- with search_path pinned.
SELECT p.oid::regprocedure AS unsafe_security_definer
  FROM pg_proc p
  JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'flux_entitlements'
  JOIN pg_roles r ON r.oid = p.proowner
 WHERE p.prosecdef
   AND (r.rolsuper OR NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false));

-- 2. Internal functions are not PUBLIC's, and the audit trigger cannot be
-- put on an application's own table.
SELECT count(*) > 20 AS has_internal_functions
  FROM pg_proc WHERE pronamespace = 'flux'::regnamespace AND proname LIKE '\_%';
SELECT p.oid::regprocedure AS executable_by_sec_app
  FROM pg_proc p
 WHERE p.pronamespace = 'flux'::regnamespace AND p.proname LIKE '\_%'
   AND has_function_privilege('sec_app', p.oid, 'EXECUTE')
 ORDER BY 1;
SELECT NOT coalesce(has_function_privilege('sec_app', to_regprocedure('flux._check_row_limit(oid, text, text, text)'), 'EXECUTE'), false)
       AS check_row_limit_not_for_apps;
CREATE SCHEMA sec_app_s AUTHORIZATION sec_app;
SELECT count(*) AS audit_rows_before FROM flux.audit_log \gset
SET ROLE sec_app;
-- Finding 2: an enum whose cast to json is the app's function, on a temp table.
CREATE TYPE sec_app_s.mood AS ENUM ('pro');
CREATE FUNCTION sec_app_s.mood_json(sec_app_s.mood) RETURNS json LANGUAGE plpgsql AS $$
BEGIN
    RAISE NOTICE 'mood_json ran as %', current_user;
    BEGIN EXECUTE 'ALTER ROLE sec_app SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
    RETURN '{}';
END $$;
CREATE CAST (sec_app_s.mood AS json) WITH FUNCTION sec_app_s.mood_json(sec_app_s.mood);
CREATE TEMP TABLE forged (id text, plan sec_app_s.mood);
CREATE TRIGGER forge_audit AFTER INSERT ON forged FOR EACH ROW EXECUTE FUNCTION flux._audit('id');
CREATE TRIGGER forge_cache AFTER INSERT ON forged FOR EACH STATEMENT EXECUTE FUNCTION flux._cache_invalidate();
CREATE TRIGGER forge_validate BEFORE INSERT ON forged FOR EACH ROW EXECUTE FUNCTION flux._tenants_validate();
INSERT INTO forged VALUES ('acme', 'pro');
RESET ROLE;
DROP TABLE pg_temp.forged;
SELECT rolsuper FROM pg_roles WHERE rolname = 'sec_app';
SELECT count(*) - :audit_rows_before AS forged_audit_rows FROM flux.audit_log;
-- Even a superuser cannot point flux's trigger functions at another table.
CREATE TABLE sec_fake_plans (LIKE flux.plans);
CREATE TRIGGER audit AFTER INSERT ON sec_fake_plans FOR EACH ROW EXECUTE FUNCTION flux._audit('key');
SELECT sec_try($$INSERT INTO sec_fake_plans SELECT * FROM flux.plans WHERE key = 'pro'$$) <> 'ok' AS audit_refuses_other_tables;
CREATE TABLE sec_fake_tenants (LIKE flux.tenants);
CREATE TRIGGER tenants_validate BEFORE INSERT ON sec_fake_tenants FOR EACH ROW EXECUTE FUNCTION flux._tenants_validate();
SELECT sec_try($$INSERT INTO sec_fake_tenants SELECT * FROM flux.tenants WHERE id = 'acme'$$) AS validator_on_other_table;
SELECT count(*) - :audit_rows_before AS forged_audit_rows FROM flux.audit_log;
DROP TABLE sec_fake_plans, sec_fake_tenants;

-- 3. Shadowing. The app fills a schema of its own with look-alikes of the
-- functions and operators flux uses (each records that it ran, says so in a
-- NOTICE, tries to make the app a superuser and answers wrongly), then puts
-- that schema and pg_temp first in its search_path, and so does an admin.
SET ROLE sec_app;
CREATE TABLE sec_app_s.ran (fn text, as_user text);
GRANT USAGE ON SCHEMA sec_app_s TO PUBLIC;
GRANT INSERT ON sec_app_s.ran TO PUBLIC;
CREATE FUNCTION sec_app_s.hit(fn pg_catalog.text) RETURNS pg_catalog.bool LANGUAGE plpgsql AS $$
BEGIN
    RAISE NOTICE 'shadow % ran as %', fn, current_user;
    INSERT INTO sec_app_s.ran VALUES (fn, current_user);
    BEGIN EXECUTE 'ALTER ROLE sec_app SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
    RETURN true;
END $$;
-- Functions with the catalog's own signatures.
CREATE FUNCTION sec_app_s.now() RETURNS pg_catalog.timestamptz LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('now()'); RETURN pg_catalog.now() OPERATOR(pg_catalog.+) '5 years'::pg_catalog.interval; END $$;
CREATE FUNCTION sec_app_s.clock_timestamp() RETURNS pg_catalog.timestamptz LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('clock_timestamp()'); RETURN pg_catalog.now() OPERATOR(pg_catalog.+) '5 years'::pg_catalog.interval; END $$;
CREATE FUNCTION sec_app_s.statement_timestamp() RETURNS pg_catalog.timestamptz LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('statement_timestamp()'); RETURN pg_catalog.now() OPERATOR(pg_catalog.+) '5 years'::pg_catalog.interval; END $$;
CREATE FUNCTION sec_app_s.transaction_timestamp() RETURNS pg_catalog.timestamptz LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('transaction_timestamp()'); RETURN pg_catalog.now() OPERATOR(pg_catalog.+) '5 years'::pg_catalog.interval; END $$;
CREATE FUNCTION sec_app_s.to_jsonb(anyelement) RETURNS pg_catalog.jsonb LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('to_jsonb(anyelement)'); RETURN '{}'; END $$;
CREATE FUNCTION sec_app_s.to_json(anyelement) RETURNS pg_catalog.json LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('to_json(anyelement)'); RETURN '{}'; END $$;
CREATE FUNCTION sec_app_s.unnest(anyarray) RETURNS SETOF anyelement LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('unnest(anyarray)'); RETURN; END $$;
CREATE FUNCTION sec_app_s.json_build_object(pg_catalog.text, pg_catalog.text, pg_catalog.text, pg_catalog.text,
                                            pg_catalog.text, pg_catalog.text, pg_catalog.text, pg_catalog.text)
RETURNS pg_catalog.json LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('json_build_object(text x 8)'); RETURN '{}'; END $$;
CREATE FUNCTION sec_app_s.pg_has_role(pg_catalog.name, pg_catalog.text) RETURNS pg_catalog.bool LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('pg_has_role(name, text)'); RETURN true; END $$;
CREATE FUNCTION sec_app_s.pg_has_role(pg_catalog.oid, pg_catalog.text) RETURNS pg_catalog.bool LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('pg_has_role(oid, text)'); RETURN true; END $$;
CREATE FUNCTION sec_app_s.current_setting(pg_catalog.text, pg_catalog.bool) RETURNS pg_catalog.text LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('current_setting(text, bool)'); RETURN pg_catalog.current_setting($1, $2); END $$;
CREATE FUNCTION sec_app_s.current_query() RETURNS pg_catalog.text LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('current_query()'); RETURN 'COPY x FROM stdin'; END $$;
CREATE FUNCTION sec_app_s.hashtextextended(pg_catalog.text, pg_catalog.int8) RETURNS pg_catalog.int8 LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('hashtextextended(text, bigint)'); RETURN 0; END $$;
CREATE FUNCTION sec_app_s.pg_advisory_xact_lock(pg_catalog.int8) RETURNS void LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('pg_advisory_xact_lock(bigint)'); END $$;
CREATE FUNCTION sec_app_s.pg_notify(pg_catalog.text, pg_catalog.text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('pg_notify(text, text)'); END $$;
CREATE FUNCTION sec_app_s.count_step(pg_catalog.int8) RETURNS pg_catalog.int8 LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('count(*)'); RETURN 0; END $$;
CREATE AGGREGATE sec_app_s.count(*) (SFUNC = sec_app_s.count_step, STYPE = pg_catalog.int8, INITCOND = '0');
CREATE FUNCTION sec_app_s.agg_step(pg_catalog.text, pg_catalog.text, pg_catalog.text) RETURNS pg_catalog.text LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('string_agg(text, text)'); RETURN ''; END $$;
CREATE AGGREGATE sec_app_s.string_agg(pg_catalog.text, pg_catalog.text) (SFUNC = sec_app_s.agg_step, STYPE = pg_catalog.text);
-- More specific overloads win over the catalog's polymorphic ones even
-- when pg_catalog comes first in the path.
CREATE FUNCTION sec_app_s.to_jsonb(record) RETURNS pg_catalog.jsonb LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('to_jsonb(record)'); RETURN '{}'; END $$;
CREATE FUNCTION sec_app_s.unnest(pg_catalog.text[]) RETURNS SETOF pg_catalog.text LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('unnest(text[])'); RETURN; END $$;
-- Operators with the catalog's signatures, each answering wrongly.
DO $$
DECLARE o record;
BEGIN
    FOR o IN SELECT * FROM (VALUES
        ('=', 'text', 'text', 'bool', 'false'), ('<>', 'text', 'text', 'bool', 'true'),
        ('||', 'text', 'text', 'text', '$1'), ('~~', 'text', 'text', 'bool', 'true'),
        ('~*', 'text', 'text', 'bool', 'true'), ('!~*', 'text', 'text', 'bool', 'false'),
        ('=', 'name', 'name', 'bool', 'false'), ('=', 'oid', 'oid', 'bool', 'false'),
        ('=', 'bytea', 'bytea', 'bool', 'true'),
        ('<', 'timestamptz', 'timestamptz', 'bool', 'true'), ('<=', 'timestamptz', 'timestamptz', 'bool', 'true'),
        ('>', 'timestamptz', 'timestamptz', 'bool', 'false'), ('>=', 'timestamptz', 'timestamptz', 'bool', 'false'),
        ('=', 'timestamptz', 'timestamptz', 'bool', 'false'),
        ('+', 'timestamptz', 'interval', 'timestamptz', '$1'), ('-', 'timestamptz', 'interval', 'timestamptz', '$1'),
        ('-', 'timestamptz', 'timestamptz', 'interval', '''0'''),
        ('+', 'int8', 'int8', 'int8', '0'), ('-', 'int8', 'int8', 'int8', '0'),
        ('<', 'int8', 'int8', 'bool', 'true'), ('<=', 'int8', 'int8', 'bool', 'true'),
        ('>', 'int8', 'int8', 'bool', 'false'), ('>=', 'int8', 'int8', 'bool', 'false'),
        ('=', 'int8', 'int8', 'bool', 'false'),
        ('->>', 'jsonb', 'text', 'text', 'NULL'), ('->', 'jsonb', 'text', 'jsonb', 'NULL'),
        ('-', 'jsonb', 'text', 'jsonb', '$1')
    ) v(op, l, r, ret, answer) LOOP
        EXECUTE pg_catalog.format(
            'CREATE FUNCTION sec_app_s.%I(pg_catalog.%I, pg_catalog.%I) RETURNS pg_catalog.%I LANGUAGE plpgsql '
            'AS $f$BEGIN PERFORM sec_app_s.hit(%L); RETURN %s; END$f$',
            'op_' || md5(o.op || o.l || o.r), o.l, o.r, o.ret, o.op || '(' || o.l || ', ' || o.r || ')', o.answer);
        EXECUTE pg_catalog.format('CREATE OPERATOR sec_app_s.%s (LEFTARG = pg_catalog.%I, RIGHTARG = pg_catalog.%I, FUNCTION = sec_app_s.%I)',
            o.op, o.l, o.r, 'op_' || md5(o.op || o.l || o.r));
    END LOOP;
END $$;
-- Look-alike domains in the app's schema (types are also looked up there).
CREATE DOMAIN sec_app_s.text AS pg_catalog.text CHECK (sec_app_s.hit('domain sec_app_s.text'));
CREATE DOMAIN sec_app_s.jsonb AS pg_catalog.jsonb CHECK (sec_app_s.hit('domain sec_app_s.jsonb'));
CREATE DOMAIN sec_app_s.timestamptz AS pg_catalog.timestamptz CHECK (sec_app_s.hit('domain sec_app_s.timestamptz'));
RESET ROLE;

-- An admin whose search_path includes the app's schema: admin functions,
-- plain DML (validators, audit, cache triggers), flux_protect and
-- flux_enforce_limit all run without touching the app's objects.
CREATE TABLE sec_docs (id int PRIMARY KEY, tenant_id text NOT NULL, title text);
INSERT INTO sec_docs VALUES (1, 'acme', 'acme 1'), (2, 'acme', 'acme 2'), (3, 'globex', 'globex 1');
CREATE TABLE sec_members (tenant_id text NOT NULL, name text);
ALTER TABLE sec_docs OWNER TO sec_ops;
ALTER TABLE sec_members OWNER TO sec_ops;
GRANT SELECT, INSERT, UPDATE, DELETE ON sec_docs, sec_members TO sec_app;
SELECT max(id) AS audit_mark FROM flux.audit_log \gset
SET ROLE sec_ops;
SET search_path = sec_app_s, pg_catalog, public;
SELECT flux_define_feature('sso');
SELECT flux_grant('pro', 'sso');
SELECT flux_subscribe('initech', 'pro');
SELECT flux_override('globex', 'sso', false, reason => 'security review');
SELECT flux_set_flag('sso', true, 50);
SELECT flux_flag_allow('sso', 'acme');
SELECT flux_create_api_key('globex', 'ops') IS NOT NULL AS key_created;
SELECT flux_revoke_api_key(id) FROM flux.api_keys WHERE name OPERATOR(pg_catalog.=) 'ops';
INSERT INTO flux.features (key, kind) VALUES ('audited', 'boolean');
UPDATE flux.tenants SET status = 'past_due' WHERE id OPERATOR(pg_catalog.=) 'initech';
DELETE FROM flux.overrides WHERE tenant OPERATOR(pg_catalog.=) 'globex';
SELECT flux_protect('sec_docs', 'reports');
SELECT flux_enforce_limit('sec_members', 'seats');
SELECT action, entity, key FROM flux_history('initech') ORDER BY id;
SELECT (flux_decide('globex', 'reports')).reason AS admin_decides_for_globex;
RESET search_path;
RESET ROLE;
SELECT fn, as_user FROM sec_app_s.ran;
SELECT actor, action, entity, CASE WHEN entity = 'api_keys' THEN '(key id)' ELSE key END AS key,
       coalesce(new, old) ? 'secret_hash' AS has_hash
  FROM flux.audit_log WHERE id > :audit_mark ORDER BY id;
-- The policies and the trigger flux wrote refer to nothing of the app's.
SELECT count(*) AS policy_deps_on_app_objects
  FROM pg_depend d JOIN pg_policy p ON d.classid = 'pg_policy'::regclass AND d.objid = p.oid
 WHERE p.polrelid = 'sec_docs'::regclass
   AND (d.refobjid IN (SELECT oid FROM pg_proc WHERE pronamespace = 'sec_app_s'::regnamespace)
     OR d.refobjid IN (SELECT oid FROM pg_operator WHERE oprnamespace = 'sec_app_s'::regnamespace)
     OR d.refobjid IN (SELECT oid FROM pg_type WHERE typnamespace = 'sec_app_s'::regnamespace));

-- The app itself, with look-alikes in pg_temp as well (the issue's
-- CREATE DOMAIN pg_temp.text ... CHECK (pg_temp.pwn(VALUE))) and temp
-- views named like catalogs and flux tables.
SET ROLE sec_app;
CREATE FUNCTION pg_temp.pwn(anyelement) RETURNS pg_catalog.bool LANGUAGE plpgsql AS $$
BEGIN RETURN sec_app_s.hit('pg_temp.pwn'); END $$;
CREATE FUNCTION pg_temp.now() RETURNS pg_catalog.timestamptz LANGUAGE plpgsql AS $$
BEGIN PERFORM sec_app_s.hit('pg_temp.now()'); RETURN pg_catalog.now(); END $$;
CREATE TEMP VIEW pg_extension AS SELECT * FROM pg_catalog.pg_extension WHERE sec_app_s.hit('view pg_temp.pg_extension');
CREATE TEMP VIEW pg_namespace AS SELECT * FROM pg_catalog.pg_namespace WHERE sec_app_s.hit('view pg_temp.pg_namespace');
CREATE TEMP VIEW pg_class AS SELECT * FROM pg_catalog.pg_class WHERE sec_app_s.hit('view pg_temp.pg_class');
CREATE TEMP VIEW pg_roles AS SELECT * FROM pg_catalog.pg_roles WHERE sec_app_s.hit('view pg_temp.pg_roles');
CREATE TEMP VIEW pg_auth_members AS SELECT * FROM pg_catalog.pg_auth_members WHERE sec_app_s.hit('view pg_temp.pg_auth_members');
CREATE TEMP VIEW tenants AS SELECT NULL::pg_catalog.text AS id WHERE sec_app_s.hit('view pg_temp.tenants');
CREATE TEMP VIEW usage AS SELECT NULL::pg_catalog.text AS tenant WHERE sec_app_s.hit('view pg_temp.usage');
CREATE TEMP VIEW api_keys AS SELECT NULL::pg_catalog.text AS id WHERE sec_app_s.hit('view pg_temp.api_keys');
CREATE DOMAIN pg_temp.text AS pg_catalog.text CHECK (pg_temp.pwn(VALUE));
CREATE DOMAIN pg_temp.jsonb AS pg_catalog.jsonb CHECK (pg_temp.pwn(VALUE));
CREATE DOMAIN pg_temp.timestamptz AS pg_catalog.timestamptz CHECK (pg_temp.pwn(VALUE));
CREATE DOMAIN pg_temp.int8 AS pg_catalog.int8 CHECK (pg_temp.pwn(VALUE));
CREATE DOMAIN pg_temp.oid AS pg_catalog.oid CHECK (pg_temp.pwn(VALUE));
CREATE DOMAIN pg_temp.name AS pg_catalog.name CHECK (pg_temp.pwn(VALUE));
CREATE DOMAIN pg_temp.bytea AS pg_catalog.bytea CHECK (pg_temp.pwn(VALUE));
CREATE DOMAIN pg_temp.regclass AS pg_catalog.regclass CHECK (pg_temp.pwn(VALUE));
SET search_path = pg_temp, sec_app_s, pg_catalog, public;
SET flux.tenant = 'acme';
SELECT flux_current_tenant();
SELECT flux_check('acme', 'reports') AS acme_reports, flux_check('reports') AS current_reports,
       flux_check('acme', 'nope') AS unknown_feature, flux_check('globex', 'reports') AS other_tenant;
SELECT allowed, reason, plan, "limit", used, remaining FROM flux_decide('acme', 'calls');
SELECT allowed, reason FROM flux_decide('acme', 'export', 'user-1');
SELECT feature, allowed, reason, "limit" FROM flux_entitlements('acme');
SELECT flux_value('acme', 'export');
SELECT allowed, reason, used, remaining FROM flux_consume('acme', 'calls', 2);
SELECT allowed, reason, used, remaining FROM flux_consume('acme', 'calls', 1, 'req-1');
SELECT allowed, reason, used, remaining FROM flux_consume('acme', 'calls', 1, 'req-1');
SELECT flux_usage('acme', 'calls');
SELECT allowed, reason, used FROM flux_consume('acme', 'seats', 2);
SELECT flux_release('acme', 'seats');
SELECT allowed, reason FROM flux_consume('acme', 'rate');
SELECT sec_refused($$SELECT flux_decide('globex', 'reports')$$, 'globex');
SELECT sec_refused($$SELECT flux_consume('globex', 'calls')$$, 'globex');
BEGIN;
SELECT flux_authenticate(:'acme_key') AS authenticated;
SELECT flux_current_tenant();
COMMIT;
SELECT sec_try(format('SELECT flux_authenticate(%L)', :'revoked_key')) AS revoked_key;
SELECT sec_try($$SELECT flux_authenticate('flux_000000000000_0000000000000000000000000000000000000000000000000000000000000000')$$) AS unknown_key;
-- The protected table: acme's rows only; writes only as acme.
SELECT id, tenant_id, title FROM sec_docs ORDER BY id;
INSERT INTO sec_docs VALUES (4, 'acme', 'acme 3');
SELECT sec_try($$INSERT INTO sec_docs VALUES (5, 'globex', 'forged')$$) AS insert_for_globex;
-- Seats: 3 on pro, whatever the app's = and count(*) and to_jsonb say.
INSERT INTO sec_members VALUES ('acme', 'm1');
INSERT INTO sec_members VALUES ('acme', 'm2');
INSERT INTO sec_members VALUES ('acme', 'm3');
SELECT sec_try($$INSERT INTO sec_members VALUES ('acme', 'm4')$$) AS fourth_seat;
-- Errors inside flux give back the caller's identity and path.
SELECT current_user, current_setting('search_path') AS search_path;
RESET search_path;
RESET flux.tenant;
RESET ROLE;
-- (the temp look-alikes would catch this script's own queries too)
DISCARD TEMP;
SELECT rolname, rolsuper FROM pg_roles WHERE rolname IN ('sec_app', 'sec_ops', 'sec_svc') ORDER BY 1;
SELECT fn, as_user FROM sec_app_s.ran;
SELECT tenant_id, count(*) FROM sec_members GROUP BY 1 ORDER BY 1;
SELECT id, tenant_id FROM sec_docs ORDER BY id;

-- 4. Acting for a tenant: the current tenant only, unless flux_service,
-- flux_admin or a superuser.
SET ROLE sec_app;
-- No tenant at all.
SELECT flux_current_tenant() IS NULL AS no_tenant, flux_check('acme', 'reports') AS check_acme;
SELECT sec_refused($$SELECT flux_decide('acme', 'reports')$$, 'acme') AS decide_acme;
SET flux.tenant = 'acme';
SELECT flux_check('acme', 'reports') AS own, flux_check('globex', 'reports') AS other,
       flux_check('globex', 'nope') AS other_unknown, flux_check(NULL, 'reports') IS NULL AS null_tenant;
SELECT (flux_decide('acme', 'reports')).reason AS own_decision;
SELECT sec_refused($$SELECT flux_decide('globex', 'reports')$$, 'globex') AS decide;
SELECT sec_refused($$SELECT flux_decide('globex', 'reports', 'user-1')$$, 'globex') AS decide_subject;
SELECT sec_refused($$SELECT * FROM flux_entitlements('globex')$$, 'globex') AS entitlements;
SELECT sec_refused($$SELECT flux_value('globex', 'export')$$, 'globex') AS value;
SELECT sec_refused($$SELECT flux_usage('globex', 'calls')$$, 'globex') AS usage;
SELECT sec_refused($$SELECT flux_consume('globex', 'calls', 1000)$$, 'globex') AS consume;
SELECT sec_refused($$SELECT flux_consume('globex', 'calls', 1, 'k-globex')$$, 'globex') AS consume_with_key;
SELECT sec_refused($$SELECT flux_release('globex', 'seats')$$, 'globex') AS release;
SELECT sec_refused($$SELECT flux_decide('ACME', 'reports')$$, 'ACME') AS other_case;
SELECT sec_refused($$SELECT flux_decide('nobody', 'reports')$$, 'nobody') AS unknown_tenant;
-- PostgREST: the verified claims name the tenant.
RESET flux.tenant;
SET request.jwt.claims = '{"role": "web", "tenant_id": "acme"}';
SELECT flux_current_tenant(), flux_check('reports') AS current_reports, (flux_decide('acme', 'reports')).reason;
SELECT sec_refused($$SELECT flux_consume('globex', 'calls')$$, 'globex') AS consume_for_globex;
-- A claim with an embedded NUL names no tenant.
SET request.jwt.claims = '{"tenant_id": "acme\u0000x"}';
SELECT flux_current_tenant() IS NULL AS nul_claim_no_tenant, flux_check('reports') IS NOT TRUE AS not_entitled;
SELECT sec_refused($$SELECT flux_decide('acme', 'reports')$$, 'acme') AS decide_acme;
SET request.jwt.claims = '{"tenant_id": "\u0000"}';
SELECT flux_current_tenant() IS NULL AS nul_only_no_tenant;
RESET request.jwt.claims;
RESET ROLE;
SELECT count(*) AS globex_usage_rows FROM flux.usage WHERE tenant = 'globex';
SELECT count(*) AS globex_keys FROM flux.usage_keys WHERE tenant = 'globex';
-- flux_service may act for any tenant (and flux_release works for it).
SET ROLE sec_svc;
SELECT flux_current_tenant() IS NULL AS no_tenant, flux_check('globex', 'reports'),
       (flux_decide('globex', 'reports')).reason, flux_usage('globex', 'calls');
SELECT count(*) AS globex_entitlements FROM flux_entitlements('globex');
SELECT allowed, reason, used FROM flux_consume('globex', 'seats', 2);
SELECT flux_release('globex', 'seats') AS seats_after_release;
RESET ROLE;
-- ... until the grant is revoked: the next transaction is refused.
REVOKE flux_service FROM sec_svc;
SET ROLE sec_svc;
SELECT flux_check('globex', 'reports') AS after_revoke;
SELECT sec_refused($$SELECT flux_decide('globex', 'reports')$$, 'globex') AS after_revoke;
RESET ROLE;
-- The answer is per role, not per session.
SELECT (flux_decide('globex', 'reports')).reason AS superuser;
SET ROLE sec_ops;
SELECT (flux_decide('globex', 'reports')).reason AS flux_admin_member;
SET ROLE sec_app;
SELECT sec_refused($$SELECT flux_decide('globex', 'reports')$$, 'globex') AS app_after_admin;
RESET ROLE;

-- 5. The clock and the actor belong to superusers and flux_admin.
SET flux.now = '2026-11-30 12:00+00';
SET ROLE sec_app;
SET flux.tenant = 'trialco';
SELECT sec_try($$SET flux.now = '2026-11-19 00:00+00'$$) AS set_now;
SELECT sec_try($$SET LOCAL flux.now = '2026-11-19 00:00+00'$$) AS set_local_now;
SELECT sec_try($$SELECT set_config('flux.now', '2026-11-19 00:00+00', false)$$) AS set_config_now;
SELECT sec_try($$SELECT set_config('flux.now', '2026-11-19 00:00+00', true)$$) AS set_config_local_now;
SELECT sec_try($$RESET flux.now$$) AS reset_now;
SELECT sec_try($$SET flux.actor = 'someone'$$) AS set_actor;
SELECT sec_try($$SELECT set_config('flux.actor', 'someone', false)$$) AS set_config_actor;
SELECT current_setting('flux.now') AS clock, coalesce(current_setting('flux.actor', true), '') AS actor;
-- The trial stays ended, the expired override stays expired.
SELECT flux_check('reports') AS trial_reports, flux_check('export') AS override_export;
-- The expired and the revoked key stay refused.
SELECT sec_try(format('SELECT flux_authenticate(%L)', :'expiring_key')) AS expired_key,
       sec_try(format('SELECT flux_authenticate(%L)', :'revoked_key')) AS revoked_key;
-- 50 a day is 50 a day.
SET flux.tenant = 'acme';
SELECT allowed, used, remaining FROM flux_consume('acme', 'api', 50);
SELECT allowed, reason, used FROM flux_consume('acme', 'api');
SELECT sec_try($$SET flux.now = '2026-12-05 00:00+00'$$) AS next_day;
SELECT allowed, reason, used FROM flux_consume('acme', 'api');
-- Idempotency keys bind the amount; unknown tenants and features store none.
SELECT allowed, used FROM flux_consume('acme', 'calls', 1, 'k1');
SELECT sec_try($$SELECT flux_consume('acme', 'calls', 5, 'k1')$$) AS replay_other_amount;
SELECT allowed, used FROM flux_consume('acme', 'calls', 1, 'k1');
SELECT flux_usage('acme', 'calls');
SELECT reason FROM flux_consume('acme', 'nope', 1, 'k2');
SET flux.tenant = 'nobody';
SELECT reason FROM flux_consume('nobody', 'calls', 1, 'k3');
RESET flux.tenant;
RESET ROLE;
SELECT reason FROM flux_consume('ghost', 'calls', 1, 'k4');
SELECT tenant, feature, idempotency_key FROM flux.usage_keys ORDER BY 1, 2, 3;
SELECT period_start, used FROM flux.usage WHERE tenant = 'acme' AND feature = 'api' ORDER BY 1;
-- A flux_admin member may move the clock and name the actor; the audit log
-- keeps the real role beside it.
SET ROLE sec_ops;
SELECT sec_try($$SET flux.now = '2026-11-30 13:00+00'$$) AS admin_sets_now;
SET flux.actor = 'stripe:evt_1';
SELECT flux_subscribe('globex', 'pro', 'past_due');
RESET flux.actor;
RESET ROLE;
SELECT actor, role, action, entity, key FROM flux.audit_log ORDER BY id DESC LIMIT 1;
SET flux.actor = 'superuser-script';
SELECT flux_subscribe('globex', 'pro');
RESET flux.actor;
SELECT actor, role, action, entity, key FROM flux.audit_log ORDER BY id DESC LIMIT 1;
RESET flux.now;

-- 6. flux_protect compares tenant columns as text: no truncation to a
-- varchar(8) or char(8), no cast of the tenant to the column's type.
CREATE TABLE sec_v8 (id int PRIMARY KEY, org_id varchar(8) NOT NULL, title text);
CREATE TABLE sec_c8 (id int PRIMARY KEY, org_id char(8) NOT NULL, title text);
CREATE TABLE sec_int (id int PRIMARY KEY, acct_id integer NOT NULL, title text);
INSERT INTO sec_v8 VALUES (1, 'org-0001', 'secret 1'), (2, 'org-0001', 'secret 2'), (3, 'org-01', 'other');
INSERT INTO sec_c8 SELECT * FROM sec_v8;
INSERT INTO sec_int VALUES (1, 42, 'forty-two'), (2, 7, 'seven');
SELECT flux_protect('sec_v8', 'reports', 'org_id');
SELECT flux_protect('sec_c8', 'reports', 'org_id');
SELECT flux_protect('sec_int', 'reports', 'acct_id');
GRANT SELECT, INSERT, UPDATE, DELETE ON sec_v8, sec_c8, sec_int TO sec_app;
SET ROLE sec_app;
SET flux.tenant = 'org-0001-attacker';
SELECT count(*) AS v8_seen FROM sec_v8;
SELECT count(*) AS c8_seen FROM sec_c8;
WITH u AS (UPDATE sec_v8 SET title = 'pwned' RETURNING 1) SELECT count(*) AS v8_updated FROM u;
WITH u AS (UPDATE sec_c8 SET title = 'pwned' RETURNING 1) SELECT count(*) AS c8_updated FROM u;
WITH d AS (DELETE FROM sec_v8 RETURNING 1) SELECT count(*) AS v8_deleted FROM d;
SELECT sec_try($$INSERT INTO sec_v8 VALUES (10, 'org-0001', 'forged')$$) AS v8_insert;
SELECT sec_try($$INSERT INTO sec_c8 VALUES (10, 'org-0001', 'forged')$$) AS c8_insert;
SET flux.tenant = 'org-0001';
SELECT count(*) AS v8_own, (SELECT count(*) FROM sec_c8) AS c8_own FROM sec_v8;
SET flux.tenant = 'org-01';
SELECT count(*) AS v8_own, (SELECT count(*) FROM sec_c8) AS c8_own FROM sec_v8;
SET flux.tenant = '42';
SELECT title FROM sec_int;
SET flux.tenant = 'abc';
SELECT sec_try($$SELECT * FROM sec_int$$) AS non_numeric_tenant;
SELECT count(*) AS int_seen FROM sec_int;
RESET flux.tenant;
RESET ROLE;
SELECT id, org_id, title FROM sec_v8 ORDER BY id;
SELECT id, org_id, title FROM sec_c8 ORDER BY id;

-- 7. COPY as the first statement of a multi-statement query does not skip
-- the audit log.
SELECT max(id) AS audit_mark FROM flux.audit_log \gset
SET ROLE sec_ops;
COPY (SELECT 'copied') TO STDOUT \; UPDATE flux.tenants SET plan = 'free' WHERE id = 'initech';
  copy (SELECT 'copied again') TO STDOUT \; UPDATE flux.tenants SET plan = 'pro' WHERE id = 'initech';
RESET ROLE;
SELECT action, entity, key, new ->> 'plan' AS plan FROM flux.audit_log WHERE id > :audit_mark ORDER BY id;

-- Everyone is still who they were.
SELECT rolname, rolsuper FROM pg_roles WHERE rolname IN ('sec_app', 'sec_ops', 'sec_svc', 'flux_owner') ORDER BY 1;
DROP TABLE sec_docs, sec_members, sec_v8, sec_c8, sec_int;
DROP EXTENSION flux_entitlements;
SET client_min_messages = warning;
DROP SCHEMA sec_app_s CASCADE;
RESET client_min_messages;
DROP FUNCTION sec_try(text), sec_refused(text, text);
DROP ROLE sec_app;
DROP ROLE sec_ops;
DROP ROLE sec_svc;
