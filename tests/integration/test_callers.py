"""Callers (CONTRACT "Callers: API keys and subjects") over real
connections: a consume under an API key or for a subject is charged to the
caller's counter and the tenant's in one step (both or neither, exact under
concurrency), the key is current only in the transaction that authenticated
(parallel workers included), and no caller without privileges can name,
shed or read another key.

Every test asserts the promised outcome, so it fails when the promise is
broken. Roles are cluster-wide: each test makes its own, named
cal_<what>_<random>, and drops them at the end.
"""
import os
import signal
import subprocess
import tempfile
import threading
import time
import uuid

import psycopg
import pytest
from psycopg import sql

from conftest import BIN, HOST, PORT, Roles, connect, login, role_dsn, sqlstate_of, wait_until_up

NOW_OPT = "-c flux.now=2026-11-22T12:00:00Z"  # superusers only: a fixed clock

# ---------------------------------------------------------------------------
# Helpers


@pytest.fixture
def roles(fresh_db):
    r = Roles(fresh_db, "cal")
    yield r
    wait_until_up(fresh_db)
    r.cleanup()






def make_key(c, tenant, name, scopes=None):
    """(plaintext, id) of a new key; the id is the public part flux_<id>_<secret>."""
    plain = c.execute("SELECT flux_create_api_key(%s, %s, scopes => %s)", (tenant, name, scopes)).fetchone()[0]
    kid = plain.split("_")[1]
    assert c.execute("SELECT tenant, name FROM flux.api_keys WHERE id = %s", (kid,)).fetchone() == (tenant, name)
    return plain, kid


def tenant_used(db, tenant, feature):
    with connect(db) as c:
        return c.execute("SELECT flux_usage(%s, %s)", (tenant, feature)).fetchone()[0]


def key_used(db, kid, feature):
    with connect(db) as c:
        return c.execute("SELECT flux_key_usage(%s, %s)", (kid, feature)).fetchone()[0]


def caller_counters(db, tenant, feature):
    """{caller: used} from flux.caller_usage (current and past periods summed;
    each test stays inside one period)."""
    with connect(db) as c:
        rows = c.execute(
            "SELECT caller, sum(used)::bigint FROM flux.caller_usage WHERE tenant = %s AND feature = %s GROUP BY caller",
            (tenant, feature),
        ).fetchall()
    return {k: v for k, v in rows if v}


def run_threads(n, target):
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a client hung (a lock wait that never ends?)"


CATALOGUE = """
SELECT flux_define_feature('calls', 'metered');
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_feature('rate', 'rate');
SELECT flux_define_feature('export');
SELECT flux_define_feature('reports');
SELECT flux_define_plan('pro');
SELECT flux_grant('pro', 'export');
SELECT flux_grant('pro', 'reports');
SELECT flux_subscribe('acme', 'pro');
SELECT flux_subscribe('globex', 'pro');
"""

# ---------------------------------------------------------------------------
# 1. Exact under concurrency: two keys of one tenant


def consume_until_refused(db, n_clients, plan_for, feature, *, login_as=None, options=None, tail=5, cap=3000):
    """Each client i loops BEGIN; [flux_authenticate(key)]; flux_consume(...);
    COMMIT until refused `tail` times in a row. plan_for(i) -> (key or None,
    tenant, subject or None). Returns ({i: [(allowed, reason, api_key,
    subject, message)]}, errors)."""
    out = {i: [] for i in range(n_clients)}
    errors = []
    barrier = threading.Barrier(n_clients)

    def worker(i):
        key, tenant, subject = plan_for(i)
        try:
            if login_as:
                conn = login(db, login_as, autocommit=False, options=options)
            else:
                conn = psycopg.connect(f"host={HOST} port={PORT} user=postgres dbname={db}", autocommit=False,
                                       **({"options": options} if options else {}))
        except psycopg.Error as e:
            errors.append(e)
            return
        with conn:
            try:
                barrier.wait()
                refused = 0
                for _ in range(cap):
                    if key:
                        conn.execute("SELECT flux_authenticate(%s)", (key,))
                    d = conn.execute(
                        "SELECT allowed, reason, api_key, subject, message FROM flux_consume(%s, %s, 1, NULL, %s)",
                        (tenant, feature, subject),
                    ).fetchone()
                    conn.commit()
                    out[i].append(d)
                    refused = 0 if d[0] else refused + 1
                    if refused >= tail:
                        return
                errors.append(AssertionError(f"client {i} was never refused in {cap} consumes"))
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    run_threads(n_clients, worker)
    return out, errors


@pytest.mark.parametrize("kind", ["limit", "metered"])
@pytest.mark.parametrize("tenant_limit,limit_a,limit_b", [(300, 200, 150), (1000, 200, 150)],
                         ids=["tenant-binds", "keys-bind"])
def test_two_keys_racing_get_exactly_what_fits_both_limits(fresh_db, roles, kind, tenant_limit, limit_a, limit_b):
    app = roles.make("app")
    feature = "seats" if kind == "limit" else "calls"
    period = None if kind == "limit" else "month"
    with connect(fresh_db) as c:
        c.execute(CATALOGUE)
        c.execute("SELECT flux_grant('pro', %s, %s, %s)", (feature, tenant_limit, period))
        plain_a, id_a = make_key(c, "acme", "alpha")
        plain_b, id_b = make_key(c, "acme", "beta")
        c.execute("SELECT flux_key_limit(%s, %s, %s)", (id_a, feature, limit_a))
        c.execute("SELECT flux_key_limit(%s, %s, %s)", (id_b, feature, limit_b))
    keys = [(plain_a, id_a), (plain_b, id_b)]
    # 8 clients, 4 per key, as a role with no grants at all (a real API caller).
    out, errors = consume_until_refused(fresh_db, 8, lambda i: (keys[i % 2][0], "acme", None), feature, login_as=app)
    assert not errors, errors[:5]
    allowed = {id_a: 0, id_b: 0}
    for i, decisions in out.items():
        kid = keys[i % 2][1]
        for ok, reason, api_key, _, _ in decisions:
            assert api_key == kid, (i, api_key, kid)  # every decision under the key names it
            assert reason == ("ok" if ok else "limit_reached"), (ok, reason)
            allowed[kid] += ok
    expected_total = min(tenant_limit, limit_a + limit_b)
    assert allowed[id_a] + allowed[id_b] == expected_total, allowed
    assert allowed[id_a] <= limit_a and allowed[id_b] <= limit_b, allowed
    if tenant_limit >= limit_a + limit_b:
        assert allowed == {id_a: limit_a, id_b: limit_b}
    # The counters say the same: tenant == sum of the keys' == allowed consumes.
    assert tenant_used(fresh_db, "acme", feature) == expected_total
    assert key_used(fresh_db, id_a, feature) == allowed[id_a]
    assert key_used(fresh_db, id_b, feature) == allowed[id_b]
    assert caller_counters(fresh_db, "acme", feature) == {f"key:{id_a}": allowed[id_a], f"key:{id_b}": allowed[id_b]}


@pytest.mark.parametrize("tenant_limit,limit_a,limit_b", [(100, 60, 50), (1000, 60, 50)],
                         ids=["tenant-binds", "keys-bind"])
def test_two_keys_racing_a_rate_limit_at_one_instant(fresh_db, tenant_limit, limit_a, limit_b):
    """At one clock instant exactly the bursts pass: the tenant's and each
    key's (GCRA), never more."""
    with connect(fresh_db) as c:
        c.execute(CATALOGUE)
        c.execute("SELECT flux_grant('pro', 'rate', %s, '1 hour')", (tenant_limit,))
        plain_a, id_a = make_key(c, "acme", "alpha")
        plain_b, id_b = make_key(c, "acme", "beta")
        c.execute("SELECT flux_key_limit(%s, 'rate', %s, '1 hour')", (id_a, limit_a))
        c.execute("SELECT flux_key_limit(%s, 'rate', %s, '1 hour')", (id_b, limit_b))
    keys = [(plain_a, id_a), (plain_b, id_b)]
    out, errors = consume_until_refused(fresh_db, 8, lambda i: (keys[i % 2][0], "acme", None), "rate",
                                        options=NOW_OPT)
    assert not errors, errors[:5]
    allowed = {id_a: 0, id_b: 0}
    for i, decisions in out.items():
        kid = keys[i % 2][1]
        for ok, reason, api_key, _, _ in decisions:
            assert api_key == kid
            assert reason == ("ok" if ok else "rate_limited"), (ok, reason)
            allowed[kid] += ok
    assert allowed[id_a] + allowed[id_b] == min(tenant_limit, limit_a + limit_b), allowed
    assert allowed[id_a] <= limit_a and allowed[id_b] <= limit_b, allowed
    if tenant_limit >= limit_a + limit_b:
        assert allowed == {id_a: limit_a, id_b: limit_b}
    with connect(fresh_db) as c:
        callers = {r[0] for r in c.execute("SELECT caller FROM flux.caller_rate_state WHERE tenant = 'acme' AND feature = 'rate'")}
    assert callers == {f"key:{id_a}", f"key:{id_b}"}


# ---------------------------------------------------------------------------
# 2. Subjects racing


@pytest.mark.parametrize("kind", ["limit", "metered"])
@pytest.mark.parametrize("tenant_limit,subject_limit", [(100, 40), (1000, 40)], ids=["tenant-binds", "subjects-bind"])
def test_subjects_racing_get_exactly_what_fits(fresh_db, roles, kind, tenant_limit, subject_limit):
    app = roles.make("app")
    feature = "seats" if kind == "limit" else "calls"
    period = None if kind == "limit" else "month"
    subjects = ["u1", "u2", "u3", "u4"]
    with connect(fresh_db) as c:
        c.execute(CATALOGUE)
        c.execute("SELECT flux_grant('pro', %s, %s, %s, subject_limit => %s)", (feature, tenant_limit, period, subject_limit))
    # 8 clients, 2 per subject, each acting for its current tenant.
    out, errors = consume_until_refused(fresh_db, 8, lambda i: (None, "acme", subjects[i % 4]), feature,
                                        login_as=app, options="-c flux.tenant=acme")
    assert not errors, errors[:5]
    allowed = dict.fromkeys(subjects, 0)
    for i, decisions in out.items():
        for ok, reason, api_key, subject, _ in decisions:
            assert subject == subjects[i % 4] and api_key is None
            assert reason == ("ok" if ok else "limit_reached"), (ok, reason)
            allowed[subject] += ok
    expected = min(tenant_limit, subject_limit * len(subjects))
    assert sum(allowed.values()) == expected, allowed
    assert all(n <= subject_limit for n in allowed.values()), allowed
    if tenant_limit >= subject_limit * len(subjects):
        assert allowed == dict.fromkeys(subjects, subject_limit)
    assert tenant_used(fresh_db, "acme", feature) == expected
    with connect(fresh_db) as c:
        for s in subjects:
            assert c.execute("SELECT flux_usage('acme', %s, %s)", (feature, s)).fetchone()[0] == allowed[s], s
    assert caller_counters(fresh_db, "acme", feature) == {f"subject:{s}": n for s, n in allowed.items() if n}


def test_keys_and_subjects_racing_together_stay_consistent_and_full(fresh_db, roles):
    """Consumes under a key for a subject charge tenant, key and subject in
    one step: the three totals agree, every limit holds, and when everyone
    is refused every (key, subject) pair was refused for a full counter."""
    app = roles.make("app")
    tenant_limit, key_limits, subject_limit = 250, (120, 100), 70
    subjects = ["u0", "u1", "u2", "u3"]
    with connect(fresh_db) as c:
        c.execute(CATALOGUE)
        c.execute("SELECT flux_grant('pro', 'calls', %s, 'month', subject_limit => %s)", (tenant_limit, subject_limit))
        keys = [make_key(c, "acme", "alpha"), make_key(c, "acme", "beta")]
        for (_, kid), lim in zip(keys, key_limits):
            c.execute("SELECT flux_key_limit(%s, 'calls', %s)", (kid, lim))
    plan = lambda i: (keys[i % 2][0], "acme", subjects[(i // 2) % 4])  # noqa: E731
    out, errors = consume_until_refused(fresh_db, 8, plan, "calls", login_as=app)
    assert not errors, errors[:5]
    total = sum(d[0] for ds in out.values() for d in ds)
    by_key = {kid: 0 for _, kid in keys}
    by_subject = dict.fromkeys(subjects, 0)
    for i, ds in out.items():
        for ok, reason, api_key, subject, _ in ds:
            assert api_key == keys[i % 2][1] and subject == subjects[(i // 2) % 4]
            assert reason == ("ok" if ok else "limit_reached")
            by_key[api_key] += ok
            by_subject[subject] += ok
    t = tenant_used(fresh_db, "acme", "calls")
    counters = caller_counters(fresh_db, "acme", "calls")
    assert t == total
    assert counters == {**{f"key:{k}": n for k, n in by_key.items() if n}, **{f"subject:{s}": n for s, n in by_subject.items() if n}}
    assert sum(by_key.values()) == total == sum(by_subject.values())
    assert t <= tenant_limit
    for (_, kid), lim in zip(keys, key_limits):
        assert by_key[kid] <= lim
    assert all(n <= subject_limit for n in by_subject.values())
    # Maximal: no pair could still have consumed one more.
    for i in range(8):
        _, kid = keys[i % 2]
        s = subjects[(i // 2) % 4]
        assert t == tenant_limit or by_key[kid] == key_limits[i % 2] or by_subject[s] == subject_limit, (i, t, by_key, by_subject)


# ---------------------------------------------------------------------------
# 3. Both or neither, rollback and the undo path


def setup_small(db):
    with connect(db) as c:
        c.execute(CATALOGUE)
        c.execute("SELECT flux_grant('pro', 'calls', 10, 'month', subject_limit => 6)")
        c.execute("SELECT flux_grant('pro', 'seats', 10)")
        ka = make_key(c, "acme", "alpha")
        kb = make_key(c, "acme", "beta")
        c.execute("SELECT flux_key_limit(%s, 'calls', 100)", (ka[1],))
        c.execute("SELECT flux_key_limit(%s, 'seats', 3)", (ka[1],))
    return ka, kb


def test_a_rolled_back_consume_under_a_key_leaves_both_counters(fresh_db, roles):
    app = roles.make("app")
    (plain_a, id_a), _ = setup_small(fresh_db)
    with login(fresh_db, app, autocommit=False) as a:
        a.execute("SELECT flux_authenticate(%s)", (plain_a,))
        d = a.execute("SELECT allowed, used, api_key FROM flux_consume('acme', 'calls', 4, NULL, 'u1')").fetchone()
        assert d == (True, 4, id_a)
        # Inside the transaction both are charged.
        assert a.execute("SELECT flux_key_usage(%s, 'calls'), flux_usage('acme', 'calls'), flux_usage('acme', 'calls', 'u1')",
                         (id_a,)).fetchone() == (4, 4, 4)
        a.rollback()
        assert tenant_used(fresh_db, "acme", "calls") == 0
        assert key_used(fresh_db, id_a, "calls") == 0
        assert caller_counters(fresh_db, "acme", "calls") == {}
        # A savepoint rolled back takes its share of both counters with it.
        a.execute("SELECT flux_authenticate(%s)", (plain_a,))
        a.execute("SELECT flux_consume('acme', 'calls', 2, NULL, 'u1')")
        a.execute("SAVEPOINT s")
        a.execute("SELECT flux_consume('acme', 'calls', 3, NULL, 'u1')")
        a.execute("ROLLBACK TO SAVEPOINT s")
        a.commit()
    assert tenant_used(fresh_db, "acme", "calls") == 2
    assert caller_counters(fresh_db, "acme", "calls") == {f"key:{id_a}": 2, "subject:u1": 2}


def test_a_consume_refused_by_one_counter_charges_none(fresh_db, roles):
    app = roles.make("app")
    (plain_a, id_a), (plain_b, id_b) = setup_small(fresh_db)
    with login(fresh_db, app, autocommit=False) as a:
        # Key B fills 8 of the tenant's 10 calls.
        a.execute("SELECT flux_authenticate(%s)", (plain_b,))
        assert a.execute("SELECT allowed FROM flux_consume('acme', 'calls', 8)").fetchone() == (True,)
        a.commit()
        # Refused by the tenant: key A (room for 100) is not charged.
        a.execute("SELECT flux_authenticate(%s)", (plain_a,))
        d = a.execute("SELECT allowed, reason, api_key FROM flux_consume('acme', 'calls', 5)").fetchone()
        assert d == (False, "limit_reached", id_a)
        a.commit()
        assert caller_counters(fresh_db, "acme", "calls") == {f"key:{id_b}": 8}
        assert tenant_used(fresh_db, "acme", "calls") == 8
        # The same with a subject as well: neither key nor subject charged.
        a.execute("SELECT flux_authenticate(%s)", (plain_a,))
        assert a.execute("SELECT allowed, reason FROM flux_consume('acme', 'calls', 3, NULL, 'u1')").fetchone() == (False, "limit_reached")
        a.commit()
        assert caller_counters(fresh_db, "acme", "calls") == {f"key:{id_b}": 8}
        # What fits goes to all three.
        a.execute("SELECT flux_authenticate(%s)", (plain_a,))
        assert a.execute("SELECT allowed, used FROM flux_consume('acme', 'calls', 2, NULL, 'u1')").fetchone()[0] is True
        a.commit()
        assert caller_counters(fresh_db, "acme", "calls") == {f"key:{id_b}": 8, f"key:{id_a}": 2, "subject:u1": 2}
        assert tenant_used(fresh_db, "acme", "calls") == 10

        # Refused by the key (3 seats for key A, 10 for the tenant): the
        # tenant is not charged, and the message names the key.
        a.execute("SELECT flux_authenticate(%s)", (plain_a,))
        assert a.execute("SELECT allowed FROM flux_consume('acme', 'seats', 2)").fetchone() == (True,)
        d = a.execute("SELECT allowed, reason, api_key, message FROM flux_consume('acme', 'seats', 2)").fetchone()
        a.commit()
        assert d[:3] == (False, "limit_reached", id_a), d
        assert "alpha" in d[3] or id_a in d[3], d[3]
        assert tenant_used(fresh_db, "acme", "seats") == 2
        assert caller_counters(fresh_db, "acme", "seats") == {f"key:{id_a}": 2}
    with connect(fresh_db) as c:
        # Refused by the subject (6 per subject): the tenant is not charged.
        c.execute("SELECT flux_grant('pro', 'calls', 100, 'month', subject_limit => 6)")
        assert c.execute("SELECT allowed FROM flux_consume('acme', 'calls', 4, NULL, 'u2')").fetchone() == (True,)
        assert c.execute("SELECT allowed, reason FROM flux_consume('acme', 'calls', 3, NULL, 'u2')").fetchone() == (False, "limit_reached")
        assert c.execute("SELECT flux_usage('acme', 'calls'), flux_usage('acme', 'calls', 'u2')").fetchone() == (14, 4)


def test_a_key_scoped_to_other_features_is_not_permitted_and_charges_nothing(fresh_db, roles):
    app = roles.make("app")
    with connect(fresh_db) as c:
        c.execute(CATALOGUE)
        c.execute("SELECT flux_grant('pro', 'calls', 10, 'month')")
        c.execute("SELECT flux_grant('pro', 'seats', 10)")
        plain, kid = make_key(c, "acme", "ci pipeline", scopes=["calls", "reports"])
        # An unknown feature in scopes is refused (23503).
        assert sqlstate_of(c, "SELECT flux_create_api_key('acme', 'bad', scopes => ARRAY['calls', 'nope'])") == "23503"
    with login(fresh_db, app, autocommit=False) as a:
        a.execute("SELECT flux_authenticate(%s)", (plain,))
        assert a.execute("SELECT flux_check('acme', 'export'), flux_check('export'), flux_check('acme', 'reports')").fetchone() == (False, False, True)
        d = a.execute("SELECT allowed, reason, api_key, message FROM flux_decide('acme', 'export')").fetchone()
        assert d[:3] == (False, "not_permitted", kid)
        assert "ci pipeline" in d[3] and "export" in d[3], d[3]
        d = a.execute("SELECT allowed, reason, api_key FROM flux_consume('acme', 'seats', 1)").fetchone()
        assert d == (False, "not_permitted", kid)
        assert a.execute("SELECT allowed, api_key FROM flux_consume('acme', 'calls', 1)").fetchone() == (True, kid)
        a.commit()
    assert tenant_used(fresh_db, "acme", "seats") == 0
    assert caller_counters(fresh_db, "acme", "seats") == {}
    assert caller_counters(fresh_db, "acme", "calls") == {f"key:{kid}": 1}


def test_a_keys_period_is_its_own(fresh_db):
    """A key's allowance of a metered feature has its own period (here a
    day inside the tenant's month): the key's counter starts again the next
    day while the tenant's goes on."""
    with connect(fresh_db) as c:
        c.execute(CATALOGUE)
        c.execute("SELECT flux_grant('pro', 'calls', 10, 'month')")
        plain, kid = make_key(c, "acme", "alpha")
        c.execute("SELECT flux_key_limit(%s, 'calls', 3, 'day')", (kid,))
    for day, expected in (("2026-11-22T23:00:00Z", [True, True, True, False]), ("2026-11-23T01:00:00Z", [True, True])):
        with connect(fresh_db, autocommit=False, options=f"-c flux.now={day}") as c:
            c.execute("SELECT flux_authenticate(%s)", (plain,))
            got = [c.execute("SELECT allowed FROM flux_consume('acme', 'calls')").fetchone()[0] for _ in expected]
            assert got == expected, (day, got)
            c.commit()
    with connect(fresh_db, options="-c flux.now=2026-11-23T01:00:00Z") as c:
        assert c.execute("SELECT flux_key_usage(%s, 'calls'), flux_usage('acme', 'calls')", (kid,)).fetchone() == (2, 5)


def test_release_under_a_key_gives_the_unit_back_to_the_key(fresh_db, roles):
    """flux_release gives seats back (a limit feature). Under the key that
    took them, the key's counter must come down with the tenant's: else the
    key 'uses' more seats than the tenant has and can never add one again."""
    app = roles.make("app")
    with connect(fresh_db) as c:
        c.execute(CATALOGUE)
        c.execute("SELECT flux_grant('pro', 'seats', 10)")
        plain, kid = make_key(c, "acme", "alpha")
        c.execute("SELECT flux_key_limit(%s, 'seats', 3)", (kid,))
    with login(fresh_db, app, autocommit=False) as a:
        a.execute("SELECT flux_authenticate(%s)", (plain,))
        assert a.execute("SELECT allowed FROM flux_consume('acme', 'seats', 3)").fetchone() == (True,)
        assert a.execute("SELECT flux_release('acme', 'seats', 2)").fetchone() == (1,)
        a.commit()
        a.execute("SELECT flux_authenticate(%s)", (plain,))
        key_now, tenant_now = a.execute("SELECT flux_key_usage(%s, 'seats'), flux_usage('acme', 'seats')", (kid,)).fetchone()
        d = a.execute("SELECT allowed, reason, message FROM flux_consume('acme', 'seats', 2)").fetchone()
        a.commit()
    assert tenant_now == 1
    assert key_now <= tenant_now, f"after releasing 2 of 3 seats the key still holds {key_now}, the tenant {tenant_now}"
    assert d[0] is True, f"the key could not take back a freed seat: {d}"


def test_a_key_applies_only_to_its_own_tenant(fresh_db, roles):
    """A trusted backend (flux_service) that authenticated acme's key and
    then consumes for globex charges globex alone: no key counter, no key
    in the decision, no scopes."""
    svc = roles.make("svc", member_of=["flux_service"])
    with connect(fresh_db) as c:
        c.execute(CATALOGUE)
        c.execute("SELECT flux_grant('pro', 'calls', 10, 'month')")
        plain, kid = make_key(c, "acme", "alpha", scopes=["calls"])
        c.execute("SELECT flux_key_limit(%s, 'calls', 1)", (kid,))
    with login(fresh_db, svc, autocommit=False) as s:
        s.execute("SELECT flux_authenticate(%s)", (plain,))
        assert s.execute("SELECT allowed, api_key FROM flux_consume('globex', 'calls', 5)").fetchone() == (True, None)
        assert s.execute("SELECT flux_check('globex', 'export')").fetchone() == (True,)
        assert s.execute("SELECT allowed, api_key FROM flux_consume('acme', 'calls', 1)").fetchone() == (True, kid)
        assert s.execute("SELECT allowed, reason FROM flux_consume('acme', 'calls', 1)").fetchone() == (False, "limit_reached")
        s.commit()
    assert caller_counters(fresh_db, "globex", "calls") == {}
    assert caller_counters(fresh_db, "acme", "calls") == {f"key:{kid}": 1}
    assert tenant_used(fresh_db, "globex", "calls") == 5


def test_flux_protect_policies_apply_the_current_key(fresh_db, roles):
    app = roles.make("app")
    with connect(fresh_db) as c:
        c.execute(CATALOGUE)
        scoped, _ = make_key(c, "acme", "calls only", scopes=["calls"])
        full, _ = make_key(c, "acme", "all")
        c.execute("CREATE TABLE public.cal_docs (id int PRIMARY KEY, tenant_id text NOT NULL)")
        c.execute("INSERT INTO cal_docs VALUES (1, 'acme'), (2, 'acme'), (3, 'globex')")
        c.execute("SELECT flux_protect('cal_docs', 'reports')")
        c.execute(sql.SQL("GRANT SELECT, INSERT ON public.cal_docs TO {}").format(sql.Identifier(app)))
    with login(fresh_db, app, autocommit=False) as a:
        a.execute("SELECT flux_authenticate(%s)", (full,))
        assert a.execute("SELECT count(*) FROM cal_docs").fetchone() == (2,)
        a.rollback()
        a.execute("SELECT flux_authenticate(%s)", (scoped,))
        assert a.execute("SELECT count(*) FROM cal_docs").fetchone() == (0,)
        assert sqlstate_of(a, "INSERT INTO cal_docs VALUES (4, 'acme')") == "42501"
        a.rollback()


# ---------------------------------------------------------------------------
# 4. Idempotency under a key


def test_a_repeated_idempotency_key_under_a_key_charges_both_once(fresh_db, roles):
    app = roles.make("app")
    (plain_a, id_a), (plain_b, id_b) = setup_small(fresh_db)
    with connect(fresh_db) as c:
        c.execute("SELECT flux_grant('pro', 'calls', 1000, 'month', subject_limit => 100)")
    with login(fresh_db, app, autocommit=False) as a:
        firsts = []
        for _ in range(2):
            a.execute("SELECT flux_authenticate(%s)", (plain_a,))
            firsts.append(a.execute("SELECT allowed, used, api_key FROM flux_consume('acme', 'calls', 5, 'req-1', 'u1')").fetchone())
            a.commit()
        assert firsts[0] == firsts[1] == (True, 5, id_a)
        # The same request id from the other key of the tenant records nothing more.
        a.execute("SELECT flux_authenticate(%s)", (plain_b,))
        assert a.execute("SELECT allowed, used FROM flux_consume('acme', 'calls', 5, 'req-1', 'u1')").fetchone() == (True, 5)
        a.commit()
    assert tenant_used(fresh_db, "acme", "calls") == 5
    assert caller_counters(fresh_db, "acme", "calls") == {f"key:{id_a}": 5, "subject:u1": 5}

    # Eight clients sending the same request at once: charged once.
    errors = []
    barrier = threading.Barrier(8)

    def worker(i):
        try:
            with login(fresh_db, app, autocommit=False) as c:
                barrier.wait()
                c.execute("SELECT flux_authenticate(%s)", (plain_a,))
                d = c.execute("SELECT allowed, api_key FROM flux_consume('acme', 'calls', 7, 'req-2', 'u2')").fetchone()
                c.commit()
                assert d == (True, id_a), d
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    run_threads(8, worker)
    assert not errors, errors[:5]
    assert tenant_used(fresh_db, "acme", "calls") == 12
    assert caller_counters(fresh_db, "acme", "calls") == {f"key:{id_a}": 12, "subject:u1": 5, "subject:u2": 7}


# ---------------------------------------------------------------------------
# 5. The key is the transaction's, and only its


def test_the_key_is_current_only_in_the_transaction_that_authenticated(fresh_db, roles):
    app = roles.make("app")
    (plain_a, id_a), (plain_b, id_b) = setup_small(fresh_db)
    with login(fresh_db, app, autocommit=False) as a, login(fresh_db, app, autocommit=False) as other:
        assert a.execute("SELECT flux_current_api_key()").fetchone() == (None,)
        assert a.execute("SELECT flux_authenticate(%s)", (plain_a,)).fetchone() == ("acme",)
        assert a.execute("SELECT flux_current_api_key(), flux_current_tenant()").fetchone() == (id_a, "acme")
        # Another session, now, never sees it.
        other.execute("SET flux.tenant = 'acme'")
        assert other.execute("SELECT flux_current_api_key(), nullif(current_setting('flux.api_key', true), '')").fetchone() == (None, None)
        assert other.execute("SELECT api_key FROM flux_consume('acme', 'calls')").fetchone() == (None,)
        other.commit()
        a.commit()
        # The next transaction on the same connection has no key, nor the
        # tenant flux_authenticate set.
        assert a.execute("SELECT flux_current_api_key(), flux_current_tenant()").fetchone() == (None, None)
        a.rollback()
        # A rolled-back transaction's key is gone too, as is a rolled-back savepoint's.
        a.execute("SELECT flux_authenticate(%s)", (plain_a,))
        a.rollback()
        assert a.execute("SELECT flux_current_api_key()").fetchone() == (None,)
        a.execute("SAVEPOINT s")
        a.execute("SELECT flux_authenticate(%s)", (plain_a,))
        a.execute("ROLLBACK TO SAVEPOINT s")
        assert a.execute("SELECT flux_current_api_key()").fetchone() == (None,)
        a.rollback()
        # A second flux_authenticate in a transaction makes its key current.
        a.execute("SELECT flux_authenticate(%s)", (plain_a,))
        a.execute("SELECT flux_authenticate(%s)", (plain_b,))
        assert a.execute("SELECT flux_current_api_key()").fetchone() == (id_b,)
        assert a.execute("SELECT api_key FROM flux_consume('acme', 'calls')").fetchone() == (id_b,)
        a.commit()
        # Autocommit: the key lasts for its one statement.
        a.autocommit = True
        a.execute("SELECT flux_authenticate(%s)", (plain_a,))
        assert a.execute("SELECT flux_current_api_key()").fetchone() == (None,)
        a.execute("SET flux.tenant = 'acme'")
        assert a.execute("SELECT api_key FROM flux_consume('acme', 'calls')").fetchone() == (None,)
    # Only the consume under key B was charged to a key; three to the tenant.
    assert tenant_used(fresh_db, "acme", "calls") == 3
    assert caller_counters(fresh_db, "acme", "calls") == {f"key:{id_b}": 1}


# ---------------------------------------------------------------------------
# 6. Parallel workers apply the key


def parallel_settings(c):
    major = int(c.execute("SHOW server_version_num").fetchone()[0]) // 10000
    force = "debug_parallel_query" if major >= 16 else "force_parallel_mode"
    for s in (f"{force} = on", "parallel_setup_cost = 0", "parallel_tuple_cost = 0",
              "min_parallel_table_scan_size = 0", "max_parallel_workers_per_gather = 2",
              # The leader scans nothing: every row is evaluated in a worker.
              "parallel_leader_participation = off"):
        c.execute(f"SET LOCAL {s}")


def workers_evaluated(c, query, params=None):
    """Runs EXPLAIN ANALYZE of `query`: True when at least one worker was
    launched and flux_ is called below the Gather."""
    plan = c.execute("EXPLAIN (ANALYZE, VERBOSE, FORMAT JSON) " + query, params).fetchone()[0][0]["Plan"]

    def find(node, under_gather):
        here = under_gather and "flux_" in str({k: v for k, v in node.items() if k != "Plans"})
        launched = node.get("Workers Launched", 0) if node.get("Node Type") in ("Gather", "Gather Merge") else 0
        below = node.get("Node Type") in ("Gather", "Gather Merge") or under_gather
        results = [find(p, below) for p in node.get("Plans", [])]
        return (launched + sum(r[0] for r in results), here or any(r[1] for r in results))

    launched, in_worker = find(plan, False)
    return launched > 0 and in_worker, plan


def test_parallel_workers_apply_the_keys_scopes(fresh_db, roles):
    app = roles.make("app")
    n = 50000
    with connect(fresh_db) as c:
        c.execute(CATALOGUE)
        plain, kid = make_key(c, "acme", "reports only", scopes=["reports"])
        c.execute("CREATE TABLE public.cal_rows AS SELECT i, 'acme'::text AS tenant_id FROM generate_series(1, %s) i", (n,))
        c.execute("ANALYZE public.cal_rows")
        c.execute(sql.SQL("GRANT SELECT ON public.cal_rows TO {}").format(sql.Identifier(app)))
    q_rows = "SELECT count(*) FROM public.cal_rows WHERE flux_check(tenant_id, %s)"
    q_agg = ("SELECT count(*) FILTER (WHERE flux_check(tenant_id, 'export')), "
             "count(*) FILTER (WHERE flux_check(tenant_id, 'reports')), "
             "count(*) FILTER (WHERE (flux_decide(tenant_id, 'export')).reason = 'not_permitted'), "
             "count(*) FILTER (WHERE (flux_decide(tenant_id, 'export')).api_key = %s), "
             "count(*) FILTER (WHERE flux_check('export')), count(*) FROM public.cal_rows")
    with login(fresh_db, app, autocommit=False) as a:
        # Control, without a key: export is entitled for every row in workers.
        a.execute("SET LOCAL flux.tenant = 'acme'")
        parallel_settings(a)
        ok, plan = workers_evaluated(a, q_rows, ("export",))
        assert ok, f"no parallel plan evaluating flux_check in workers: {plan}"
        assert a.execute(q_rows, ("export",)).fetchone() == (n,)
        a.rollback()
        # Under the key: export is out of scope in every worker, reports in.
        a.execute("SELECT flux_authenticate(%s)", (plain,))
        parallel_settings(a)
        for feature, expected in (("export", 0), ("reports", n)):
            ok, plan = workers_evaluated(a, q_rows, (feature,))
            assert ok, f"no parallel plan evaluating flux_check in workers: {plan}"
            assert a.execute(q_rows, (feature,)).fetchone() == (expected,), feature
        ok, plan = workers_evaluated(a, q_agg, (kid,))
        assert ok, f"no parallel plan evaluating flux_check in workers: {plan}"
        assert a.execute(q_agg, (kid,)).fetchone() == (0, n, n, n, 0, n)
        a.rollback()


# ---------------------------------------------------------------------------
# 7. A hostile caller


def test_a_caller_cannot_name_shed_or_read_keys(fresh_db, roles):
    app = roles.make("app")
    with connect(fresh_db) as c:
        c.execute(CATALOGUE)
        c.execute("SELECT flux_grant('pro', 'calls', 100, 'month')")
        plain_a, id_a = make_key(c, "acme", "alpha", scopes=["calls"])
        _, id_b = make_key(c, "acme", "beta")
        _, id_g = make_key(c, "globex", "gamma")
        c.execute("SELECT flux_key_limit(%s, 'calls', 10)", (id_a,))
        c.execute("SELECT flux_key_limit(%s, 'calls', 10)", (id_g,))

    def still_a(a, attempt):
        got = a.execute("SELECT flux_current_api_key(), current_setting('flux.api_key')").fetchone()
        assert got == (id_a, id_a), (attempt, got)
        assert a.execute("SELECT reason FROM flux_decide('acme', 'export')").fetchone() == ("not_permitted",), attempt

    with login(fresh_db, app, autocommit=False) as a:
        a.execute("SELECT flux_authenticate(%s)", (plain_a,))
        for attempt in (
            f"SET flux.api_key = '{id_b}'",
            f"SET LOCAL flux.api_key = '{id_b}'",
            f"SET SESSION flux.api_key = '{id_g}'",
            "SET flux.api_key = ''",
            "SET flux.api_key TO DEFAULT",
            f"SELECT set_config('flux.api_key', '{id_b}', true)",
            f"SELECT set_config('flux.api_key', '{id_b}', false)",
            "SELECT set_config('flux.api_key', 'x', true)",
            "SELECT set_config('flux.api_key', '', true)",
            f"CREATE FUNCTION pg_temp.cal_f() RETURNS text LANGUAGE sql SET flux.api_key = '{id_b}' AS 'SELECT flux_current_api_key()'",
            f"ALTER ROLE CURRENT_USER SET flux.api_key = '{id_b}'",
        ):
            assert sqlstate_of(a, attempt) == "42501", attempt
            still_a(a, attempt)
        # RESET: refused, or the key stays in place. (RESET ALL has its own
        # test below.) Changing roles back does not drop it either.
        for attempt in ("RESET flux.api_key", "SET flux.api_key TO DEFAULT", "DISCARD ALL",
                        "SET SESSION AUTHORIZATION DEFAULT", "RESET ROLE"):
            sqlstate_of(a, attempt)
            still_a(a, attempt)
        assert sqlstate_of(a, "RESET flux.api_key") == "42501"
        # The tables and the admin function.
        for table in ("caller_usage", "key_limits", "caller_rate_state", "api_keys"):
            assert sqlstate_of(a, f"SELECT * FROM flux.{table}") == "42501", table
        assert sqlstate_of(a, "SELECT flux_key_limit(%s, 'calls', 1000)", (id_a,)) == "42501"
        assert sqlstate_of(a, "SELECT flux_key_limit(%s, 'calls', NULL)", (id_a,)) == "42501"
        assert sqlstate_of(a, "SELECT flux_key_usage(%s, 'calls')", (id_g,)) == "42501"
        # Its own key's usage it may read.
        assert a.execute("SELECT flux_key_usage(%s, 'calls')", (id_a,)).fetchone() == (0,)
        a.rollback()
    with connect(fresh_db) as c:
        assert c.execute("SELECT key_id, \"limit\" FROM flux.key_limits ORDER BY 1").fetchall() == sorted([(id_a, 10), (id_g, 10)])

    # Before flux is loaded in a backend the setting is only a placeholder:
    # what a caller puts there must not become the current key once it loads.
    for how in (f"SET flux.api_key = '{id_g}'", f"SELECT set_config('flux.api_key', '{id_g}', false)"):
        with login(fresh_db, app) as a:
            state = sqlstate_of(a, how)
            a.execute("SET flux.tenant = 'globex'")
            assert a.execute("SELECT flux_current_api_key(), nullif(current_setting('flux.api_key', true), '')").fetchone() == (None, None), (how, state)
            assert a.execute("SELECT api_key FROM flux_consume('globex', 'calls')").fetchone() == (None,), how
    with login(fresh_db, app, options=f"-c flux.api_key={id_g}") as a:
        a.execute("SET flux.tenant = 'globex'")
        assert a.execute("SELECT flux_current_api_key(), nullif(current_setting('flux.api_key', true), '')").fetchone() == (None, None)
        assert a.execute("SELECT api_key FROM flux_consume('globex', 'calls')").fetchone() == (None,)
    assert key_used(fresh_db, id_g, "calls") == 0
    assert caller_counters(fresh_db, "globex", "calls") == {}


def test_reset_all_does_not_shed_the_key(fresh_db, roles):
    """RESET ALL is RESET of every setting: it must not clear flux.api_key
    (superuser-only) for a caller who may not RESET flux.api_key itself, or
    the caller sheds its key's scopes and allowances inside the very
    transaction that authenticated."""
    app = roles.make("app")
    with connect(fresh_db) as c:
        c.execute(CATALOGUE)
        c.execute("SELECT flux_grant('pro', 'calls', 100, 'month')")
        plain, kid = make_key(c, "acme", "alpha", scopes=["calls"])
        c.execute("SELECT flux_key_limit(%s, 'calls', 1)", (kid,))
    with login(fresh_db, app, autocommit=False) as a:
        a.execute("SELECT flux_authenticate(%s)", (plain,))
        assert sqlstate_of(a, "RESET flux.api_key") == "42501"
        state = sqlstate_of(a, "RESET ALL")
        # RESET ALL also drops flux.tenant (a user setting): the caller sets it back.
        a.execute("SET LOCAL flux.tenant = 'acme'")
        got = a.execute("SELECT flux_current_api_key(), nullif(current_setting('flux.api_key', true), '')").fetchone()
        assert got == (kid, kid), f"RESET ALL ({state}) left the key {got}"
        assert a.execute("SELECT reason FROM flux_decide('acme', 'export')").fetchone() == ("not_permitted",)
        assert a.execute("SELECT allowed FROM flux_consume('acme', 'calls', 2)").fetchone() == (False,)
        a.rollback()


# ---------------------------------------------------------------------------
# 8. kill -9


def test_sigkill_keeps_committed_caller_usage_and_drops_the_killed_transactions(fresh_db):
    with connect(fresh_db) as c:
        c.execute(CATALOGUE)
        c.execute("SELECT flux_grant('pro', 'calls', 1000, 'month', subject_limit => 500)")
        c.execute("SELECT flux_grant('pro', 'seats', 100)")
        c.execute("SELECT flux_define_feature('api', 'metered')")
        c.execute("SELECT flux_grant('pro', 'api', NULL, 'month')")
        (plain_a, id_a), (plain_b, id_b) = make_key(c, "acme", "alpha"), make_key(c, "acme", "beta")
        for kid in (id_a, id_b):
            c.execute("SELECT flux_key_limit(%s, 'calls', 500)", (kid,))
            c.execute("SELECT flux_key_limit(%s, 'api', 1000000)", (kid,))
    # Committed: key A 5 + 2 (with u2), key B 3, u1 4 without a key, 2 seats under A.
    with connect(fresh_db, autocommit=False) as c:
        for key, amount, subject in ((plain_a, 5, None), (plain_b, 3, None), (None, 4, "u1"), (plain_a, 2, "u2")):
            if key:
                c.execute("SELECT flux_authenticate(%s)", (key,))
            assert c.execute("SELECT allowed FROM flux_consume('acme', 'calls', %s, NULL, %s)", (amount, subject)).fetchone() == (True,)
            c.commit()
        c.execute("SELECT flux_authenticate(%s)", (plain_a,))
        c.execute("SELECT flux_consume('acme', 'seats', 2)")
        c.commit()
    committed_calls = {f"key:{id_a}": 7, f"key:{id_b}": 3, "subject:u1": 4, "subject:u2": 2}
    assert caller_counters(fresh_db, "acme", "calls") == committed_calls

    # Clients racing on 'api' under the keys while the crash happens.
    seen = {id_a: 0, id_b: 0}
    unknown = {id_a: 0, id_b: 0}
    lock = threading.Lock()
    stop = threading.Event()
    started = threading.Barrier(5)

    def worker(i):
        plain, kid = ((plain_a, id_a), (plain_b, id_b))[i % 2]
        try:
            conn = psycopg.connect(f"host={HOST} port={PORT} user=postgres dbname={fresh_db}", autocommit=False)
        except psycopg.Error:
            started.wait()
            return
        started.wait()
        with conn:
            while not stop.is_set():
                try:
                    conn.execute("SELECT flux_authenticate(%s)", (plain,))
                    ok = conn.execute("SELECT allowed FROM flux_consume('acme', 'api')").fetchone()[0]
                except psycopg.Error:
                    return  # killed before COMMIT was sent: not committed
                try:
                    conn.commit()
                except psycopg.Error:
                    with lock:
                        unknown[kid] += 1  # COMMIT in flight: may or may not have committed
                    return
                if ok:
                    with lock:
                        seen[kid] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    # The victim: a transaction under key A, charging key, subject and
    # tenant, never committed (on other features than the racers': it holds
    # its counters' row locks until it dies).
    victim = psycopg.connect(f"host={HOST} port={PORT} user=postgres dbname={fresh_db}", autocommit=False)
    victim.execute("SELECT flux_authenticate(%s)", (plain_a,))
    assert victim.execute("SELECT allowed FROM flux_consume('acme', 'calls', 7, NULL, 'u1')").fetchone() == (True,)
    assert victim.execute("SELECT allowed FROM flux_consume('acme', 'seats', 1)").fetchone() == (True,)
    pid = victim.info.backend_pid
    started.wait()
    time.sleep(1.5)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    try:
        victim.close()
    except psycopg.Error:
        pass
    wait_until_up(fresh_db)

    assert caller_counters(fresh_db, "acme", "calls") == committed_calls
    assert tenant_used(fresh_db, "acme", "calls") == 14
    assert caller_counters(fresh_db, "acme", "seats") == {f"key:{id_a}": 2}
    assert tenant_used(fresh_db, "acme", "seats") == 2
    api = caller_counters(fresh_db, "acme", "api")
    used = tenant_used(fresh_db, "acme", "api")
    assert sum(seen.values()) > 50, seen
    # Both or neither survived the crash: the tenant's counter is the keys' sum.
    assert used == api.get(f"key:{id_a}", 0) + api.get(f"key:{id_b}", 0), (used, api)
    for kid in (id_a, id_b):
        assert seen[kid] <= api.get(f"key:{kid}", 0) <= seen[kid] + unknown[kid], (kid, seen, unknown, api)
    # And counting goes on, exact, after recovery.
    with connect(fresh_db, autocommit=False) as c:
        c.execute("SELECT flux_authenticate(%s)", (plain_a,))
        assert c.execute("SELECT allowed FROM flux_consume('acme', 'calls', 1, NULL, 'u1')").fetchone() == (True,)
        c.commit()
    assert caller_counters(fresh_db, "acme", "calls") == {**committed_calls, f"key:{id_a}": 8, "subject:u1": 5}
    assert tenant_used(fresh_db, "acme", "calls") == 15


# ---------------------------------------------------------------------------
# 9. pg_dump / pg_restore

CALLER_TABLES = ["api_keys", "key_limits", "caller_usage", "caller_rate_state", "usage", "rate_state"]


def caller_snapshot(db, plain, kid):
    with connect(db, options=NOW_OPT, autocommit=False) as c:
        c.execute("SET LOCAL timezone = 'UTC'")
        rows = {t: c.execute(f"SELECT x::text FROM flux.{t} x ORDER BY 1").fetchall() for t in CALLER_TABLES}
        rows["scopes"] = c.execute("SELECT id, scopes FROM flux.api_keys ORDER BY 1").fetchall()
        c.execute("SELECT flux_authenticate(%s)", (plain,))
        rows["decisions"] = c.execute(
            "SELECT f, d.allowed, d.reason, d.\"limit\", d.used, d.remaining, d.api_key, d.message, flux_key_usage(%s, f) "
            "FROM unnest(ARRAY['calls', 'seats', 'rate', 'export']) f, flux_decide('acme', f, 'u1') d ORDER BY 1",
            (kid,),
        ).fetchall()
        c.rollback()
        return rows


def test_dump_and_restore_keep_key_limits_caller_usage_rate_state_and_scopes(fresh_db):
    opts = NOW_OPT
    with connect(fresh_db, options=opts) as c:
        c.execute(CATALOGUE)
        c.execute("SELECT flux_grant('pro', 'calls', 100, 'month', subject_limit => 30)")
        c.execute("SELECT flux_grant('pro', 'seats', 10)")
        c.execute("SELECT flux_grant('pro', 'rate', 20, '1 hour', subject_limit => 8)")
        plain_a, id_a = make_key(c, "acme", "alpha", scopes=["calls", "seats", "rate"])
        _, id_b = make_key(c, "acme", "beta")
        _, id_c = make_key(c, "acme", "exporter", scopes=["export"])
        c.execute("SELECT flux_key_limit(%s, 'calls', 50)", (id_a,))
        c.execute("SELECT flux_key_limit(%s, 'seats', 3)", (id_a,))
        c.execute("SELECT flux_key_limit(%s, 'rate', 5, '1 hour')", (id_a,))
        c.execute("SELECT flux_key_limit(%s, 'calls', 20, 'day')", (id_b,))
    with connect(fresh_db, options=opts, autocommit=False) as c:
        c.execute("SELECT flux_authenticate(%s)", (plain_a,))
        for feature, amount in (("calls", 7), ("seats", 2), ("rate", 3)):
            assert c.execute("SELECT allowed FROM flux_consume('acme', %s, %s, NULL, 'u1')", (feature, amount)).fetchone() == (True,)
        c.commit()
    before = caller_snapshot(fresh_db, plain_a, id_a)
    assert len(before["key_limits"]) == 4 and len(before["caller_usage"]) >= 3 and len(before["caller_rate_state"]) == 2, before
    assert sorted(before["scopes"]) == sorted([(id_a, ["calls", "seats", "rate"]), (id_b, None), (id_c, ["export"])])
    target = "flux_restored_" + uuid.uuid4().hex[:8]
    conn_args = ["-h", HOST, "-p", str(PORT), "-U", "postgres"]
    with tempfile.TemporaryDirectory() as tmp:
        dump = os.path.join(tmp, "flux.dump")
        subprocess.run([f"{BIN}/pg_dump", *conn_args, "-Fc", "-f", dump, fresh_db], check=True)
        subprocess.run([f"{BIN}/createdb", *conn_args, target], check=True)
        try:
            r = subprocess.run([f"{BIN}/pg_restore", *conn_args, "--exit-on-error", "-d", target, dump],
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            after = caller_snapshot(target, plain_a, id_a)
            for part in before:
                assert after[part] == before[part], part
            # The restored allowances still bind the same key (its secret
            # hash came along): 7 of 50 calls used, 2 of 3 seats, 3 of 5 rate.
            with connect(target, options=opts, autocommit=False) as c:
                c.execute("SELECT flux_authenticate(%s)", (plain_a,))
                assert c.execute("SELECT allowed FROM flux_consume('acme', 'calls', 44)").fetchone() == (False,)
                assert c.execute("SELECT allowed FROM flux_consume('acme', 'seats', 2)").fetchone() == (False,)
                rate = [c.execute("SELECT allowed FROM flux_consume('acme', 'rate')").fetchone()[0] for _ in range(5)]
                assert rate == [True, True, False, False, False], rate
                assert c.execute("SELECT reason FROM flux_decide('acme', 'export')").fetchone() == ("not_permitted",)
                assert c.execute("SELECT allowed, used FROM flux_consume('acme', 'calls', 43)").fetchone() == (True, 50)
                c.commit()
        finally:
            subprocess.run([f"{BIN}/dropdb", *conn_args, "--force", target], check=True)
