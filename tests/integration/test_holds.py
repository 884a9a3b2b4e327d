"""Holds (CONTRACT "Credits and holds", second part): flux_hold reserves
units (counted as used, or reserved in a credits pool) for work that
outlives a transaction; flux_settle turns the hold into what was really
used (more than held only if it fits); flux_release_hold gives it back; a
hold whose ttl has passed stops counting, by the clock (flux.now too), with
no job.

Over real connections: metered quotas and a priced feature, expiry seen by
new sessions, eight racing clients, concurrent idempotent holds and
settles, rollbacks, a kill -9, a hot standby, pg_dump / pg_restore, an
unprivileged role and bad input. Superuser connections run on a fixed clock
(flux.now), as in test_credits.py; the privilege test uses the real clock.
"""
import os
import random
import shutil
import signal
import threading
import time

import psycopg
import pytest

from conftest import BIN, PORT, Roles, connect, dsn, login, sqlstate_of, wait_until_up
from test_credits import as_postgres, dump_and_restore, in_thread, one, wait_blocked, wait_for_replay

NOW = "2026-11-22 12:00+00"
CLOCK = "-c flux.now=2026-11-22T12:00:00Z"
LATER = "-c flux.now=2026-11-22T12:11:00Z"  # past a 10-minute ttl, same month

STANDBY_PORT = 5479
STANDBY_DIR = f"/tmp/flux-pg/holds-standby-{STANDBY_PORT}"


def clocked(db, autocommit=True, options=CLOCK):
    return connect(db, autocommit=autocommit, options=options)


def metered(c, limit=1000, tenants=("acme",)):
    """tokens: metered, `limit` a month on plan pro."""
    c.execute("SELECT flux_define_feature('tokens', 'metered')")
    c.execute("SELECT flux_define_plan('pro')")
    c.execute("SELECT flux_grant('pro', 'tokens', %s, 'month')", (limit,))
    for t in tenants:
        c.execute("SELECT flux_subscribe(%s, 'pro')", (t,))


def priced(c, tenants=("acme",)):
    """ai_credits pool, 1000 a month; chat (metered, unlimited) costs 1; a
    top-up of 500 for each tenant: balance 1500."""
    c.execute("""
        SELECT flux_define_feature('ai_credits', 'credits');
        SELECT flux_define_feature('chat', 'metered');
        SELECT flux_define_plan('pro');
        SELECT flux_grant('pro', 'ai_credits', 1000, 'month');
        SELECT flux_grant('pro', 'chat', NULL, 'month');
        SELECT flux_set_cost('chat', 'ai_credits', 1);
    """)
    for t in tenants:
        c.execute("SELECT flux_subscribe(%s, 'pro')", (t,))
        c.execute("SELECT flux_add_credits(%s, 'ai_credits', 500, NULL, %s)", (t, f"buy-{t}"))


def hold(c, amount, feature="tokens", tenant="acme", ttl="15 minutes", key=None):
    """(allowed, reason, used, balance, hold_id)"""
    return c.execute("SELECT allowed, reason, used, balance, hold_id FROM flux_hold(%s, %s, %s, %s::interval, %s)",
                     (tenant, feature, amount, ttl, key)).fetchone()


def settle(c, hold_id, actual):
    """(allowed, reason, used, balance)"""
    return c.execute("SELECT allowed, reason, used, balance FROM flux_settle(%s, %s)", (hold_id, actual)).fetchone()


def usage(c, feature="tokens", tenant="acme"):
    return one(c, "SELECT flux_usage(%s, %s)", (tenant, feature))


def balance(c, tenant="acme"):
    return one(c, "SELECT flux_balance(%s, 'ai_credits')", (tenant,))


def hold_row(c, hold_id):
    return c.execute("SELECT amount, actual, settled_at IS NOT NULL, released_at IS NOT NULL FROM flux.holds"
                     " WHERE id = %s", (hold_id,)).fetchone()


def open_charges(c, hold_id):
    return c.execute("SELECT caller, amount FROM flux.hold_charges WHERE hold_id = %s AND open ORDER BY caller",
                     (hold_id,)).fetchall()


def error(c, query, params=None):
    """(SQLSTATE, message) of a query that must fail."""
    with pytest.raises(psycopg.Error) as e:
        if c.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
            with c.transaction():
                c.execute(query, params)
        else:
            c.execute(query, params)
    return e.value.sqlstate, str(e.value)


TABLES = ["holds", "hold_charges", "usage", "credit_ledger"]


def written(c):
    return {t: c.execute(f"SELECT x::text FROM flux.{t} x ORDER BY 1").fetchall() for t in TABLES}


# ---------------------------------------------------------------------------
# 1-2. A hold counts as used; settle, release


def test_a_hold_counts_as_used_until_settled(fresh_db):
    with clocked(fresh_db) as c:
        metered(c, 1000)
        ok, reason, used, _, h = hold(c, 600)
        assert (ok, reason, used) == (True, "ok", 600) and h
        assert open_charges(c, h) == [("", 600)]
        assert c.execute("SELECT allowed, reason FROM flux_consume('acme', 'tokens', 500)").fetchone() == (False, "limit_reached")
        assert c.execute("SELECT allowed, used FROM flux_consume('acme', 'tokens', 400)").fetchone() == (True, 1000)
        assert settle(c, h, 250)[:3] == (True, "ok", 650)
        assert usage(c) == 650
        assert hold_row(c, h) == (600, 250, True, False) and open_charges(c, h) == []
        # Closed: settling again or releasing it is an error, and changes nothing.
        before = written(c)
        assert error(c, "SELECT flux_settle(%s, 250)", (h,))[0] == "55000"
        assert error(c, "SELECT flux_settle(%s, 1)", (h,))[0] == "55000"
        assert error(c, "SELECT flux_release_hold(%s)", (h,))[0] == "55000"
        assert written(c) == before and usage(c) == 650


def test_release_gives_the_hold_back_and_twice_is_a_no_op(fresh_db):
    with clocked(fresh_db) as c:
        metered(c, 1000)
        h = hold(c, 700)[4]
        assert usage(c) == 700
        c.execute("SELECT flux_release_hold(%s)", (h,))
        assert usage(c) == 0 and open_charges(c, h) == []
        assert hold_row(c, h) == (700, None, False, True)
        before = written(c)
        c.execute("SELECT flux_release_hold(%s)", (h,))
        assert written(c) == before and usage(c) == 0
        assert error(c, "SELECT flux_settle(%s, 10)", (h,))[0] == "55000"
        assert c.execute("SELECT allowed, used FROM flux_consume('acme', 'tokens', 1000)").fetchone() == (True, 1000)


def test_settling_more_than_held_only_if_it_fits(fresh_db):
    with clocked(fresh_db) as c:
        metered(c, 1000)
        a = hold(c, 300)[4]
        assert settle(c, a, 450)[:3] == (True, "ok", 450)  # 150 more than held: fits
        assert usage(c) == 450
        b = hold(c, 200)[4]
        c.execute("SELECT flux_consume('acme', 'tokens', 300)")
        assert usage(c) == 950
        before = written(c)
        r = settle(c, b, 260)  # 60 more than held, only 50 left
        assert r[:2] == (False, "limit_reached"), r
        assert written(c) == before and usage(c) == 950
        assert hold_row(c, b) == (200, None, False, False) and open_charges(c, b) == [("", 200)]
        # Still open: it settles within what fits.
        assert settle(c, b, 250)[:3] == (True, "ok", 1000)
        assert usage(c) == 1000


# ---------------------------------------------------------------------------
# 3. Expiry by the clock, seen by every session


def test_an_expired_hold_stops_counting_in_every_session(fresh_db):
    with clocked(fresh_db) as c:
        metered(c, 100)
        h = hold(c, 100, ttl="10 minutes")[4]
        assert usage(c) == 100
        assert one(c, "SELECT used FROM flux_decide('acme', 'tokens')") == 100
        assert one(c, "SELECT flux_check('acme', 'tokens')") is False
    # A new session whose clock is past the ttl: it no longer counts, with no job.
    with clocked(fresh_db, options=LATER) as late:
        assert usage(late) == 0
        assert late.execute("SELECT allowed, used, remaining FROM flux_decide('acme', 'tokens')").fetchone() == (True, 0, 100)
        assert one(late, "SELECT flux_check('acme', 'tokens')") is True
        sqlstate, message = error(late, "SELECT flux_settle(%s, 10)", (h,))
        assert sqlstate == "55000" and "expired" in message, message
        # The next writer gets the whole limit.
        assert late.execute("SELECT allowed, used FROM flux_consume('acme', 'tokens', 100)").fetchone() == (True, 100)
        assert usage(late) == 100
        assert open_charges(late, h) == []
    # What the late consume took is counted: a new hold is refused.
    with clocked(fresh_db, options=LATER) as c:
        r = hold(c, 1, ttl="10 minutes")
        assert r[:2] == (False, "limit_reached") and r[4] is None, r


def test_an_expired_hold_in_a_session_that_saw_it_open(fresh_db):
    with clocked(fresh_db) as c, clocked(fresh_db) as other:
        metered(c, 100)
        other.execute("SELECT flux_decide('acme', 'tokens')")  # warm
        h = hold(c, 80, ttl="10 minutes")[4]
        assert usage(other) == 80
        other.execute("SET flux.now = '2026-11-22 12:11+00'")
        assert usage(other) == 0
        assert one(other, "SELECT flux_check('acme', 'tokens')") is True
        assert other.execute("SELECT allowed, used FROM flux_consume('acme', 'tokens', 100)").fetchone() == (True, 100)
        c.execute("SET flux.now = '2026-11-22 12:11+00'")
        sqlstate, message = error(c, "SELECT flux_settle(%s, 80)", (h,))
        assert sqlstate == "55000" and "expired" in message, message
        assert usage(c) == 100


def test_an_expired_hold_on_a_limit_feature_stops_counting_for_flux_release(fresh_db):
    """A limit feature (seats): 2 taken, 3 held for 10 minutes. Past the ttl
    the hold no longer counts: used is 2, and freeing a seat leaves 1
    (flux_release "returns the new used")."""
    with clocked(fresh_db) as c:
        c.execute("""
            SELECT flux_define_feature('seats', 'limit');
            SELECT flux_define_plan('pro');
            SELECT flux_grant('pro', 'seats', 5);
            SELECT flux_subscribe('acme', 'pro');
            SELECT flux_consume('acme', 'seats', 2);
        """)
        assert hold(c, 3, feature="seats", ttl="10 minutes")[:3] == (True, "ok", 5)
        assert c.execute("SELECT allowed FROM flux_consume('acme', 'seats')").fetchone() == (False,)
        c.execute("SET flux.now = '2026-11-22 12:11+00'")
        assert usage(c, "seats") == 2
        assert one(c, "SELECT used FROM flux_decide('acme', 'seats')") == 2
        released = one(c, "SELECT flux_release('acme', 'seats', 1)")
        assert (released, usage(c, "seats")) == (1, 1), (released, usage(c, "seats"))
        assert c.execute("SELECT allowed, used FROM flux_consume('acme', 'seats', 4)").fetchone() == (True, 5)


def test_a_settle_racing_a_writer_that_gives_the_expired_hold_back(fresh_db):
    """B's clock is past the ttl, A's is not: B's consume gives the hold back
    while A settles it. Either A's settle fails (55000) and the hold counts
    for nothing, or A's actual is counted once; never the hold's units."""
    with clocked(fresh_db) as c:
        metered(c, 1000)
        h = hold(c, 100, ttl="10 minutes")[4]
    with clocked(fresh_db) as watch, \
            clocked(fresh_db, autocommit=False, options=LATER) as b, \
            clocked(fresh_db, autocommit=False, options="-c flux.now=2026-11-22T12:05:00Z") as a:
        # B first (holds the counter), A waits on it.
        assert b.execute("SELECT allowed, used FROM flux_consume('acme', 'tokens', 10)").fetchone() == (True, 10)
        t, out = in_thread(lambda: settle(a, h, 40))
        wait_blocked(watch, a.info.backend_pid)
        b.commit()
        t.join()
        a.commit()
        if "error" in out:
            assert out["error"].sqlstate == "55000", out
            assert hold_row(watch, h)[1:3] == (None, False)
            want = 10
        else:
            assert out["value"][:2] == (True, "ok"), out
            assert hold_row(watch, h) == (100, 40, True, False)
            want = 50
        with clocked(fresh_db, options=LATER) as late:
            assert usage(late) == want
        # A first (holds the counter), B waits on it.
        h2 = hold(watch, 100, ttl="10 minutes")[4]
        assert settle(a, h2, 30)[0] is True
        t, out = in_thread(lambda: b.execute("SELECT allowed, used FROM flux_consume('acme', 'tokens', 5)").fetchone())
        wait_blocked(watch, b.info.backend_pid)
        a.commit()
        t.join()
        b.commit()
        assert out.get("value") == (True, want + 35), out
        with clocked(fresh_db, options=LATER) as late:
            assert usage(late) == want + 35
        assert one(watch, "SELECT count(*) FROM flux.hold_charges WHERE open") == 0


# ---------------------------------------------------------------------------
# 4. Eight racing clients


def test_eight_clients_racing_holds_and_consumes_never_pass_the_limit(fresh_db):
    with clocked(fresh_db) as c:
        metered(c, 100)
    holds = [[] for _ in range(8)]  # (hold_id, amount) allowed
    consumed = [0] * 8
    errors, over = [], []
    barrier = threading.Barrier(8)
    racing = threading.Event()
    racing.set()

    def watch():
        with clocked(fresh_db) as w:
            while racing.is_set():
                u = usage(w)
                held = one(w, "SELECT COALESCE(sum(amount), 0)::bigint FROM flux.hold_charges WHERE open")
                if u > 100 or held > 100:
                    over.append((u, held))

    def worker(i):
        rng = random.Random(i)
        try:
            with clocked(fresh_db) as w:
                barrier.wait()
                for _ in range(25):
                    if rng.random() < 0.5:
                        amt = rng.randint(1, 8)
                        ok, _, used, _, h = hold(w, amt)
                        assert used <= 100
                        if ok:
                            holds[i].append((h, amt))
                    else:
                        amt = rng.randint(1, 4)
                        ok, used = w.execute("SELECT allowed, used FROM flux_consume('acme', 'tokens', %s)", (amt,)).fetchone()
                        assert used <= 100
                        if ok:
                            consumed[i] += amt
                # Then fill to the limit one unit at a time.
                while w.execute("SELECT allowed FROM flux_consume('acme', 'tokens')").fetchone()[0]:
                    consumed[i] += 1
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    w = threading.Thread(target=watch)
    w.start()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    racing.clear()
    w.join()
    assert not errors, errors
    assert not over, over[:5]
    held = sum(a for hs in holds for _, a in hs)
    assert held > 0 and sum(consumed) > 0
    with clocked(fresh_db) as c:
        assert held + sum(consumed) == 100 == usage(c), (held, sum(consumed))
        assert one(c, "SELECT sum(amount) FROM flux.hold_charges WHERE open") == held
    # Settle everything, concurrently, at random actuals within each hold.
    actuals = [0] * 8

    def settler(i):
        rng = random.Random(100 + i)
        try:
            with clocked(fresh_db) as w:
                barrier.wait()
                for h, amt in holds[i]:
                    a = rng.randint(0, amt)
                    assert settle(w, h, a)[:2] == (True, "ok")
                    actuals[i] += a
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=settler, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with clocked(fresh_db) as c:
        assert usage(c) == sum(consumed) + sum(actuals)
        assert one(c, "SELECT count(*) FROM flux.hold_charges WHERE open") == 0
        assert one(c, "SELECT sum(actual) FROM flux.holds") == sum(actuals)


# ---------------------------------------------------------------------------
# 5-6. Concurrent idempotent holds and settles


def test_concurrent_holds_with_one_key_make_one_hold(fresh_db):
    with clocked(fresh_db) as c:
        metered(c, 1000)
    with clocked(fresh_db) as watch, clocked(fresh_db, autocommit=False) as a:
        first = hold(a, 100, key="job-1")
        assert first[:3] == (True, "ok", 100) and first[4]
        others = [clocked(fresh_db) for _ in range(4)]
        try:
            runs = [in_thread(lambda o=o: hold(o, 100, key="job-1")) for o in others]
            for o in others:
                wait_blocked(watch, o.info.backend_pid)
            a.commit()
            for t, _ in runs:
                t.join()
            for _, out in runs:
                assert "error" not in out, out
                assert out["value"][0] is True and out["value"][4] == first[4], out
        finally:
            for o in others:
                o.close()
        assert usage(watch) == 100
        assert one(watch, "SELECT count(*) FROM flux.holds WHERE idempotency_key = 'job-1'") == 1
        # The first rolls back: one of the waiters makes the hold, once.
        assert hold(a, 50, key="job-2")[0] is True
        others = [clocked(fresh_db) for _ in range(3)]
        try:
            runs = [in_thread(lambda o=o: hold(o, 50, key="job-2")) for o in others]
            for o in others:
                wait_blocked(watch, o.info.backend_pid)
            a.rollback()
            for t, _ in runs:
                t.join()
            ids = {out.get("value", (None,) * 5)[4] for _, out in runs}
            assert all("error" not in out for _, out in runs), runs
            assert len(ids) == 1 and None not in ids, runs
        finally:
            for o in others:
                o.close()
        assert usage(watch) == 150
        assert one(watch, "SELECT count(*) FROM flux.holds") == 2
        # The same key with another amount is another request: refused.
        before = written(watch)
        assert error(watch, "SELECT flux_hold('acme', 'tokens', 101, '15 minutes', 'job-1')")[0] == "22023"
        assert written(watch) == before


def test_two_sessions_settle_one_hold_and_exactly_one_succeeds(fresh_db):
    with clocked(fresh_db) as c:
        metered(c, 1000)
        h = hold(c, 100)[4]
        h2 = hold(c, 100)[4]
    with clocked(fresh_db) as watch, clocked(fresh_db, autocommit=False) as a, clocked(fresh_db) as b:
        assert settle(a, h, 30)[0] is True
        t, out = in_thread(lambda: settle(b, h, 40))
        wait_blocked(watch, b.info.backend_pid)
        a.commit()
        t.join()
        assert isinstance(out.get("error"), psycopg.Error) and out["error"].sqlstate == "55000", out
        assert hold_row(watch, h) == (100, 30, True, False)
        assert usage(watch) == 130
        # The first one rolls back: the second settles.
        assert settle(a, h2, 10)[0] is True
        t, out = in_thread(lambda: settle(b, h2, 70))
        wait_blocked(watch, b.info.backend_pid)
        a.rollback()
        t.join()
        assert out.get("value", (None,))[0] is True, out
        assert hold_row(watch, h2) == (100, 70, True, False)
        assert usage(watch) == 100
    # Released and settled at the same moment: one of the two.
    with clocked(fresh_db) as c:
        h3 = hold(c, 50)[4]
    results = []
    barrier = threading.Barrier(2)

    def go(q):
        with clocked(fresh_db) as w:
            barrier.wait()
            results.append(sqlstate_of(w, q, (h3,)))

    ts = [threading.Thread(target=go, args=(q,)) for q in ("SELECT flux_settle(%s, 20)", "SELECT flux_release_hold(%s)")]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    with clocked(fresh_db) as c:
        row = hold_row(c, h3)
        assert sorted(results) == ["55000", "ok"], (results, row)
        assert row[2] != row[3] and usage(c) == (120 if row[2] else 100), (results, row)


# ---------------------------------------------------------------------------
# 7. A priced feature: a reservation in the pool


def test_a_priced_hold_reserves_credits_and_a_settle_draws_once(fresh_db):
    with clocked(fresh_db) as c:
        priced(c)
        assert balance(c) == 1500
        ok, reason, _, bal, h = hold(c, 300, feature="chat")
        assert (ok, reason, bal) == (True, "ok", 1200) and h
        assert balance(c) == 1200
        assert one(c, "SELECT balance FROM flux_decide('acme', 'chat')") == 1200
        assert c.execute("SELECT count(*) FROM flux.credit_ledger WHERE amount < 0").fetchone() == (0,)
        # Settled under the hold: only what was used is drawn.
        assert settle(c, h, 100)[:2] == (True, "ok")
        assert balance(c) == 1400 and usage(c, "chat") == 100
        rows = c.execute("SELECT amount, feature, reason FROM flux.credit_ledger WHERE amount < 0").fetchall()
        assert len(rows) == 1 and rows[0][:2] == (-100, "chat") and h in (rows[0][2] or ""), rows
        # Over the hold: fits, then does not.
        h2 = hold(c, 100, feature="chat")[4]
        assert balance(c) == 1300
        assert settle(c, h2, 150)[:2] == (True, "ok")
        assert balance(c) == 1250
        h3 = hold(c, 1000, feature="chat")[4]
        assert balance(c) == 250
        before = written(c)
        assert settle(c, h3, 1300)[:2] == (False, "limit_reached")  # 1250 with the hold
        assert written(c) == before and balance(c) == 250
        assert settle(c, h3, 1250)[:2] == (True, "ok")
        assert balance(c) == 0
        draws = c.execute("SELECT amount, reason FROM flux.credit_ledger WHERE amount < 0 ORDER BY id").fetchall()
        assert [d[0] for d in draws] == [-100, -150, -1250], draws
        assert all(hid in (d[1] or "") for d, hid in zip(draws, (h, h2, h3))), draws
        # Released: the reservation goes back whole, nothing drawn.
        c.execute("SELECT flux_add_credits('acme', 'ai_credits', 100, NULL, 'buy-2')")
        h4 = hold(c, 60, feature="chat")[4]
        assert balance(c) == 40
        c.execute("SELECT flux_release_hold(%s)", (h4,))
        assert balance(c) == 100 and one(c, "SELECT count(*) FROM flux.credit_ledger WHERE amount < 0") == 3


def test_an_expired_priced_hold_restores_the_balance_without_a_write(fresh_db):
    with clocked(fresh_db) as c:
        priced(c)
        h = hold(c, 400, feature="chat", ttl="10 minutes")[4]
        p = hold(c, 100, feature="ai_credits", ttl="10 minutes")[4]  # the pool itself
        assert p and balance(c) == 1000
        before = written(c)
    with clocked(fresh_db, autocommit=False, options=LATER) as late:
        late.execute("SET TRANSACTION READ ONLY")
        assert balance(late) == 1500
        assert one(late, "SELECT balance FROM flux_decide('acme', 'chat')") == 1500
        assert one(late, "SELECT remaining FROM flux_decide('acme', 'ai_credits')") == 1500
        assert one(late, "SELECT txid_current_if_assigned()") is None
        late.commit()
        assert written(late) == before
        assert error(late, "SELECT flux_settle(%s, 1)", (h,))[0] == "55000"
        assert error(late, "SELECT flux_settle(%s, 1)", (p,))[0] == "55000"
        late.rollback()
        # Spendable again.
        assert late.execute("SELECT allowed, balance FROM flux_consume('acme', 'chat', 1500)").fetchone() == (True, 0)
        late.commit()
        assert one(late, "SELECT count(*) FROM flux.credit_ledger WHERE amount < 0") == 1


def test_eight_clients_racing_priced_holds_never_overdraw_the_pool(fresh_db):
    """1000 allowance + 500 (never) + 300 (expiring later this month) = 1800
    credits; chat costs 1. At every moment balance + reserved + drawn is
    1800 and the balance is never below 0; after settling, every credit is
    accounted for, one ledger row per settle."""
    total = 1800
    with clocked(fresh_db) as c:
        priced(c)
        c.execute("SELECT flux_add_credits('acme', 'ai_credits', 300, '2026-11-30 00:00+00', 'soon')")
        assert balance(c) == total
    holds = [[] for _ in range(8)]
    consumed = [0] * 8
    consumes = [0] * 8
    errors, broken = [], []
    barrier = threading.Barrier(8)
    racing = threading.Event()
    racing.set()

    def figures(w):
        with w.transaction():
            w.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            return w.execute(
                "SELECT flux_balance('acme', 'ai_credits'),"
                " (SELECT COALESCE(sum(amount), 0)::bigint FROM flux.hold_charges WHERE caller = 'pool' AND open),"
                " (SELECT COALESCE(-sum(amount), 0)::bigint FROM flux.credit_ledger WHERE amount < 0)").fetchone()

    def watch():
        with clocked(fresh_db) as w:
            while racing.is_set():
                bal, reserved, drawn = figures(w)
                if bal < 0 or bal + reserved + drawn != total:
                    broken.append((bal, reserved, drawn))

    def worker(i):
        rng = random.Random(i)
        try:
            with clocked(fresh_db) as w:
                barrier.wait()
                for _ in range(20):
                    if rng.random() < 0.5:
                        amt = rng.randint(1, 60)
                        ok, _, _, bal, h = hold(w, amt, feature="chat")
                        if ok:
                            assert bal >= 0
                            holds[i].append((h, amt))
                    else:
                        amt = rng.randint(1, 20)
                        ok, bal = w.execute("SELECT allowed, balance FROM flux_consume('acme', 'chat', %s)", (amt,)).fetchone()
                        if ok:
                            assert bal >= 0
                            consumed[i] += amt
                            consumes[i] += 1
                while w.execute("SELECT allowed FROM flux_consume('acme', 'chat')").fetchone()[0]:
                    consumed[i] += 1
                    consumes[i] += 1
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    w = threading.Thread(target=watch)
    w.start()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    racing.clear()
    w.join()
    assert not errors, errors
    assert not broken, broken[:5]
    held = sum(a for hs in holds for _, a in hs)
    with clocked(fresh_db) as c:
        assert figures(c) == (0, held, sum(consumed)), (figures(c), held, sum(consumed))
    actuals = {}

    def settler(i):
        rng = random.Random(50 + i)
        try:
            with clocked(fresh_db) as w:
                barrier.wait()
                for h, amt in holds[i]:
                    a = rng.randint(1, amt)
                    assert settle(w, h, a)[:2] == (True, "ok")
                    actuals[h] = a
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=settler, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    drawn = sum(consumed) + sum(actuals.values())
    with clocked(fresh_db) as c:
        assert figures(c) == (total - drawn, 0, drawn)
        assert usage(c, "chat") == drawn
        rows = c.execute("SELECT -amount, reason FROM flux.credit_ledger WHERE amount < 0").fetchall()
        assert len(rows) == sum(consumes) + len(actuals)
        by_hold = {}
        for amount, reason in rows:
            for h in actuals:
                if reason and h in reason:
                    by_hold.setdefault(h, []).append(amount)
        assert by_hold == {h: [a] for h, a in actuals.items()}
        assert usage(c, "ai_credits") == min(drawn, 1000)
        left = dict(c.execute("SELECT idempotency_key, remaining FROM flux.credit_ledger WHERE amount > 0").fetchall())
        assert left["soon"] == 300 - min(max(drawn - 1000, 0), 300), (left, drawn)
        assert left["buy-acme"] == 500 - max(drawn - 1300, 0), (left, drawn)


# ---------------------------------------------------------------------------
# 8. Rollback


def test_a_rolled_back_hold_or_settle_leaves_nothing(fresh_db):
    with clocked(fresh_db) as c:
        metered(c, 1000)
        c.execute("SELECT flux_consume('acme', 'tokens', 100)")
        before = written(c)
        with clocked(fresh_db, autocommit=False) as t:
            h = hold(t, 500)[4]
            assert usage(t) == 600
            t.rollback()
        assert written(c) == before and usage(c) == 100
        assert one(c, "SELECT count(*) FROM flux.holds") == 0
        assert error(c, "SELECT flux_settle(%s, 1)", (h,))[0] == "23503"
        # A savepoint rolled back: only the hold after it goes.
        with clocked(fresh_db, autocommit=False) as t:
            kept = hold(t, 200)[4]
            t.execute("SAVEPOINT s")
            gone = hold(t, 300)[4]
            t.execute("ROLLBACK TO SAVEPOINT s")
            t.commit()
        assert [r[0] for r in c.execute("SELECT id FROM flux.holds").fetchall()] == [kept]
        assert gone != kept and usage(c) == 300
        # A settle rolled back: the hold is open again, and still settles.
        for how in ("rollback", "release"):
            with clocked(fresh_db, autocommit=False) as t:
                if how == "rollback":
                    assert settle(t, kept, 50)[:3] == (True, "ok", 150)
                else:
                    t.execute("SELECT flux_release_hold(%s)", (kept,))
                    assert usage(t) == 100
                t.rollback()
            assert hold_row(c, kept) == (200, None, False, False)
            assert open_charges(c, kept) == [("", 200)] and usage(c) == 300
        assert settle(c, kept, 50)[:3] == (True, "ok", 150)


# ---------------------------------------------------------------------------
# 9. kill -9 while holding and settling


def test_sigkill_during_holds_and_settles_loses_nothing_committed(fresh_db):
    with clocked(fresh_db) as c:
        metered(c, 10**9)
    holds = {}  # key -> (hold_id, amount), committed
    settled, released = {}, set()  # hold_id -> actual; hold_id, committed
    in_flight = [None] * 8
    pids, crashed = [], []
    stop = threading.Event()

    def worker(i):
        rng = random.Random(i)
        try:
            conn = psycopg.connect(dsn(fresh_db), autocommit=False, options=CLOCK)
        except psycopg.Error:
            return
        pids.append(conn.info.backend_pid)
        n = 0
        try:
            while not stop.is_set():
                key, amt = f"k{i}-{n}", rng.randint(1, 9)
                n += 1
                try:
                    in_flight[i] = ("hold", key)
                    ok, _, _, _, h = hold(conn, amt, key=key)
                    conn.commit()
                    assert ok
                    holds[key] = (h, amt)
                    r = rng.random()
                    if r < 0.6:
                        actual = rng.randint(0, amt + 2)
                        in_flight[i] = ("settle", h, actual)
                        assert settle(conn, h, actual)[0] is True
                        conn.commit()
                        settled[h] = actual
                    elif r < 0.8:
                        in_flight[i] = ("release", h)
                        conn.execute("SELECT flux_release_hold(%s)", (h,))
                        conn.commit()
                        released.add(h)
                    in_flight[i] = None
                except psycopg.Error:
                    crashed.append(i)
                    return  # the crash: the call in flight may or may not have committed
        finally:
            try:
                conn.close()
            except psycopg.Error:
                pass

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 20
        while time.time() < deadline and (len(pids) < 8 or len(settled) < 300):
            time.sleep(0.05)
        assert len(pids) == 8
        # SIGKILL of a server process: the postmaster kills every other and
        # restarts the cluster through crash recovery.
        os.kill(pids[0], signal.SIGKILL)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
        wait_until_up(fresh_db)
    assert len(crashed) == 8, crashed  # every session was cut off by the crash
    flight = [f for f in in_flight if f is not None]
    flight_keys = {f[1] for f in flight if f[0] == "hold"}
    flight_settles = {f[1]: f[2] for f in flight if f[0] == "settle"}
    flight_releases = {f[1] for f in flight if f[0] == "release"}
    with clocked(fresh_db) as c:
        rows = {r[0]: r[1:] for r in c.execute(
            "SELECT id, idempotency_key, amount, actual, settled_at IS NOT NULL, released_at IS NOT NULL FROM flux.holds")}
        keys = {r[0] for r in rows.values()}
        assert set(holds) <= keys, sorted(set(holds) - keys)[:5]
        assert keys <= set(holds) | flight_keys, sorted(keys - set(holds) - flight_keys)[:5]
        for h, actual in settled.items():
            assert rows[h][2:4] == (actual, True), (h, rows[h], actual)
        for h in released:
            assert rows[h][4] is True, (h, rows[h])
        for h, (_, amount, actual, is_settled, is_released) in rows.items():
            if is_settled and h not in settled:
                assert flight_settles.get(h) == actual, (h, rows[h])
            if is_released and h not in released:
                assert h in flight_releases, (h, rows[h])
        want = sum(r[2] for r in rows.values() if r[3]) + sum(r[1] for r in rows.values() if not r[3] and not r[4])
        assert usage(c) == want, (usage(c), want)
        assert sum(settled.values()) <= want
        # A charge is open exactly while its hold is neither settled nor released.
        charges = dict(c.execute("SELECT hold_id, bool_and(open) FROM flux.hold_charges GROUP BY 1").fetchall())
        assert set(charges) == set(rows)
        bad = [h for h, r in rows.items() if charges[h] != (not r[3] and not r[4])]
        assert not bad, [(h, rows[h], charges[h]) for h in bad[:5]]
        # The open ones still settle after the restart.
        still = [h for h, r in rows.items() if not r[3] and not r[4]]
        for h in still:
            assert settle(c, h, 0)[0] is True
        assert usage(c) == sum(r[2] for r in rows.values() if r[3])
    assert len(settled) > 100, len(settled)


# ---------------------------------------------------------------------------
# 10. Hot standby


def replica(db, options=CLOCK):
    return psycopg.connect(f"host={STANDBY_DIR} port={STANDBY_PORT} user=postgres dbname={db}",
                           autocommit=True, options=options)


def test_the_standby_answers_with_holds_and_refuses_to_hold(fresh_db):
    with clocked(fresh_db) as c:
        metered(c, 1000)
        c.execute("""
            SELECT flux_define_feature('ai_credits', 'credits');
            SELECT flux_define_feature('chat', 'metered');
            SELECT flux_grant('pro', 'ai_credits', 1000, 'month');
            SELECT flux_grant('pro', 'chat', NULL, 'month');
            SELECT flux_set_cost('chat', 'ai_credits', 1);
            SELECT flux_add_credits('acme', 'ai_credits', 500, NULL, 'buy-1');
        """)
        h = hold(c, 300, ttl="10 minutes")[4]
        p = hold(c, 200, feature="chat", ttl="10 minutes")[4]
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
            assert one(rep, "SELECT pg_is_in_recovery()") is True
            assert balance(rep) == balance(primary) == 1300
            assert rep.execute("SELECT allowed, used, remaining FROM flux_decide('acme', 'tokens')").fetchone() == (True, 300, 700)
            assert one(rep, "SELECT balance FROM flux_decide('acme', 'chat')") == 1300
            for q, args in (("SELECT flux_hold('acme', 'tokens', 10)", None),
                            ("SELECT flux_hold('acme', 'chat', 10, '1 minute', 'k-standby')", None),
                            ("SELECT flux_settle(%s, 100)", (h,)),
                            ("SELECT flux_settle(%s, 100)", (p,)),
                            ("SELECT flux_release_hold(%s)", (h,))):
                assert error(rep, q, args)[0] == "25006", q
            # Past the ttl by the standby's clock: the holds no longer count there either.
            with replica(fresh_db, LATER) as late:
                assert balance(late) == 1500
                assert one(late, "SELECT used FROM flux_decide('acme', 'tokens')") == 0
            # A settle on the primary is seen after replay.
            settle(primary, h, 100)
            wait_for_replay(primary, rep)
            assert usage(rep) == 100
    finally:
        as_postgres(f"{BIN}/pg_ctl", "-D", STANDBY_DIR, "-m", "immediate", "-w", "stop")
        shutil.rmtree(STANDBY_DIR, ignore_errors=True)


# ---------------------------------------------------------------------------
# 11. pg_dump / pg_restore


def holds_snapshot(db):
    with clocked(db) as c:
        c.execute("SET timezone = 'UTC'")
        rows = {t: c.execute(f"SELECT x::text FROM flux.{t} x ORDER BY 1").fetchall()
                for t in ("holds", "hold_charges", "usage", "credit_ledger", "features")}
        # The features that had holds come back too (their readers count
        # expired holds out).
        rows["held_features"] = c.execute("SELECT DISTINCT feature FROM flux.held_features ORDER BY 1").fetchall()
        assert rows["held_features"], "the snapshot has features with holds"
        rows["figures"] = c.execute(
            "SELECT flux_usage('acme', 'tokens'), flux_usage('acme', 'chat'), flux_balance('acme', 'ai_credits')").fetchone()
        return rows


def test_dump_and_restore_keep_open_holds(fresh_db):
    with clocked(fresh_db) as c:
        priced(c)
        c.execute("SELECT flux_define_feature('tokens', 'metered'); SELECT flux_grant('pro', 'tokens', 1000, 'month')")
        t_open = hold(c, 300, key="t-open", ttl="10 minutes")[4]
        settle(c, hold(c, 50)[4], 20)
        c.execute("SELECT flux_release_hold(%s)", (hold(c, 40)[4],))
        c_open = hold(c, 200, feature="chat", ttl="10 minutes")[4]
        settle(c, hold(c, 70, feature="chat")[4], 30)
    before = holds_snapshot(fresh_db)
    assert before["figures"] == (320, 230, 1270), before["figures"]
    assert len(before["holds"]) == 5 and len(before["hold_charges"]) == 7

    def check(target):
        after = holds_snapshot(target)
        for k in before:
            assert after[k] == before[k], k
        with clocked(target) as c:
            # The open holds are still holds: they count, settle and repeat.
            assert c.execute("SELECT allowed FROM flux_consume('acme', 'tokens', 701)").fetchone() == (False,)
            assert hold(c, 300, key="t-open", ttl="10 minutes")[4] == t_open
            assert settle(c, c_open, 100)[:2] == (True, "ok")
            assert balance(c) == 1370
        with clocked(target, options=LATER) as late:
            assert usage(late) == 20
            assert error(late, "SELECT flux_settle(%s, 1)", (t_open,))[0] == "55000"

    dump_and_restore(fresh_db, check)


# ---------------------------------------------------------------------------
# 12. Privileges


@pytest.fixture
def roles(fresh_db):
    r = Roles(fresh_db, "hold")
    yield r
    r.cleanup()


def test_a_plain_role_holds_only_for_its_own_tenant(fresh_db, roles):
    with connect(fresh_db) as su:
        metered(su, 1000, tenants=("acme", "globex"))
        theirs = hold(su, 100, tenant="globex")[4]
    app = roles.make("app")
    with connect(fresh_db) as su, login(fresh_db, app) as a:
        before = written(su)
        # No current tenant: nobody's.
        assert sqlstate_of(a, "SELECT flux_hold('acme', 'tokens', 10)") == "42501"
        a.execute("SET flux.tenant = 'acme'")
        assert sqlstate_of(a, "SELECT flux_hold('globex', 'tokens', 10)") == "42501"
        for q in ("SELECT flux_settle(%s, 1)", "SELECT flux_release_hold(%s)", "SELECT flux_settle(%s, 0)"):
            sqlstate, message = error(a, q, (theirs,))
            assert sqlstate == "42501", (q, message)
            assert "globex" not in message, message
        assert written(su) == before
        assert hold_row(su, theirs) == (100, None, False, False) and usage(su, tenant="globex") == 100
        # The tables are not the app's to read or write.
        for q in ("SELECT * FROM flux.holds",
                  "SELECT count(*) FROM flux.hold_charges",
                  "INSERT INTO flux.holds (tenant, feature, amount, created_at, expires_at) VALUES ('acme', 'tokens', 1, now(), now() + '1 hour')",
                  "UPDATE flux.holds SET released_at = now()",
                  "DELETE FROM flux.holds",
                  "UPDATE flux.hold_charges SET open = false",
                  "DELETE FROM flux.hold_charges",
                  "DELETE FROM flux.held_features",
                  "INSERT INTO flux.held_features (feature) VALUES ('tokens')",
                  "SELECT count(*) FROM flux.held_features"):
            assert sqlstate_of(a, q) == "42501", q
        assert written(su) == before
        # Its own tenant: hold, settle and release with no grant on the tables.
        ok, _, used, _, mine = hold(a, 100)
        assert ok and used == 100
        assert settle(a, mine, 60)[:3] == (True, "ok", 60)
        other = hold(a, 10)[4]
        a.execute("SELECT flux_release_hold(%s)", (other,))
        assert usage(a) == 60 and usage(su, tenant="globex") == 100
        assert one(su, "SELECT count(*) > 0 FROM flux.held_features WHERE feature = 'tokens'") is True


# ---------------------------------------------------------------------------
# 13. Bad input


def test_bad_input_is_refused_with_nothing_written(fresh_db):
    with clocked(fresh_db) as c:
        metered(c, 1000)
        c.execute("""
            SELECT flux_define_feature('sso', 'boolean');
            SELECT flux_define_feature('calls', 'rate');
            SELECT flux_grant('pro', 'sso');
            SELECT flux_grant('pro', 'calls', 10, '1 hour');
        """)
        h = hold(c, 100)[4]
        before = written(c)
        cases = [
            ("SELECT flux_hold('acme', 'tokens', 0)", "22023"),
            ("SELECT flux_hold('acme', 'tokens', -5)", "22023"),
            ("SELECT flux_hold('acme', 'tokens', 5, '0 seconds')", "22023"),
            ("SELECT flux_hold('acme', 'tokens', 5, '-1 minute')", "22023"),
            ("SELECT flux_hold('acme', 'tokens', 5, NULL)", "22023"),
            ("SELECT flux_hold('acme', 'tokens', NULL)", "22023"),
            ("SELECT flux_hold('acme', 'tokens', 5, '15 minutes', '')", "22023"),
            ("SELECT flux_hold('acme', 'sso', 1)", "22023"),
            ("SELECT flux_hold('acme', 'calls', 1)", "22023"),
            ("SELECT flux_settle(NULL, 5)", "22023"),
            ("SELECT flux_release_hold(NULL)", "22023"),
            ("SELECT flux_settle('no-such-hold', 5)", "23503"),
            ("SELECT flux_release_hold('no-such-hold')", "23503"),
            (f"SELECT flux_settle('{h}', -1)", "22023"),
            (f"SELECT flux_settle('{h}', NULL)", "22023"),
        ]
        for q, state in cases:
            assert sqlstate_of(c, q) == state, q
            assert written(c) == before, q
        # An unknown tenant or feature is a decision, with no hold.
        assert hold(c, 1, tenant="nobody")[:2] == (False, "unknown_tenant")
        assert hold(c, 1, feature="nothing")[:2] == (False, "unknown_feature")
        c.execute("SELECT flux_define_feature('extra', 'metered')")
        before = written(c)
        assert hold(c, 1, feature="extra")[:2] == (False, "not_in_plan")
        assert hold(c, 2000)[:2] == (False, "limit_reached")  # over the limit: a refusal, no hold
        assert written(c) == before
        assert written(c) == before
        assert settle(c, h, 0)[:3] == (True, "ok", 0)


# ---------------------------------------------------------------------------
# 14. A transaction left open keeps its start time as the clock (no
# flux.now): it must not settle a hold that expired by the wall clock, whose
# units everyone else already stopped counting (red-team: the pool was
# overdrawn 4x this way, a limit pushed to twice its size).

def test_a_stale_transaction_cannot_settle_a_hold_expired_by_the_wall_clock(fresh_db):
    with connect(fresh_db, autocommit=True) as su:
        priced(su)
        metered(su, limit=50)
        stale = connect(fresh_db, autocommit=False)
        stale.execute("SELECT 1")  # its clock: now
        ok, _, _, bal, pool_hold = hold(su, 1000, feature="ai_credits", ttl="1 second")
        ok2, _, _, _, token_hold = hold(su, 50, ttl="1 second")
        assert ok and ok2 and bal == 500
        time.sleep(1.3)
        # Everyone else stopped counting both holds: the pool's 1500 and the
        # 50 tokens are there again, and are taken.
        assert balance(su) == 1500
        assert one(su, "SELECT allowed FROM flux_consume('acme', 'ai_credits', 1500)") is True
        assert one(su, "SELECT allowed FROM flux_consume('acme', 'tokens', 50)") is True
        for hid in (pool_hold, token_hold):
            stale.execute("SAVEPOINT s")
            sqlstate, message = error(stale, "SELECT flux_settle(%s, 10)", (hid,))
            assert sqlstate == "55000" and "expired" in message, message
            stale.execute("ROLLBACK TO SAVEPOINT s")
        stale.commit()
        stale.close()
        assert balance(su) == 0 and usage(su) == 50
        assert one(su, "SELECT sum(amount) FROM flux.credit_ledger WHERE amount < 0") == -1500


# Second red-team pass.

def test_a_repeatable_read_draw_cannot_spend_credits_a_later_hold_reserved(fresh_db):
    with connect(fresh_db, autocommit=True) as su:
        priced(su)
        su.execute("SELECT flux_consume('acme', 'ai_credits', 1)")  # the pool's row exists
        rr = connect(fresh_db, autocommit=False)
        rr.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        rr.execute("SELECT 1")  # the snapshot
        ok, _, _, bal, _ = hold(su, 1499, feature="ai_credits")
        assert ok and bal == 0
        sqlstate, _ = error(rr, "SELECT flux_consume('acme', 'ai_credits', 1499)")
        assert sqlstate == "40001"
        rr.rollback()
        rr.close()
        assert balance(su) == 0


def test_a_settle_whose_top_up_expired_under_it_draws_what_is_left(fresh_db):
    with clocked(fresh_db) as su:
        su.execute("""
            SELECT flux_define_feature('ai_credits', 'credits');
            SELECT flux_define_plan('basic');
            SELECT flux_subscribe('acme', 'basic');
            SELECT flux_add_credits('acme', 'ai_credits', 500, '2026-11-22 12:05+00', 'buy-1');
        """)
        ok, _, _, bal, hid = hold(su, 250, feature="ai_credits", ttl="1 day")
        assert ok and bal == 250
    with clocked(fresh_db, options="-c flux.now=2026-11-22T12:10:00Z") as later:
        assert balance(later) == 0
        r = settle(later, hid, 250)
        assert r[0] is True and balance(later) == 0
        assert one(later, "SELECT count(*) FROM flux.credit_ledger WHERE amount < 0") == 0
        assert hold_row(later, hid)[1] == 250


def test_a_repeated_key_of_a_closed_hold_is_an_error(fresh_db):
    with clocked(fresh_db) as su:
        metered(su)
        hid = hold(su, 10, key="req-1")[4]
        settle(su, hid, 4)
        sqlstate, message = error(su, "SELECT flux_hold('acme', 'tokens', 10, '15 minutes', 'req-1')")
        assert sqlstate == "55000" and "settled" in message, message
        assert usage(su) == 4


def test_a_ttl_longer_than_seven_days_is_refused(fresh_db):
    with clocked(fresh_db) as su:
        metered(su)
        assert error(su, "SELECT flux_hold('acme', 'tokens', 1, '8 days')")[0] == "22023"
        assert error(su, "SELECT flux_hold('acme', 'tokens', 1, '292200 years')")[0] == "22023"
        assert hold(su, 1, ttl="7 days")[0] is True
