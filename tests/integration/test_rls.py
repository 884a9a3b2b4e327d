"""flux_protect seen from application sessions that are not the table owner
and have no grant on the flux tables."""
from conftest import connect

SETUP = """
SELECT flux_define_feature('reports');
SELECT flux_define_plan('starter', rank => 1);
SELECT flux_define_plan('pro', rank => 2);
SELECT flux_grant('pro', 'reports');
SELECT flux_subscribe(t, 'pro') FROM unnest(ARRAY['acme', 'globex', 'initech']) t;
CREATE TABLE reports (id serial PRIMARY KEY, tenant_id text NOT NULL, title text);
CREATE INDEX ON reports (tenant_id);
INSERT INTO reports (tenant_id, title) SELECT t, 'r' || i FROM unnest(ARRAY['acme', 'globex', 'initech']) t, generate_series(1, 4) i;
SELECT flux_protect('reports', 'reports');
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'flux_it_app') THEN CREATE ROLE flux_it_app; END IF;
END $$;
GRANT SELECT, INSERT, UPDATE, DELETE ON reports TO flux_it_app;
GRANT USAGE ON SEQUENCE reports_id_seq TO flux_it_app;
"""


def app(db, tenant=None, claims=None):
    c = connect(db)
    c.execute("SET ROLE flux_it_app")
    if tenant:
        c.execute("SELECT set_config('flux.tenant', %s, false)", (tenant,))
    if claims:
        c.execute("SELECT set_config('request.jwt.claims', %s, false)", (claims,))
    return c


def count(c):
    return c.execute("SELECT count(*) FROM reports").fetchone()[0]


def test_isolation_claims_and_a_downgrade_seen_by_the_next_statement(fresh_db):
    with connect(fresh_db) as admin:
        admin.execute(SETUP)
        acme = app(fresh_db, tenant="acme")
        globex = app(fresh_db, claims='{"tenant_id": "globex"}')
        nobody = app(fresh_db)
        try:
            assert count(acme) == 4 and count(globex) == 4 and count(nobody) == 0
            assert acme.execute("SELECT DISTINCT tenant_id FROM reports").fetchall() == [("acme",)]
            # Cross-tenant writes are refused.
            for sql in [
                "INSERT INTO reports (tenant_id, title) VALUES ('globex', 'x')",
                "UPDATE reports SET tenant_id = 'initech'",
            ]:
                try:
                    acme.execute(sql)
                    raise AssertionError(sql)
                except Exception as e:  # noqa: BLE001
                    assert e.sqlstate == "42501", e
            assert acme.execute("DELETE FROM reports WHERE tenant_id = 'globex'").rowcount == 0
            assert count(globex) == 4
            # A downgrade committed elsewhere hides the rows on the next statement.
            admin.execute("UPDATE flux.tenants SET plan = 'starter' WHERE id = 'globex'")
            assert count(globex) == 0 and count(acme) == 4
            admin.execute("SELECT flux_subscribe('globex', 'pro')")
            assert count(globex) == 4
            # The application role cannot read the flux tables at all.
            try:
                globex.execute("SELECT * FROM flux.tenants")
                raise AssertionError("flux.tenants readable")
            except Exception as e:  # noqa: BLE001
                assert e.sqlstate == "42501", e
        finally:
            for c in (acme, globex, nobody):
                c.close()
            admin.execute("DROP TABLE reports")
            admin.execute("DROP OWNED BY flux_it_app")
