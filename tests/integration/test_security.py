"""Security (issue 14): every finding replayed as an unprivileged role over
real connections, plus variants of each class the issue does not spell out.

Each test asserts the safe outcome (no superuser, nothing of the caller's
ever run by flux, nothing written, the expected SQLSTATE), so it fails when
the hole is open. Roles are cluster-wide: each test makes its own, named
sec_<what>_<random>, and drops them at the end.

The look-alike objects an attacking role creates all call `sec_s.hit(name)`,
which announces itself three ways that survive what flux might do to the
transaction: a NOTICE (seen by the client even when the statement fails), a
sequence (nextval is not rolled back) and a row in sec_s.ran. It also tries
`ALTER ROLE <app> SUPERUSER`.
"""
import hashlib
import hmac
import re
import subprocess
import time
import uuid

import psycopg
import pytest
from psycopg import sql

from conftest import BIN, HOST, PORT, Roles, connect, login, role_dsn, sqlstate_of

# ---------------------------------------------------------------------------
# Roles, connections, the catalogue


@pytest.fixture
def roles(fresh_db):
    r = Roles(fresh_db)
    yield r
    r.cleanup()


SETUP = """
SELECT flux_define_feature('reports');
SELECT flux_define_feature('export');
SELECT flux_define_feature('sso');
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_feature('calls', 'metered');
SELECT flux_define_feature('api', 'metered');
SELECT flux_define_feature('rate', 'rate');
SELECT flux_define_plan('free', rank => 0, is_default => true);
SELECT flux_define_plan('pro', rank => 1);
SELECT flux_define_plan('enterprise', rank => 2);
SELECT flux_grant('pro', 'reports');
SELECT flux_grant('pro', 'export', value => '["csv", "pdf"]');
SELECT flux_grant('pro', 'seats', 3);
SELECT flux_grant('pro', 'calls', 100, 'day');
SELECT flux_grant('pro', 'api', 50, 'day');
SELECT flux_grant('pro', 'rate', 5, '1 hour');
SELECT flux_grant('enterprise', 'sso');
SELECT flux_subscribe(t, 'pro') FROM unnest(ARRAY['acme', 'globex', 'initech']) t;
CREATE TABLE public.sec_docs (id int PRIMARY KEY, tenant_id text NOT NULL, title text);
INSERT INTO sec_docs VALUES (1, 'acme', 'a1'), (2, 'acme', 'a2'), (3, 'globex', 'g1');
SELECT flux_protect('sec_docs', 'reports');
CREATE TABLE public.sec_members (tenant_id text NOT NULL, name text);
SELECT flux_enforce_limit('sec_members', 'seats');
-- An application's own policy calling flux_check(tenant, feature) per row.
CREATE TABLE public.sec_notes (id int PRIMARY KEY, tenant_id text NOT NULL);
INSERT INTO sec_notes VALUES (1, 'acme'), (2, 'globex'), (3, 'initech');
ALTER TABLE sec_notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY notes ON sec_notes USING (flux_check(tenant_id, 'reports'));
"""


def setup_catalogue(db, *grantees):
    with connect(db) as c:
        c.execute(SETUP)
        for g in grantees:
            c.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON sec_docs, sec_members, sec_notes TO {}").format(sql.Identifier(g)))


def rolsuper(db, role):
    with connect(db) as c:
        return c.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()[0]




def error_of(c, query, params=None):
    try:
        if c.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
            with c.transaction():
                c.execute(query, params)
        else:
            c.execute(query, params)
    except psycopg.Error as e:
        return e
    raise AssertionError(f"no error from {query}")


# ---------------------------------------------------------------------------
# The recorder every look-alike calls

RECORDER = """
CREATE TABLE sec_s.ran (fn text, as_user text, superuser text);
CREATE SEQUENCE sec_s.hits;
GRANT USAGE ON SCHEMA sec_s TO PUBLIC;
GRANT INSERT ON sec_s.ran TO PUBLIC;
GRANT USAGE, UPDATE ON SEQUENCE sec_s.hits TO PUBLIC;
CREATE FUNCTION sec_s.hit(fn pg_catalog.text) RETURNS pg_catalog.bool LANGUAGE plpgsql AS $b$
BEGIN
    PERFORM pg_catalog.nextval('sec_s.hits'::pg_catalog.regclass);
    RAISE NOTICE 'shadow % ran as % (superuser: %)', fn, current_user, pg_catalog.current_setting('is_superuser');
    INSERT INTO sec_s.ran VALUES (fn, current_user, pg_catalog.current_setting('is_superuser'));
    BEGIN
        EXECUTE pg_catalog.format('ALTER ROLE %I SUPERUSER', {app});
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    RETURN true;
END $b$;
CREATE FUNCTION sec_s.pwn(anyelement) RETURNS pg_catalog.bool LANGUAGE plpgsql AS $b$
BEGIN RETURN sec_s.hit(pg_catalog.format('domain check on %s', pg_catalog.pg_typeof($1)));
END $b$;
"""


def install_recorder(db, app):
    with connect(db) as c:
        c.execute(sql.SQL("CREATE SCHEMA sec_s AUTHORIZATION {}").format(sql.Identifier(app)))
    with login(db, app) as a:
        a.execute(RECORDER.replace("{app}", "'" + app + "'"))


def hits(db):
    """How many times any look-alike ran, and the rows it could keep."""
    with connect(db) as c:
        last, called = c.execute("SELECT last_value, is_called FROM sec_s.hits").fetchone()
        rows = c.execute("SELECT fn, as_user, superuser FROM sec_s.ran").fetchall()
    return (last if called else 0), rows


def assert_nothing_ran(db, *conns):
    n, rows = hits(db)
    notices = [m for c in conns for m in c.notices if "shadow" in m]
    assert n == 0 and not rows and not notices, f"look-alikes ran {n} times: {rows} {notices[:20]}"


# ---------------------------------------------------------------------------
# Look-alike kits. Each is created by the attacking role in its own session
# (pg_temp) or schema (sec_s), then the role puts them first in its path.

RIGGED = "pg_temp, sec_s, pg_catalog, public"  # same signatures win
DEFAULT = '"$user", public'  # pg_catalog implicitly first: only better matches win
SPECIFIC = "sec_s, public"  # ditto, with the app's schema on the path

PSEUDO_OK = ("anyelement", "anyarray", "anynonarray", "anycompatible", "anycompatiblearray",
             "anycompatiblenonarray", "void", "record")


def catalog_function_shadows(c, names, lies=None):
    """Look-alikes with the exact signatures of pg_catalog's functions
    `names`, passing through to the real one (or answering `lies[name]`)."""
    lies = lies or {}
    rows = c.execute(
        """
        SELECT p.oid, p.proname, pg_get_function_arguments(p.oid), pg_get_function_identity_arguments(p.oid),
               pg_get_function_result(p.oid), p.proretset, p.pronargs, p.provariadic <> 0,
               p.prorettype = 'void'::regtype
          FROM pg_proc p
         WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname = ANY(%s) AND p.prokind = 'f'
           AND p.proallargtypes IS NULL AND p.prorettype <> 'record'::regtype
           AND NOT EXISTS (SELECT FROM unnest(p.proargtypes::oid[] || p.prorettype) t(oid)
                             JOIN pg_type ty ON ty.oid = t.oid
                            WHERE ty.typtype = 'p' AND ty.typname <> ALL(%s))
        """,
        (list(names), list(PSEUDO_OK)),
    ).fetchall()
    out = []
    for oid, name, args, ident, result, retset, nargs, variadic, void in rows:
        call_args = [f"${i + 1}" for i in range(nargs)]
        if variadic:
            call_args[-1] = "VARIADIC " + call_args[-1]
        call = f"pg_catalog.{name}({', '.join(call_args)})"
        label = f"{name}({ident})".replace("'", "''")
        if name in lies:
            body = f"RETURN {lies[name]};"
        elif retset:
            body = f"RETURN QUERY SELECT * FROM {call};"
        elif void:
            body = f"PERFORM {call}; RETURN;"
        else:
            body = f"RETURN {call};"
        out.append(
            f"CREATE FUNCTION sec_s.{name}({args}) RETURNS {result} LANGUAGE plpgsql AS "
            f"$f$BEGIN PERFORM sec_s.hit('{label}'); {body} END$f$"
        )
    assert out, names
    return out


def catalog_operator_shadows(c, types, lies=None):
    """Look-alikes with the exact signatures of every pg_catalog operator
    whose operands include one of `types`, passing through (or lying)."""
    lies = lies or {}
    rows = c.execute(
        """
        SELECT o.oid, o.oprname, o.oprkind,
               CASE WHEN o.oprleft <> 0 THEN quote_ident(ln.nspname) || '.' || quote_ident(lt.typname) END,
               quote_ident(rn.nspname) || '.' || quote_ident(rt.typname),
               quote_ident(xn.nspname) || '.' || quote_ident(xt.typname),
               p.proname, lt.typname, rt.typname
          FROM pg_operator o
          JOIN pg_proc p ON p.oid = o.oprcode
          LEFT JOIN pg_type lt ON lt.oid = o.oprleft LEFT JOIN pg_namespace ln ON ln.oid = lt.typnamespace
          JOIN pg_type rt ON rt.oid = o.oprright JOIN pg_namespace rn ON rn.oid = rt.typnamespace
          JOIN pg_type xt ON xt.oid = o.oprresult JOIN pg_namespace xn ON xn.oid = xt.typnamespace
         WHERE o.oprnamespace = 'pg_catalog'::regnamespace
           AND (o.oprleft = ANY(%s::regtype[]) OR o.oprright = ANY(%s::regtype[]))
           AND (lt.typtype IS DISTINCT FROM 'p' OR lt.typname = ANY(%s))
           AND (rt.typtype <> 'p' OR rt.typname = ANY(%s))
           AND (xt.typtype <> 'p' OR xt.typname = ANY(%s))
        """,
        (list(types), list(types), list(PSEUDO_OK), list(PSEUDO_OK), list(PSEUDO_OK)),
    ).fetchall()
    out = []
    for oid, op, kind, left, right, result, proname, ln_, rn_ in rows:
        label = f"{op}({ln_ or ''}, {rn_})".replace("'", "''")
        answer = lies.get((op, ln_, rn_))
        if kind == "b":
            params = f"{left}, {right}"
            body = answer or f"pg_catalog.{proname}($1, $2)"
            opargs = f"LEFTARG = {left}, RIGHTARG = {right}"
        else:
            params = right
            body = answer or f"pg_catalog.{proname}($1)"
            opargs = f"RIGHTARG = {right}"
        fn = f"sec_s.op_{oid}"
        out.append(
            f"CREATE FUNCTION {fn}({params}) RETURNS {result} LANGUAGE plpgsql AS "
            f"$f$BEGIN PERFORM sec_s.hit('{label}'); RETURN {body}; END$f$"
        )
        out.append(f"CREATE OPERATOR sec_s.{op} ({opargs}, FUNCTION = {fn})")
    assert out, types
    return out


def domains(schema, types, check):
    return [f"CREATE DOMAIN {schema}.{t} AS pg_catalog.{t} CHECK ({check}(VALUE))" for t in types]


PWN = ["CREATE FUNCTION pg_temp.pwn(anyelement) RETURNS pg_catalog.bool LANGUAGE plpgsql AS "
       "$f$BEGIN RETURN sec_s.hit('pg_temp.pwn'); END$f$"]
DOMAIN_TYPES = ["text", "jsonb", "json", "timestamptz", "int8", "int4", "bool", "oid", "name", "bytea",
                "regclass", "regproc", "regprocedure", "regtype", "regrole", "regnamespace", "uuid", "float8"]
FIVE_YEARS = "pg_catalog.now() OPERATOR(pg_catalog.+) '5 years'::pg_catalog.interval"
CATALOG_VIEWS = ["pg_class", "pg_namespace", "pg_extension", "pg_proc", "pg_roles", "pg_auth_members",
                 "pg_trigger", "pg_policy", "pg_attribute", "pg_type", "pg_index", "pg_settings",
                 "pg_stat_activity", "pg_locks", "pg_operator", "pg_constraint", "pg_depend"]
FLUX_TABLES = ["features", "plans", "grants", "tenants", "addons", "addon_grants", "tenant_addons",
               "overrides", "flags", "flag_lists", "usage", "rate_state", "usage_keys", "api_keys",
               "audit_log", "limit_locks", "billing_prices", "billing_events"]

AGGREGATES = [
    "CREATE FUNCTION sec_s.agg_count(pg_catalog.int8) RETURNS pg_catalog.int8 LANGUAGE plpgsql AS $f$BEGIN PERFORM sec_s.hit('count(*)'); RETURN 0; END$f$",
    "CREATE AGGREGATE sec_s.count(*) (SFUNC = sec_s.agg_count, STYPE = pg_catalog.int8, INITCOND = '0')",
    "CREATE FUNCTION sec_s.agg_count_any(pg_catalog.int8, anyelement) RETURNS pg_catalog.int8 LANGUAGE plpgsql AS $f$BEGIN PERFORM sec_s.hit('count(anyelement)'); RETURN 0; END$f$",
    "CREATE AGGREGATE sec_s.count(anyelement) (SFUNC = sec_s.agg_count_any, STYPE = pg_catalog.int8, INITCOND = '0')",
    "CREATE FUNCTION sec_s.agg_sum8(pg_catalog.int8, pg_catalog.int8) RETURNS pg_catalog.int8 LANGUAGE plpgsql AS $f$BEGIN PERFORM sec_s.hit('sum(bigint)'); RETURN 0; END$f$",
    "CREATE AGGREGATE sec_s.sum(pg_catalog.int8) (SFUNC = sec_s.agg_sum8, STYPE = pg_catalog.int8, INITCOND = '0')",
    "CREATE FUNCTION sec_s.agg_sum4(pg_catalog.int8, pg_catalog.int4) RETURNS pg_catalog.int8 LANGUAGE plpgsql AS $f$BEGIN PERFORM sec_s.hit('sum(integer)'); RETURN 0; END$f$",
    "CREATE AGGREGATE sec_s.sum(pg_catalog.int4) (SFUNC = sec_s.agg_sum4, STYPE = pg_catalog.int8, INITCOND = '0')",
    "CREATE FUNCTION sec_s.agg_ts(pg_catalog.timestamptz, pg_catalog.timestamptz) RETURNS pg_catalog.timestamptz LANGUAGE plpgsql AS $f$BEGIN PERFORM sec_s.hit('max/min(timestamptz)'); RETURN $2; END$f$",
    "CREATE AGGREGATE sec_s.max(pg_catalog.timestamptz) (SFUNC = sec_s.agg_ts, STYPE = pg_catalog.timestamptz)",
    "CREATE AGGREGATE sec_s.min(pg_catalog.timestamptz) (SFUNC = sec_s.agg_ts, STYPE = pg_catalog.timestamptz)",
    "CREATE FUNCTION sec_s.agg_i8(pg_catalog.int8, pg_catalog.int8) RETURNS pg_catalog.int8 LANGUAGE plpgsql AS $f$BEGIN PERFORM sec_s.hit('max/min(bigint)'); RETURN 0; END$f$",
    "CREATE AGGREGATE sec_s.max(pg_catalog.int8) (SFUNC = sec_s.agg_i8, STYPE = pg_catalog.int8)",
    "CREATE AGGREGATE sec_s.min(pg_catalog.int8) (SFUNC = sec_s.agg_i8, STYPE = pg_catalog.int8)",
    "CREATE FUNCTION sec_s.agg_text(pg_catalog.text, pg_catalog.text, pg_catalog.text) RETURNS pg_catalog.text LANGUAGE plpgsql AS $f$BEGIN PERFORM sec_s.hit('string_agg(text, text)'); RETURN ''; END$f$",
    "CREATE AGGREGATE sec_s.string_agg(pg_catalog.text, pg_catalog.text) (SFUNC = sec_s.agg_text, STYPE = pg_catalog.text)",
    "CREATE FUNCTION sec_s.agg_bool(pg_catalog.bool, pg_catalog.bool) RETURNS pg_catalog.bool LANGUAGE plpgsql AS $f$BEGIN PERFORM sec_s.hit('bool_and/bool_or(boolean)'); RETURN true; END$f$",
    "CREATE AGGREGATE sec_s.bool_and(pg_catalog.bool) (SFUNC = sec_s.agg_bool, STYPE = pg_catalog.bool)",
    "CREATE AGGREGATE sec_s.bool_or(pg_catalog.bool) (SFUNC = sec_s.agg_bool, STYPE = pg_catalog.bool)",
    "CREATE FUNCTION sec_s.agg_arr(anyarray, anyelement) RETURNS anyarray LANGUAGE plpgsql AS $f$BEGIN PERFORM sec_s.hit('array_agg(anyelement)'); RETURN $1; END$f$",
    "CREATE AGGREGATE sec_s.array_agg(anyelement) (SFUNC = sec_s.agg_arr, STYPE = anyarray)",
    "CREATE FUNCTION sec_s.agg_jsonb(pg_catalog.jsonb, anyelement) RETURNS pg_catalog.jsonb LANGUAGE plpgsql AS $f$BEGIN PERFORM sec_s.hit('jsonb_agg(anyelement)'); RETURN '[]'; END$f$",
    "CREATE AGGREGATE sec_s.jsonb_agg(anyelement) (SFUNC = sec_s.agg_jsonb, STYPE = pg_catalog.jsonb)",
]

SPECIFIC_OVERLOADS = [
    "CREATE FUNCTION sec_s.to_jsonb(record) RETURNS pg_catalog.jsonb LANGUAGE plpgsql AS $f$BEGIN PERFORM sec_s.hit('to_jsonb(record)'); RETURN '{}'; END$f$",
    "CREATE FUNCTION sec_s.to_json(record) RETURNS pg_catalog.json LANGUAGE plpgsql AS $f$BEGIN PERFORM sec_s.hit('to_json(record)'); RETURN '{}'; END$f$",
    "CREATE FUNCTION sec_s.unnest(pg_catalog.text[]) RETURNS SETOF pg_catalog.text LANGUAGE plpgsql AS $f$BEGIN PERFORM sec_s.hit('unnest(text[])'); RETURN; END$f$",
    "CREATE FUNCTION sec_s.unnest(pg_catalog.int8[]) RETURNS SETOF pg_catalog.int8 LANGUAGE plpgsql AS $f$BEGIN PERFORM sec_s.hit('unnest(bigint[])'); RETURN; END$f$",
    "CREATE FUNCTION sec_s.array_length(pg_catalog.text[], pg_catalog.int4) RETURNS pg_catalog.int4 LANGUAGE plpgsql AS $f$BEGIN PERFORM sec_s.hit('array_length(text[], int)'); RETURN 0; END$f$",
    "CREATE FUNCTION sec_s.format(pg_catalog.text, pg_catalog.text) RETURNS pg_catalog.text LANGUAGE plpgsql AS $f$BEGIN PERFORM sec_s.hit('format(text, text)'); RETURN $1; END$f$",
    "CREATE FUNCTION sec_s.concat(pg_catalog.text, pg_catalog.text) RETURNS pg_catalog.text LANGUAGE plpgsql AS $f$BEGIN PERFORM sec_s.hit('concat(text, text)'); RETURN $1; END$f$",
    "CREATE FUNCTION sec_s.coalesce_(pg_catalog.text) RETURNS pg_catalog.text LANGUAGE sql AS $f$SELECT $1$f$",
] + [
    f"CREATE FUNCTION sec_s.{f}({', '.join(['pg_catalog.text'] * n)}) RETURNS pg_catalog.{r} LANGUAGE plpgsql AS "
    f"$f$BEGIN PERFORM sec_s.hit('{f}(text x {n})'); RETURN '{{}}'; END$f$"
    for f, r in (("json_build_object", "json"), ("jsonb_build_object", "jsonb"))
    for n in (2, 4, 6, 8, 10)
]

LYING_TEXT_OPS = {("=", "text", "text"): "false", ("<>", "text", "text"): "true"}
LYING_TEXT_OPS_TRUE = {("=", "text", "text"): "true", ("<>", "text", "text"): "false"}
LYING_TIME_OPS = {
    ("<", "timestamptz", "timestamptz"): "true", ("<=", "timestamptz", "timestamptz"): "true",
    (">", "timestamptz", "timestamptz"): "false", (">=", "timestamptz", "timestamptz"): "false",
    ("=", "timestamptz", "timestamptz"): "false",
    ("+", "timestamptz", "interval"): "$1", ("-", "timestamptz", "interval"): "$1",
    ("-", "timestamptz", "timestamptz"): "'0'::pg_catalog.interval",
}
LYING_INT_OPS = {
    ("+", "int8", "int8"): "0", ("-", "int8", "int8"): "0", ("*", "int8", "int8"): "0",
    ("<", "int8", "int8"): "true", ("<=", "int8", "int8"): "true", (">", "int8", "int8"): "false",
    (">=", "int8", "int8"): "false", ("=", "int8", "int8"): "false",
    ("<", "int4", "int4"): "true", (">", "int4", "int4"): "false", ("=", "int4", "int4"): "false",
}
LYING_JSON_OPS = {("->>", "jsonb", "text"): "NULL", ("->", "jsonb", "text"): "NULL", ("-", "jsonb", "text"): "$1",
                  ("?", "jsonb", "text"): "true", ("=", "jsonb", "jsonb"): "true", ("=", "bytea", "bytea"): "true"}

# An unqualified statement that the kit's look-alikes do catch in the
# attacker's own session: run after the calls under test, it proves the
# kit was live there (so a test that finds nothing is not vacuous).
CANARIES = {
    "issue_pg_temp_text_domain": "SELECT 'x'::text",
    "pg_temp_domains": "SELECT 'x'::text, '{}'::jsonb",
    "pg_temp_domains_rigged": "SELECT 'x'::text, '{}'::jsonb",
    "schema_domains": "SELECT 'x'::text",
    "pg_temp_functions": "SELECT pg_temp.now()",
    "time_functions": "SELECT now()",
    "json_functions": "SELECT to_jsonb(1)",
    "set_functions": "SELECT * FROM unnest(ARRAY[1])",
    "setting_functions": "SELECT current_setting('search_path')",
    "role_functions": "SELECT pg_has_role('postgres', 'USAGE')",
    "lock_hash_functions": "SELECT md5('x')",
    "text_functions": "SELECT lower('X'::pg_catalog.text)",
    "misc_functions": "SELECT current_query()",
    "aggregates": "SELECT count(*) FROM (VALUES (1)) v",
    "specific_overloads_default_path": "SELECT to_jsonb(ROW(1))",
    "operators_text": "SELECT 'a'::pg_catalog.text = 'b'::pg_catalog.text",
    "operators_integers": "SELECT 1::pg_catalog.int8 + 1::pg_catalog.int8",
    "operators_numeric": "SELECT 1.5 + 1.5",
    "operators_time": "SELECT pg_catalog.now() > pg_catalog.now()",
    "operators_json": "SELECT '{}'::pg_catalog.jsonb -> 'a'",
    "operators_misc": "SELECT true = true",
    "operators_arrays": "SELECT ARRAY[1] = ARRAY[1]",
    "lying_text_eq_false": "SELECT 'a'::pg_catalog.text = 'a'",
    "lying_text_eq_true": "SELECT 'a'::pg_catalog.text = 'a'",
    "lying_time_operators": "SELECT pg_catalog.now() < pg_catalog.now()",
    "lying_int_operators": "SELECT 1::pg_catalog.int8 + 1::pg_catalog.int8",
    "lying_json_bytea_operators": "SELECT '{}'::pg_catalog.jsonb -> 'a'",
    "temp_views_like_catalogs": "SELECT 1 FROM pg_class LIMIT 1",
    "temp_views_like_flux_tables": "SELECT * FROM tenants",
    "schema_views_like_catalogs": "SELECT 1 FROM pg_class LIMIT 1",
    "casts_from_app_types": "SELECT 'x'::text",
}


def assert_kit_live(db, c, name):
    """The canary trips the kit in this session (see CANARIES)."""
    before = hits(db)[0]
    try:
        c.execute(CANARIES[name]).fetchall()
    except psycopg.Error:
        pass
    assert hits(db)[0] > before, f"kit {name} was not live in this session: its canary ran nothing"


def kit(name, c):
    """(path, statements) of a look-alike kit, made with the app's connection `c`."""
    def fns(names, lies=None, extra=()):
        return lambda: catalog_function_shadows(c, names, lies) + list(extra)

    def ops(types, lies=None):
        return lambda: catalog_operator_shadows(c, types, lies)

    def const(stmts):
        return lambda: stmts

    kits = {
        # The issue's replay, as written: the default search_path.
        "issue_pg_temp_text_domain": (DEFAULT, const(PWN + domains("pg_temp", ["text"], "pg_temp.pwn"))),
        "pg_temp_domains": (DEFAULT, const(PWN + domains("pg_temp", DOMAIN_TYPES, "pg_temp.pwn"))),
        "pg_temp_domains_rigged": (RIGGED, const(PWN + domains("pg_temp", DOMAIN_TYPES, "pg_temp.pwn"))),
        "schema_domains": (RIGGED, const(domains("sec_s", DOMAIN_TYPES, "sec_s.pwn"))),
        # Functions in pg_temp are never found unqualified; check anyway.
        "pg_temp_functions": (RIGGED, lambda: [x.replace("sec_s.", "pg_temp.", 1) for x in
                                               fns(["now", "to_jsonb", "current_setting", "lower", "pg_has_role", "hashtextextended"],
                                                   {"now": FIVE_YEARS, "pg_has_role": "true"})()]),
        "time_functions": (RIGGED, fns(["now", "clock_timestamp", "statement_timestamp", "transaction_timestamp",
                                        "timeofday", "date_trunc", "date_part", "extract", "date_bin", "age",
                                        "to_char", "to_timestamp", "make_interval", "justify_interval",
                                        "make_timestamptz", "isfinite", "timezone"],
                                       {"now": FIVE_YEARS, "clock_timestamp": FIVE_YEARS,
                                        "statement_timestamp": FIVE_YEARS, "transaction_timestamp": FIVE_YEARS})),
        "json_functions": (RIGGED, fns(["to_jsonb", "to_json", "row_to_json", "jsonb_extract_path_text",
                                        "jsonb_extract_path", "jsonb_typeof", "jsonb_set", "jsonb_strip_nulls",
                                        "jsonb_object_keys", "jsonb_array_elements_text", "jsonb_array_elements",
                                        "jsonb_array_length", "jsonb_populate_record", "jsonb_pretty", "json_typeof",
                                        "jsonb_build_array", "to_tsvector"],
                                       {"to_jsonb": "'{}'", "to_json": "'{}'"}, SPECIFIC_OVERLOADS)),
        "set_functions": (RIGGED, fns(["unnest", "generate_series", "regexp_split_to_table", "string_to_table",
                                       "generate_subscripts", "regexp_matches"])),
        "setting_functions": (RIGGED, fns(["current_setting", "set_config", "current_schemas", "current_database",
                                           "pg_backend_pid", "version", "inet_client_addr"])),
        "role_functions": (RIGGED, fns(["pg_has_role", "has_table_privilege", "has_function_privilege",
                                        "has_schema_privilege", "has_parameter_privilege", "has_column_privilege",
                                        "has_any_column_privilege", "has_sequence_privilege", "has_database_privilege",
                                        "to_regrole", "pg_get_userbyid", "row_security_active"],
                                       {n: "true" for n in ["pg_has_role", "has_table_privilege", "has_function_privilege",
                                                            "has_schema_privilege", "has_parameter_privilege",
                                                            "has_column_privilege", "has_any_column_privilege",
                                                            "has_sequence_privilege", "has_database_privilege"]})),
        "lock_hash_functions": (RIGGED, fns(["hashtext", "hashtextextended", "pg_advisory_xact_lock",
                                             "pg_advisory_lock", "pg_try_advisory_xact_lock", "pg_advisory_unlock",
                                             "md5", "sha256", "sha224", "encode", "decode", "gen_random_uuid", "random",
                                             "pg_sleep"])),
        "text_functions": (RIGGED, fns(["lower", "upper", "btrim", "ltrim", "rtrim", "length", "char_length",
                                        "octet_length", "substr", "substring", "strpos", "position", "left", "right",
                                        "replace", "split_part", "quote_ident", "quote_literal", "quote_nullable",
                                        "format", "regexp_replace", "regexp_match", "starts_with", "textcat",
                                        "texteq", "initcap", "translate", "string_to_array", "array_to_string",
                                        "convert_from", "convert_to", "lpad", "rpad", "repeat", "reverse"])),
        "misc_functions": (RIGGED, fns(["current_query", "txid_current", "pg_current_xact_id", "pg_notify",
                                        "nextval", "currval", "setval", "format_type", "pg_get_expr", "to_regclass",
                                        "to_regprocedure", "to_regproc", "to_regtype", "to_regnamespace",
                                        "obj_description", "array_length", "cardinality", "array_position",
                                        "array_append", "array_cat", "array_remove", "num_nonnulls",
                                        "pg_relation_size", "pg_get_indexdef", "pg_typeof", "pg_column_size",
                                        "int8", "int4", "text", "numeric", "float8", "bool", "oid", "abs", "round",
                                        "ceil", "floor", "greatest", "least", "pg_catalog_placeholder"],
                                       {"current_query": "'COPY x FROM stdin'"})),
        "aggregates": (RIGGED, const(AGGREGATES)),
        "specific_overloads_default_path": (SPECIFIC, const(SPECIFIC_OVERLOADS)),
        "operators_text": (RIGGED, ops(["text", "name", "bpchar", "varchar", '"char"'])),
        "operators_integers": (RIGGED, ops(["int8", "int4", "int2"])),
        "operators_numeric": (RIGGED, ops(["numeric", "float8", "float4"])),
        "operators_time": (RIGGED, ops(["timestamptz", "timestamp", "date", "interval", "time"])),
        "operators_json": (RIGGED, ops(["jsonb", "json"])),
        "operators_misc": (RIGGED, ops(["bytea", "oid", "bool", "uuid", "tid", "xid", "regclass", "oidvector"])),
        "operators_arrays": (RIGGED, ops(["anyarray", "anycompatiblearray", "anyelement", "anycompatible",
                                          "_text", "_int8"])),
        "lying_text_eq_false": (RIGGED, ops(["text"], LYING_TEXT_OPS)),
        "lying_text_eq_true": (RIGGED, ops(["text"], LYING_TEXT_OPS_TRUE)),
        "lying_time_operators": (RIGGED, ops(["timestamptz"], LYING_TIME_OPS)),
        "lying_int_operators": (RIGGED, ops(["int8", "int4"], LYING_INT_OPS)),
        "lying_json_bytea_operators": (RIGGED, ops(["jsonb", "bytea"], LYING_JSON_OPS)),
        # Relations are looked up in pg_temp first unless the path says otherwise.
        "temp_views_like_catalogs": (DEFAULT, const([
            f"CREATE TEMP VIEW {v} AS SELECT * FROM pg_catalog.{v} WHERE sec_s.hit('view pg_temp.{v}')"
            for v in CATALOG_VIEWS])),
        "temp_views_like_flux_tables": (DEFAULT, const([
            f"CREATE TEMP VIEW {t} AS SELECT NULL::pg_catalog.text AS x WHERE sec_s.hit('view pg_temp.{t}')"
            for t in FLUX_TABLES])),
        "schema_views_like_catalogs": (RIGGED, const([
            f"CREATE VIEW sec_s.{v} AS SELECT * FROM pg_catalog.{v} WHERE sec_s.hit('view sec_s.{v}')"
            for v in CATALOG_VIEWS if v not in ("pg_settings",)]
            + ["GRANT SELECT ON ALL TABLES IN SCHEMA sec_s TO PUBLIC"])),
        # A cast from the app's own domain (PostgreSQL ignores casts from
        # domains) and from its own type to json.
        "casts_from_app_types": (RIGGED, const([
            "CREATE DOMAIN sec_s.tid AS pg_catalog.text CHECK (sec_s.hit('domain sec_s.tid'))",
            "CREATE FUNCTION sec_s.tid_json(sec_s.tid) RETURNS pg_catalog.jsonb LANGUAGE plpgsql AS "
            "$f$BEGIN PERFORM sec_s.hit('cast tid -> jsonb'); RETURN '{}'; END$f$",
            "CREATE CAST (sec_s.tid AS pg_catalog.jsonb) WITH FUNCTION sec_s.tid_json(sec_s.tid)",
            "CREATE TYPE sec_s.mood AS ENUM ('acme', 'globex')",
            "CREATE FUNCTION sec_s.mood_text(sec_s.mood) RETURNS pg_catalog.text LANGUAGE plpgsql AS "
            "$f$BEGIN PERFORM sec_s.hit('cast mood -> text'); RETURN 'globex'; END$f$",
            "CREATE CAST (sec_s.mood AS pg_catalog.text) WITH FUNCTION sec_s.mood_text(sec_s.mood) AS IMPLICIT",
            "CREATE DOMAIN pg_temp.text AS sec_s.tid",
        ])),
    }
    path, make = kits[name]
    return path, make(), CANARIES[name]


APP_KITS = ["issue_pg_temp_text_domain", "pg_temp_domains", "pg_temp_domains_rigged", "schema_domains",
            "pg_temp_functions", "time_functions", "json_functions", "set_functions", "setting_functions",
            "role_functions", "lock_hash_functions", "text_functions", "misc_functions", "aggregates",
            "specific_overloads_default_path", "operators_text", "operators_integers", "operators_numeric",
            "operators_time", "operators_json", "operators_misc", "operators_arrays", "lying_text_eq_false",
            "lying_text_eq_true", "lying_time_operators", "lying_int_operators", "lying_json_bytea_operators",
            "temp_views_like_catalogs", "temp_views_like_flux_tables", "schema_views_like_catalogs",
            "casts_from_app_types"]
# An admin's session has no app objects in pg_temp: only schemas matter.
ADMIN_KITS = [k for k in APP_KITS if not k.startswith(("issue_", "pg_temp_", "temp_"))]


def create_kit_on(a, name):
    """Create the kit with the app's connection `a`; returns its path."""
    made = 0
    path, stmts, _ = kit(name, a)
    for s in stmts:
        try:
            a.execute(s)
            made += 1
        except psycopg.Error as e:
            # A few catalog signatures cannot be copied (e.g. a return type
            # plpgsql cannot handle); the rest still count.
            assert e.sqlstate not in ("XX000",), (s, e)
    assert made >= max(1, len(stmts) // 2), f"kit {name}: only {made} of {len(stmts)} objects created"
    return path


def create_kit(db, app, name):
    with login(db, app) as a:
        return create_kit_on(a, name)


def make_keys(db):
    """(valid, revoked, expired) API keys of acme."""
    with connect(db) as c:
        valid = c.execute("SELECT flux_create_api_key('acme', 'app')").fetchone()[0]
        revoked = c.execute("SELECT flux_create_api_key('acme', 'old')").fetchone()[0]
        c.execute("SELECT flux_revoke_api_key(id) FROM flux.api_keys WHERE name = 'old'")
        c.execute("SELECT set_config('flux.now', %s, false)", (time.strftime("%Y-%m-%d %H:%M:%S+00", time.gmtime(time.time() - 3 * 86400)),))
        expired = c.execute("SELECT flux_create_api_key('acme', 'ci', expires_at => now() - interval '1 day')").fetchone()[0]
    return valid, revoked, expired


def stripe_header(payload, secret, t=None):
    t = int(t or time.time())
    sig = hmac.new(secret.encode(), f"{t}.{payload}".encode(), hashlib.sha256).hexdigest()
    return f"t={t},v1={sig}"


def app_battery(keys):
    """What an application role acting for acme calls: (label, sql, params)."""
    valid, revoked, expired = keys
    payload = '{"id": "evt_1"}'
    good = stripe_header(payload, "whsec_test")
    bad = stripe_header(payload, "whsec_other")
    d = 'allowed, reason, plan, "limit", used, remaining'
    return [
        ("current_tenant", "SELECT flux_current_tenant()", None),
        ("checks", "SELECT flux_check('acme', 'reports'), flux_check('reports'), flux_check('acme', 'nope'), "
                   "flux_check('globex', 'reports'), flux_check('acme', 'seats'), flux_check('acme', 'sso'), "
                   "flux_check('nobody', 'reports')", None),
        ("decide_calls", f"SELECT {d}, message FROM flux_decide('acme', 'calls')", None),
        ("decide_seats", f"SELECT {d} FROM flux_decide('acme', 'seats')", None),
        ("decide_subject", "SELECT allowed, reason FROM flux_decide('acme', 'export', 'user-1')", None),
        ("decide_not_in_plan", "SELECT allowed, reason, upgrade_plans, message FROM flux_decide('acme', 'sso')", None),
        ("decide_unknown", "SELECT allowed, reason FROM flux_decide('acme', 'nope')", None),
        ("entitlements", 'SELECT feature, allowed, reason, plan, "limit" FROM flux_entitlements(\'acme\')', None),
        ("value", "SELECT flux_value('acme', 'export')", None),
        ("usage", "SELECT flux_usage('acme', 'calls'), flux_usage('acme', 'seats')", None),
        ("consume", f"SELECT {d} FROM flux_consume('acme', 'calls', 2)", None),
        ("consume_key", f"SELECT {d} FROM flux_consume('acme', 'calls', 1, 'k1')", None),
        ("consume_key_again", f"SELECT {d} FROM flux_consume('acme', 'calls', 1, 'k1')", None),
        ("consume_key_other_amount", f"SELECT {d} FROM flux_consume('acme', 'calls', 5, 'k1')", None),
        ("consume_over", f"SELECT {d} FROM flux_consume('acme', 'calls', 1000)", None),
        ("consume_bad_amount", f"SELECT {d} FROM flux_consume('acme', 'calls', -1)", None),
        ("consume_seats", f"SELECT {d} FROM flux_consume('acme', 'seats', 2)", None),
        ("release", "SELECT flux_release('acme', 'seats')", None),
        ("rate", "SELECT allowed, reason FROM flux_consume('acme', 'rate')", None),
        ("rate_again", "SELECT allowed, reason FROM flux_consume('acme', 'rate')", None),
        ("usage_after", "SELECT flux_usage('acme', 'calls'), flux_usage('acme', 'seats')", None),
        ("other_decide", "SELECT allowed FROM flux_decide('globex', 'reports')", None),
        ("other_consume", "SELECT allowed FROM flux_consume('globex', 'calls')", None),
        ("other_release", "SELECT flux_release('globex', 'seats')", None),
        ("authenticate", "SELECT flux_authenticate(%s)", (valid,)),
        ("after_authenticate", "SELECT flux_current_tenant()", None),
        ("authenticate_revoked", "SELECT flux_authenticate(%s)", (revoked,)),
        ("authenticate_expired", "SELECT flux_authenticate(%s)", (expired,)),
        ("authenticate_garbage", "SELECT flux_authenticate('flux_000000000000_" + "0" * 64 + "')", None),
        ("stripe_signature", "SELECT flux_verify_stripe_signature(%s, %s, 'whsec_test'), "
                             "flux_verify_stripe_signature(%s, %s, 'whsec_test')", (payload, good, payload, bad)),
        ("docs_select", "SELECT id, tenant_id, title FROM sec_docs ORDER BY id", None),
        ("docs_insert", "INSERT INTO sec_docs VALUES (100, 'acme', 'x') RETURNING id", None),
        ("docs_insert_other", "INSERT INTO sec_docs VALUES (101, 'globex', 'x') RETURNING id", None),
        ("docs_update", "UPDATE sec_docs SET title = 'y' RETURNING id, tenant_id", None),
        ("docs_move", "UPDATE sec_docs SET tenant_id = 'globex' RETURNING id", None),
        ("docs_delete", "DELETE FROM sec_docs RETURNING id, tenant_id", None),
        ("notes_policy", "SELECT id, tenant_id FROM sec_notes ORDER BY id", None),
        ("member_1", "INSERT INTO sec_members VALUES ('acme', 'm1') RETURNING name", None),
        ("member_2", "INSERT INTO sec_members VALUES ('acme', 'm2') RETURNING name", None),
        ("member_3", "INSERT INTO sec_members VALUES ('acme', 'm3') RETURNING name", None),
        ("member_4", "INSERT INTO sec_members VALUES ('acme', 'm4') RETURNING name", None),
        ("member_other_tenant", "INSERT INTO sec_members VALUES ('globex', 'g1') RETURNING name", None),
        ("members_move_in", "UPDATE sec_members SET tenant_id = 'acme' RETURNING name", None),
        ("whoami", "SELECT current_user", None),
    ]


def run_battery(c, battery):
    """Each call in its own savepoint, the whole rolled back: [(label, state, rows)]."""
    out = []
    with c.transaction(force_rollback=True):
        for label, q, p in battery:
            try:
                with c.transaction():
                    cur = c.execute(q, p)
                    rows = cur.fetchall() if cur.description else cur.rowcount
                out.append((label, "ok", rows))
            except psycopg.Error as e:
                out.append((label, e.sqlstate, None))
    return out


def assert_same(baseline, attacked):
    diffs = [(b, a) for b, a in zip(baseline, attacked) if b != a]
    assert not diffs, "results changed under the look-alikes:\n" + "\n".join(f"  {b}\n  {a}" for b, a in diffs)


# ---------------------------------------------------------------------------
# 1. The owner


def test_owner_is_flux_owner_a_nologin_non_superuser_with_no_members(fresh_db, roles):
    app = roles.make("app")
    ops = roles.make("ops", member_of=["flux_admin"])
    svc = roles.make("svc", member_of=["flux_service"])
    with connect(fresh_db) as c:
        owner = c.execute("""SELECT r.rolname, r.rolsuper, r.rolcanlogin, r.rolcreaterole, r.rolcreatedb, r.rolreplication
                               FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner WHERE n.nspname = 'flux'""").fetchone()
        assert owner == ("flux_owner", False, False, False, False, False), owner
        bad = c.execute("""SELECT c.oid::regclass::text, c.relkind, r.rolname FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner
                            WHERE c.relnamespace = 'flux'::regnamespace AND c.relkind <> 'c'
                              AND (r.rolname <> 'flux_owner' OR r.rolsuper)""").fetchall()
        assert not bad, f"flux relations not owned by flux_owner: {bad}"
        kinds = {k for (k,) in c.execute("SELECT DISTINCT relkind::text FROM pg_class WHERE relnamespace = 'flux'::regnamespace")}
        assert {"r", "S", "i"} <= kinds, kinds
        bad = c.execute("""SELECT p.oid::regprocedure::text, r.rolname FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner
                            WHERE p.pronamespace = 'flux'::regnamespace AND p.proname LIKE '\\_%%'
                              AND (r.rolname <> 'flux_owner' OR r.rolsuper)""").fetchall()
        assert not bad, f"internal functions not owned by flux_owner: {bad}"
        # No superuser owns anything of the extension that runs as its owner.
        bad = c.execute("""SELECT p.oid::regprocedure::text, r.rolname, p.proconfig FROM pg_proc p
                             JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
                             JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'flux_entitlements'
                             JOIN pg_roles r ON r.oid = p.proowner
                            WHERE p.prosecdef""").fetchall()
        for name, who, config in bad:
            assert who == "flux_owner", (name, who)
            assert any(re.fullmatch(r'search_path="?pg_catalog"?,\s*"?pg_temp"?', x) for x in (config or [])), (name, config)
        # Nobody is flux_owner's member, and it is a member of nothing.
        assert c.execute("SELECT count(*) FROM pg_auth_members WHERE roleid = 'flux_owner'::regrole").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM pg_auth_members WHERE member = 'flux_owner'::regrole").fetchone()[0] == 0
        for r in ("flux_admin", "flux_service"):
            assert c.execute("SELECT rolsuper, rolcanlogin FROM pg_roles WHERE rolname = %s", (r,)).fetchone() == (False, False), r
        # The settings only flux_admin may set beside superusers.
        acl = c.execute("SELECT parname, paracl::text FROM pg_parameter_acl WHERE parname IN ('flux.now', 'flux.actor') ORDER BY 1").fetchall()
        assert [p for p, _ in acl] == ["flux.actor", "flux.now"] and all("flux_admin=s" in a for _, a in acl), acl
        assert not [a for _, a in acl if re.search(r"(^|[{,])=", a)], f"SET granted to PUBLIC: {acl}"
    for who in (app, ops, svc):
        with login(fresh_db, who) as a:
            assert sqlstate_of(a, "SET ROLE flux_owner") == "42501", who
            assert sqlstate_of(a, "SET SESSION AUTHORIZATION flux_owner") == "42501", who
        assert not rolsuper(fresh_db, who)


# ---------------------------------------------------------------------------
# 2. Internal functions, trigger functions


def test_no_internal_function_is_executable_by_an_application_role(fresh_db, roles):
    app = roles.make("app")
    with connect(fresh_db) as c:
        internal = c.execute("""SELECT p.oid, p.oid::regprocedure::text, p.prorettype = 'trigger'::regtype,
                                       coalesce(p.proacl::text, '(default: PUBLIC)')
                                  FROM pg_proc p WHERE p.pronamespace = 'flux'::regnamespace AND p.proname LIKE '\\_%%'
                                 ORDER BY 2""").fetchall()
        assert len(internal) > 20, internal
        executable = [name for oid, name, _, _ in internal
                      if c.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')", (app, oid)).fetchone()[0]]
        assert not executable, f"{len(executable)} internal functions executable by a role with no grants: {executable}"
        public = [(name, acl) for _, name, _, acl in internal if acl == "(default: PUBLIC)" or re.search(r"(^|[{,])=X", acl)]
        assert not public, f"internal functions granted to PUBLIC: {public}"
        # Anything in schema flux at all that PUBLIC may run is one of the
        # documented entry points (none are expected there).
        others = c.execute("""SELECT p.oid::regprocedure::text FROM pg_proc p
                               WHERE p.pronamespace = 'flux'::regnamespace AND p.proname NOT LIKE '\\_%%'
                                 AND has_function_privilege(%s, p.oid, 'EXECUTE')""", (app,)).fetchall()
        assert not others, others
        assert c.execute("SELECT to_regprocedure('flux._check_row_limit(oid, text, text, text)') IS NULL "
                         "OR NOT has_function_privilege(%s, 'flux._check_row_limit(oid, text, text, text)', 'EXECUTE')",
                         (app,)).fetchone()[0]
        # Non-NULL arguments: a STRICT call with a NULL constant is folded
        # away by the planner and never reaches the permission check.
        args = {oid: c.execute("SELECT string_agg(format('%%L::%%s', CASE WHEN t = 'bool'::regtype THEN 'true' "
                               "WHEN t IN ('int8'::regtype, 'int4'::regtype, 'numeric'::regtype, 'oid'::regtype) THEN '1' "
                               "WHEN t = 'timestamptz'::regtype THEN '2026-01-01' WHEN t = 'interval'::regtype THEN '1 day' "
                                   "WHEN t = 'text[]'::regtype THEN '{x}' "
                               "ELSE 'x' END, t::regtype), ', ' ORDER BY n) "
                               "FROM unnest((SELECT proargtypes::oid[] FROM pg_proc WHERE oid = %s)) WITH ORDINALITY u(t, n)",
                               (oid,)).fetchone()[0] or "" for oid, _, trig, _ in internal if not trig}
        names = {oid: c.execute("SELECT format('%%I.%%I', n.nspname, p.proname) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.oid = %s", (oid,)).fetchone()[0]
                 for oid in args}
    # And calling them directly is refused.
    with login(fresh_db, app) as a:
        for oid, argl in args.items():
            state = sqlstate_of(a, f"SELECT {names[oid]}({argl})")
            assert state == "42501", f"{names[oid]}({argl}): {state}"


def test_app_cannot_attach_flux_trigger_functions_to_its_own_tables(fresh_db, roles):
    """Finding 2: flux._audit on a temp table with an enum whose json cast is
    the app's function made the app superuser and forged the audit log."""
    app = roles.make("app")
    setup_catalogue(fresh_db)
    install_recorder(fresh_db, app)
    with connect(fresh_db) as c:
        before = c.execute("SELECT count(*) FROM flux.audit_log").fetchone()[0]
        triggers = [r for (r,) in c.execute("SELECT p.oid::regproc::text FROM pg_proc p WHERE p.pronamespace = 'flux'::regnamespace "
                                            "AND p.prorettype = 'trigger'::regtype ORDER BY 1")]
    assert "flux._audit" in triggers and len(triggers) > 5, triggers
    with connect(fresh_db) as listener:
        listener.execute("LISTEN flux_changes")
        with login(fresh_db, app) as a:
            a.execute("CREATE TYPE sec_s.mood AS ENUM ('pro')")
            a.execute("CREATE FUNCTION sec_s.mood_json(sec_s.mood) RETURNS json LANGUAGE plpgsql AS "
                      "$f$BEGIN PERFORM sec_s.hit('mood -> json'); RETURN '{\"plan\": \"enterprise\"}'; END$f$")
            a.execute("CREATE CAST (sec_s.mood AS json) WITH FUNCTION sec_s.mood_json(sec_s.mood)")
            for table in ("pg_temp.forged", "sec_s.forged"):
                a.execute(f"CREATE TABLE {table} (id text, tenant text, plan sec_s.mood)")
                for fn in triggers:
                    for timing in ("BEFORE", "AFTER"):
                        e = error_of(a, f"CREATE TRIGGER t AFTER INSERT OR UPDATE OR DELETE ON {table} "
                                        f"FOR EACH ROW EXECUTE FUNCTION {fn}('id')".replace("AFTER", timing, 1))
                        assert e.sqlstate == "42501", (fn, table, e)
                    e = error_of(a, f"CREATE TRIGGER t AFTER INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {fn}()")
                    assert e.sqlstate == "42501", (fn, table, e)
                a.execute(f"INSERT INTO {table} VALUES ('acme', 'acme', 'pro')")
            # A policy or a column default calling them is refused as well.
            # (PostgreSQL checks EXECUTE when the default is evaluated.)
            if sqlstate_of(a, "CREATE TABLE sec_s.t2 (x text DEFAULT flux._audit())") == "ok":
                assert sqlstate_of(a, "INSERT INTO sec_s.t2 DEFAULT VALUES") == "42501"
        assert_nothing_ran(fresh_db, a)
        time.sleep(0.2)
        listener.execute("SELECT 1")
        assert not list(listener.notifies(timeout=0.5, stop_after=1)), "forged NOTIFY flux_changes"
    with connect(fresh_db) as c:
        assert c.execute("SELECT count(*) FROM flux.audit_log").fetchone()[0] == before
    assert not rolsuper(fresh_db, app)


def flux_triggers(db):
    """(trigger function, table, timing, level, arguments) of every trigger flux puts on its tables."""
    with connect(db) as c:
        rows = c.execute("""
            SELECT t.tgfoid::regproc::text, c.relname::text,
                   CASE WHEN t.tgtype & 2 = 2 THEN 'BEFORE' ELSE 'AFTER' END,
                   CASE WHEN t.tgtype & 1 = 1 THEN 'ROW' ELSE 'STATEMENT' END,
                   pg_get_triggerdef(t.oid)
              FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
             WHERE c.relnamespace = 'flux'::regnamespace AND NOT t.tgisinternal
             ORDER BY 1, 2""").fetchall()
    out = []
    for fn, table, timing, level, definition in rows:
        args = re.search(r"EXECUTE FUNCTION \S+?\((.*)\)$", definition).group(1)
        out.append((fn, table, timing, level, args))
    return out


def test_flux_trigger_functions_refuse_tables_that_are_not_theirs(fresh_db):
    """Even a superuser who attaches a flux trigger function (with its own
    arguments) to a copy of the flux table it belongs to gets a refusal
    and no audit row: 'a trigger function refuses to run on a table that
    is not its own'."""
    setup_catalogue(fresh_db)
    with connect(fresh_db) as c:
        c.execute("""SELECT flux_define_addon('pack'); SELECT flux_grant_addon('pack', 'seats', 2);
                     SELECT flux_attach_addon('acme', 'pack', 1); SELECT flux_override('acme', 'sso');
                     SELECT flux_set_flag('reports'); SELECT flux_flag_allow('reports', 'acme');
                     SELECT flux_map_price('price_pro', 'pro'); SELECT flux_create_api_key('acme', 'x');
                     SELECT flux_consume('acme', 'calls'); SELECT flux_consume('acme', 'rate');
                     SELECT flux_consume('acme', 'calls', 1, 'k');""")
    triggers = flux_triggers(fresh_db)
    assert len(triggers) > 20 and any(fn == "flux._audit" for fn, *_ in triggers), triggers
    ran, tried = [], 0
    with connect(fresh_db) as c:
        before = c.execute("SELECT count(*) FROM flux.audit_log").fetchone()[0]
        for i, (fn, table, timing, level, args) in enumerate(triggers):
            if not c.execute(f"SELECT count(*) FROM flux.{table}").fetchone()[0]:
                continue
            fake = f"public.fake_{i}_{table}"
            c.execute(f"CREATE TABLE {fake} (LIKE flux.{table})")
            c.execute(f"CREATE TRIGGER t {timing} INSERT OR UPDATE OR DELETE ON {fake} "
                      f"FOR EACH {level} EXECUTE FUNCTION {fn}({args})")
            state = sqlstate_of(c, f"INSERT INTO {fake} SELECT * FROM flux.{table} LIMIT 1")
            tried += 1
            if state == "ok" or state == "XX000":
                ran.append((fn, table, args, state))
        assert c.execute("SELECT count(*) FROM flux.audit_log").fetchone()[0] == before
    assert tried > 20, tried
    assert not ran, f"flux trigger functions that ran on a table not their own: {ran}"


# ---------------------------------------------------------------------------
# 3. Shadowing: nothing the caller creates is resolved by flux


@pytest.mark.parametrize("kit_name", APP_KITS)
def test_app_look_alikes_never_run_and_change_nothing(fresh_db, roles, kit_name):
    """Finding 1 and its variants, as an application role acting for acme:
    the same calls with and without the look-alikes first in its path give
    the same answers, and none of the look-alikes ever runs."""
    app = roles.make("app")
    setup_catalogue(fresh_db, app)
    install_recorder(fresh_db, app)
    keys = make_keys(fresh_db)
    battery = app_battery(keys)
    with login(fresh_db, app) as a:
        a.execute("SET flux.tenant = 'acme'")
        baseline = run_battery(a, battery)
    states = dict((label, state) for label, state, _ in baseline)
    # The baseline itself is the contract.
    assert states["other_decide"] == states["other_consume"] == states["other_release"] == "42501", states
    assert states["consume_key_other_amount"] == "22023" and states["member_4"] == "23P01", states
    assert states["docs_insert_other"] == "42501" and states["authenticate_revoked"] == "28000", states
    assert states["authenticate_expired"] == "28000" and states["authenticate"] == "ok", states

    with login(fresh_db, app) as a:
        path = create_kit_on(a, kit_name)
        a.execute("SET flux.tenant = 'acme'")
        a.execute(f"SET search_path = {path}")
        attacked = run_battery(a, battery)
        shown_path = a.execute("SHOW search_path").fetchone()[0]
        who = a.execute("SELECT current_user, session_user").fetchone()
        assert_nothing_ran(fresh_db, a)
        assert not rolsuper(fresh_db, app)
        assert who == (app, app) and shown_path == path, (who, shown_path)
        assert_same(baseline, attacked)
        assert_kit_live(fresh_db, a, kit_name)


def admin_battery():
    eq = "OPERATOR(pg_catalog.=)"
    gt = "OPERATOR(pg_catalog.>)"
    return [
        ("define_feature", "SELECT flux_define_feature('sso2', 'boolean', 'single sign-on, again')", None),
        ("define_plan", "SELECT flux_define_plan('team', 'Team', 5)", None),
        ("grant", "SELECT flux_grant('team', 'sso2')", None),
        ("grant_metered", "SELECT flux_grant('team', 'calls', 10, 'month')", None),
        ("grant_rate", "SELECT flux_grant('team', 'rate', 10, '2 hours')", None),
        ("grant_bad", "SELECT flux_grant('team', 'calls', -1, 'day')", None),
        ("grant_bad_period", "SELECT flux_grant('team', 'calls', 1, 'fortnight')", None),
        ("revoke", "SELECT flux_revoke('team', 'sso2')", None),
        ("subscribe", "SELECT flux_subscribe('initech', 'team')", None),
        ("subscribe_past_due", "SELECT flux_subscribe('initech', 'pro', 'past_due')", None),
        ("subscribe_trial", "SELECT flux_subscribe('newco', 'pro', 'trialing', trial_ends_at => '2999-01-01 00:00+00')", None),
        ("override", "SELECT flux_override('globex', 'sso', true, expires_at => '2999-01-01 00:00+00', reason => 'deal')", None),
        ("override_limit", "SELECT flux_override('globex', 'seats', true, 10)", None),
        ("addon", "SELECT flux_define_addon('seatpack')", None),
        ("grant_addon", "SELECT flux_grant_addon('seatpack', 'seats', 2)", None),
        ("attach_addon", "SELECT flux_attach_addon('acme', 'seatpack', 2)", None),
        ("flag", "SELECT flux_set_flag('reports', true, 50)", None),
        ("flag_allow", "SELECT flux_flag_allow('reports', 'acme')", None),
        ("flag_deny", "SELECT flux_flag_deny('reports', 'globex')", None),
        ("flag_clear", "SELECT flux_flag_clear('reports', 'globex')", None),
        ("map_price", "SELECT flux_map_price('price_team', 'team')", None),
        ("create_key", "SELECT flux_create_api_key('globex', 'ops') IS NOT NULL", None),
        ("revoke_key", f"SELECT flux_revoke_api_key(id) FROM flux.api_keys WHERE name {eq} 'ops'", None),
        ("stripe_event", "SELECT flux_apply_stripe_event(%s::pg_catalog.jsonb)",
         ('{"id": "evt_sec_1", "type": "customer.subscription.updated", "created": 1764000000, '
          '"data": {"object": {"id": "sub_1", "customer": "cus_1", "status": "active", "metadata": {"tenant_id": "stripeco"}, '
          '"items": {"data": [{"price": {"id": "price_team"}, "quantity": 1, "current_period_start": 1764000000, '
          '"current_period_end": 1766600000}]}}}}',)),
        ("prune", "SELECT flux_prune_usage_keys() OPERATOR(pg_catalog.>=) 0", None),
        ("dml_insert_feature", "INSERT INTO flux.features (key, kind) VALUES ('dml_feature', 'boolean') RETURNING key", None),
        ("dml_insert_bad", "INSERT INTO flux.features (key, kind) VALUES ('bad', 'nonsense')", None),
        ("dml_insert_grant", "INSERT INTO flux.grants (plan, feature) VALUES ('pro', 'dml_feature') RETURNING plan", None),
        ("dml_update_tenant", f"UPDATE flux.tenants SET status = 'active' WHERE id {eq} 'initech' RETURNING id, status, past_due_since IS NULL", None),
        ("dml_update_plan", f"UPDATE flux.plans SET rank = 7 WHERE key {eq} 'team' RETURNING key", None),
        ("dml_delete_flag_list", f"DELETE FROM flux.flag_lists WHERE feature {eq} 'reports' RETURNING id", None),
        ("dml_delete_plan_in_use", f"DELETE FROM flux.plans WHERE key {eq} 'pro'", None),
        ("decide_any_tenant", "SELECT allowed, reason, plan FROM flux_decide('globex', 'sso')", None),
        ("entitlements_any", "SELECT feature, allowed, reason FROM flux_entitlements('initech')", None),
        ("history", "SELECT action, entity, key, old IS NULL, new IS NULL FROM flux_history('initech') ORDER BY id", None),
        ("audit", "SELECT actor, action, entity, CASE WHEN entity " + eq + " 'api_keys' THEN '-' ELSE key END, "
                  "tenant, (coalesce(new, old) OPERATOR(pg_catalog.?) 'secret_hash') FROM flux.audit_log "
                  f"WHERE id {gt} 0 ORDER BY id", None),
        ("usage_keys_table", "SELECT pg_catalog.count(*) FROM flux.usage_keys", None),
    ]


@pytest.mark.parametrize("kit_name", ADMIN_KITS)
def test_admin_with_the_apps_schema_in_its_path_runs_nothing_of_the_apps(fresh_db, roles, kit_name):
    """An admin whose search_path includes a schema the app can write to:
    admin functions, plain DML (validators, audit and cache triggers) and
    the audit log give the same answers, and nothing of the app's runs."""
    app = roles.make("app")
    ops = roles.make("ops", member_of=["flux_admin"])
    setup_catalogue(fresh_db)
    install_recorder(fresh_db, app)
    battery = admin_battery()
    with login(fresh_db, ops) as o:
        baseline = run_battery(o, battery)
    states = {label: state for label, state, _ in baseline}
    assert states["grant_bad"] == states["dml_insert_bad"] == "22023", states
    assert all(s == "ok" for label, s in states.items() if "bad" not in label and "in_use" not in label), states
    path = create_kit(fresh_db, app, kit_name)
    with login(fresh_db, ops) as o:
        o.execute(f"SET search_path = {path}")
        attacked = run_battery(o, battery)
        assert_nothing_ran(fresh_db, o)
        assert not rolsuper(fresh_db, app) and not rolsuper(fresh_db, ops)
        assert_same(baseline, attacked)
        if kit_name != "casts_from_app_types":  # its canary needs the app's own pg_temp
            assert_kit_live(fresh_db, o, kit_name)


@pytest.mark.parametrize("kit_name", ["lying_text_eq_false", "lying_text_eq_true", "schema_domains", "operators_text",
                                      "text_functions", "role_functions"])
def test_policies_and_triggers_written_under_an_apps_path_refer_to_nothing_of_the_apps(fresh_db, roles, kit_name):
    """flux_protect and flux_enforce_limit run by an admin whose path starts
    with the app's schema write policies and triggers that depend on no
    object of the app's, and later queries by anyone run none of them."""
    app = roles.make("app")
    ops = roles.make("ops", member_of=["flux_admin"])
    setup_catalogue(fresh_db)
    install_recorder(fresh_db, app)
    path = create_kit(fresh_db, app, kit_name)
    with connect(fresh_db) as c:
        for t in ("sec_d2", "sec_m2", "sec_v2"):
            col = "org varchar(8)" if t == "sec_v2" else "tenant_id text"
            c.execute(f"CREATE TABLE public.{t} (id int, {col} NOT NULL)")
            c.execute(sql.SQL(f"ALTER TABLE public.{t} OWNER TO {{}}").format(sql.Identifier(ops)))
            c.execute(sql.SQL(f"GRANT SELECT, INSERT, UPDATE, DELETE ON public.{t} TO {{}}").format(sql.Identifier(app)))
        c.execute("INSERT INTO sec_d2 VALUES (1, 'acme'), (2, 'globex')")
        c.execute("INSERT INTO sec_v2 VALUES (1, 'acme'), (2, 'globex')")
    with login(fresh_db, ops) as o:
        o.execute(f"SET search_path = {path}")
        o.execute("SELECT flux_protect('public.sec_d2', 'reports')")
        o.execute("SELECT flux_protect('public.sec_v2', 'reports', 'org', force => true)")
        o.execute("SELECT flux_enforce_limit('public.sec_m2', 'seats')")
        o.execute("SELECT flux_enforce_limit('public.sec_v2', 'seats', 'org')")
    assert_nothing_ran(fresh_db, o)
    with connect(fresh_db) as c:
        deps = c.execute("""
            SELECT d.classid::regclass::text, d.objid, d.refclassid::regclass::text, d.refobjid
              FROM pg_depend d
             WHERE ((d.classid = 'pg_policy'::regclass AND d.objid IN (SELECT oid FROM pg_policy WHERE polrelid IN ('sec_d2'::regclass, 'sec_v2'::regclass)))
                 OR (d.classid = 'pg_trigger'::regclass AND d.objid IN (SELECT oid FROM pg_trigger WHERE tgrelid IN ('sec_m2'::regclass, 'sec_v2'::regclass))))
               AND (d.refobjid IN (SELECT oid FROM pg_proc WHERE pronamespace IN ('sec_s'::regnamespace, pg_my_temp_schema()))
                 OR d.refobjid IN (SELECT oid FROM pg_operator WHERE oprnamespace = 'sec_s'::regnamespace)
                 OR d.refobjid IN (SELECT oid FROM pg_type WHERE typnamespace = 'sec_s'::regnamespace))""").fetchall()
        assert not deps, f"policies or triggers bound to the app's objects: {deps}"
        quals = c.execute("SELECT polname, pg_get_expr(polqual, polrelid) FROM pg_policy WHERE polrelid IN ('sec_d2'::regclass, 'sec_v2'::regclass)").fetchall()
        assert quals and not [q for q in quals if "sec_s" in (q[1] or "")], quals
    with login(fresh_db, app) as a, login(fresh_db, ops) as o:
        a.execute("SET flux.tenant = 'acme'")
        o.execute("SET flux.tenant = 'acme'")
        a.execute(f"SET search_path = {path}")
        assert [r[0] for r in a.execute("SELECT id FROM sec_d2 ORDER BY id")] == [1]
        assert [r[0] for r in a.execute("SELECT id FROM sec_v2 ORDER BY id")] == [1]
        # The owner: sec_d2 is not forced, sec_v2 is.
        assert [r[0] for r in o.execute("SELECT id FROM sec_d2 ORDER BY id")] == [1, 2]
        assert [r[0] for r in o.execute("SELECT id FROM sec_v2 ORDER BY id")] == [1]
        for i in range(3):
            a.execute("INSERT INTO sec_m2 VALUES (%s, 'acme')", (i,))
        assert error_of(a, "INSERT INTO sec_m2 VALUES (9, 'acme')").sqlstate == "23P01"
    assert_nothing_ran(fresh_db, a, o)


def test_enforce_limit_counts_with_the_apps_operators_in_its_path(fresh_db, roles):
    """Finding 6: an operator app_s.= answering false gave 23 members
    against 3 seats. With every lie the app can think of, 3 stays 3."""
    app = roles.make("app")
    setup_catalogue(fresh_db, app)
    install_recorder(fresh_db, app)
    with login(fresh_db, app) as a:
        for name in ("lying_text_eq_false", "aggregates", "lying_json_bytea_operators", "lying_int_operators"):
            for s in kit(name, a)[1]:
                try:
                    a.execute(s)
                except (psycopg.errors.DuplicateFunction, psycopg.errors.DuplicateObject):
                    pass  # the kits overlap (e.g. jsonb -> integer)
        for s in ["CREATE FUNCTION sec_s.to_jsonb(anyelement) RETURNS pg_catalog.jsonb LANGUAGE plpgsql AS "
                  "$f$BEGIN PERFORM sec_s.hit('to_jsonb'); RETURN '{}'; END$f$",
                  "CREATE FUNCTION sec_s.text(pg_catalog.text) RETURNS pg_catalog.text LANGUAGE plpgsql AS "
                  "$f$BEGIN PERFORM sec_s.hit('text(text)'); RETURN 'nobody'; END$f$"]:
            a.execute(s)
        a.execute(f"SET search_path = {RIGGED}")
        # A row counts against its tenant only for a session acting for it.
        a.execute("SET flux.tenant = 'acme'")
        for i in range(3):
            a.execute("INSERT INTO sec_members VALUES ('acme', %s)", (f"m{i}",))
        for i in range(20):
            assert error_of(a, "INSERT INTO sec_members VALUES ('acme', 'more')").sqlstate == "23P01"
        assert error_of(a, "INSERT INTO sec_members SELECT 'acme', 'bulk' FROM generate_series(1, 5)").sqlstate == "23P01"
        # Moving rows of another tenant in counts too.
        with connect(fresh_db) as c:
            c.execute("INSERT INTO sec_members VALUES ('globex', 'g')")
        assert error_of(a, "UPDATE sec_members SET tenant_id = 'acme' WHERE name OPERATOR(pg_catalog.=) 'g'").sqlstate == "23P01"
    assert_nothing_ran(fresh_db, a)
    with connect(fresh_db) as c:
        assert c.execute("SELECT count(*) FROM sec_members WHERE tenant_id = 'acme'").fetchone()[0] == 3


def test_enforce_limit_reads_no_column_of_an_app_type_it_does_not_need(fresh_db, roles):
    """Variant: a members table with a column of the app's enum type whose
    casts to json and text are the app's functions. Inserts by a trusted
    backend run none of them (the trigger reads only the tenant column)."""
    app = roles.make("app")
    svc = roles.make("svc", member_of=["flux_service"])
    setup_catalogue(fresh_db)
    install_recorder(fresh_db, app)
    with login(fresh_db, app) as a:
        a.execute("CREATE TYPE sec_s.mood AS ENUM ('happy')")
        for target in ("json", "jsonb", "text"):
            a.execute(f"CREATE FUNCTION sec_s.mood_{target}(sec_s.mood) RETURNS pg_catalog.{target} LANGUAGE plpgsql AS "
                      f"$f$BEGIN PERFORM sec_s.hit('mood -> {target}'); RETURN '\"x\"'; END$f$")
            a.execute(f"CREATE CAST (sec_s.mood AS pg_catalog.{target}) WITH FUNCTION sec_s.mood_{target}(sec_s.mood)")
        a.execute("GRANT USAGE ON TYPE sec_s.mood TO PUBLIC")
    with connect(fresh_db) as c:
        c.execute("CREATE TABLE public.sec_team (tenant_id text NOT NULL, mood sec_s.mood)")
        c.execute("SELECT flux_enforce_limit('sec_team', 'seats')")
        c.execute(sql.SQL("GRANT INSERT, SELECT ON sec_team TO {}").format(sql.Identifier(svc)))
    with login(fresh_db, svc) as s:
        for _ in range(3):
            s.execute("INSERT INTO sec_team VALUES ('acme', 'happy')")
        assert error_of(s, "INSERT INTO sec_team VALUES ('acme', 'happy')").sqlstate == "23P01"
    assert_nothing_ran(fresh_db, s)


# ---------------------------------------------------------------------------
# Identity: the caller comes back whole


def test_caller_identity_and_path_survive_errors_cursors_and_interleaved_rows(fresh_db, roles):
    app = roles.make("app")
    ops = roles.make("ops", member_of=["flux_admin"])
    setup_catalogue(fresh_db, app)
    install_recorder(fresh_db, app)
    with login(fresh_db, app) as a:
        for sig in ("", "anyelement"):
            a.execute(f"CREATE FUNCTION sec_s.whoami({sig}) RETURNS pg_catalog.text LANGUAGE sql "
                      "AS $f$SELECT current_user::pg_catalog.text OPERATOR(pg_catalog.||) '|' "
                      "OPERATOR(pg_catalog.||) pg_catalog.current_setting('search_path')$f$")
    for role, tenant in ((app, "acme"), (ops, None)):
        with login(fresh_db, role) as c:
            path = "sec_s, public"
            me = f"{role}|{path}"
            c.execute(f"SET search_path = {path}")
            if tenant:
                c.execute(f"SET flux.tenant = '{tenant}'")
            c.execute("SELECT flux_consume('acme', 'calls', 1, 'k1')")
            failing = ["SELECT flux_decide('globex', 'reports')" if tenant else "SELECT flux_grant('pro', 'calls', -1, 'day')",
                       "SELECT flux_consume('acme', 'calls', 5, 'k1')",
                       "SELECT flux_consume('acme', 'calls', -3)",
                       "SELECT flux_authenticate('flux_000000000000_" + "0" * 64 + "')",
                       "SELECT flux_authenticate('garbage')",
                       "INSERT INTO sec_members SELECT 'acme', 'x' FROM generate_series(1, 10)",
                       "SELECT flux_consume('acme', 'calls', 1, '')",
                       "SELECT flux_check('acme', 'reports'), 1 / 0"]
            for q in failing:
                with c.transaction():
                    assert sqlstate_of(c, q) != "ok", q
                    assert c.execute("SELECT sec_s.whoami()").fetchone()[0] == me, q
                assert c.execute("SELECT sec_s.whoami()").fetchone()[0] == me, q
            # A plpgsql handler that catches flux's error.
            c.execute("DO $d$ BEGIN PERFORM flux_consume('acme', 'calls', 5, 'k1'); "
                      "EXCEPTION WHEN OTHERS THEN RAISE NOTICE 'after: %', sec_s.whoami(); END $d$")
            assert c.notices[-1] == f"NOTICE: after: {me}", c.notices[-1:]
            # Rows of flux's set-returning functions interleaved with the caller's own calls.
            rows = c.execute("SELECT e.feature, sec_s.whoami(e.feature) FROM flux_entitlements('acme') e").fetchall()
            assert rows and {w for _, w in rows} == {me}, rows
            rows = c.execute("SELECT sec_s.whoami(d.reason) FROM flux_decide('acme', 'calls') d, generate_series(1, 3)").fetchall()
            assert {w for (w,) in rows} == {me}, rows
            rows = c.execute("SELECT sec_s.whoami(flux_consume('acme', 'calls')) FROM generate_series(1, 3)").fetchall()
            assert {w for (w,) in rows} == {me}, rows
            # A cursor over a flux set-returning function, fetched row by row.
            with c.transaction():
                srf = "flux_history('acme')" if not tenant else "flux_entitlements('acme')"
                c.execute(f"DECLARE cur CURSOR FOR SELECT * FROM {srf}")
                for _ in range(4):
                    c.execute("FETCH 1 FROM cur")
                    assert c.execute("SELECT sec_s.whoami()").fetchone()[0] == me
                    assert c.execute("SELECT current_user, session_user").fetchone() == (role, role)
            assert c.execute("SHOW search_path").fetchone()[0] == path
    assert_nothing_ran(fresh_db)
    assert not rolsuper(fresh_db, app) and not rolsuper(fresh_db, ops)


# ---------------------------------------------------------------------------
# 4. Acting for a tenant

OTHER_TENANT_CALLS = [
    ("flux_decide", "SELECT flux_decide(%s, 'reports')"),
    ("flux_decide_subject", "SELECT flux_decide(%s, 'reports', 'user-1')"),
    ("flux_entitlements", "SELECT * FROM flux_entitlements(%s)"),
    ("flux_value", "SELECT flux_value(%s, 'export')"),
    ("flux_usage", "SELECT flux_usage(%s, 'calls')"),
    ("flux_consume", "SELECT flux_consume(%s, 'calls')"),
    ("flux_consume_huge", "SELECT flux_consume(%s, 'calls', 9223372036854775807)"),
    ("flux_consume_key", "SELECT flux_consume(%s, 'calls', 1, 'stolen')"),
    ("flux_release", "SELECT flux_release(%s, 'seats')"),
    ("flux_release_huge", "SELECT flux_release(%s, 'seats', 9223372036854775807)"),
]


def assert_refused_for(c, tenant):
    for name, q in OTHER_TENANT_CALLS:
        e = error_of(c, q, (tenant,))
        assert e.sqlstate == "42501", (name, tenant, e.sqlstate, str(e))
        assert tenant in str(e) and "flux_service" in str(e), (name, str(e))
        assert c.execute("SELECT flux_check(%s, 'reports')", (tenant,)).fetchone()[0] is False, tenant


def test_an_app_acts_only_for_its_current_tenant(fresh_db, roles):
    """Finding 5: any caller acted for any tenant (burned another tenant's
    quota, read its plan) with one RPC call."""
    app = roles.make("app")
    setup_catalogue(fresh_db, app)
    with connect(fresh_db) as c:
        before = c.execute("SELECT (SELECT count(*) FROM flux.usage), (SELECT count(*) FROM flux.usage_keys), "
                           "(SELECT count(*) FROM flux.rate_state)").fetchone()
    with login(fresh_db, app) as a:
        # No tenant: nobody.
        for t in ("acme", "globex", "nobody", ""):
            assert_refused_for(a, t)
        a.execute("SET flux.tenant = 'acme'")
        assert a.execute("SELECT (flux_decide('acme', 'reports')).reason, flux_check('acme', 'reports'), "
                         "flux_check('reports')").fetchone() == ("ok", True, True)
        assert a.execute("SELECT count(*) FROM flux_entitlements('acme')").fetchone()[0] == 7
        assert a.execute("SELECT used FROM flux_consume('acme', 'calls', 2)").fetchone()[0] == 2
        for t in ("globex", "initech", "nobody", "ACME", "acme ", " acme", "acme\t", "ac me", "аcme"):
            assert_refused_for(a, t)
        # flux_check(tenant, feature) never raises, even for NULL or unknown input.
        assert a.execute("SELECT flux_check(NULL, 'reports') IS NOT TRUE, flux_check('globex', NULL) IS NOT TRUE, "
                         "flux_check('globex', 'nope') IS NOT TRUE, flux_check(NULL, NULL) IS NOT TRUE").fetchone() == (True,) * 4
        # flux_authenticate with acme's key makes acme current, not another tenant.
        a.execute("RESET flux.tenant")
    with connect(fresh_db) as c:
        key = c.execute("SELECT flux_create_api_key('globex', 'svc')").fetchone()[0]
        after = c.execute("SELECT (SELECT count(*) FROM flux.usage WHERE tenant <> 'acme'), (SELECT count(*) FROM flux.usage_keys), "
                          "(SELECT count(*) FROM flux.rate_state)").fetchone()
        assert after == (0, before[1], before[2]), (before, after)
    with login(fresh_db, app) as a:
        with a.transaction():
            assert a.execute("SELECT flux_authenticate(%s)", (key,)).fetchone()[0] == "globex"
            assert a.execute("SELECT (flux_decide('globex', 'reports')).reason").fetchone()[0] == "ok"
            assert_refused_for(a, "acme")
        # Only for that transaction.
        assert_refused_for(a, "globex")
    assert not rolsuper(fresh_db, app)


def test_a_policy_calling_flux_check_over_other_tenants_rows_never_fails(fresh_db, roles):
    app = roles.make("app")
    setup_catalogue(fresh_db, app)
    with login(fresh_db, app) as a:
        assert a.execute("SELECT id FROM sec_notes ORDER BY id").fetchall() == []
        a.execute("SET flux.tenant = 'acme'")
        assert a.execute("SELECT id, tenant_id FROM sec_notes ORDER BY id").fetchall() == [(1, "acme")]
        a.execute("SET flux.tenant = 'nobody'")
        assert a.execute("SELECT id FROM sec_notes ORDER BY id").fetchall() == []
        a.execute("RESET flux.tenant")
        a.execute("""SET request.jwt.claims = '{"tenant_id": "globex"}'""")
        assert a.execute("SELECT id, tenant_id FROM sec_notes ORDER BY id").fetchall() == [(2, "globex")]


CLAIMS_WITHOUT_TENANT = [
    '{"tenant_id": "acme\\u0000x"}',
    '{"tenant_id": "acme\\u0000"}',
    '{"tenant_id": "\\u0000acme"}',
    '{"tenant_id": "\\u0000"}',
    '{"tenant_id": ""}',
    '{"tenant_id": null}',
    '{"tenant_id": ["acme"]}',
    '{"tenant_id": {"id": "acme"}}',
    '{"tenant_id": true}',
    '{"other": "acme"}',
    '{broken',
    '[]',
    '"acme"',
]


@pytest.mark.parametrize("claims", CLAIMS_WITHOUT_TENANT)
def test_claims_that_name_no_tenant_act_for_nobody(fresh_db, roles, claims):
    app = roles.make("app")
    setup_catalogue(fresh_db, app)
    with login(fresh_db, app) as a:
        a.execute("SELECT set_config('request.jwt.claims', %s, false)", (claims,))
        assert a.execute("SELECT flux_current_tenant() IS NULL").fetchone()[0], a.execute("SELECT flux_current_tenant()").fetchone()
        assert a.execute("SELECT flux_check('reports') IS NOT TRUE").fetchone()[0]
        assert_refused_for(a, "acme")
        assert a.execute("SELECT count(*) FROM sec_docs").fetchone()[0] == 0
        # A custom claim name with the same value.
        a.execute("SET flux.jwt_tenant_claim = 'org'")
        a.execute("SELECT set_config('request.jwt.claims', %s, false)", (claims.replace("tenant_id", "org"),))
        assert a.execute("SELECT flux_current_tenant() IS NULL").fetchone()[0]


def test_claims_name_the_tenant_when_flux_tenant_is_unset_or_empty(fresh_db, roles):
    app = roles.make("app")
    setup_catalogue(fresh_db, app)
    with login(fresh_db, app) as a:
        a.execute("""SET request.jwt.claims = '{"role": "web", "tenant_id": "acme"}'""")
        for setting in (None, ""):
            if setting is not None:
                a.execute("SET flux.tenant = ''")
            assert a.execute("SELECT flux_current_tenant(), flux_check('reports'), (flux_decide('acme', 'reports')).reason").fetchone() == ("acme", True, "ok")
            assert a.execute("SELECT used FROM flux_consume('acme', 'calls')").fetchone()[0] >= 1
            assert_refused_for(a, "globex")
            assert [r[0] for r in a.execute("SELECT id FROM sec_docs ORDER BY id")] == [1, 2]


def test_service_admin_and_superuser_act_for_any_tenant(fresh_db, roles):
    group = roles.make("backends", login=False, member_of=["flux_service"])
    svc = roles.make("svc", member_of=["flux_service"])
    nested = roles.make("nested", member_of=[group])
    ops = roles.make("ops", member_of=["flux_admin"])
    setup_catalogue(fresh_db)
    for who in (svc, nested, ops, "postgres"):
        with (login(fresh_db, who) if who != "postgres" else connect(fresh_db)) as c:
            for t in ("acme", "globex"):
                assert c.execute("SELECT flux_check(%s, 'reports'), (flux_decide(%s, 'reports')).reason", (t, t)).fetchone() == (True, "ok"), who
                assert c.execute("SELECT count(*) FROM flux_entitlements(%s)", (t,)).fetchone()[0] == 7
                assert c.execute("SELECT flux_value(%s, 'export')", (t,)).fetchone()[0] == ["csv", "pdf"]
                used = c.execute("SELECT used FROM flux_consume(%s, 'seats', 2)", (t,)).fetchone()[0]
                # flux_release works for flux_service (finding 7: permission denied for table features).
                assert c.execute("SELECT flux_release(%s, 'seats')", (t,)).fetchone()[0] == used - 1, who
                assert c.execute("SELECT flux_usage(%s, 'seats')", (t,)).fetchone()[0] == used - 1
                c.execute("SELECT flux_release(%s, 'seats')", (t,))


def test_revoking_flux_service_is_seen_by_the_next_transaction_of_another_session(fresh_db, roles):
    group = roles.make("backends", login=False, member_of=["flux_service"])
    svc = roles.make("svc", member_of=["flux_service"])
    nested = roles.make("nested", member_of=[group])
    setup_catalogue(fresh_db)
    with login(fresh_db, svc) as s, login(fresh_db, nested) as n, connect(fresh_db) as su:
        def allowed(c):
            try:
                c.execute("SELECT flux_decide('globex', 'reports')")
                assert c.execute("SELECT flux_check('globex', 'reports')").fetchone()[0] is True
                return True
            except psycopg.Error as e:
                assert e.sqlstate == "42501", e
                assert c.execute("SELECT flux_check('globex', 'reports')").fetchone()[0] is False
                return False

        for _ in range(3):  # warm every cache
            assert allowed(s) and allowed(n)
        su.execute(sql.SQL("REVOKE flux_service FROM {}").format(sql.Identifier(svc)))
        assert not allowed(s) and allowed(n)
        su.execute(sql.SQL("GRANT flux_service TO {}").format(sql.Identifier(svc)))
        assert allowed(s)
        # Through a group: revoking the group's grant, then dropping the group.
        su.execute(sql.SQL("REVOKE flux_service FROM {}").format(sql.Identifier(group)))
        assert not allowed(n) and allowed(s)
        su.execute(sql.SQL("GRANT flux_service TO {}").format(sql.Identifier(group)))
        assert allowed(n)
        su.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(group), sql.Identifier(nested)))
        assert not allowed(n)
        su.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(nested)))
        assert allowed(n)
        su.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(group)))
        roles.names.remove(group)
        assert not allowed(n)
        # NOINHERIT: a member that does not inherit flux_service's rights.
        su.execute(sql.SQL("ALTER ROLE {} NOINHERIT").format(sql.Identifier(svc)))
        pg_says = su.execute("SELECT pg_has_role(%s, 'flux_service', 'USAGE')", (svc,)).fetchone()[0]
        assert allowed(s) == pg_says
        su.execute(sql.SQL("ALTER ROLE {} INHERIT").format(sql.Identifier(svc)))
        assert allowed(s)
        # Losing flux_admin likewise.
        su.execute(sql.SQL("REVOKE flux_service FROM {}").format(sql.Identifier(svc)))
        su.execute(sql.SQL("GRANT flux_admin TO {}").format(sql.Identifier(svc)))
        assert allowed(s)
        su.execute(sql.SQL("REVOKE flux_admin FROM {}").format(sql.Identifier(svc)))
        assert not allowed(s)


def test_the_answer_is_kept_per_role_not_per_session(fresh_db, roles):
    app = roles.make("app")
    svc = roles.make("svc", member_of=["flux_service"])
    setup_catalogue(fresh_db)
    with connect(fresh_db) as c:
        for _ in range(2):
            assert c.execute("SELECT (flux_decide('globex', 'reports')).reason").fetchone()[0] == "ok"
            c.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(app)))
            assert_refused_for(c, "globex")
            c.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(svc)))
            assert c.execute("SELECT (flux_decide('globex', 'reports')).reason").fetchone()[0] == "ok"
            c.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(app)))
            assert_refused_for(c, "globex")
            c.execute("RESET ROLE")
        # Inside a SECURITY DEFINER function owned by the app, the app's answer.
        c.execute(sql.SQL("CREATE FUNCTION public.sec_as_app() RETURNS text LANGUAGE sql SECURITY DEFINER "
                          "SET search_path = pg_catalog, public AS $f$SELECT (flux_decide('globex', 'reports')).reason$f$"))
        c.execute(sql.SQL("ALTER FUNCTION public.sec_as_app() OWNER TO {}").format(sql.Identifier(app)))
        assert c.execute("SELECT (flux_decide('globex', 'reports')).reason").fetchone()[0] == "ok"
        assert error_of(c, "SELECT public.sec_as_app()").sqlstate == "42501"
        assert c.execute("SELECT (flux_decide('globex', 'reports')).reason").fetchone()[0] == "ok"
        c.execute("DROP FUNCTION public.sec_as_app()")


# ---------------------------------------------------------------------------
# 5. The clock and the actor

CLOCK_SETTERS = [
    "SET flux.now = '2019-01-01 00:00+00'",
    "SET SESSION flux.now = '2019-01-01 00:00+00'",
    "SET LOCAL flux.now = '2019-01-01 00:00+00'",
    "SET flux.now TO DEFAULT",
    "RESET flux.now",
    "SELECT set_config('flux.now', '2019-01-01 00:00+00', false)",
    "SELECT set_config('flux.now', '2019-01-01 00:00+00', true)",
    "SELECT set_config('flux.now', '', false)",
    "SET flux.actor = 'someone'",
    "SET LOCAL flux.actor = 'someone'",
    "SELECT set_config('flux.actor', 'someone', false)",
    "SELECT set_config('flux.actor', 'someone', true)",
    "RESET flux.actor",
]


def test_an_app_cannot_set_the_clock_or_the_actor(fresh_db, roles):
    app = roles.make("app")
    setup_catalogue(fresh_db)
    with login(fresh_db, app) as a:
        a.execute("SELECT flux_current_tenant()")  # the library is loaded
        for q in CLOCK_SETTERS:
            with a.transaction():
                assert sqlstate_of(a, q) == "42501", q
        assert a.execute("SELECT coalesce(current_setting('flux.now', true), ''), coalesce(current_setting('flux.actor', true), '')").fetchone() == ("", "")
        # SET ROLE from a superuser's session: the role's rights, not the session's.
    with connect(fresh_db) as c:
        # Before this backend has loaded the library, SET makes a placeholder;
        # the value the role gave must not survive the load.
        c.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(app)))
        sqlstate_of(c, "SET flux.now = '2019-01-01 00:00+00'")
        sqlstate_of(c, "SET flux.actor = 'someone'")
        c.execute("SELECT flux_current_tenant()")
        assert c.execute("SELECT coalesce(current_setting('flux.now', true), ''), "
                         "coalesce(current_setting('flux.actor', true), '')").fetchone() == ("", ""), "placeholder kept"
        c.execute("RESET ROLE")
        c.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(app)))
        for q in CLOCK_SETTERS:
            with c.transaction():
                assert sqlstate_of(c, q) == "42501", ("after SET ROLE", q)
        # ... nor through a function's SET clause or a role setting.
        state = sqlstate_of(c, "CREATE FUNCTION pg_temp.sec_f() RETURNS text LANGUAGE sql SET flux.now = '2019-01-01' AS $f$SELECT current_setting('flux.now')$f$")
        if state == "ok":
            assert sqlstate_of(c, "SELECT pg_temp.sec_f()") == "42501"
        else:
            assert state == "42501", state
        assert sqlstate_of(c, sql.SQL("ALTER ROLE {} SET flux.now = '2019-01-01'").format(sql.Identifier(app))) == "42501"
        assert sqlstate_of(c, sql.SQL("ALTER ROLE {} SET flux.actor = 'x'").format(sql.Identifier(app))) == "42501"


@pytest.mark.parametrize("how", ["options", "placeholder_before_load", "placeholder_local", "role_setting_by_app"])
def test_the_clock_cannot_be_moved_before_the_library_is_loaded(fresh_db, roles, how):
    """A new session that sets flux.now before any flux function has loaded
    the library makes a placeholder; when the library loads, the value a
    non-privileged role gave must not survive."""
    app = roles.make("app")
    setup_catalogue(fresh_db)
    with connect(fresh_db) as c:
        c.execute("SELECT flux_subscribe('trialco', 'pro', 'trialing', trial_ends_at => now() - interval '1 day')")
    past = "2019-01-01 00:00+00"
    if how == "options":
        a = login(fresh_db, app, options=f"-c flux.now={past.replace(' ', 'T')} -c flux.actor=someone")
    else:
        if how == "role_setting_by_app":
            with login(fresh_db, app) as first:
                state = sqlstate_of(first, f"ALTER ROLE CURRENT_USER SET flux.now = '{past}'")
                assert state in ("ok", "42501"), state
        a = login(fresh_db, app)
        if how == "placeholder_before_load":
            a.execute(f"SET flux.now = '{past}'")
            a.execute("SET flux.actor = 'someone'")
        elif how == "placeholder_local":
            a.autocommit = False
            a.execute(f"SET LOCAL flux.now = '{past}'")
    try:
        a.execute("SET flux.tenant = 'trialco'")
        assert a.execute("SELECT flux_check('reports')").fetchone()[0] is False
        now, actor = a.execute("SELECT coalesce(current_setting('flux.now', true), ''), coalesce(current_setting('flux.actor', true), '')").fetchone()
        assert now == "" and actor == "", (now, actor)
    finally:
        a.close()


def test_admin_and_superuser_may_set_the_clock_and_the_actor(fresh_db, roles):
    ops = roles.make("ops", member_of=["flux_admin"])
    setup_catalogue(fresh_db)
    for c in (login(fresh_db, ops), connect(fresh_db)):
        with c:
            for q in CLOCK_SETTERS:
                with c.transaction():
                    assert sqlstate_of(c, q) == "ok", q
            c.execute("SET flux.now = '2019-01-01 00:00+00'")
            assert c.execute("SELECT current_setting('flux.now')").fetchone()[0] == "2019-01-01 00:00+00"


def iso(offset_seconds):
    return time.strftime("%Y-%m-%d %H:%M:%S+00", time.gmtime(time.time() + offset_seconds))


def test_the_clock_findings_replayed(fresh_db, roles):
    """Finding 3: a revoked and an expired key authenticated, an ended trial
    answered true, an expired override came back, a 50-per-day quota gave
    150 in a day, another tenant's rate limit was pushed hours out."""
    app = roles.make("app")
    setup_catalogue(fresh_db)
    # Not across midnight UTC: the quota is per calendar day.
    if time.gmtime().tm_hour == 23 and time.gmtime().tm_min >= 58:
        time.sleep(180)
    with connect(fresh_db) as c:
        c.execute("SELECT set_config('flux.now', %s, false)", (iso(-3 * 86400),))
        c.execute("SELECT flux_subscribe('trialco', 'pro', 'trialing', trial_ends_at => %s)", (iso(-86400),))
        c.execute("SELECT flux_override('trialco', 'export', starts_at => %s, expires_at => %s)", (iso(-3 * 86400), iso(-3600)))
        expired = c.execute("SELECT flux_create_api_key('acme', 'ci', expires_at => %s)", (iso(-3600),)).fetchone()[0]
        c.execute("RESET flux.now")
        revoked = c.execute("SELECT flux_create_api_key('acme', 'old')").fetchone()[0]
        c.execute("SELECT flux_revoke_api_key(id) FROM flux.api_keys WHERE name = 'old'")
    moves = [iso(-2 * 86400), iso(-7200), iso(86400), iso(2 * 365 * 86400), "294276-12-31 00:00+00", "-infinity", "infinity"]
    with login(fresh_db, app) as a:
        def try_moves():
            for m in moves:
                for q in ("SET flux.now = %s", "SELECT set_config('flux.now', %s, false)"):
                    with a.transaction():
                        a.execute("SELECT 1")
                        assert sqlstate_of(a, q.replace("%s", "'" + m + "'")) == "42501", (q, m)

        a.execute("SELECT flux_current_tenant()")  # loaded: SET is checked (placeholders: see above)
        a.execute("SET flux.tenant = 'trialco'")
        try_moves()
        assert a.execute("SELECT flux_check('reports'), flux_check('export')").fetchone() == (False, False)
        for key in (expired, revoked):
            assert sqlstate_of(a, "SELECT flux_authenticate(%s)", (key,)) == "28000"
        a.execute("SET flux.tenant = 'acme'")
        assert a.execute("SELECT used FROM flux_consume('acme', 'api', 50)").fetchone()[0] == 50
        for _ in range(3):
            try_moves()
            assert a.execute("SELECT allowed, reason FROM flux_consume('acme', 'api')").fetchone() == (False, "limit_reached")
        for _ in range(5):
            assert a.execute("SELECT allowed FROM flux_consume('acme', 'rate')").fetchone()[0] is True
        try_moves()
        assert a.execute("SELECT allowed, reason FROM flux_consume('acme', 'rate')").fetchone() == (False, "rate_limited")
    with connect(fresh_db) as c:
        assert c.execute("SELECT count(*), sum(used) FROM flux.usage WHERE tenant = 'acme' AND feature = 'api'").fetchone() == (1, 50)
        assert c.execute("SELECT count(*) FROM flux.usage WHERE period_start > now() + interval '1 day'").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM flux.rate_state WHERE tat > now() + interval '1 day'").fetchone()[0] == 0


def test_a_past_due_tenant_cannot_extend_its_own_grace(fresh_db, roles):
    """Variant of the clock class beyond the contract's two settings:
    flux.default_grace_period also moves a time rule (how long past_due
    stays live). A tenant past its grace must not get it back by SET."""
    app = roles.make("app")
    setup_catalogue(fresh_db)
    with connect(fresh_db) as c:
        c.execute("SELECT set_config('flux.now', %s, false)", (iso(-30 * 86400),))
        c.execute("SELECT flux_subscribe('latepay', 'pro', 'past_due')")
    with login(fresh_db, app) as a:
        a.execute("SET flux.tenant = 'latepay'")
        assert a.execute("SELECT flux_check('reports')").fetchone()[0] is False
        for q in ("SET flux.default_grace_period = '1000 years'",
                  "SELECT set_config('flux.default_grace_period', '1000 years', false)"):
            with a.transaction():
                sqlstate_of(a, q)
                assert a.execute("SELECT flux_check('reports')").fetchone()[0] is False, q


def test_the_audit_log_records_the_real_role_beside_the_actor(fresh_db, roles):
    ops = roles.make("ops", member_of=["flux_admin"])
    app = roles.make("app")
    setup_catalogue(fresh_db)
    with connect(fresh_db) as c:
        assert c.execute("SELECT attnotnull FROM pg_attribute WHERE attrelid = 'flux.audit_log'::regclass AND attname = 'role'").fetchone() is not None

    def last(c):
        return c.execute("SELECT actor, role, action, entity, key FROM flux.audit_log ORDER BY id DESC LIMIT 1").fetchone()

    with login(fresh_db, ops) as o:
        o.execute("SET flux.actor = 'stripe:evt_1'")
        o.execute("SELECT flux_subscribe('acme', 'pro', 'past_due')")
        assert last(o) == ("stripe:evt_1", ops, "update", "tenants", "acme")
        o.execute("RESET flux.actor")
        o.execute("UPDATE flux.tenants SET status = 'active' WHERE id = 'acme'")
        assert last(o) == (ops, ops, "update", "tenants", "acme")
        with o.transaction():
            o.execute("SET LOCAL flux.actor = 'billing-sync'")
            o.execute("SELECT flux_override('acme', 'sso')")
        assert last(o) == ("billing-sync", ops, "insert", "overrides", "acme/sso")
    with connect(fresh_db) as c:
        c.execute("SET flux.actor = 'migration'")
        c.execute("SELECT flux_subscribe('acme', 'enterprise')")
        assert last(c) == ("migration", "postgres", "update", "tenants", "acme")
        # The role column of every row is a real role.
        assert c.execute("SELECT count(*) FROM flux.audit_log WHERE role IS NULL OR role NOT IN (SELECT rolname FROM pg_roles)").fetchone()[0] == 0
    with login(fresh_db, app) as a:
        a.execute("SELECT flux_current_tenant()")
        assert sqlstate_of(a, "SET flux.actor = %s" % ("'" + ops + "'")) == "42501"
        assert sqlstate_of(a, "SELECT * FROM flux.audit_log") == "42501"
        assert sqlstate_of(a, "INSERT INTO flux.audit_log (actor, role, action, entity, key) VALUES ('x', 'x', 'insert', 'tenants', 'acme')") == "42501"


# ---------------------------------------------------------------------------
# Finding 4: flux_protect and flux_enforce_limit compare tenants as text

PROTECT_CASES = [
    # (column type, stored values, tenant, rows it may see)
    ("varchar(8)", ["org-0001", "org-0001", "org-01"], "org-0001-attacker", 0),
    ("varchar(8)", ["org-0001", "org-0001", "org-01"], "org-0001", 2),
    ("varchar(8)", ["org-0001", "org-0001", "org-01"], "org-01", 1),
    ("char(8)", ["org-0001", "org-0001", "org-01"], "org-0001-attacker", 0),
    ("char(8)", ["org-0001", "org-0001", "org-01"], "org-0001", 2),
    ("char(8)", ["org-0001", "org-0001", "org-01"], "org-01", 1),
    ("varchar(4)", ["acme", "glob"], "acme-evil", 0),
    ("text", ["acme", "globex"], "acme", 1),
    ("name", ["acme", "globex"], "acme", 1),
    ("name", ["a" * 63], "a" * 70, 0),
    ("integer", ["42", "7"], "42", 1),
    ("integer", ["42", "7"], "042", 0),
    ("integer", ["42", "7"], "42 ", 0),
    ("integer", ["42", "7"], "abc", 0),
    ("integer", ["42", "7"], "99999999999", 0),
    ("bigint", ["42", "7"], "42", 1),
    ("bigint", ["42", "7"], "+42", 0),
    ("numeric(4,1)", ["42.0"], "42", 0),
    ("numeric(4,1)", ["42.0"], "42.0", 1),
    ("uuid", ["0b3c8e6a-3f6a-4a1e-9c7e-2d4f8a9b1c00"], "0b3c8e6a-3f6a-4a1e-9c7e-2d4f8a9b1c00", 1),
    ("uuid", ["0b3c8e6a-3f6a-4a1e-9c7e-2d4f8a9b1c00"], "0B3C8E6A-3F6A-4A1E-9C7E-2D4F8A9B1C00", 0),
    ("uuid", ["0b3c8e6a-3f6a-4a1e-9c7e-2d4f8a9b1c00"], "{0b3c8e6a-3f6a-4a1e-9c7e-2d4f8a9b1c00}", 0),
    ("uuid", ["0b3c8e6a-3f6a-4a1e-9c7e-2d4f8a9b1c00"], "not-a-uuid", 0),
]


@pytest.mark.parametrize("coltype, stored, tenant, expected", PROTECT_CASES,
                         ids=[f"{c}-{t[:20]}" for c, _, t, _ in PROTECT_CASES])
def test_flux_protect_compares_tenant_columns_as_text(fresh_db, roles, coltype, stored, tenant, expected):
    app = roles.make("app")
    setup_catalogue(fresh_db)
    with connect(fresh_db) as c:
        try:
            c.execute("SELECT flux_subscribe(%s, 'pro')", (tenant,))
        except psycopg.errors.InvalidParameterValue as e:
            pytest.skip(f"not a tenant id flux accepts: {e}")
        for s in set(stored):
            c.execute("SELECT flux_subscribe(%s, 'pro')", (s,))
        c.execute(f"CREATE TABLE public.sec_t (id serial PRIMARY KEY, org {coltype} NOT NULL, title text)")
        c.execute("CREATE INDEX ON public.sec_t (org)")
        for s in stored:
            c.execute("INSERT INTO sec_t (org, title) VALUES (%s, 'secret')", (s,))
        c.execute("SELECT flux_protect('sec_t', 'reports', 'org')")
        c.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON sec_t TO {}; GRANT USAGE ON SEQUENCE sec_t_id_seq TO {}")
                  .format(sql.Identifier(app), sql.Identifier(app)))
    with login(fresh_db, app) as a:
        a.execute("SELECT set_config('flux.tenant', %s, false)", (tenant,))
        assert a.execute("SELECT flux_check('reports')").fetchone()[0] is True
        assert a.execute("SELECT count(*) FROM sec_t").fetchone()[0] == expected
        assert a.execute("WITH u AS (UPDATE sec_t SET title = 'pwned' RETURNING 1) SELECT count(*) FROM u").fetchone()[0] == expected
        if expected == 0:
            assert a.execute("WITH d AS (DELETE FROM sec_t RETURNING 1) SELECT count(*) FROM d").fetchone()[0] == 0
            for s in set(stored):
                state = sqlstate_of(a, "INSERT INTO sec_t (org, title) VALUES (%s, 'forged')", (s,))
                assert state == "42501", (s, state)
        # The same through claims.
        a.execute("RESET flux.tenant")
        a.execute("SELECT set_config('request.jwt.claims', json_build_object('tenant_id', %s::text)::text, false)", (tenant,))
        assert a.execute("SELECT count(*) FROM sec_t").fetchone()[0] == expected
    with connect(fresh_db) as c:
        assert c.execute("SELECT count(*) FROM sec_t WHERE title = 'secret'").fetchone()[0] == len(stored) or expected > 0
        if expected == 0:
            assert c.execute("SELECT count(*) FROM sec_t WHERE title <> 'secret'").fetchone()[0] == 0


@pytest.mark.parametrize("coltype, tenant, value", [("varchar(8)", "org-0001", "org-0001"), ("char(8)", "org-01", "org-01"),
                                                    ("integer", "42", 42), ("uuid", "0b3c8e6a-3f6a-4a1e-9c7e-2d4f8a9b1c00",
                                                                             "0b3c8e6a-3f6a-4a1e-9c7e-2d4f8a9b1c00")])
def test_flux_enforce_limit_counts_tenant_columns_as_text(fresh_db, roles, coltype, tenant, value):
    svc = roles.make("svc", member_of=["flux_service"])
    setup_catalogue(fresh_db)
    with connect(fresh_db) as c:
        c.execute("SELECT flux_subscribe(%s, 'pro')", (tenant,))
        c.execute(f"CREATE TABLE public.sec_m (org {coltype} NOT NULL, name text)")
        c.execute("SELECT flux_enforce_limit('sec_m', 'seats', 'org')")
        c.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE ON sec_m TO {}").format(sql.Identifier(svc)))
    with login(fresh_db, svc) as s:
        for i in range(3):
            s.execute("INSERT INTO sec_m VALUES (%s, %s)", (value, f"m{i}"))
        assert error_of(s, "INSERT INTO sec_m VALUES (%s, 'm4')", (value,)).sqlstate == "23P01"


def test_enforce_limit_counts_rows_the_inserting_role_cannot_see(fresh_db, roles):
    """Variant: the members table has the application's own row-level
    policy (each role sees the rows it added). The seat count is the
    tenant's, not the inserting role's share of it."""
    a1 = roles.make("app1")
    a2 = roles.make("app2")
    setup_catalogue(fresh_db)
    with connect(fresh_db) as c:
        c.execute("CREATE TABLE public.sec_own (tenant_id text NOT NULL, added_by name NOT NULL DEFAULT current_user)")
        c.execute("ALTER TABLE sec_own ENABLE ROW LEVEL SECURITY")
        c.execute("CREATE POLICY mine ON sec_own USING (added_by = current_user) WITH CHECK (added_by = current_user)")
        c.execute("SELECT flux_enforce_limit('sec_own', 'seats')")
        c.execute(sql.SQL("GRANT SELECT, INSERT ON sec_own TO {}, {}").format(sql.Identifier(a1), sql.Identifier(a2)))
    with login(fresh_db, a1) as x, login(fresh_db, a2) as y:
        for c in (x, y):
            c.execute("SET flux.tenant = 'acme'")
        x.execute("INSERT INTO sec_own (tenant_id) VALUES ('acme')")
        x.execute("INSERT INTO sec_own (tenant_id) VALUES ('acme')")
        y.execute("INSERT INTO sec_own (tenant_id) VALUES ('acme')")
        assert error_of(y, "INSERT INTO sec_own (tenant_id) VALUES ('acme')").sqlstate == "23P01"
    with connect(fresh_db) as c:
        assert c.execute("SELECT count(*) FROM sec_own").fetchone()[0] == 3


def test_no_role_can_hold_another_tenants_insert_lock(fresh_db, roles):
    """Finding 6: the advisory lock key was predictable (and
    _check_row_limit PUBLIC): an app held another tenant's insert lock open.
    Whatever lock the limit check takes while globex inserts, the app cannot
    take it and make globex's next insert wait."""
    app = roles.make("app")
    svc = roles.make("svc", member_of=["flux_service"])
    setup_catalogue(fresh_db, app, svc)
    with login(fresh_db, svc, autocommit=False) as s, connect(fresh_db) as su, login(fresh_db, app) as a:
        s.execute("INSERT INTO sec_members VALUES ('globex', 'g1')")
        pid = s.info.backend_pid
        held = su.execute("SELECT locktype, classid, objid, objsubid FROM pg_locks WHERE pid = %s AND locktype = 'advisory'", (pid,)).fetchall()
        rels = [r for (r,) in su.execute("SELECT relation::regclass::text FROM pg_locks WHERE pid = %s AND locktype = 'relation'", (pid,))]
        s.rollback()
        # The app tries the very locks flux took, and the keys 0.1.0 used.
        with connect(fresh_db) as c:
            reloid = c.execute("SELECT 'sec_members'::regclass::oid::int").fetchone()[0]
        taken = 0
        for _, classid, objid, objsubid in held:
            key = (classid << 32) | objid
            key = key - (1 << 64) if key >= 1 << 63 else key
            q = "SELECT pg_try_advisory_lock(%s::bigint)" % key if objsubid == 1 else \
                "SELECT pg_try_advisory_lock(%s::int, %s::int)" % tuple(v - (1 << 32) if v >= 1 << 31 else v for v in (classid, objid))
            taken += bool(a.execute(q).fetchone()[0])
        for text_key in (f"flux_limit:{reloid}:seats:globex",):
            taken += bool(a.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (text_key,)).fetchone()[0])
        # The app cannot lock flux's lock rows either.
        for t in ("flux.limit_locks", "flux.usage", "flux.tenants"):
            if su.execute("SELECT to_regclass(%s)", (t,)).fetchone()[0]:
                assert sqlstate_of(a, f"SELECT * FROM {t} FOR UPDATE") == "42501", t
                with a.transaction():
                    assert sqlstate_of(a, f"LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE") == "42501", t
        s.execute("SET lock_timeout = '3s'")
        t0 = time.time()
        try:
            s.execute("INSERT INTO sec_members VALUES ('globex', 'g2')")
        except psycopg.Error as e:
            raise AssertionError(f"globex's insert waited on a lock the app holds ({taken} taken, {held}, {rels}): {e}")
        finally:
            s.rollback()
        assert time.time() - t0 < 2.5
        a.execute("SELECT pg_advisory_unlock_all()")


# ---------------------------------------------------------------------------
# Idempotency, release


def test_idempotency_keys_bind_the_amount_and_are_stored_only_for_known_keys(fresh_db, roles):
    app = roles.make("app")
    svc = roles.make("svc", member_of=["flux_service"])
    setup_catalogue(fresh_db)
    with login(fresh_db, app) as a, login(fresh_db, svc) as s:
        a.execute("SET flux.tenant = 'acme'")
        first = a.execute("SELECT allowed, used, remaining FROM flux_consume('acme', 'api', 1, 'k1')").fetchone()
        assert first == (True, 1, 49)
        e = error_of(a, "SELECT flux_consume('acme', 'api', 5, 'k1')")
        assert e.sqlstate == "22023" and "k1" in str(e), e
        assert a.execute("SELECT allowed, used, remaining FROM flux_consume('acme', 'api', 1, 'k1')").fetchone() == first
        assert a.execute("SELECT flux_usage('acme', 'api')").fetchone()[0] == 1
        # The service sees the same key the same way.
        assert error_of(s, "SELECT flux_consume('acme', 'api', 2, 'k1')").sqlstate == "22023"
        assert s.execute("SELECT allowed, used FROM flux_consume('acme', 'api', 1, 'k1')").fetchone() == (True, 1)
        # Keys are per tenant: globex's k1 is its own request.
        assert s.execute("SELECT used FROM flux_consume('globex', 'api', 3, 'k1')").fetchone()[0] == 3
        # The app cannot replay or poison globex's key.
        assert error_of(a, "SELECT flux_consume('globex', 'api', 3, 'k1')").sqlstate == "42501"
        # Unknown tenants and features store nothing, however many.
        with connect(fresh_db) as c:
            before = c.execute("SELECT count(*), coalesce(sum(pg_column_size(k.*)), 0) FROM flux.usage_keys k").fetchone()
        for i in range(200):
            assert s.execute("SELECT reason FROM flux_consume(%s, 'api', 1, %s)", (f"ghost-{i}", "junk" * 50)).fetchone()[0] == "unknown_tenant"
            assert s.execute("SELECT reason FROM flux_consume('acme', %s, 1, %s)", (f"nope-{i}", "junk" * 50)).fetchone()[0] == "unknown_feature"
        a.execute("SET flux.tenant = 'ghost'")
        assert a.execute("SELECT reason FROM flux_consume('ghost', 'api', 1, 'g')").fetchone()[0] == "unknown_tenant"
        with connect(fresh_db) as c:
            assert c.execute("SELECT count(*), coalesce(sum(pg_column_size(k.*)), 0) FROM flux.usage_keys k").fetchone() == before
            assert c.execute("SELECT count(*) FROM flux.usage_keys WHERE tenant NOT IN (SELECT id FROM flux.tenants) "
                             "OR feature NOT IN (SELECT key FROM flux.features)").fetchone()[0] == 0


def test_release_works_for_the_current_tenant_and_flux_service(fresh_db, roles):
    """Finding 7: flux_release failed with 'permission denied for table features'."""
    app = roles.make("app")
    svc = roles.make("svc", member_of=["flux_service"])
    setup_catalogue(fresh_db)
    with login(fresh_db, svc) as s:
        assert s.execute("SELECT used FROM flux_consume('acme', 'seats', 3)").fetchone()[0] == 3
        assert s.execute("SELECT flux_release('acme', 'seats', 1)").fetchone()[0] == 2
        assert s.execute("SELECT used FROM flux_consume('globex', 'seats', 1)").fetchone()[0] == 1
    with login(fresh_db, app) as a:
        a.execute("SET flux.tenant = 'acme'")
        assert a.execute("SELECT flux_release('acme', 'seats')").fetchone()[0] == 1
        assert a.execute("SELECT flux_release('acme', 'seats', 5)").fetchone()[0] == 0
        assert error_of(a, "SELECT flux_release('globex', 'seats')").sqlstate == "42501"
    with connect(fresh_db) as c:
        assert c.execute("SELECT flux_usage('globex', 'seats'), flux_usage('acme', 'seats')").fetchone() == (1, 0)


# ---------------------------------------------------------------------------
# COPY and the audit log


def psql(db, role, *commands):
    args = [f"{BIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-p", str(PORT), "-U", role, "-d", db]
    for cmd in commands:
        args += ["-c", cmd]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def audit_since(db, mark):
    with connect(db) as c:
        return c.execute("SELECT role, action, entity, key, new ->> 'plan' FROM flux.audit_log WHERE id > %s ORDER BY id", (mark,)).fetchall()


def audit_mark(db):
    with connect(db) as c:
        return c.execute("SELECT coalesce(max(id), 0) FROM flux.audit_log").fetchone()[0]


@pytest.mark.parametrize("query", [
    "COPY (SELECT 1) TO STDOUT; UPDATE flux.tenants SET plan = 'enterprise' WHERE id = 'acme'",
    "  copy (select 1) to stdout ;UPDATE flux.tenants SET plan = 'enterprise' WHERE id = 'acme'",
    "COPY flux.features TO STDOUT; UPDATE flux.tenants SET plan = 'enterprise' WHERE id = 'acme'",
    "COPY (SELECT 1) TO STDOUT; SELECT flux_subscribe('acme', 'enterprise')",
    "copy\t(SELECT 1) TO STDOUT; COPY (SELECT 2) TO STDOUT; UPDATE flux.tenants SET plan = 'enterprise' WHERE id = 'acme'",
])
def test_copy_first_in_a_multi_statement_query_does_not_skip_the_audit_log(fresh_db, roles, query):
    ops = roles.make("ops", member_of=["flux_admin"])
    setup_catalogue(fresh_db)
    mark = audit_mark(fresh_db)
    r = psql(fresh_db, ops, query)
    assert r.returncode == 0, r.stderr
    rows = audit_since(fresh_db, mark)
    assert (ops, "update", "tenants", "acme", "enterprise") in rows, rows
    # And through libpq's simple query protocol directly.
    mark = audit_mark(fresh_db)
    with login(fresh_db, ops) as o:
        res = o.pgconn.exec_(b"COPY (SELECT 1) TO STDOUT; UPDATE flux.tenants SET plan = 'pro' WHERE id = 'acme'")
        assert res.status == psycopg.pq.ExecStatus.COPY_OUT, res.status
        while o.pgconn.get_copy_data(0)[0] > 0:
            pass
        while (res := o.pgconn.get_result()) is not None:
            assert res.status in (psycopg.pq.ExecStatus.COMMAND_OK, psycopg.pq.ExecStatus.TUPLES_OK), res.error_message
    assert (ops, "update", "tenants", "acme", "pro") in audit_since(fresh_db, mark)


def test_copy_into_an_application_table_that_changes_flux_tables_is_audited(fresh_db, roles):
    """Variant: the restore detection looks at the statement, but must
    look at which table is loaded: a COPY into an application table (here
    one named like a flux table) whose trigger changes a tenant is audited."""
    ops = roles.make("ops", member_of=["flux_admin"])
    setup_catalogue(fresh_db)
    with connect(fresh_db) as c:
        for t in ("sec_staging", "tenants"):
            c.execute(f"CREATE TABLE public.{t} (tenant text, plan text)")
            c.execute(sql.SQL(f"GRANT INSERT ON public.{t} TO {{}}").format(sql.Identifier(ops)))
        c.execute("CREATE FUNCTION public.sec_sync() RETURNS trigger LANGUAGE plpgsql AS $f$ "
                  "BEGIN PERFORM flux_subscribe(NEW.tenant, NEW.plan); RETURN NEW; END $f$")
        c.execute("CREATE TRIGGER sync AFTER INSERT ON public.sec_staging FOR EACH ROW EXECUTE FUNCTION public.sec_sync()")
        c.execute("CREATE TRIGGER sync AFTER INSERT ON public.tenants FOR EACH ROW EXECUTE FUNCTION public.sec_sync()")
    for table, plan in (("public.sec_staging", "enterprise"), ("public.tenants", "free")):
        mark = audit_mark(fresh_db)
        with login(fresh_db, ops) as o:
            with o.cursor().copy(f"COPY {table} FROM STDIN") as cp:
                cp.write_row(("acme", plan))
        rows = audit_since(fresh_db, mark)
        assert (ops, "update", "tenants", "acme", plan) in rows, (table, rows)


# ---------------------------------------------------------------------------
# Follow-ups of the second red-team pass


def test_enforce_limit_tells_nothing_about_a_tenant_the_caller_may_not_act_for(fresh_db, roles):
    """An app acting for acme that inserts a row for globex into a limited
    table gets 42501, not globex's plan, status or seat count."""
    app = roles.make("app")
    setup_catalogue(fresh_db, app)
    with connect(fresh_db) as c:
        c.execute("SELECT flux_subscribe('globex', 'pro', 'canceled')")
    with login(fresh_db, app) as a:
        a.execute("SET flux.tenant = 'acme'")
        e = error_of(a, "INSERT INTO sec_members VALUES ('globex', 'x')")
        assert e.sqlstate == "42501"
        assert "canceled" not in e.diag.message_primary and "seats" not in e.diag.message_primary
        assert sqlstate_of(a, "INSERT INTO sec_members VALUES ('acme', 'mine')") == "ok"


def test_enforce_limit_counts_a_partitioned_tables_rows_together(fresh_db, roles):
    """Rows in sibling partitions are one tenant's seats: 3 seats are 3,
    not 3 per partition."""
    setup_catalogue(fresh_db)
    with connect(fresh_db) as c:
        c.execute("CREATE TABLE public.sec_parts (tenant_id text NOT NULL, region text NOT NULL) PARTITION BY LIST (region)")
        c.execute("CREATE TABLE public.sec_parts_eu PARTITION OF sec_parts FOR VALUES IN ('eu')")
        c.execute("CREATE TABLE public.sec_parts_us PARTITION OF sec_parts FOR VALUES IN ('us')")
        c.execute("SELECT flux_enforce_limit('sec_parts', 'seats')")
        c.execute("INSERT INTO sec_parts VALUES ('acme', 'eu'), ('acme', 'eu'), ('acme', 'us')")
        assert sqlstate_of(c, "INSERT INTO sec_parts VALUES ('acme', 'us')") == "23P01"
        assert sqlstate_of(c, "INSERT INTO sec_parts_eu VALUES ('acme', 'eu')") == "23P01"
        assert c.execute("SELECT count(*) FROM sec_parts").fetchone()[0] == 3


def test_long_feature_keys_get_names_that_fit_and_do_not_collide(fresh_db, roles):
    """PostgreSQL cuts names at 63 bytes: two 60-character keys sharing
    their first 52 bytes still get a trigger and a policy each, and work."""
    a, b = "f" * 55 + "_alpha", "f" * 55 + "_beta"
    with connect(fresh_db) as c:
        c.execute("SELECT flux_define_plan('pro')")
        for key in (a, b):
            c.execute("SELECT flux_define_feature(%s, 'limit')", (key,))
            c.execute("SELECT flux_grant('pro', %s, 1)", (key,))
        c.execute("SELECT flux_subscribe('acme', 'pro')")
        c.execute("CREATE TABLE public.sec_long (tenant_id text NOT NULL)")
        for key in (a, b):
            c.execute("SELECT flux_enforce_limit('sec_long', %s)", (key,))
            c.execute("SELECT flux_enforce_limit('sec_long', %s)", (key,))  # again: idempotent
            c.execute("SELECT flux_protect('sec_long', %s)", (key,))
        names = [r[0] for r in c.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = 'sec_long'::regclass AND NOT tgisinternal")]
        assert len(names) == 2 and all(len(n.encode()) <= 63 for n in names)
        assert c.execute("SELECT count(*) FROM pg_policy WHERE polrelid = 'sec_long'::regclass AND polname LIKE 'flux_feature_%'").fetchone()[0] == 2
        c.execute("INSERT INTO sec_long VALUES ('acme')")
        assert sqlstate_of(c, "INSERT INTO sec_long VALUES ('acme')") == "23P01"


def test_a_service_role_with_a_current_tenant_still_acts_for_others_from_its_first_call(fresh_db, roles):
    """flux_check(other, ...) by a flux_service member is true on the first
    call of a backend, even while flux.tenant names another tenant."""
    svc = roles.make("svc", member_of=["flux_service"])
    setup_catalogue(fresh_db)
    with login(fresh_db, svc) as s:
        s.execute("SET flux.tenant = 'acme'")
        assert s.execute("SELECT flux_check('globex', 'reports')").fetchone()[0] is True
        s.execute("SET max_parallel_workers_per_gather = 2; SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; "
                  "SET min_parallel_table_scan_size = 0")
        n = s.execute("SELECT count(*) FROM generate_series(1, 20000) i WHERE flux_check(CASE WHEN i % 2 = 0 THEN 'globex' ELSE 'acme' END, 'reports')").fetchone()[0]
        assert n == 20000


def test_a_view_on_an_internal_function_does_not_block_the_upgrade_from_0_1_0(fresh_db, roles):
    """In 0.1.0 flux._value was PUBLIC: an app's view on it must not keep a
    database on the release where anyone can become superuser."""
    import os
    import shutil

    from test_release import EXT_DIR, ROOT

    target = os.path.join(EXT_DIR, "flux_entitlements--0.1.0.sql")
    shutil.copy(os.path.join(ROOT, "sql/released/0.1.0.sql"), target)
    app = roles.make("app")
    try:
        with connect(fresh_db) as c:
            c.execute("DROP EXTENSION flux_entitlements")
            c.execute("CREATE EXTENSION flux_entitlements VERSION '0.1.0'")
            c.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(app)))
        with login(fresh_db, app) as a:
            a.execute("CREATE VIEW public.sec_pin AS SELECT flux._value('acme', 'export') AS v")
        with connect(fresh_db) as c:
            c.execute("ALTER EXTENSION flux_entitlements UPDATE")
            assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'flux_entitlements'").fetchone()[0] != "0.1.0"
            assert c.execute("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'flux'").fetchone()[0] == "flux_owner"
            assert c.execute("SELECT to_regclass('public.sec_pin')").fetchone()[0] is None
    finally:
        os.remove(target)
