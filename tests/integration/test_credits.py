"""Credits (CONTRACT "Credits and holds", first part; holds are not tested
here): a pool of kind credits with a period allowance and purchased top-ups,
features priced in it with flux_set_cost, draws by flux_consume.

Over real connections: the balance is exact under eight racing clients,
rolls back with the transaction (and a savepoint), is idempotent with
idempotency_key (also for two concurrent calls), survives a kill -9 of a
backend, answers on a hot standby (which refuses to draw with 25006) and
round-trips through pg_dump / pg_restore; the privileges and the bad inputs
of the admin functions, each with nothing half-written.

Every connection of the superuser runs on a fixed clock (flux.now), so that
the allowance's month is the same whatever day the suite runs; the
privilege tests (plain roles may not set flux.now) use the real clock.
"""
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid

import psycopg
import pytest

from conftest import BIN, HOST, PORT, Roles, connect, dsn, login, sqlstate_of, wait_until_up

NOW = "2026-11-22 12:00+00"
CLOCK = "-c flux.now=2026-11-22T12:00:00Z"

STANDBY_DIR = "/tmp/flux-pg/credits-standby"
STANDBY_PORT = 5484


def clocked(db, autocommit=True):
    """A superuser connection on the fixed clock."""
    return connect(db, autocommit=autocommit, options=CLOCK)


def catalogue(c, allowance=100, cost=3, tenants=("acme",)):
    """Pool ai_credits (allowance per month on plan pro), chat (metered,
    unlimited) priced at `cost` credits a unit."""
    limit = "NULL" if allowance is None else int(allowance)
    c.execute(f"""
        SELECT flux_define_feature('ai_credits', 'credits');
        SELECT flux_define_feature('chat', 'metered');
        SELECT flux_define_plan('pro');
        SELECT flux_grant('pro', 'ai_credits', {limit}, 'month');
        SELECT flux_grant('pro', 'chat', NULL, 'month');
        SELECT flux_set_cost('chat', 'ai_credits', {int(cost)});
    """)
    for t in tenants:
        c.execute("SELECT flux_subscribe(%s, 'pro')", (t,))


def one(c, query, params=None):
    return c.execute(query, params).fetchone()[0]


def balance(c, tenant="acme", pool="ai_credits"):
    return one(c, "SELECT flux_balance(%s, %s)", (tenant, pool))


def ledger(c, tenant="acme"):
    return c.execute(
        "SELECT id, pool, amount, balance_after, feature, idempotency_key, reason, expires_at, remaining"
        "  FROM flux.credit_ledger WHERE tenant = %s ORDER BY id", (tenant,)).fetchall()


def draws(c, tenant="acme"):
    return c.execute(
        "SELECT id, amount, balance_after, feature, idempotency_key FROM flux.credit_ledger"
        " WHERE tenant = %s AND amount < 0 ORDER BY id", (tenant,)).fetchall()


def top_ups(c, tenant="acme"):
    return c.execute(
        "SELECT id, amount, remaining, expires_at, idempotency_key FROM flux.credit_ledger"
        " WHERE tenant = %s AND amount > 0 ORDER BY id", (tenant,)).fetchall()


def used(c, feature, tenant="acme"):
    """The counter of the current (fixed-clock) month, 0 when absent."""
    return one(c, "SELECT COALESCE(sum(used), 0)::bigint FROM flux.usage"
                  " WHERE tenant = %s AND feature = %s AND period_start = date_trunc('month', %s::timestamptz, 'UTC')",
               (tenant, feature, NOW))


WRITTEN = ["features", "grants", "tenants", "usage", "usage_keys", "credit_ledger", "audit_log"]


def written(c):
    """Every row of the tables a credits call may write, as text."""
    return {t: c.execute(f"SELECT x::text FROM flux.{t} x ORDER BY 1").fetchall() for t in WRITTEN}


def wait_blocked(watch, pid, timeout=10):
    """Until backend `pid` waits on a lock (a concurrent call queued)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if watch.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() == (True,):
            return
        time.sleep(0.02)
    raise AssertionError(f"backend {pid} never waited on a lock")


def in_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


# ---------------------------------------------------------------------------
# 1. Eight clients drain one tenant's balance


@pytest.mark.parametrize("allowance", [100, 0])
def test_eight_clients_drain_the_pool_exactly(fresh_db, allowance):
    """allowance 100 + a top-up of 200; or, on a plan that does not grant
    the pool, top-ups only (150 expiring, then 150 never)."""
    with clocked(fresh_db) as c:
        catalogue(c, allowance=100, cost=3)
        if allowance:
            assert one(c, "SELECT flux_add_credits('acme', 'ai_credits', 200, NULL, 'buy-1', 'pack')") == 300
        else:
            c.execute("SELECT flux_revoke('pro', 'ai_credits')")
            c.execute("SELECT flux_add_credits('acme', 'ai_credits', 150, NULL, 'buy-1')")
            c.execute("SELECT flux_add_credits('acme', 'ai_credits', 150, '2026-11-30 00:00+00', 'buy-2')")
        assert balance(c) == 300
    allowed, refusals, errors = [], [], []
    barrier = threading.Barrier(8)

    def worker():
        try:
            with clocked(fresh_db) as c:
                barrier.wait()
                while True:
                    ok, reason, message, bal = c.execute(
                        "SELECT allowed, reason, message, balance FROM flux_consume('acme', 'chat')").fetchone()
                    if not ok:
                        refusals.append((reason, message, bal))
                        return
                    allowed.append(bal)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # 300 credits at 3 a unit: exactly 100 consumes pass, each one seeing its
    # own balance after it (the draws are serialised: no two see the same).
    assert len(allowed) == 100, len(allowed)
    assert len(allowed) * 3 <= 300
    assert sorted(allowed) == list(range(0, 300, 3)), sorted(allowed)
    assert all(b >= 0 for b in allowed)
    assert refusals == [("limit_reached", "ai_credits: 0 left; chat costs 3", 0)] * 8, refusals
    with clocked(fresh_db) as c:
        d = draws(c)
        assert len(d) == 100, len(d)
        assert sum(r[1] for r in d) == -len(allowed) * 3
        assert {r[1] for r in d} == {-3} and {r[3] for r in d} == {"chat"}
        # balance_after, in ledger order, goes down 3 at a time to 0.
        assert [r[2] for r in d] == list(range(297, -1, -3)), [r[2] for r in d]
        assert used(c, "ai_credits") == allowance  # the allowance, all of it
        assert used(c, "chat") == 100  # the priced feature's own counter
        assert {r[2] for r in top_ups(c)} == {0}  # the top-ups' remaining
        assert balance(c) == 0
        dec = c.execute("SELECT allowed, reason, \"limit\", remaining, balance FROM flux_decide('acme', 'ai_credits')").fetchone()
        # Granted: the pool is exhausted; not granted and nothing left that
        # was bought: not in the plan, as before any purchase.
        want = (False, "limit_reached", 100, 0, 0) if allowance else (False, "not_in_plan", None, None, None)
        assert dec == want, dec


# ---------------------------------------------------------------------------
# Draw order, expiry by the clock, the refusal message (the rules the other
# tests rely on)


def test_draws_take_the_allowance_then_the_earliest_expiring_top_up(fresh_db):
    with clocked(fresh_db) as c:
        catalogue(c, allowance=100, cost=5)
        c.execute("SELECT flux_add_credits('acme', 'ai_credits', 10, NULL, 'never')")
        c.execute("SELECT flux_add_credits('acme', 'ai_credits', 10, '2026-11-28 00:00+00', 'late')")
        c.execute("SELECT flux_add_credits('acme', 'ai_credits', 10, '2026-11-25 00:00+00', 'early')")
        assert balance(c) == 130
        # 95 of the pool itself: all from the allowance.
        r = c.execute("SELECT allowed, balance, remaining FROM flux_consume('acme', 'ai_credits', 95)").fetchone()
        assert r == (True, 35, 35), r
        assert [t[2] for t in top_ups(c)] == [10, 10, 10]
        # 2 chats = 10: the last 5 of the allowance, then 5 of 'early'.
        r = c.execute("SELECT allowed, balance FROM flux_consume('acme', 'chat', 2)").fetchone()
        assert r == (True, 25), r
        assert {t[4]: t[2] for t in top_ups(c)} == {"never": 10, "late": 10, "early": 5}
        assert used(c, "ai_credits") == 100
        # 2 more = 10: 5 of 'early', 5 of 'late'; never-expiring last.
        assert c.execute("SELECT allowed, balance FROM flux_consume('acme', 'chat', 2)").fetchone() == (True, 15)
        assert {t[4]: t[2] for t in top_ups(c)} == {"never": 10, "late": 5, "early": 0}
        assert [r[2] for r in draws(c)] == [35, 25, 15]
        # Short: refused with the pool's figures, nothing drawn.
        before = written(c)
        r = c.execute("SELECT allowed, reason, message, balance FROM flux_consume('acme', 'chat', 4)").fetchone()
        assert r == (False, "limit_reached", "ai_credits: 15 left; chat costs 20", 15), r
        r = c.execute("SELECT allowed, reason, message FROM flux_consume('acme', 'ai_credits', 16)").fetchone()
        assert r[:2] == (False, "limit_reached") and "15 left" in r[2], r
        assert written(c) == before
        r = c.execute("SELECT allowed, \"limit\", used, remaining, balance FROM flux_decide('acme', 'ai_credits')").fetchone()
        assert r == (True, 100, 100, 15, 15), r
        assert c.execute("SELECT allowed, balance FROM flux_decide('acme', 'chat')").fetchone() == (True, 15)
        # 'late' expires by the clock: its 5 stop counting.
        c.execute("SET flux.now = '2026-11-29 00:00+00'")
        assert balance(c) == 10
        r = c.execute("SELECT allowed, reason, message FROM flux_consume('acme', 'chat', 3)").fetchone()
        assert r == (False, "limit_reached", "ai_credits: 10 left; chat costs 15"), r
        assert c.execute("SELECT allowed, balance FROM flux_consume('acme', 'chat', 2)").fetchone() == (True, 0)
        assert {t[4]: t[2] for t in top_ups(c)} == {"never": 0, "late": 5, "early": 0}
        # Next month: a fresh allowance, no rollover of what was left.
        c.execute("SET flux.now = '2026-12-02 00:00+00'")
        assert balance(c) == 100
        r = c.execute("SELECT \"limit\", used, remaining FROM flux_decide('acme', 'ai_credits')").fetchone()
        assert r == (100, 0, 100), r


def test_an_unlimited_allowance_draws_no_top_up(fresh_db):
    with clocked(fresh_db) as c:
        catalogue(c, allowance=None, cost=3)
        c.execute("SELECT flux_add_credits('acme', 'ai_credits', 50, NULL, 'buy-1')")
        assert balance(c) is None
        r = c.execute("SELECT allowed, balance FROM flux_consume('acme', 'chat', 1000)").fetchone()
        assert r == (True, None), r
        assert [d[1:3] for d in draws(c)] == [(-3000, None)]
        assert [t[2] for t in top_ups(c)] == [50]
        assert used(c, "ai_credits") == 3000


def test_a_refusal_by_the_priced_features_own_limit_draws_nothing(fresh_db):
    with clocked(fresh_db) as c:
        catalogue(c, allowance=100, cost=3)
        c.execute("SELECT flux_grant('pro', 'chat', 2, 'month')")
        assert c.execute("SELECT allowed FROM flux_consume('acme', 'chat', 2)").fetchone() == (True,)
        assert balance(c) == 94
        before = written(c)
        r = c.execute("SELECT allowed, reason FROM flux_consume('acme', 'chat')").fetchone()
        assert r == (False, "limit_reached"), r
        assert written(c) == before
        assert balance(c) == 94 and used(c, "ai_credits") == 6 and used(c, "chat") == 2


# ---------------------------------------------------------------------------
# 2. Rollback refunds


def test_a_rolled_back_draw_gives_everything_back(fresh_db):
    with clocked(fresh_db) as c:
        catalogue(c, allowance=100, cost=3)
        c.execute("SELECT flux_add_credits('acme', 'ai_credits', 200, '2026-11-30 00:00+00', 'buy-1')")
        c.execute("SELECT flux_consume('acme', 'chat', 33)")  # 99 of the allowance
        assert balance(c) == 201
        before = written(c)
        with clocked(fresh_db, autocommit=False) as t:
            # 120: 1 of the allowance, 119 of the top-up.
            assert t.execute("SELECT allowed, balance FROM flux_consume('acme', 'chat', 40)").fetchone() == (True, 81)
            assert t.execute("SELECT allowed, balance FROM flux_consume('acme', 'ai_credits', 7)").fetchone() == (True, 74)
            assert balance(t) == 74
            t.rollback()
        assert written(c) == before
        assert balance(c) == 201
        # A savepoint rolled back: only what came after it goes.
        kept_draws = draws(c)
        with clocked(fresh_db, autocommit=False) as t:
            assert t.execute("SELECT allowed, balance FROM flux_consume('acme', 'chat', 2)").fetchone() == (True, 195)
            t.execute("SAVEPOINT s")
            assert t.execute("SELECT allowed, balance FROM flux_consume('acme', 'chat', 40)").fetchone() == (True, 75)
            assert t.execute("SELECT allowed FROM flux_consume('acme', 'ai_credits', 75)").fetchone() == (True,)
            assert balance(t) == 0
            t.execute("ROLLBACK TO SAVEPOINT s")
            assert balance(t) == 195
            t.commit()
        after = draws(c)
        assert after[:-1] == kept_draws, (after, kept_draws)
        assert after[-1][1:] == (-6, 195, "chat", None), after[-1]
        assert balance(c) == 195
        assert used(c, "ai_credits") == 100 and used(c, "chat") == 35
        assert [t[2] for t in top_ups(c)] == [195]
        # A rolled-back top-up leaves no ledger row and no audit entry.
        before = written(c)
        with clocked(fresh_db, autocommit=False) as t:
            assert one(t, "SELECT flux_add_credits('acme', 'ai_credits', 50, NULL, 'buy-2')") == 245
            t.rollback()
        assert written(c) == before


# ---------------------------------------------------------------------------
# 3. Idempotency


def test_a_repeated_key_draws_once(fresh_db):
    with clocked(fresh_db) as c:
        catalogue(c, allowance=100, cost=3)
        q = "SELECT allowed, reason, message, balance, used FROM flux_consume('acme', 'chat', 2, %s)"
        first = c.execute(q, ("order-1",)).fetchone()
        assert first[:2] == (True, "ok") and first[3] == 94, first
        again = c.execute(q, ("order-1",)).fetchone()
        assert again == first
        assert [r[1:] for r in draws(c)] == [(-6, 94, "chat", "order-1")]
        assert balance(c) == 94 and used(c, "ai_credits") == 6 and used(c, "chat") == 2
        # A replay with another amount is refused, and draws nothing.
        before = written(c)
        assert sqlstate_of(c, "SELECT flux_consume('acme', 'chat', 3, 'order-1')") == "22023"
        assert written(c) == before
        # The pool consumed directly, with a key: once too.
        assert c.execute("SELECT balance FROM flux_consume('acme', 'ai_credits', 4, 'direct-1')").fetchone() == (90,)
        assert c.execute("SELECT balance FROM flux_consume('acme', 'ai_credits', 4, 'direct-1')").fetchone() == (90,)
        assert len(draws(c)) == 2 and balance(c) == 90


def test_the_same_key_at_the_same_moment_draws_once(fresh_db):
    with clocked(fresh_db) as c:
        catalogue(c, allowance=100, cost=3)
    q = "SELECT allowed, balance FROM flux_consume('acme', 'chat', 2, %s)"
    with clocked(fresh_db) as watch, clocked(fresh_db, autocommit=False) as a, clocked(fresh_db) as b:
        # A draws and holds its transaction open; B, with the same key, queues.
        assert a.execute(q, ("race-1",)).fetchone() == (True, 94)
        t, out = in_thread(lambda: b.execute(q, ("race-1",)).fetchone())
        wait_blocked(watch, b.info.backend_pid)
        a.commit()
        t.join()
        assert out.get("value") == (True, 94), out
        assert [r[1:] for r in draws(watch)] == [(-6, 94, "chat", "race-1")]
        assert balance(watch) == 94
        # A rolls back: B's call is then the first, and draws (once).
        assert a.execute(q, ("race-2",)).fetchone() == (True, 88)
        t, out = in_thread(lambda: b.execute(q, ("race-2",)).fetchone())
        wait_blocked(watch, b.info.backend_pid)
        a.rollback()
        t.join()
        assert out.get("value") == (True, 88), out
        assert [r[1:] for r in draws(watch)] == [(-6, 94, "chat", "race-1"), (-6, 88, "chat", "race-2")]
        assert balance(watch) == 88 and used(watch, "ai_credits") == 12 and used(watch, "chat") == 4


def test_a_repeated_top_up_key_adds_once(fresh_db):
    with clocked(fresh_db) as c:
        catalogue(c, allowance=100, cost=3)
        q = "SELECT flux_add_credits('acme', 'ai_credits', 50, NULL, %s, 'pack')"
        assert one(c, q, ("inv-1",)) == 150
        audits = one(c, "SELECT count(*) FROM flux.audit_log WHERE entity = 'credit_ledger'")
        assert one(c, q, ("inv-1",)) == 150
        assert len(top_ups(c)) == 1 and balance(c) == 150
        assert one(c, "SELECT count(*) FROM flux.audit_log WHERE entity = 'credit_ledger'") == audits == 1
        # The same key for another tenant is another top-up.
        c.execute("SELECT flux_subscribe('globex', 'pro')")
        assert one(c, "SELECT flux_add_credits('globex', 'ai_credits', 50, NULL, 'inv-1')") == 150
        assert balance(c) == 150
    with clocked(fresh_db) as watch, clocked(fresh_db, autocommit=False) as a, clocked(fresh_db) as b:
        q = "SELECT flux_add_credits('acme', 'ai_credits', 30, NULL, %s)"
        assert one(a, q, ("inv-2",)) == 180
        t, out = in_thread(lambda: one(b, q, ("inv-2",)))
        wait_blocked(watch, b.info.backend_pid)
        a.commit()
        t.join()
        assert out.get("value") == 180, out
        assert [r[4] for r in top_ups(watch)] == ["inv-1", "inv-2"] and balance(watch) == 180
        # A rolls back: B's top-up is the one that counts.
        assert one(a, q, ("inv-3",)) == 210
        t, out = in_thread(lambda: one(b, q, ("inv-3",)))
        wait_blocked(watch, b.info.backend_pid)
        a.rollback()
        t.join()
        assert out.get("value") == 210, out
        assert [r[4] for r in top_ups(watch)] == ["inv-1", "inv-2", "inv-3"] and balance(watch) == 210


def _second_waits_then_commit_first(watch, a, b_sql, fresh_db):
    """Run b_sql on a new connection while `a` holds its transaction open:
    b must wait on a's lock (the pool's row); then commit a and let b end."""
    done = {}

    def run():
        with clocked(fresh_db) as b:
            done["result"] = b.execute(b_sql).fetchone()[0]

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 10
    while time.time() < deadline:
        waiting = watch.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query = %s", (b_sql,)
        ).fetchone()[0]
        if waiting:
            break
        time.sleep(0.05)
    assert waiting, "the second did not wait for the first's lock on the pool"
    a.commit()
    t.join(10)
    assert not t.is_alive()
    return done["result"]


def test_balance_after_agrees_with_the_balance_after_two_concurrent_top_ups(fresh_db):
    """balance_after is "the pool's balance after this row" (schema.sql): the
    newest row of the ledger says what flux_balance says, also when two
    top-ups are made at the same time (the second waits on the pool's row)."""
    with clocked(fresh_db) as c:
        catalogue(c, allowance=100, cost=3)
    with clocked(fresh_db) as watch, clocked(fresh_db, autocommit=False) as a:
        a.execute("SELECT flux_add_credits('acme', 'ai_credits', 50)")
        second = _second_waits_then_commit_first(
            watch, a, "SELECT flux_add_credits('acme', 'ai_credits', 50)", fresh_db)
        assert second == 200
        assert balance(watch) == 200
        rows = ledger(watch)
        assert [r[3] for r in rows] == [150, 200], ("balance_after of the two top-ups", rows)


def test_balance_after_agrees_with_the_balance_after_a_concurrent_draw_and_top_up(fresh_db):
    """The same, for a draw and a top-up at the same time."""
    with clocked(fresh_db) as c:
        catalogue(c, allowance=100, cost=3)
        c.execute("SELECT flux_add_credits('acme', 'ai_credits', 100)")
    with clocked(fresh_db) as watch, clocked(fresh_db, autocommit=False) as a:
        a.execute("SELECT flux_consume('acme', 'chat')")
        second = _second_waits_then_commit_first(
            watch, a, "SELECT flux_add_credits('acme', 'ai_credits', 10)", fresh_db)
        assert second == 207
        assert balance(watch) == 207
        rows = ledger(watch)
        assert [r[3] for r in rows[1:]] == [197, 207], ("balance_after of the draw and the top-up", rows)


# ---------------------------------------------------------------------------
# 4. kill -9 during draws


def test_sigkill_during_draws_loses_no_credit(fresh_db):
    cost, allowance, soon, never = 2, 400, 600, 100000
    with clocked(fresh_db) as c:
        catalogue(c, allowance=allowance, cost=cost)
        c.execute("SELECT flux_add_credits('acme', 'ai_credits', %s, '2026-11-30 00:00+00', 'soon')", (soon,))
        c.execute("SELECT flux_add_credits('acme', 'ai_credits', %s, NULL, 'never')", (never,))
    committed = [[] for _ in range(8)]
    in_flight = [None] * 8
    pids = []
    stop = threading.Event()

    def worker(i):
        try:
            conn = psycopg.connect(dsn(fresh_db), autocommit=False, options=CLOCK)
        except psycopg.Error:
            return
        pids.append(conn.info.backend_pid)
        n = 0
        try:
            while not stop.is_set():
                key = f"c{i}-{n}"
                n += 1
                in_flight[i] = key
                try:
                    ok = conn.execute("SELECT allowed FROM flux_consume('acme', 'chat', 1, %s)", (key,)).fetchone()[0]
                    conn.commit()
                except psycopg.Error:
                    return  # the crash: this consume may or may not have committed
                in_flight[i] = None
                if ok:
                    committed[i].append(key)
        finally:
            try:
                conn.close()
            except psycopg.Error:
                pass

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.time() + 20
    while time.time() < deadline and (len(pids) < 8 or sum(map(len, committed)) < 800):
        time.sleep(0.05)
    assert len(pids) == 8
    os.kill(pids[0], signal.SIGKILL)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    wait_until_up(fresh_db)
    seen = {k for keys in committed for k in keys}
    unknown = {k for k in in_flight if k is not None}
    with clocked(fresh_db) as c:
        d = draws(c)
        keys = [r[4] for r in d]
        assert len(keys) == len(set(keys)), "a key drew twice"
        assert {r[1] for r in d} == {-cost}
        # Every consume whose COMMIT returned drew; nothing else did, but for
        # the ones in flight when the server went down.
        assert seen <= set(keys), sorted(seen - set(keys))[:5]
        assert set(keys) <= seen | unknown, sorted(set(keys) - seen - unknown)[:5]
        drawn = -sum(r[1] for r in d)
        assert drawn == cost * len(keys)
        assert cost * len(seen) <= drawn <= cost * (len(seen) + len(unknown)), (len(seen), len(unknown), drawn)
        # What was drawn is what the allowance and the top-ups lost, in order.
        allowance_used = used(c, "ai_credits")
        lost = {t[4]: t[1] - t[2] for t in top_ups(c)}
        assert drawn == allowance_used + sum(lost.values()), (drawn, allowance_used, lost)
        assert allowance_used == min(drawn, allowance)
        assert lost["soon"] == min(max(drawn - allowance, 0), soon)
        assert lost["never"] == max(drawn - allowance - soon, 0)
        assert used(c, "chat") == len(keys)
        assert balance(c) == allowance + soon + never - drawn
        assert d[-1][2] == balance(c)
    assert len(seen) > 200, len(seen)


# ---------------------------------------------------------------------------
# 5. Hot standby


def as_postgres(*cmd):
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run(prefix + list(cmd), check=True, capture_output=True, text=True)


def replica(db):
    return psycopg.connect(f"host={STANDBY_DIR} port={STANDBY_PORT} user=postgres dbname={db}",
                           autocommit=True, options=CLOCK)


def wait_for_replay(primary, rep, timeout=20):
    target = primary.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if rep.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)).fetchone()[0]:
            return
        time.sleep(0.05)
    raise AssertionError("the replica did not replay in time")


DECIDE = "SELECT allowed, reason, \"limit\", used, remaining, balance, message FROM flux_decide(%s, %s)"


def test_the_standby_answers_balances_and_refuses_draws(fresh_db):
    with clocked(fresh_db) as c:
        catalogue(c, allowance=100, cost=3, tenants=("acme", "globex"))
        c.execute("SELECT flux_add_credits('acme', 'ai_credits', 50, '2026-11-30 00:00+00', 'buy-1')")
        c.execute("SELECT flux_consume('acme', 'chat', 40)")  # 120: 100 + 20 of the top-up
    shutil.rmtree(STANDBY_DIR, ignore_errors=True)
    os.makedirs(os.path.dirname(STANDBY_DIR), exist_ok=True)
    as_postgres(f"{BIN}/pg_basebackup", "-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres",
                "-D", STANDBY_DIR, "-R", "-X", "stream", "-c", "fast")
    with open(os.path.join(STANDBY_DIR, "postgresql.conf"), "a") as f:
        f.write(f"\nport = {STANDBY_PORT}\nunix_socket_directories = '{STANDBY_DIR}'\nhot_standby = on\n")
    as_postgres(f"{BIN}/pg_ctl", "-D", STANDBY_DIR, "-l", os.path.join(STANDBY_DIR, "server.log"), "-w", "start")
    try:
        with clocked(fresh_db) as primary, replica(fresh_db) as rep:
            wait_for_replay(primary, rep)
            assert rep.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
            assert balance(rep) == balance(primary) == 30
            assert balance(rep, "globex") == 100
            for tenant in ("acme", "globex"):
                for feature in ("ai_credits", "chat"):
                    assert rep.execute(DECIDE, (tenant, feature)).fetchone() == primary.execute(DECIDE, (tenant, feature)).fetchone()
            r = rep.execute(DECIDE, ("acme", "ai_credits")).fetchone()
            assert r[:6] == (True, "ok", 100, 100, 30, 30), r
            assert rep.execute("SELECT balance FROM flux_decide('acme', 'chat')").fetchone() == (30,)
            assert rep.execute("SELECT count(*) FROM flux.credit_ledger").fetchone() == (2,)
            before = ledger(rep)
            # Drawing (a priced feature, the pool itself) and topping up are writes.
            for q in ("SELECT flux_consume('acme', 'chat')",
                      "SELECT flux_consume('acme', 'chat', 1, 'standby-key')",
                      "SELECT flux_consume('acme', 'ai_credits', 5)",
                      "SELECT flux_add_credits('acme', 'ai_credits', 10)"):
                with pytest.raises(psycopg.Error) as e:
                    rep.execute(q)
                assert e.value.sqlstate == "25006", (q, e.value)
            assert ledger(rep) == before
            # The same warm session follows a draw and a top-up made on the primary.
            primary.execute("SELECT flux_consume('acme', 'chat', 5)")
            primary.execute("SELECT flux_add_credits('acme', 'ai_credits', 7)")
            wait_for_replay(primary, rep)
            assert balance(rep) == balance(primary) == 22
            assert rep.execute(DECIDE, ("acme", "ai_credits")).fetchone()[4:6] == (22, 22)
            assert ledger(rep) == ledger(primary)
    finally:
        as_postgres(f"{BIN}/pg_ctl", "-D", STANDBY_DIR, "-m", "immediate", "-w", "stop")
        shutil.rmtree(STANDBY_DIR, ignore_errors=True)


# ---------------------------------------------------------------------------
# 6. pg_dump / pg_restore


DUMPED = ["features", "plans", "grants", "tenants", "usage", "usage_keys", "credit_ledger", "audit_log"]


def credits_snapshot(db):
    with clocked(db) as c:
        c.execute("SET timezone = 'UTC'")
        rows = {t: c.execute(f"SELECT x::text FROM flux.{t} x ORDER BY 1").fetchall() for t in DUMPED}
        rows["costs"] = c.execute("SELECT key, kind, cost_pool, cost_credits FROM flux.features ORDER BY 1").fetchall()
        rows["balances"] = c.execute(
            "SELECT id, flux_balance(id, 'ai_credits') FROM flux.tenants ORDER BY 1").fetchall()
        rows["decisions"] = c.execute(
            "SELECT t.id, f.f, d.allowed, d.reason, d.\"limit\", d.used, d.remaining, d.balance, d.message"
            "  FROM flux.tenants t, unnest(ARRAY['ai_credits', 'chat', 'image']) f(f), flux_decide(t.id, f.f) d"
            " ORDER BY 1, 2").fetchall()
        return rows


def dump_and_restore(db, check):
    """pg_dump -Fc `db`, pg_restore it into a new database, run check(target)."""
    target = "flux_restored_" + uuid.uuid4().hex[:8]
    conn_args = ["-h", HOST, "-p", str(PORT), "-U", "postgres"]
    with tempfile.TemporaryDirectory() as tmp:
        dump = os.path.join(tmp, "flux.dump")
        subprocess.run([f"{BIN}/pg_dump", *conn_args, "-Fc", "-f", dump, db], check=True, capture_output=True)
        subprocess.run([f"{BIN}/createdb", *conn_args, target], check=True)
        try:
            r = subprocess.run([f"{BIN}/pg_restore", *conn_args, "--exit-on-error", "-d", target, dump],
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            return check(target)
        finally:
            subprocess.run([f"{BIN}/dropdb", *conn_args, "--force", target], check=True)


def priced_catalogue_with_history(c):
    catalogue(c, allowance=100, cost=3, tenants=("acme", "globex", "initech"))
    c.execute("""
        SELECT flux_define_feature('image', 'metered');
        SELECT flux_grant('pro', 'image', NULL, 'month');
        SELECT flux_set_cost('image', 'ai_credits', 10);
        SELECT flux_add_credits('acme', 'ai_credits', 200, '2026-11-30 00:00+00', 'acme-1', 'pack');
        SELECT flux_add_credits('acme', 'ai_credits', 500, NULL, 'acme-2', 'annual');
        SELECT flux_add_credits('globex', 'ai_credits', 40, '2026-11-25 00:00+00', 'globex-1');
        SELECT flux_consume('acme', 'chat', 30);
        SELECT flux_consume('acme', 'image', 5, 'img-1');
        SELECT flux_consume('acme', 'ai_credits', 25);
        SELECT flux_consume('globex', 'image', 13);
        SELECT flux_consume('initech', 'chat', 2);
    """)


def test_dump_and_restore_keep_the_ledger_costs_and_balances(fresh_db):
    with clocked(fresh_db) as c:
        priced_catalogue_with_history(c)
        last_id = one(c, "SELECT max(id) FROM flux.credit_ledger")
    before = credits_snapshot(fresh_db)
    assert len(before["credit_ledger"]) == 8, before["credit_ledger"]
    assert before["balances"] == [("acme", 635), ("globex", 10), ("initech", 94)], before["balances"]

    def check(target):
        after = credits_snapshot(target)
        for k in before:
            assert after[k] == before[k], k
        with clocked(target) as c:
            # The sequence came along: new rows get new ids.
            assert one(c, "SELECT flux_add_credits('acme', 'ai_credits', 5, NULL, 'after-restore')") == 640
            assert one(c, "SELECT max(id) FROM flux.credit_ledger") > last_id
            # A top-up key from before the dump still adds nothing, a draw key draws nothing.
            assert one(c, "SELECT flux_add_credits('acme', 'ai_credits', 200, NULL, 'acme-1')") == 640
            assert c.execute("SELECT allowed, balance FROM flux_consume('acme', 'image', 5, 'img-1')").fetchone() == (True, 660)
            assert balance(c) == 640
            assert c.execute("SELECT allowed, balance FROM flux_consume('acme', 'chat', 2)").fetchone() == (True, 634)

    dump_and_restore(fresh_db, check)


def test_dump_and_restore_after_the_pool_was_edited(fresh_db):
    """An ordinary edit of the pool after pricing a feature (a description)
    moves the pool's row after the priced feature's in flux.features; the
    dump must still restore."""
    with clocked(fresh_db) as c:
        priced_catalogue_with_history(c)
        c.execute("SELECT flux_define_feature('ai_credits', 'credits', 'AI credits')")
    before = credits_snapshot(fresh_db)

    def check(target):
        after = credits_snapshot(target)
        for k in before:
            assert after[k] == before[k], k

    dump_and_restore(fresh_db, check)


# ---------------------------------------------------------------------------
# 7. Privileges


@pytest.fixture
def roles(fresh_db):
    r = Roles(fresh_db, "cred")
    yield r
    r.cleanup()


def test_a_plain_role_may_only_read_and_draw_its_own_balance(fresh_db, roles):
    with connect(fresh_db) as su:
        catalogue(su, allowance=100, cost=3, tenants=("acme", "globex"))
        su.execute("SELECT flux_add_credits('globex', 'ai_credits', 20, NULL, 'g-1')")
    app = roles.make("app")
    with connect(fresh_db) as su, login(fresh_db, app) as c:
        before = written(su)
        for q in ("SELECT flux_set_cost('chat', 'ai_credits', 1)",
                  "SELECT flux_set_cost('chat', NULL, NULL)",
                  "SELECT flux_add_credits('acme', 'ai_credits', 1000)",
                  "SELECT flux_add_credits('acme', 'ai_credits', 1000, NULL, 'k', 'free money')",
                  "SELECT * FROM flux.credit_ledger",
                  "SELECT count(*) FROM flux.credit_ledger WHERE tenant = 'globex'",
                  "INSERT INTO flux.credit_ledger (tenant, pool, amount, remaining) VALUES ('acme', 'ai_credits', 1000, 1000)",
                  "UPDATE flux.credit_ledger SET remaining = amount",
                  "DELETE FROM flux.credit_ledger",
                  "UPDATE flux.features SET cost_pool = NULL, cost_credits = NULL"):
            assert sqlstate_of(c, q) == "42501", q
        # The clock that expires top-ups (and starts a new allowance) is not
        # the caller's to move.
        c.execute("SELECT flux_current_tenant()")  # the library is loaded
        assert sqlstate_of(c, "SET flux.now = '2030-01-01 00:00+00'") == "42501"
        assert sqlstate_of(c, "SELECT set_config('flux.now', '2030-01-01 00:00+00', false)") == "42501"
        # No current tenant: no balance of anyone's.
        assert sqlstate_of(c, "SELECT flux_balance('acme', 'ai_credits')") == "42501"
        c.execute("SET flux.tenant = 'acme'")
        assert balance(c) == 100
        with pytest.raises(psycopg.Error) as e:
            c.execute("SELECT flux_balance('globex', 'ai_credits')")
        assert e.value.sqlstate == "42501"
        assert "globex" in str(e.value) and "flux_service" in str(e.value), str(e.value)
        assert sqlstate_of(c, "SELECT flux_consume('globex', 'chat')") == "42501"
        assert sqlstate_of(c, "SELECT flux_decide('globex', 'ai_credits')") == "42501"
        assert written(su) == before
        # Its own tenant: it draws without any grant on the tables.
        r = c.execute("SELECT allowed, balance FROM flux_consume('acme', 'chat', 2)").fetchone()
        assert r == (True, 94), r
        assert balance(c) == 94
        assert c.execute("SELECT remaining, balance FROM flux_decide('acme', 'ai_credits')").fetchone() == (94, 94)
        assert balance(su, "globex") == 120
        assert one(su, "SELECT count(*) FROM flux.credit_ledger WHERE tenant = 'acme' AND amount = -6") == 1
    # A placeholder set before the library loads does not move the clock
    # either: a new month would hand out a fresh allowance.
    with login(fresh_db, app) as c:
        sqlstate_of(c, "SET flux.now = '2030-01-15 00:00+00'")
        c.execute("SET flux.tenant = 'acme'")
        assert balance(c) == 94
        assert c.execute("SELECT coalesce(current_setting('flux.now', true), '')").fetchone() == ("",)


def test_admin_and_service_roles(fresh_db, roles):
    with connect(fresh_db) as su:
        catalogue(su, allowance=100, cost=3, tenants=("acme", "globex"))
    ops = roles.make("ops", member_of=["flux_admin"])
    svc = roles.make("svc", member_of=["flux_service"])
    with connect(fresh_db) as su, login(fresh_db, ops) as admin, login(fresh_db, svc) as service:
        # flux_admin prices and tops up, and reads the ledger, but does not
        # write it by hand (it must always add up to the balances).
        admin.execute("SELECT flux_set_cost('chat', 'ai_credits', 4)")
        assert one(admin, "SELECT flux_add_credits('acme', 'ai_credits', 30, NULL, 'ops-1')") == 130
        assert one(admin, "SELECT count(*) FROM flux.credit_ledger") == 1
        assert sqlstate_of(admin, "INSERT INTO flux.credit_ledger (tenant, pool, amount, remaining) VALUES ('acme', 'ai_credits', 1000, 1000)") == "42501"
        assert sqlstate_of(admin, "UPDATE flux.credit_ledger SET remaining = 1000") == "42501"
        assert sqlstate_of(admin, "DELETE FROM flux.credit_ledger") == "42501"
        # flux_service acts for any tenant, but is not an admin.
        assert balance(service, "acme") == 130 and balance(service, "globex") == 100
        assert service.execute("SELECT allowed, balance FROM flux_consume('globex', 'chat', 5)").fetchone() == (True, 80)
        before = written(su)
        assert sqlstate_of(service, "SELECT flux_add_credits('globex', 'ai_credits', 1000)") == "42501"
        assert sqlstate_of(service, "SELECT flux_set_cost('chat', 'ai_credits', 1)") == "42501"
        assert sqlstate_of(service, "SELECT * FROM flux.credit_ledger") == "42501"
        assert written(su) == before


def test_a_top_ups_audit_entry_names_the_role_that_made_it(fresh_db, roles):
    """CONTRACT: the audit log records "actor (the role)" and "the session's
    real role in a role column"; the top-up of flux_add_credits is audited
    (entity credit_ledger) like flux_set_cost's change of the feature."""
    with connect(fresh_db) as su:
        catalogue(su, allowance=100, cost=3)
    ops = roles.make("ops", member_of=["flux_admin"])
    with connect(fresh_db) as su, login(fresh_db, ops) as admin:
        admin.execute("SELECT flux_set_cost('chat', 'ai_credits', 4)")
        admin.execute("SELECT flux_add_credits('acme', 'ai_credits', 30, NULL, 'ops-1', 'goodwill')")
        cost = su.execute("SELECT actor, role, new->>'cost_credits' FROM flux.audit_log"
                          " WHERE entity = 'features' AND key = 'chat' ORDER BY id DESC LIMIT 1").fetchone()
        assert cost == (ops, ops, "4"), cost
        top_up = su.execute("SELECT actor, role, action, tenant, new->>'amount', new->>'reason' FROM flux.audit_log"
                            " WHERE entity = 'credit_ledger'").fetchall()
        assert top_up == [(ops, ops, "insert", "acme", "30", "goodwill")], top_up


# ---------------------------------------------------------------------------
# 8. Bad input: a clear error, nothing written


def test_bad_input_is_refused_with_nothing_written(fresh_db):
    with clocked(fresh_db) as c:
        catalogue(c, allowance=100, cost=3)
        c.execute("""
            SELECT flux_define_feature('other_pool', 'credits');
            SELECT flux_define_feature('api', 'metered');
            SELECT flux_define_feature('sso', 'boolean');
            SELECT flux_grant('pro', 'api', 10, 'month');
            SELECT flux_add_credits('acme', 'ai_credits', 20, NULL, 'ok-1');
            SELECT flux_consume('acme', 'chat', 2);
        """)
        before = written(c)
        cases = [
            # (call, SQLSTATE, words of the message)
            ("SELECT flux_set_cost('chat', 'api', 3)", "22023", ["api", "credits"]),
            ("SELECT flux_set_cost('chat', 'sso', 3)", "22023", ["sso", "credits"]),
            ("SELECT flux_set_cost('chat', 'chat', 3)", "22023", ["chat", "itself"]),
            ("SELECT flux_set_cost('ai_credits', 'ai_credits', 3)", "22023", ["ai_credits", "pool"]),
            ("SELECT flux_set_cost('ai_credits', 'other_pool', 3)", "22023", ["ai_credits", "pool"]),
            ("SELECT flux_set_cost('chat', 'ai_credits', 0)", "22023", ["0", "> 0"]),
            ("SELECT flux_set_cost('chat', 'ai_credits', -2)", "22023", ["-2", "> 0"]),
            ("SELECT flux_set_cost('chat', 'no_such_pool', 3)", "23503", ["no_such_pool"]),
            ("SELECT flux_set_cost('no_such_feature', 'ai_credits', 3)", "23503", ["no_such_feature"]),
            ("UPDATE flux.features SET cost_pool = 'api', cost_credits = 3 WHERE key = 'chat'", "22023", ["api", "credits"]),
            ("SELECT flux_add_credits('acme', 'ai_credits', 0)", "22023", ["0", "> 0"]),
            ("SELECT flux_add_credits('acme', 'ai_credits', -50)", "22023", ["-50", "> 0"]),
            ("SELECT flux_add_credits('acme', 'ai_credits', 50, '2026-11-22 11:00+00')", "22023", ["past"]),
            ("SELECT flux_add_credits('acme', 'ai_credits', 50, %s::timestamptz)", "22023", ["past"]),
            ("SELECT flux_add_credits('nobody', 'ai_credits', 50)", "23503", ["nobody"]),
            ("SELECT flux_add_credits('acme', 'api', 50)", "22023", ["api", "credits"]),
            ("SELECT flux_add_credits('acme', 'no_such_pool', 50)", "23503", ["no_such_pool"]),
            ("SELECT flux_add_credits('acme', 'ai_credits', 50, NULL, '')", "22023", ["idempotency_key"]),
            ("SELECT flux_add_credits('acme', 'ai_credits', NULL)", None, []),
            ("SELECT flux_balance('acme', 'api')", "22023", ["api", "credits"]),
            ("SELECT flux_balance('acme', 'no_such_pool')", "23503", ["no_such_pool"]),
            ("SELECT flux_consume('acme', 'chat', 0)", "22023", ["0"]),
            ("SELECT flux_consume('acme', 'chat', 4611686018427387904)", "22023", ["out of range"]),
            # A pool stays a pool while a feature draws from it.
            ("SELECT flux_define_feature('ai_credits', 'metered')", "22023", ["ai_credits", "chat", "draws"]),
            ("SELECT flux_define_feature('ai_credits', 'boolean')", "22023", ["ai_credits", "chat", "draws"]),
            ("UPDATE flux.features SET kind = 'metered' WHERE key = 'ai_credits'", "22023", ["ai_credits", "chat"]),
            # A priced feature does not become a pool.
            ("SELECT flux_define_feature('chat', 'credits')", "22023", ["chat", "pool"]),
        ]
        for query, state, words in cases:
            params = (NOW,) if "%s" in query else None
            try:
                c.execute(query, params)
                got, message = "ok", ""
            except psycopg.Error as e:
                got, message = e.sqlstate, str(e)
            if state is None:
                assert got != "XX000", (query, message)
            else:
                assert got == state, (query, got, message)
                for w in words:
                    assert w in message, (query, w, message)
            assert written(c) == before, query
        # An unknown tenant draws nothing (a decision, as for any feature).
        r = c.execute("SELECT allowed, reason, balance FROM flux_consume('nobody', 'chat', 1, 'k-nobody')").fetchone()
        assert r == (False, "unknown_tenant", None), r
        assert written(c) == before
        # The same refusals inside a transaction leave the rest of it whole.
        with clocked(fresh_db, autocommit=False) as t:
            assert t.execute("SELECT balance FROM flux_consume('acme', 'chat')").fetchone() == (111,)
            assert sqlstate_of(t, "SELECT flux_add_credits('acme', 'ai_credits', -1)") == "22023"
            assert sqlstate_of(t, "SELECT flux_define_feature('ai_credits', 'metered')") == "22023"
            t.commit()
        assert balance(c) == 111
        # Unpriced, the pool may change kind; removing a price is NULL.
        c.execute("SELECT flux_set_cost('chat', NULL, NULL)")
        assert c.execute("SELECT cost_pool, cost_credits FROM flux.features WHERE key = 'chat'").fetchone() == (None, None)
        assert c.execute("SELECT balance FROM flux_consume('acme', 'chat')").fetchone() == (None,)
        assert balance(c) == 111
