"""Hot standby: a streaming replica built with pg_basebackup on loopback
answers checks, decisions and RLS policies, sees a change made on the
primary once it is replayed, and refuses flux_consume with 25006."""
import os
import shutil
import subprocess
import time

import psycopg
import pytest

from conftest import BIN, PORT, connect

STANDBY_DIR = os.environ.get("FLUX_STANDBY_DIR", "/tmp/flux-pg/standby")
STANDBY_PORT = int(os.environ.get("FLUX_STANDBY_PORT", "5496"))


def as_postgres(*cmd):
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run(prefix + list(cmd), check=True, capture_output=True, text=True)


@pytest.fixture
def standby(fresh_db):
    with connect(fresh_db) as c:
        c.execute("""
            SELECT flux_define_feature('export');
            SELECT flux_define_feature('api', 'metered');
            SELECT flux_define_plan('starter', rank => 1);
            SELECT flux_define_plan('pro', rank => 2);
            SELECT flux_grant('pro', 'export', value => '["csv"]');
            SELECT flux_grant('pro', 'api', 100, 'day');
            SELECT flux_subscribe('acme', 'pro');
            CREATE TABLE reports (id int, tenant_id text);
            INSERT INTO reports VALUES (1, 'acme'), (2, 'acme'), (3, 'globex');
            SELECT flux_protect('reports', 'export');
            DO $$ BEGIN
              IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'flux_it_reader') THEN CREATE ROLE flux_it_reader; END IF;
            END $$;
            GRANT SELECT ON reports TO flux_it_reader;
        """)
    shutil.rmtree(STANDBY_DIR, ignore_errors=True)
    parent = os.path.dirname(STANDBY_DIR)
    os.makedirs(parent, exist_ok=True)
    as_postgres(f"{BIN}/pg_basebackup", "-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres",
                "-D", STANDBY_DIR, "-R", "-X", "stream", "-c", "fast")
    with open(os.path.join(STANDBY_DIR, "postgresql.conf"), "a") as f:
        f.write(f"\nport = {STANDBY_PORT}\nunix_socket_directories = '{STANDBY_DIR}'\nhot_standby = on\n")
    as_postgres(f"{BIN}/pg_ctl", "-D", STANDBY_DIR, "-l", os.path.join(STANDBY_DIR, "server.log"), "-w", "start")
    try:
        yield fresh_db
    finally:
        as_postgres(f"{BIN}/pg_ctl", "-D", STANDBY_DIR, "-m", "immediate", "-w", "stop")
        shutil.rmtree(STANDBY_DIR, ignore_errors=True)


def replica(db):
    return psycopg.connect(f"host={STANDBY_DIR} port={STANDBY_PORT} user=postgres dbname={db}", autocommit=True)


def wait_for_replay(primary, rep, timeout=20):
    target = primary.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if rep.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)).fetchone()[0]:
            return
        time.sleep(0.05)
    raise AssertionError("the replica did not replay in time")


def test_replica_answers_and_follows_the_primary(standby):
    with connect(standby) as primary, replica(standby) as rep:
        wait_for_replay(primary, rep)
        assert rep.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
        assert rep.execute("SELECT flux_check('acme', 'export')").fetchone()[0] is True
        assert rep.execute("SELECT reason FROM flux_decide('acme', 'api')").fetchone()[0] == "ok"
        assert rep.execute("SELECT count(*) FROM flux_entitlements('acme')").fetchone()[0] == 2
        assert rep.execute("SELECT flux_value('acme', 'export')").fetchone()[0] == ["csv"]
        rep.execute("SET flux.tenant = 'acme'")
        assert rep.execute("SELECT flux_current_tenant(), flux_check('export')").fetchone() == ("acme", True)
        rep.execute("SET ROLE flux_it_reader")
        assert rep.execute("SELECT count(*) FROM reports").fetchone()[0] == 2
        # A downgrade on the primary is answered by the same warm session after replay.
        primary.execute("UPDATE flux.tenants SET plan = 'starter' WHERE id = 'acme'")
        wait_for_replay(primary, rep)
        assert rep.execute("SELECT count(*) FROM reports").fetchone()[0] == 0
        rep.execute("RESET ROLE")
        assert rep.execute("SELECT reason FROM flux_decide('acme', 'export')").fetchone()[0] == "not_in_plan"
        # Writing usage is refused with a clear read-only error.
        primary.execute("SELECT flux_subscribe('acme', 'pro')")
        wait_for_replay(primary, rep)
        with pytest.raises(psycopg.Error) as e:
            rep.execute("SELECT flux_consume('acme', 'api')")
        assert e.value.sqlstate == "25006", e.value
        assert "read-only" in str(e.value)
        with pytest.raises(psycopg.Error) as e:
            rep.execute("SELECT flux_subscribe('acme', 'starter')")
        assert e.value.sqlstate == "25006", e.value
        primary.execute("DROP TABLE reports")
        primary.execute("DROP OWNED BY flux_it_reader")
