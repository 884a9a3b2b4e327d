"""Behind PgBouncer in transaction mode (Debian's pgbouncer, one server
connection shared by every client): flux_authenticate's tenant ends with the
transaction, the next client on the same server connection sees none of it,
decisions are fresh through the pooler, and a session-level
`SET flux.tenant` does stay on the pooled connection (the README's warning)."""
import os
import shutil
import subprocess
import time

import psycopg
import pytest

from conftest import HOST, PORT, connect

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
DIR = os.environ.get("FLUX_POOLER_DIR", "/tmp/flux-pg/pgbouncer")
POOL_PORT = int(os.environ.get("FLUX_POOLER_PORT", "6499"))


def as_postgres(*cmd):
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.Popen(prefix + list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def pooler(fresh_db):
    if not os.path.exists(PGBOUNCER):
        pytest.fail("pgbouncer is not installed: scripts/deps.sh installs it")
    shutil.rmtree(DIR, ignore_errors=True)
    os.makedirs(DIR)
    with open(os.path.join(DIR, "users.txt"), "w") as f:
        f.write('"postgres" ""\n')
    with open(os.path.join(DIR, "pgbouncer.ini"), "w") as f:
        f.write(f"""[databases]
{fresh_db} = host={HOST} port={PORT} dbname={fresh_db}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {POOL_PORT}
unix_socket_dir =
auth_type = trust
auth_file = {DIR}/users.txt
pool_mode = transaction
default_pool_size = 1
max_client_conn = 20
logfile = {DIR}/pgbouncer.log
pidfile = {DIR}/pgbouncer.pid
""")
    if os.geteuid() == 0:
        shutil.chown(DIR, "postgres")
        for name in os.listdir(DIR):
            shutil.chown(os.path.join(DIR, name), "postgres")
    proc = as_postgres(PGBOUNCER, os.path.join(DIR, "pgbouncer.ini"))
    deadline = time.time() + 10
    while True:
        try:
            psycopg.connect(dsn_pool(fresh_db), connect_timeout=1).close()
            break
        except psycopg.OperationalError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError("pgbouncer did not start:\n" + open(os.path.join(DIR, "pgbouncer.log")).read())
            time.sleep(0.2)
    yield fresh_db
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(DIR, ignore_errors=True)


def dsn_pool(db):
    return f"host=127.0.0.1 port={POOL_PORT} user=postgres dbname={db}"


def pooled(db):
    # No server-side prepared statements: transaction pooling hands each
    # transaction to whichever server connection is free.
    return psycopg.connect(dsn_pool(db), autocommit=True, prepare_threshold=None)


def backend_pid(c):
    return c.execute("SELECT pg_backend_pid()").fetchone()[0]


def test_an_api_keys_tenant_ends_with_the_transaction_behind_pgbouncer(pooler):
    with connect(pooler) as admin:
        admin.execute("""
            SELECT flux_define_feature('export');
            SELECT flux_define_plan('free', is_default => true);
            SELECT flux_define_plan('pro', rank => 1);
            SELECT flux_grant('pro', 'export');
            SELECT flux_subscribe('acme', 'pro');
        """)
        key = admin.execute("SELECT flux_create_api_key('acme', 'pooled')").fetchone()[0]
    with pooled(pooler) as a, pooled(pooler) as b:
        with a.transaction():
            assert a.execute("SELECT flux_authenticate(%s)", [key]).fetchone()[0] == "acme"
            assert a.execute("SELECT flux_current_tenant(), flux_check('export')").fetchone() == ("acme", True)
            pid = backend_pid(a)
        # The next client gets the same server connection (pool size 1) and
        # none of the first one's identity.
        assert backend_pid(b) == pid
        assert b.execute("SELECT flux_current_tenant(), flux_check('export')").fetchone() == (None, None)
        # SET LOCAL / set_config(..., true) is the pooled way to name a tenant.
        with b.transaction():
            b.execute("SELECT set_config('flux.tenant', 'acme', true)")
            assert b.execute("SELECT flux_check('export')").fetchone()[0] is True
        assert a.execute("SELECT flux_current_tenant()").fetchone()[0] is None


def test_decisions_are_fresh_through_the_pooler(pooler):
    with connect(pooler) as admin:
        admin.execute("""
            SELECT flux_define_feature('export');
            SELECT flux_define_plan('starter');
            SELECT flux_define_plan('pro', rank => 1);
            SELECT flux_grant('pro', 'export');
            SELECT flux_subscribe('acme', 'starter');
        """)
        with pooled(pooler) as client:
            assert client.execute("SELECT flux_check('acme', 'export')").fetchone()[0] is False
            admin.execute("SELECT flux_subscribe('acme', 'pro')")
            assert client.execute("SELECT flux_check('acme', 'export')").fetchone()[0] is True
            admin.execute("SELECT flux_subscribe('acme', 'starter')")
            assert client.execute("SELECT flux_check('acme', 'export')").fetchone()[0] is False


def test_a_session_level_set_leaks_to_the_next_client(pooler):
    """Why the README says never `SET flux.tenant` (session level) behind a
    transaction pooler: it stays on the server connection."""
    with pooled(pooler) as a, pooled(pooler) as b:
        a.execute("SET flux.tenant = 'acme'")
        assert backend_pid(a) == backend_pid(b)
        assert b.execute("SELECT flux_current_tenant()").fetchone()[0] == "acme"
        b.execute("RESET flux.tenant")
