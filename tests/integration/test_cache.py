"""The per-backend cache never gives a stale answer after a commit: warm
sessions interleave with changes made by functions and by plain DML,
rollbacks, and dropping and recreating the extension."""
import random

from conftest import connect

CATALOGUE = """
SELECT flux_define_feature('export');
SELECT flux_define_feature('sso');
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_plan('free', rank => 0, is_default => true);
SELECT flux_define_plan('starter', rank => 1);
SELECT flux_define_plan('pro', rank => 2);
SELECT flux_grant('pro', 'export');
SELECT flux_grant('pro', 'seats', 10);
SELECT flux_grant('starter', 'seats', 3);
SELECT flux_grant('free', 'seats', 1);
SELECT flux_define_addon('pack');
SELECT flux_grant_addon('pack', 'seats', 5);
SELECT flux_subscribe('t' || i, CASE WHEN i % 2 = 0 THEN 'pro' ELSE 'starter' END) FROM generate_series(1, 6) i;
"""
TENANTS = [f"t{i}" for i in range(1, 7)]
FEATURES = ["export", "sso", "seats"]
# flux_check is asked twice per pair so that its per-instant memo (which
# keeps answers from the second check of a transaction on) is exercised.
ANSWERS = """
SELECT t, f, d.allowed, d.reason, d."limit", flux_check(t, f), flux_check(t, f)
  FROM unnest(%s::text[]) t, unnest(%s::text[]) f, flux_decide(t, f) d ORDER BY 1, 2
"""


def answers(conn):
    return conn.execute(ANSWERS, (TENANTS, FEATURES)).fetchall()


CHANGES = [
    lambda r: f"SELECT flux_subscribe('{r.choice(TENANTS)}', '{r.choice(['free', 'starter', 'pro'])}')",
    lambda r: f"UPDATE flux.tenants SET plan = '{r.choice(['starter', 'pro'])}' WHERE id = '{r.choice(TENANTS)}'",
    lambda r: f"UPDATE flux.tenants SET status = '{r.choice(['active', 'canceled', 'paused', 'past_due'])}' WHERE id = '{r.choice(TENANTS)}'",
    lambda r: f"SELECT flux_override('{r.choice(TENANTS)}', '{r.choice(FEATURES)}', enabled => {r.choice(['true', 'false'])})",
    lambda r: f"DELETE FROM flux.overrides WHERE tenant = '{r.choice(TENANTS)}'",
    lambda r: f"UPDATE flux.grants SET \"limit\" = {r.randint(0, 20)} WHERE plan = 'pro' AND feature = 'seats'",
    lambda r: f"SELECT flux_grant('{r.choice(['starter', 'pro'])}', 'sso')",
    lambda r: f"SELECT flux_revoke('{r.choice(['starter', 'pro'])}', 'sso')",
    lambda r: f"SELECT flux_attach_addon('{r.choice(TENANTS)}', 'pack', {r.randint(0, 3)})",
    lambda r: f"SELECT flux_set_flag('export', enabled => {r.choice(['true', 'false'])})",
    lambda r: f"UPDATE flux.plans SET is_default = {r.choice(['true', 'false'])} WHERE key = 'free'",
]


def test_no_stale_answer_after_any_commit_or_rollback(fresh_db):
    rng = random.Random(20261122)
    with connect(fresh_db) as admin:
        admin.execute(CATALOGUE)
    readers = [connect(fresh_db) for _ in range(3)]
    in_tx_reader = connect(fresh_db, autocommit=False)
    stale = checked = 0
    try:
        with connect(fresh_db) as admin:
            for r in readers + [in_tx_reader]:
                answers(r)  # warm every cache
            for step in range(150):
                change = rng.choice(CHANGES)(rng)
                rollback = rng.random() < 0.25
                if rollback:
                    admin.execute("BEGIN")
                    admin.execute(change)
                    admin.execute("ROLLBACK")
                else:
                    admin.execute(change)
                with connect(fresh_db) as oracle:  # a cold cache: reads the tables
                    want = answers(oracle)
                for r in readers + [in_tx_reader]:
                    got = answers(r)
                    checked += 1
                    if got != want:
                        stale += 1
                if step % 10 == 9:
                    in_tx_reader.commit()
    finally:
        for r in readers + [in_tx_reader]:
            r.close()
    assert checked == 600
    assert stale == 0, f"{stale} stale answers of {checked}"


def test_own_uncommitted_change_is_seen_and_forgotten_on_rollback(fresh_db):
    with connect(fresh_db) as admin:
        admin.execute(CATALOGUE)
    with connect(fresh_db, autocommit=False) as c, connect(fresh_db) as other:
        assert c.execute("SELECT flux_check('t1', 'export')").fetchone()[0] is False
        c.execute("UPDATE flux.tenants SET plan = 'pro' WHERE id = 't1'")
        assert c.execute("SELECT flux_check('t1', 'export')").fetchone()[0] is True
        assert other.execute("SELECT flux_check('t1', 'export')").fetchone()[0] is False
        c.rollback()
        assert c.execute("SELECT flux_check('t1', 'export')").fetchone()[0] is False
        assert other.execute("SELECT flux_check('t1', 'export')").fetchone()[0] is False


def test_drop_and_recreate_the_extension_under_a_warm_session(fresh_db):
    with connect(fresh_db) as admin:
        admin.execute(CATALOGUE)
    with connect(fresh_db) as reader, connect(fresh_db) as admin:
        assert reader.execute("SELECT flux_check('t2', 'export')").fetchone()[0] is True
        admin.execute("DROP EXTENSION flux_entitlements")
        admin.execute("CREATE EXTENSION flux_entitlements")
        admin.execute("SELECT flux_define_feature('export')")
        admin.execute("SELECT flux_define_plan('pro')")
        admin.execute("SELECT flux_subscribe('t2', 'pro')")
        assert reader.execute("SELECT reason FROM flux_decide('t2', 'export')").fetchone()[0] == "not_in_plan"
        admin.execute("SELECT flux_grant('pro', 'export')")
        assert reader.execute("SELECT flux_check('t2', 'export')").fetchone()[0] is True


def test_the_clock_is_read_at_decision_time_not_cached(fresh_db):
    with connect(fresh_db) as admin:
        admin.execute(CATALOGUE)
        admin.execute(
            "SELECT flux_subscribe('trial', 'pro', 'trialing', trial_ends_at => '2026-12-01 00:00+00')"
        )
    with connect(fresh_db) as c:
        c.execute("SET flux.now = '2026-11-30 23:59+00'")
        assert c.execute("SELECT flux_check('trial', 'export')").fetchone()[0] is True
        c.execute("SET flux.now = '2026-12-01 00:00+00'")
        assert c.execute("SELECT flux_check('trial', 'export')").fetchone()[0] is False


def test_the_tenant_cache_is_bounded(fresh_db):
    with connect(fresh_db) as admin:
        admin.execute(CATALOGUE)
        admin.execute("SELECT count(flux_subscribe('x' || i, 'pro')) FROM generate_series(1, 500) i")
    with connect(fresh_db) as c:
        c.execute("SET flux.cache_tenants = 100")
        n = c.execute("SELECT count(*) FILTER (WHERE flux_check('x' || i, 'export')) FROM generate_series(1, 500) i").fetchone()[0]
        assert n == 500
        assert c.execute("SELECT flux._cached_tenants()").fetchone()[0] <= 100


def count_checks(conn, tenant, feature, n=200):
    return conn.execute(
        "SELECT count(*) FILTER (WHERE flux_check(%s, %s)) FROM generate_series(1, %s)",
        (tenant, feature, n),
    ).fetchone()[0]


def test_remembered_answers_follow_the_settings_within_a_transaction(fresh_db):
    """flux_check remembers answers for an instant; SET LOCAL of flux.now or
    flux.default_grace_period inside one transaction changes the instant."""
    with connect(fresh_db) as admin:
        admin.execute(CATALOGUE)
        admin.execute(
            "SELECT flux_subscribe('trial', 'pro', 'trialing', trial_ends_at => '2026-12-01 00:00+00')"
        )
        admin.execute("SELECT flux_subscribe('late', 'pro', 'past_due')")
        admin.execute(
            "UPDATE flux.tenants SET past_due_since = '2026-11-20 00:00+00' WHERE id = 'late'"
        )
    with connect(fresh_db, autocommit=False) as c:
        c.execute("SET LOCAL flux.now = '2026-11-30 23:59+00'")
        assert count_checks(c, "trial", "export") == 200
        c.execute("SET LOCAL flux.now = '2026-12-01 00:00+00'")
        assert count_checks(c, "trial", "export") == 0
        c.execute("SET LOCAL flux.now = '2026-11-25 00:00+00'")
        c.execute("SET LOCAL flux.default_grace_period = '30 days'")
        assert count_checks(c, "late", "export") == 200
        c.execute("SET LOCAL flux.default_grace_period = '1 day'")
        assert count_checks(c, "late", "export") == 0
        c.rollback()


def test_remembered_answers_follow_commits_inside_an_open_transaction(fresh_db):
    with connect(fresh_db) as admin:
        admin.execute(CATALOGUE)
    with connect(fresh_db, autocommit=False) as reader, connect(fresh_db) as admin:
        assert count_checks(reader, "t2", "export") == 200
        admin.execute("SELECT flux_subscribe('t2', 'starter')")
        assert count_checks(reader, "t2", "export") == 0
        admin.execute("BEGIN")
        admin.execute("SELECT flux_subscribe('t2', 'pro')")
        assert count_checks(reader, "t2", "export") == 0  # not committed yet
        admin.execute("ROLLBACK")
        assert count_checks(reader, "t2", "export") == 0
        reader.execute("SELECT flux_subscribe('t2', 'pro')")  # its own change
        assert count_checks(reader, "t2", "export") == 200
        reader.rollback()
        assert count_checks(reader, "t2", "export") == 0
        reader.rollback()


PARALLEL = [
    "SET parallel_setup_cost = 0",
    "SET parallel_tuple_cost = 0",
    "SET min_parallel_table_scan_size = 0",
    "SET max_parallel_workers_per_gather = 2",
]


def test_parallel_scans_agree_with_serial_and_see_changes(fresh_db):
    """Parallel workers start with empty caches (and load every tenant at
    once); what they answer must match the leader's serial answer."""
    with connect(fresh_db) as admin:
        admin.execute(CATALOGUE)
        admin.execute(
            "CREATE TABLE docs AS SELECT i, 't' || (i % 8) AS tenant FROM generate_series(1, 40000) i"
        )
        admin.execute("ANALYZE docs")
    q = "SELECT tenant, count(*) FILTER (WHERE flux_check(tenant, 'export')) FROM docs GROUP BY 1 ORDER BY 1"
    with connect(fresh_db) as c, connect(fresh_db) as admin:
        for s in PARALLEL:
            c.execute(s)
        plan = "\n".join(r[0] for r in c.execute("EXPLAIN (ANALYZE, COSTS OFF) " + q))
        assert "Workers Launched: 2" in plan or "Workers Launched: 1" in plan, plan
        # t2, t4, t6 are on pro; t0 and t7 do not exist; t1, t3, t5 on starter.
        want = [(f"t{i}", 5000 if i in (2, 4, 6) else 0) for i in range(8)]
        assert c.execute(q).fetchall() == want
        admin.execute("SELECT flux_subscribe('t1', 'pro')")
        admin.execute("SELECT flux_subscribe('t7', 'pro')")
        admin.execute("SELECT flux_override('t2', 'export', enabled => false)")
        want = [(f"t{i}", 5000 if i in (1, 4, 6, 7) else 0) for i in range(8)]
        assert c.execute(q).fetchall() == want
        c.execute("SET max_parallel_workers_per_gather = 0")
        assert c.execute(q).fetchall() == want
