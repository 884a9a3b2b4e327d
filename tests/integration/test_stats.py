"""Decision statistics (CONTRACT "Decision statistics and limit reports")
over real connections to a cluster of their own that preloads the library
(shared_preload_libraries = 'flux_entitlements'): the shared table exists
only with the preload, so the normal test cluster cannot count.

What is promised and asserted here, with exact numbers:
- flux_check, flux_decide and the policies of flux_protect count once per
  statement for each (tenant, feature); flux_consume counts every call, an
  idempotent repeat not again; flux_entitlements is not counted; denials are
  counted by (tenant, feature, reason); rolled-back decisions count too.
- Concurrent clients lose no count.
- The four functions are for flux_admin; a reset forgets one database only.
- A clean restart keeps the counts, a crash restart drops them.
- flux.stats_max bounds the table, evicting the least used.
- A standby counts its own decisions.
- Without the preload every function raises 55000 naming the setting.

- Statements of one query string count apart; a parallel query counts at
  most once per process; a feature key longer than the 64 bytes kept is
  still found by flux_denials(feature) (section 6).

Each test works in a database of its own, since counts are per database.
Roles made here live in the throwaway cluster, which is destroyed at the end.
"""
import os
import signal
import subprocess
import threading
import time
import uuid

import psycopg
import pytest
from psycopg import sql

from conftest import BIN, PORT, connect, wait_until_up

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PG_SH = os.path.join(ROOT, "scripts/pg.sh")
PRELOAD = "shared_preload_libraries = 'flux_entitlements'"

STATS_PORT = int(os.environ.get("FLUX_STATS_PORT", PORT - 17))
STATS_DIR = f"/tmp/flux-pg/stats-{STATS_PORT}"
STANDBY_PORT = int(os.environ.get("FLUX_STATS_STANDBY_PORT", STATS_PORT + 100))
STANDBY_DIR = f"/tmp/flux-pg/stats-{STATS_PORT}-standby"
STAT_FILE = os.path.join(STATS_DIR, "pg_stat/flux_entitlements.stat")

# A fixed clock (superusers only) so that no daily period or rate window
# turns over in the middle of a test.
NOW_OPT = "-c flux.now=2026-11-22T12:00:00Z"

# ---------------------------------------------------------------------------
# The preloaded cluster and its databases


def pg_sh(*args):
    env = dict(os.environ, FLUX_PG_CONF=PRELOAD, FLUX_PGBIN=BIN)
    r = subprocess.run([PG_SH, *args], env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"scripts/pg.sh {' '.join(args)}: {r.stdout}{r.stderr}"


def as_postgres(*cmd):
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    r = subprocess.run(prefix + list(cmd), capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}: {r.stdout}{r.stderr}"


def sconnect(db, *, autocommit=True, user="postgres", options=None, port=STATS_PORT, host=STATS_DIR):
    kw = {"options": options} if options else {}
    return psycopg.connect(f"host={host} port={port} user={user} dbname={db}", autocommit=autocommit, **kw)


def restart():
    pg_sh("stop", STATS_DIR)
    pg_sh("start", STATS_DIR, str(STATS_PORT))


def wait_up(db="postgres", timeout=60):
    wait_until_up(db, timeout, connect=sconnect)


@pytest.fixture(scope="module")
def cluster():
    """A cluster of this module's own, preloading the library."""
    pg_sh("destroy", STATS_DIR)
    pg_sh("start", STATS_DIR, str(STATS_PORT))
    try:
        with sconnect("postgres") as c:
            assert c.execute("SHOW shared_preload_libraries").fetchone()[0] == "flux_entitlements"
        yield STATS_DIR
    finally:
        pg_sh("destroy", STATS_DIR)


def create_db(name):
    with sconnect("postgres") as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with sconnect(name) as c:
        c.execute("CREATE EXTENSION flux_entitlements")
    return name


def drop_db(name):
    wait_up()
    with sconnect("postgres") as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def db(cluster):
    """A new database with the extension on the statistics cluster."""
    name = create_db("flux_st_" + uuid.uuid4().hex[:10])
    yield name
    drop_db(name)


def make_role(db, what, member_of=()):
    name = f"st_{what}_{uuid.uuid4().hex[:8]}"
    with sconnect(db) as c:
        c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
        for r in member_of:
            c.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(r), sql.Identifier(name)))
    return name


# ---------------------------------------------------------------------------
# Reading the counts


def keyed(rows):
    """{key: count} of (key..., count) rows; a key twice is a failure."""
    out = {}
    for *k, n in rows:
        k = tuple(k)
        assert k not in out, f"{k} listed twice: {rows}"
        out[k] = n
    return out


def decisions(c):
    """{(feature, plan, reason): decisions} of this database."""
    return keyed(c.execute("SELECT feature, plan, reason, decisions FROM flux_decision_stats()").fetchall())


def denials(c, feature=None):
    """{(tenant, feature, reason): denials} of this database."""
    if feature is None:
        rows = c.execute("SELECT tenant, feature, reason, denials FROM flux_denials()").fetchall()
    else:
        rows = c.execute("SELECT tenant, feature, reason, denials FROM flux_denials(%s)", (feature,)).fetchall()
    return keyed(rows)


def info(c):
    entries, mx, evictions, reset_at = c.execute("SELECT * FROM flux_stats_info()").fetchone()
    return {"entries": entries, "max": mx, "evictions": evictions, "reset_at": reset_at}


def checks(c, tenant, feature, times):
    """`times` separate autocommit statements flux_check(tenant, feature)."""
    for _ in range(times):
        c.execute("SELECT flux_check(%s, %s)", (tenant, feature))


CATALOGUE = """
SELECT flux_define_feature('export');
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_feature('api', 'metered');
SELECT flux_define_feature('burst', 'rate');
SELECT flux_define_feature('beta');
SELECT flux_define_feature('newui');
SELECT flux_define_plan('free', rank => 0, is_default => true);
SELECT flux_define_plan('pro', rank => 1);
SELECT flux_grant('free', 'seats', 1);
SELECT flux_grant('pro', 'export');
SELECT flux_grant('pro', 'seats', 5);
SELECT flux_grant('pro', 'api', 3, 'day');
SELECT flux_grant('pro', 'burst', 2, '1 hour');
SELECT flux_grant('pro', 'beta');
SELECT flux_grant('pro', 'newui');
SELECT flux_set_flag('beta', false);
SELECT flux_set_flag('newui', true, 0);
SELECT flux_subscribe('acme', 'pro');
SELECT flux_subscribe('globex', 'free');
SELECT flux_subscribe('initech', 'pro', 'canceled');
"""


def setup_catalogue(db):
    with sconnect(db) as c:
        for stmt in CATALOGUE.strip().splitlines():
            c.execute(stmt)


# ---------------------------------------------------------------------------
# 1. A known sequence, every reason


def test_known_sequence_is_counted_exactly(db):
    """Every reason is counted under (feature, plan, reason), the plan being
    the decision's; a check counts once per statement for its (tenant,
    feature), also through flux_decide and the policies of flux_protect over
    many rows; each flux_consume counts, an idempotent repeat does not;
    flux_entitlements does not count; rolled-back and failed transactions'
    decisions count; a reading function sees the caller's own pending
    counts; denials are counted by (tenant, feature, reason), and
    flux_denials(feature) keeps that feature's."""
    setup_catalogue(db)
    with sconnect(db) as c:
        c.execute("CREATE TABLE docs (id int, tenant_id text)")
        c.execute("INSERT INTO docs SELECT i, CASE WHEN i % 2 = 0 THEN 'acme' ELSE 'globex' END FROM generate_series(1, 40) i")
        c.execute("SELECT flux_protect('docs', 'export')")
        reader = make_role(db, "reader")
        c.execute(sql.SQL("GRANT SELECT ON docs TO {}").format(sql.Identifier(reader)))
        scoped_key = c.execute("SELECT flux_create_api_key('acme', 'ci', scopes => ARRAY['seats'])").fetchone()[0]
        # Defining things decides nothing.
        assert decisions(c) == {} and denials(c) == {}
        started = c.execute("SELECT clock_timestamp()").fetchone()[0]

    with sconnect(db, options=NOW_OPT) as c:
        # Ten rows, one statement: one decision; twenty rows of acme's: one.
        # Three statements: three.
        assert c.execute("SELECT flux_check('acme', 'export') FROM generate_series(1, 10)").fetchall() == [(True,)] * 10
        assert c.execute("SELECT flux_check(tenant_id, 'export') FROM docs WHERE tenant_id = 'acme'").fetchall() == [(True,)] * 20
        checks(c, "acme", "export", 3)
        # flux_decide is a check: with flux_check in the same statement, one.
        assert c.execute("SELECT (flux_decide('acme', 'export')).allowed, flux_check('acme', 'export')").fetchone() == (True, True)
        assert c.execute("SELECT reason FROM flux_decide('acme', 'export')").fetchone()[0] == "ok"
        # The denial reasons, one each (globex twice).
        checks(c, "globex", "export", 2)                                   # not_in_plan
        assert c.execute("SELECT flux_check('nobody', 'export')").fetchone()[0] is False    # unknown_tenant
        assert c.execute("SELECT reason FROM flux_decide('acme', 'nope')").fetchone()[0] == "unknown_feature"
        assert c.execute("SELECT reason FROM flux_decide('acme', 'beta')").fetchone()[0] == "feature_disabled"
        assert c.execute("SELECT reason FROM flux_decide('acme', 'newui')").fetchone()[0] == "not_in_rollout"
        assert c.execute("SELECT reason, plan FROM flux_decide('initech', 'export')").fetchone() == ("subscription_inactive", "free")
        assert c.execute("SELECT flux_check('initech', 'seats')").fetchone()[0] is True  # the default plan's seat
        # Metered: 3 a day. Two consumes in one statement count two.
        assert c.execute("SELECT (flux_consume('acme', 'api')).reason FROM generate_series(1, 2)").fetchall() == [("ok",)] * 2
        assert c.execute("SELECT reason FROM flux_consume('acme', 'api', 1, 'idem-1')").fetchone()[0] == "ok"
        for _ in range(2):  # idempotent repeats: the first decision, not counted again
            assert c.execute("SELECT reason, used FROM flux_consume('acme', 'api', 1, 'idem-1')").fetchone() == ("ok", 3)
        assert c.execute("SELECT flux_usage('acme', 'api')").fetchone()[0] == 3
        assert c.execute("SELECT reason FROM flux_consume('acme', 'api')").fetchone()[0] == "limit_reached"
        assert c.execute("SELECT flux_check('acme', 'api')").fetchone()[0] is False  # limit_reached, as a check
        # Rate: 2 an hour.
        got = [c.execute("SELECT reason FROM flux_consume('acme', 'burst')").fetchone()[0] for _ in range(3)]
        assert got == ["ok", "ok", "rate_limited"]
        # flux_entitlements lists decisions without counting them.
        assert c.execute("SELECT count(*) FROM flux_entitlements('acme')").fetchone()[0] == 6

    # An API key scoped to seats: export and api are not_permitted.
    with sconnect(db, autocommit=False, options=NOW_OPT) as k:
        assert k.execute("SELECT flux_authenticate(%s)", (scoped_key,)).fetchone()[0] == "acme"
        assert k.execute("SELECT flux_check('export')").fetchone()[0] is False
        assert k.execute("SELECT reason FROM flux_decide('acme', 'api')").fetchone()[0] == "not_permitted"
        assert k.execute("SELECT flux_check('seats')").fetchone()[0] is True
        k.commit()

    with sconnect(db, autocommit=False, options=NOW_OPT) as t:
        # Rolled back: the decisions were made, so they count (the seat does not stay used).
        assert t.execute("SELECT flux_check('globex', 'export')").fetchone()[0] is False
        assert t.execute("SELECT allowed FROM flux_consume('acme', 'seats')").fetchone()[0] is True
        t.rollback()
        assert t.execute("SELECT flux_usage('acme', 'seats')").fetchone()[0] == 0
        t.rollback()
        # Aborted by an error: counted too.
        assert t.execute("SELECT flux_check('nobody', 'export')").fetchone()[0] is False
        with pytest.raises(psycopg.errors.DivisionByZero):
            t.execute("SELECT 1 / (SELECT count(*) - count(*) FROM docs)")
        t.rollback()
        # In an open transaction the reading functions see this session's pending counts.
        assert t.execute("SELECT flux_check('acme', 'beta')").fetchone()[0] is False
        assert denials(t, "beta") == {("acme", "beta", "feature_disabled"): 2}
        t.commit()

    # Row-level security as a non-superuser: one decision per statement, however many rows.
    with sconnect(db, user=reader) as r:
        r.execute("SET flux.tenant = 'acme'")
        assert r.execute("SELECT count(*) FROM docs").fetchone()[0] == 20
        assert len(r.execute("SELECT id FROM docs").fetchall()) == 20
        r.execute("SET flux.tenant = 'globex'")
        assert r.execute("SELECT count(*) FROM docs").fetchone()[0] == 0  # globex is on free: no export

    with sconnect(db) as c:
        assert decisions(c) == {
            ("export", "pro", "ok"): 1 + 1 + 3 + 1 + 1 + 2,  # 10 rows, 20 rows, 3 statements, decide+check, decide, 2 RLS
            ("export", "free", "not_in_plan"): 2 + 1 + 1,  # 2 checks, rolled back, RLS as globex
            ("export", None, "unknown_tenant"): 1 + 1,  # one committed, one in an aborted transaction
            ("nope", None, "unknown_feature"): 1,
            ("beta", None, "feature_disabled"): 2,
            ("newui", None, "not_in_rollout"): 1,
            ("export", "free", "subscription_inactive"): 1,
            ("seats", "free", "ok"): 1,
            ("api", "pro", "ok"): 3,  # 2 + 1, the 2 idempotent repeats not counted
            ("api", "pro", "limit_reached"): 2,  # a consume and a check
            ("burst", "pro", "ok"): 2,
            ("burst", "pro", "rate_limited"): 1,
            ("export", None, "not_permitted"): 1,
            ("api", None, "not_permitted"): 1,
            ("seats", "pro", "ok"): 2,  # the key's check, the rolled-back consume
        }
        expected_denials = {
            ("globex", "export", "not_in_plan"): 4,
            ("nobody", "export", "unknown_tenant"): 2,
            ("acme", "nope", "unknown_feature"): 1,
            ("acme", "beta", "feature_disabled"): 2,
            ("acme", "newui", "not_in_rollout"): 1,
            ("initech", "export", "subscription_inactive"): 1,
            ("acme", "api", "limit_reached"): 2,
            ("acme", "burst", "rate_limited"): 1,
            ("acme", "export", "not_permitted"): 1,
            ("acme", "api", "not_permitted"): 1,
        }
        assert denials(c) == expected_denials
        assert denials(c, "api") == {k: v for k, v in expected_denials.items() if k[1] == "api"}
        assert denials(c, "export") == {k: v for k, v in expected_denials.items() if k[1] == "export"}
        assert denials(c, "seats") == {}
        # Most frequent first; timestamps in order and inside the test.
        now = c.execute("SELECT clock_timestamp()").fetchone()[0]
        rows = c.execute("SELECT decisions, first_at, last_at FROM flux_decision_stats()").fetchall()
        assert [n for n, _, _ in rows] == sorted((n for n, _, _ in rows), reverse=True)
        for n, first_at, last_at in rows:
            assert started <= first_at <= last_at <= now, (n, first_at, last_at)
        for n, first_at, last_at in rows:
            if n == 1:
                assert first_at == last_at
        drows = c.execute("SELECT denials, last_at FROM flux_denials()").fetchall()
        assert [n for n, _ in drows] == sorted((n for n, _ in drows), reverse=True)
        assert all(started <= at <= now for _, at in drows)
        assert info(c)["max"] == 5000


# ---------------------------------------------------------------------------
# 2. Many clients


def test_concurrent_clients_lose_no_count(db):
    """Eight clients at once, each N autocommit checks of an allowed
    feature, N of a denied one (its own tenant) and M consumes: the totals
    are exact, per reason and per denied tenant."""
    n_clients, n_checks, n_consumes = 8, 40, 15
    with sconnect(db) as c:
        c.execute("SELECT flux_define_feature('export')")
        c.execute("SELECT flux_define_feature('api', 'metered')")
        c.execute("SELECT flux_define_plan('free', is_default => true)")
        c.execute("SELECT flux_define_plan('pro', rank => 1)")
        c.execute("SELECT flux_grant('pro', 'export')")
        c.execute("SELECT flux_grant('pro', 'api', 1000000, 'month')")
        c.execute("SELECT flux_subscribe('acme', 'pro')")
        for i in range(n_clients):
            c.execute("SELECT flux_subscribe(%s, 'free')", (f"client{i}",))
    barrier = threading.Barrier(n_clients)
    errors = []

    def client(i):
        try:
            with sconnect(db, options=NOW_OPT) as conn:
                barrier.wait(timeout=30)
                for j in range(max(n_checks, n_consumes)):
                    if j < n_checks:
                        assert conn.execute("SELECT flux_check('acme', 'export')").fetchone()[0] is True
                        assert conn.execute("SELECT flux_check(%s, 'export')", (f"client{i}",)).fetchone()[0] is False
                    if j < n_consumes:
                        assert conn.execute("SELECT allowed FROM flux_consume('acme', 'api')").fetchone()[0] is True
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert errors == []
    with sconnect(db, options=NOW_OPT) as c:
        assert c.execute("SELECT flux_usage('acme', 'api')").fetchone()[0] == n_clients * n_consumes
        assert decisions(c) == {
            ("export", "pro", "ok"): n_clients * n_checks,
            ("export", "free", "not_in_plan"): n_clients * n_checks,
            ("api", "pro", "ok"): n_clients * n_consumes,
        }
        assert denials(c) == {(f"client{i}", "export", "not_in_plan"): n_checks for i in range(n_clients)}


# ---------------------------------------------------------------------------
# 3. Privileges and reset


def test_only_admins_read_and_counts_are_per_database_and_reset_is_the_servers(db):
    """The four functions are not PUBLIC: a plain login gets 42501 on each;
    a member of flux_admin reads them and resets. Each database reads its
    own counts; a reset forgets every database's (the table is the
    server's, as pg_stat_statements' is)."""
    other = create_db("flux_st_" + uuid.uuid4().hex[:10])
    try:
        for name in (db, other):
            setup_catalogue(name)
            with sconnect(name) as c:
                checks(c, "acme", "export", 3)
                checks(c, "globex", "export", 2)
        plain = make_role(db, "plain")
        admin = make_role(db, "admin", member_of=["flux_admin"])
        with sconnect(db, user=plain) as p:
            for q in ("SELECT * FROM flux_decision_stats()", "SELECT * FROM flux_denials()",
                      "SELECT * FROM flux_denials('export')", "SELECT * FROM flux_stats_info()",
                      "SELECT flux_stats_reset()"):
                with pytest.raises(psycopg.Error) as e:
                    p.execute(q)
                assert e.value.sqlstate == "42501", (q, e.value)
        expected = {("export", "pro", "ok"): 3, ("export", "free", "not_in_plan"): 2}
        with sconnect(db, user=admin) as a:
            assert decisions(a) == expected
            assert denials(a) == {("globex", "export", "not_in_plan"): 2}
            before = info(a)
            assert before["entries"] >= 6 and before["max"] == 5000  # 3 entries in each database
            a.execute("SELECT flux_stats_reset()")
            assert decisions(a) == {} and denials(a) == {}
            after = info(a)
            assert after["entries"] == 0 and after["evictions"] == 0
            assert after["reset_at"] > before["reset_at"]
            # Counting starts again.
            checks(a, "acme", "export", 1)
            assert decisions(a) == {("export", "pro", "ok"): 1}
        with sconnect(other) as o:
            assert decisions(o) == {} and denials(o) == {}
            checks(o, "globex", "export", 1)
            assert denials(o) == {("globex", "export", "not_in_plan"): 1}
    finally:
        drop_db(other)


# ---------------------------------------------------------------------------
# 4. Clean restart and crash


def test_counts_survive_a_clean_restart_and_not_a_crash(db):
    """A clean (fast) shutdown writes pg_stat/flux_entitlements.stat; the
    next start reads it back, removes it, and shows the same counts and
    times. A crash restart (a backend killed with SIGKILL) drops every
    count, and counting goes on afterwards."""
    setup_catalogue(db)
    with sconnect(db) as c:
        checks(c, "acme", "export", 4)
        checks(c, "globex", "export", 3)
        checks(c, "nobody", "beta", 1)
        c.execute("SELECT flux_consume('acme', 'seats')")
        assert decisions(c) == {
            ("export", "pro", "ok"): 4,
            ("export", "free", "not_in_plan"): 3,
            ("beta", None, "unknown_tenant"): 1,
            ("seats", "pro", "ok"): 1,
        }
        assert denials(c) == {("globex", "export", "not_in_plan"): 3, ("nobody", "beta", "unknown_tenant"): 1}
        stats_before = c.execute("SELECT * FROM flux_decision_stats() ORDER BY 1, 2, 3").fetchall()
        denials_before = c.execute("SELECT * FROM flux_denials() ORDER BY 1, 2, 3").fetchall()
        info_before = info(c)

    pg_sh("stop", STATS_DIR)
    assert os.path.exists(STAT_FILE), "a clean shutdown leaves the statistics file"
    pg_sh("start", STATS_DIR, str(STATS_PORT))
    assert not os.path.exists(STAT_FILE), "the file is removed once read back"
    with sconnect(db) as c:
        assert c.execute("SELECT * FROM flux_decision_stats() ORDER BY 1, 2, 3").fetchall() == stats_before
        assert c.execute("SELECT * FROM flux_denials() ORDER BY 1, 2, 3").fetchall() == denials_before
        assert info(c) == info_before
        # And they go on from there.
        checks(c, "acme", "export", 1)
        assert decisions(c)[("export", "pro", "ok")] == 5

    # A crash: SIGKILL of a backend makes the postmaster restart every process.
    witness = sconnect(db)
    victim = sconnect(db)
    pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 30
    while True:  # the crash restart ends every session
        try:
            witness.execute("SELECT 1")
        except psycopg.Error:
            break
        assert time.time() < deadline, "no crash restart after SIGKILL of a backend"
        time.sleep(0.1)
    witness.close()
    victim.close()
    wait_up(db)
    assert not os.path.exists(STAT_FILE)
    with sconnect(db) as c:
        assert decisions(c) == {} and denials(c) == {}
        assert info(c)["entries"] == 0
        checks(c, "globex", "export", 2)
        assert decisions(c) == {("export", "free", "not_in_plan"): 2}
        assert denials(c) == {("globex", "export", "not_in_plan"): 2}


# ---------------------------------------------------------------------------
# 5. Standby


def test_a_standby_counts_its_own_decisions(db):
    """A hot standby (pg_basebackup of the statistics cluster, so preloaded
    too) counts the decisions made on it, in its own table: the primary does
    not see them and the standby does not see the primary's. flux_consume
    there fails with 25006."""
    setup_catalogue(db)
    with sconnect(db) as p:
        checks(p, "acme", "export", 2)
    subprocess.run(["rm", "-rf", STANDBY_DIR], check=True)
    as_postgres(f"{BIN}/pg_basebackup", "-h", "127.0.0.1", "-p", str(STATS_PORT), "-U", "postgres",
                "-D", STANDBY_DIR, "-R", "-X", "stream", "-c", "fast")
    with open(os.path.join(STANDBY_DIR, "postgresql.conf"), "a") as f:
        f.write(f"\nport = {STANDBY_PORT}\nunix_socket_directories = '{STANDBY_DIR}'\nhot_standby = on\n")
    as_postgres(f"{BIN}/pg_ctl", "-D", STANDBY_DIR, "-l", os.path.join(STANDBY_DIR, "server.log"), "-w", "-t", "60", "start")
    try:
        with sconnect(db, port=STANDBY_PORT, host=STANDBY_DIR) as s:
            assert s.execute("SELECT pg_is_in_recovery(), current_setting('shared_preload_libraries')").fetchone() == (True, "flux_entitlements")
            assert decisions(s) == {}
            assert s.execute("SELECT flux_check('acme', 'export') FROM generate_series(1, 5)").fetchall() == [(True,)] * 5
            checks(s, "acme", "export", 2)
            assert s.execute("SELECT reason FROM flux_decide('globex', 'export')").fetchone()[0] == "not_in_plan"
            with pytest.raises(psycopg.Error) as e:
                s.execute("SELECT flux_consume('acme', 'api')")
            assert e.value.sqlstate == "25006", e.value
            assert decisions(s) == {("export", "pro", "ok"): 3, ("export", "free", "not_in_plan"): 1}
            assert denials(s) == {("globex", "export", "not_in_plan"): 1}
        with sconnect(db) as p:
            assert decisions(p) == {("export", "pro", "ok"): 2}
            assert denials(p) == {}
    finally:
        as_postgres(f"{BIN}/pg_ctl", "-D", STANDBY_DIR, "-m", "fast", "-w", "stop")
        subprocess.run(["rm", "-rf", STANDBY_DIR], check=True)


# ---------------------------------------------------------------------------
# 6. Edges of "once per statement" and of names cut to 64 bytes


def test_two_statements_in_one_query_string_count_twice(db):
    """Two statements count two decisions, also when a client sends them in
    one query string (psql -c, psycopg without parameters)."""
    setup_catalogue(db)
    with sconnect(db) as c:
        c.execute("SELECT flux_check('acme', 'export'); SELECT flux_check('acme', 'export')")
        assert decisions(c) == {("export", "pro", "ok"): 2}


def test_a_parallel_query_counts_once_per_process(db):
    """A check over many rows of one tenant in one statement is one
    decision in each process that evaluates it: a parallel query counts at
    most once per worker and the leader (README, Insights: each process
    keeps its own once-per-statement memory)."""
    setup_catalogue(db)
    with sconnect(db) as c:
        c.execute("CREATE TABLE events AS SELECT i AS id, 'acme'::text AS tenant_id FROM generate_series(1, 100000) i")
        c.execute("ANALYZE events")
        for s in ("SET max_parallel_workers_per_gather = 2", "SET parallel_setup_cost = 0",
                  "SET parallel_tuple_cost = 0", "SET min_parallel_table_scan_size = 0"):
            c.execute(s)
        plan = c.execute("EXPLAIN (ANALYZE, FORMAT JSON) SELECT count(*) FROM events WHERE flux_check(tenant_id, 'export')").fetchone()[0]
        launched = plan[0]["Plan"].get("Plans", [{}])[0].get("Workers Launched")
        d = decisions(c)
        assert launched and launched >= 1, plan
        assert set(d) == {("export", "pro", "ok")}, d
        assert 1 <= d[("export", "pro", "ok")] <= 1 + launched, f"{d} with {launched} workers launched"


def test_denials_of_a_long_feature_key(db):
    """flux_denials(feature) lists that feature's denials whatever the
    length of its key (flux_define_feature accepts a 70-byte key)."""
    long_key = "f" * 70
    setup_catalogue(db)
    with sconnect(db) as c:
        c.execute("SELECT flux_define_feature(%s)", (long_key,))
        checks(c, "acme", long_key, 1)
        assert len(denials(c)) == 1
        assert len(denials(c, long_key)) == 1


# ---------------------------------------------------------------------------
# 7. Eviction (restarts the cluster with flux.stats_max = 100, then restores it)


def test_the_table_is_bounded_and_evicts_the_least_used(db):
    """With flux.stats_max = 100 the table never holds more than 100
    entries: 300 distinct denied unknown tenants make room by evicting the
    least used, counted in flux_stats_info().evictions, while a heavily used
    entry stays with its exact count."""
    with sconnect("postgres") as c:
        c.execute("ALTER SYSTEM SET flux.stats_max = 100")
    restart()
    try:
        setup_catalogue(db)
        with sconnect(db) as c:
            assert c.execute("SHOW flux.stats_max").fetchone()[0] == "100"
            start = info(c)
            assert start["max"] == 100 and start["entries"] <= 100
            checks(c, "acme", "export", 150)
            # 150 unknown tenants in one statement (one flush), 150 one by one.
            assert c.execute("SELECT count(*) FROM generate_series(1, 150) i WHERE flux_check('ghost-' || i, 'export')").fetchone()[0] == 0
            for i in range(151, 301):
                c.execute("SELECT flux_check(%s, 'export')", (f"ghost-{i}",))
            end = info(c)
            assert end["entries"] <= 100, end
            assert end["evictions"] > start["evictions"], (start, end)
            d = decisions(c)
            assert d[("export", "pro", "ok")] == 150
            assert d[("export", None, "unknown_tenant")] == 300
            kept = denials(c)
            assert 0 < len(kept) <= 98, len(kept)
            assert all(k[0].startswith("ghost-") and n == 1 for k, n in kept.items())
            # The most recent denials are the ones kept.
            assert ("ghost-300", "export", "unknown_tenant") in kept
    finally:
        with sconnect("postgres") as c:
            c.execute("ALTER SYSTEM RESET flux.stats_max")
        restart()
        with sconnect("postgres") as c:
            assert c.execute("SHOW flux.stats_max").fetchone()[0] == "5000"


# ---------------------------------------------------------------------------
# 8. Without the preload (the normal test cluster)


def test_without_the_preload_every_function_names_the_setting(fresh_db):
    """On a server that does not preload the library, each function raises
    55000 with a message naming shared_preload_libraries =
    'flux_entitlements'; flux.stats_max does not exist; decisions go on."""
    with connect(fresh_db) as c:
        assert "flux_entitlements" not in c.execute("SHOW shared_preload_libraries").fetchone()[0]
        for q in ("SELECT * FROM flux_decision_stats()", "SELECT * FROM flux_denials()",
                  "SELECT * FROM flux_denials('export')", "SELECT * FROM flux_stats_info()",
                  "SELECT flux_stats_reset()"):
            with pytest.raises(psycopg.Error) as e:
                c.execute(q)
            assert e.value.sqlstate == "55000", (q, e.value)
            assert "shared_preload_libraries = 'flux_entitlements'" in str(e.value), (q, e.value)
        assert c.execute("SELECT current_setting('flux.stats_max', true)").fetchone()[0] is None
        c.execute("SELECT flux_define_feature('export')")
        assert c.execute("SELECT flux_check('nobody', 'export')").fetchone()[0] is False


# ---------------------------------------------------------------------------
# 9. The README's Insights section


def test_the_readme_prints_what_it_shows_with_statistics_on(db):
    """The whole README, its ```sql stats blocks (Insights) included, runs
    on a preloaded server and prints exactly what it shows: the rest of it
    answers the same as without the preload."""
    from test_readme import ROOT as README_ROOT, run_readme

    with open(os.path.join(README_ROOT, "README.md")) as f:
        stats_blocks = f.read().count("```sql stats\n")
    assert stats_blocks >= 3
    ran, compared = run_readme(db, STATS_DIR, STATS_PORT, stats=True)
    assert ran >= 5 + stats_blocks and compared >= 3 + 3
