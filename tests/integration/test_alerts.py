"""Usage alerts and the billable view (CONTRACT "Soft limits, overage and
usage alerts", second part): flux_alert(feature, threshold) sets a
threshold as a fraction of the limit; the first consume in a period taking
a tenant to or past it writes one row of flux.usage_alerts and queues
NOTIFY flux_usage (sent at commit, dropped on rollback).

Over real connections: eight clients racing across the thresholds (hard
and soft grants) write exactly one row and one notification per threshold,
from the consume that crossed it; rolled-back crossings leave nothing while
committed ones racing them write; four workers draining the table with the
README's SKIP LOCKED pattern return every alert exactly once; a kill -9
loses no committed crossing and invents none; pg_dump / pg_restore keeps
thresholds and alerts (an old crossing does not repeat, a new one fires); a
hot standby reads the view and the alerts and refuses flux_alert with
25006; a role without flux_admin can neither set thresholds nor read the
alerts or the view, and its own consumes still alert. Plus the semantics
the races rely on: two thresholds in one jump, once per period, a warm
session seeing a new or cleared threshold, holds.

Superuser connections run on a fixed clock (flux.now), as in
test_credits.py; the privilege test uses the real clock (plain roles may
not set flux.now).
"""
import datetime
import json
import os
import random
import shutil
import signal
import threading
import time
from decimal import Decimal

import psycopg
import pytest

from conftest import BIN, PORT, Roles, connect, dsn, login, sqlstate_of, wait_until_up
from test_credits import as_postgres, dump_and_restore, one, wait_blocked, wait_for_replay

CLOCK = "-c flux.now=2026-12-01T10:00:00Z"
NOW = datetime.datetime(2026, 12, 1, 10, 0, tzinfo=datetime.timezone.utc)
PERIOD = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)
NEXT_PERIOD = datetime.datetime(2027, 1, 1, tzinfo=datetime.timezone.utc)
NEG_INF = "-infinity"

STANDBY_PORT = 5477
STANDBY_DIR = f"/tmp/flux-pg/alerts-standby-{STANDBY_PORT}"

PROCESS = """
UPDATE flux.usage_alerts a SET processed_at = now()
  FROM (SELECT tenant, feature, period_start, threshold FROM flux.usage_alerts
         WHERE processed_at IS NULL ORDER BY at LIMIT %s FOR UPDATE SKIP LOCKED) n
 WHERE (a.tenant, a.feature, a.period_start, a.threshold) = (n.tenant, n.feature, n.period_start, n.threshold)
RETURNING a.*
"""


def clocked(db, autocommit=True, options=CLOCK):
    return connect(db, autocommit=autocommit, options=options)


def catalogue(c, limit=1000, thresholds=(0.5, 0.8, 1), tenants=("acme",), cap=None, soft=False):
    """api: metered, `limit` a month on plan pro (soft with `cap` past it
    when soft); the thresholds on api."""
    c.execute("SELECT flux_define_feature('api', 'metered')")
    c.execute("SELECT flux_define_plan('pro')")
    c.execute("SELECT flux_grant('pro', 'api', %s, 'month')", (limit,))
    if soft:
        c.execute("SELECT flux_set_overage('pro', 'api', true, %s)", (cap,))
    for t in thresholds:
        c.execute("SELECT flux_alert('api', %s::numeric)", (str(t),))
    for t in tenants:
        c.execute("SELECT flux_subscribe(%s, 'pro')", (t,))


def consume(c, amount=1, tenant="acme", feature="api"):
    """(allowed, used)"""
    return c.execute("SELECT allowed, used FROM flux_consume(%s, %s, %s)", (tenant, feature, amount)).fetchone()


def alerts(c, tenant=None, feature="api"):
    """{threshold: (used, limit, period_start, at, processed)} of one tenant, or
    {(tenant, threshold): ...} of all when tenant is None."""
    rows = c.execute(
        "SELECT tenant, threshold, used, \"limit\", period_start, at, processed_at IS NOT NULL"
        "  FROM flux.usage_alerts WHERE feature = %s AND (%s::text IS NULL OR tenant = %s) ORDER BY 1, 2",
        (feature, tenant, tenant)).fetchall()
    if tenant is None:
        return {(r[0], r[1]): r[2:] for r in rows}
    return {r[1]: r[2:] for r in rows}


def listener(db):
    c = connect(db)
    c.execute("LISTEN flux_usage")
    return c


def drain(lc, quiet=0.7, limit=30):
    """Every notification the listener has or gets until `quiet` seconds
    pass with none: [(pid, payload dict)]."""
    out = []
    deadline = time.time() + limit
    while time.time() < deadline:
        got = [(n.pid, json.loads(n.payload, parse_float=Decimal)) for n in lc.notifies(timeout=quiet)]
        out.extend(got)
        if not got:
            break
    for _, p in out:
        assert set(p) == {"tenant", "feature", "period_start", "threshold", "used", "limit"}, p
    return out


def stamp(p):
    """A payload's period_start as a datetime (or '-infinity')."""
    v = p["period_start"]
    return v if v in ("-infinity", "infinity") else datetime.datetime.fromisoformat(v)


def crossed(thresholds, limit, before, after):
    """The thresholds `before < t x limit <= after` (exact, in decimals)."""
    return [t for t in thresholds if Decimal(before) < Decimal(str(t)) * limit <= Decimal(after)]


def dec(t):
    """A threshold as a Decimal (equal and hashing alike whatever its scale)."""
    return Decimal(str(t))


# ---------------------------------------------------------------------------
# 1. Eight clients racing across the thresholds


@pytest.mark.parametrize("grant", ["hard", "soft"])
def test_eight_clients_crossing_thresholds_write_one_row_and_one_notification_each(fresh_db, grant):
    """hard: limit 1000, thresholds 0.5, 0.8, 1, one unit a consume until
    refused: the rows are at 500, 800 and 1000. soft: limit 997 and a cap
    of 503 (1500 in all), thresholds 0.5, 0.8, 1, 1.2, 1.5, random amounts
    of 1 to 7 then single units to the cap: each row is the one consume
    whose before < t x 997 <= after, with the limit (997), not the cap."""
    if grant == "hard":
        limit, thresholds, cap, ceiling = 1000, (0.5, 0.8, 1), None, 1000
    else:
        limit, thresholds, cap, ceiling = 997, (0.5, 0.8, 1, 1.2, 1.5), 503, 1500
    with clocked(fresh_db) as su:
        catalogue(su, limit, thresholds, cap=cap, soft=grant == "soft")
    lc = listener(fresh_db)
    seen = []  # (pid, used, amount) of every allowed consume
    errors = []
    barrier = threading.Barrier(8)

    def client(i):
        rng = random.Random(i)
        try:
            with clocked(fresh_db) as c:
                pid = c.info.backend_pid
                barrier.wait()
                while True:
                    amount = 1 if grant == "hard" else rng.randint(1, 7)
                    ok, used = consume(c, amount)
                    if not ok and amount > 1:
                        amount = 1
                        ok, used = consume(c, 1)
                    if not ok:
                        assert used == ceiling, used
                        return
                    seen.append((pid, used, amount))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # The race itself is exact: every total from 1 (or the first amount) to the ceiling once.
    assert sum(a for _, _, a in seen) == ceiling
    assert len({u for _, u, _ in seen}) == len(seen)
    assert len({p for p, _, _ in seen}) == 8, "every client consumed"
    # The crossing consume of each threshold: before < t x limit <= after.
    expected = {}
    for pid, used, amount in seen:
        for t in crossed(thresholds, limit, used - amount, used):
            assert dec(t) not in expected, t
            expected[dec(t)] = (pid, used)
    assert sorted(expected) == sorted(dec(t) for t in thresholds)
    if grant == "hard":
        assert {t: u for t, (_, u) in expected.items()} == {Decimal("0.5"): 500, Decimal("0.8"): 800, Decimal("1"): 1000}
    with clocked(fresh_db) as su:
        rows = alerts(su, "acme")
        assert rows == {t: (u, limit, PERIOD, NOW, False) for t, (_, u) in expected.items()}, rows
        assert one(su, "SELECT count(*) FROM flux.usage_alerts") == len(thresholds)
        assert one(su, "SELECT used FROM flux.usage WHERE tenant = 'acme'") == ceiling
    notes = drain(lc)
    lc.close()
    assert len(notes) == len(thresholds), notes
    got = {}
    for pid, p in notes:
        assert (p["tenant"], p["feature"], stamp(p), p["limit"]) == ("acme", "api", PERIOD, limit), p
        t = dec(p["threshold"])
        assert t not in got, p
        got[t] = (pid, p["used"])
    # Sent by the backend whose consume crossed, with its total.
    assert got == expected, (got, expected)


# ---------------------------------------------------------------------------
# 2. Rolled-back crossings


def test_a_rolled_back_crossing_leaves_nothing_and_the_committed_one_writes(fresh_db):
    """700 committed; a transaction takes it to 850 (past 0.8), sees its
    own row, and a second consume of 120 waits behind it; the first rolls
    back: the row and the notification are the second's, at 820."""
    with clocked(fresh_db) as su:
        catalogue(su)
        assert consume(su, 700) == (True, 700)
        assert alerts(su, "acme") == {Decimal("0.5"): (700, 1000, PERIOD, NOW, False)}
    lc = listener(fresh_db)
    assert [p for _, p in drain(lc, quiet=0.3)] == []
    doomed = clocked(fresh_db, autocommit=False)
    later = clocked(fresh_db)
    watch = clocked(fresh_db)
    try:
        assert consume(doomed, 150) == (True, 850)
        mine = doomed.execute("SELECT threshold, used FROM flux.usage_alerts WHERE xmin = pg_current_xact_id()::xid").fetchall()
        assert mine == [(Decimal("0.8"), 850)]
        assert alerts(watch, "acme") == {Decimal("0.5"): (700, 1000, PERIOD, NOW, False)}  # not committed: not seen

        out = {}

        def second():
            out["r"] = consume(later, 120)

        t = threading.Thread(target=second)
        t.start()
        wait_blocked(watch, later.info.backend_pid)
        doomed.rollback()
        t.join(10)
        assert out["r"] == (True, 820)
        rows = alerts(watch, "acme")
        assert rows == {Decimal("0.5"): (700, 1000, PERIOD, NOW, False), Decimal("0.8"): (820, 1000, PERIOD, NOW, False)}
        notes = drain(lc)
        assert len(notes) == 1, notes
        pid, p = notes[0]
        assert pid == later.info.backend_pid
        assert p == {"tenant": "acme", "feature": "api", "period_start": p["period_start"], "threshold": Decimal("0.8"),
                     "used": 820, "limit": 1000}
        assert stamp(p) == PERIOD
        # A savepoint rolled back takes its crossing back too, the outer
        # transaction's stays.
        doomed.execute("SELECT 1")
        assert consume(doomed, 100) == (True, 920)
        doomed.execute("SAVEPOINT s")
        assert consume(doomed, 80) == (True, 1000)
        doomed.execute("ROLLBACK TO SAVEPOINT s")
        doomed.commit()
        assert set(alerts(watch, "acme")) == {Decimal("0.5"), Decimal("0.8")}
        assert drain(lc, quiet=0.3) == []
        assert consume(later, 80) == (True, 1000)
        assert alerts(watch, "acme")[Decimal("1")] == (1000, 1000, PERIOD, NOW, False)
        assert [p["threshold"] for _, p in drain(lc)] == [1]
    finally:
        for c in (doomed, later, watch, lc):
            c.close()


def test_rollbacks_racing_commits_leave_exactly_the_committed_alerts(fresh_db):
    """Four committers consume one unit at a time (autocommit) to the
    limit; four others keep taking 50 to 300 in a transaction, checking the
    alert rows their consume wrote (exactly the thresholds it crossed),
    holding the counter a moment and rolling back. The table and the
    listener end with exactly the committers' crossings: 500, 800, 1000."""
    with clocked(fresh_db) as su:
        catalogue(su)
    lc = listener(fresh_db)
    thresholds = (0.5, 0.8, 1)
    seen = []  # (pid, used) committed
    committer_pids = set()
    doomed_crossings = []  # (used, thresholds) each rolled-back consume crossed
    errors = []
    done = threading.Event()
    barrier = threading.Barrier(8)

    def committer():
        try:
            with clocked(fresh_db) as c:
                committer_pids.add(c.info.backend_pid)
                barrier.wait()
                while True:
                    ok, used = consume(c, 1)
                    if not ok:
                        assert used == 1000
                        return
                    seen.append((c.info.backend_pid, used))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def roller(i):
        rng = random.Random(i)
        try:
            with clocked(fresh_db, autocommit=False) as c:
                barrier.wait()
                while not done.is_set():
                    amount = rng.randint(50, 300)
                    ok, used = consume(c, amount)
                    if ok:
                        mine = c.execute("SELECT threshold FROM flux.usage_alerts"
                                         " WHERE xmin = pg_current_xact_id()::xid ORDER BY 1").fetchall()
                        want = [dec(t) for t in crossed(thresholds, 1000, used - amount, used)]
                        assert [r[0] for r in mine] == want, (used, amount, mine)
                        if want:
                            doomed_crossings.append((used, want))
                        time.sleep(rng.random() * 0.003)
                    c.rollback()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=committer) for _ in range(4)] + \
              [threading.Thread(target=roller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads[:4]:
        t.join()
    done.set()
    for t in threads[4:]:
        t.join()
    assert not errors, errors
    assert sorted(u for _, u in seen) == list(range(1, 1001))
    # The race had rolled-back crossings of every threshold below the limit.
    doomed = {t for _, ts in doomed_crossings for t in ts}
    assert {Decimal("0.5"), Decimal("0.8")} <= doomed, doomed_crossings[:10]
    by_used = dict((u, p) for p, u in seen)
    expected = {Decimal("0.5"): (by_used[500], 500), Decimal("0.8"): (by_used[800], 800), Decimal("1"): (by_used[1000], 1000)}
    with clocked(fresh_db) as su:
        assert alerts(su, "acme") == {t: (u, 1000, PERIOD, NOW, False) for t, (_, u) in expected.items()}
        assert one(su, "SELECT count(*) FROM flux.usage_alerts") == 3
    notes = drain(lc)
    lc.close()
    got = {dec(p["threshold"]): (pid, p["used"]) for pid, p in notes}
    assert len(notes) == 3 and got == expected, (notes, expected)
    assert {pid for pid, _ in notes} <= committer_pids


# ---------------------------------------------------------------------------
# 3. Exactly-once processing with FOR UPDATE SKIP LOCKED


def test_four_workers_process_every_alert_exactly_once(fresh_db):
    """200 tenants each cross 0.5 and 0.8 (400 alerts) while four workers
    run the README's processing UPDATE in batches of 5, each batch its own
    transaction held a moment; every alert is returned once, by one worker."""
    tenants = [f"t{i:03}" for i in range(200)]
    with connect(fresh_db) as su:
        catalogue(su, 1000, (0.5, 0.8, 1), tenants=tenants)
    returned = [[] for _ in range(4)]
    batches = [0] * 4
    errors = []
    producing = threading.Event()
    producing.set()
    barrier = threading.Barrier(6)

    def producer(part):
        try:
            with connect(fresh_db) as c:
                barrier.wait()
                for t in part:
                    assert consume(c, 400, tenant=t)[0] is True  # 0.5 not yet
                    assert consume(c, 450, tenant=t) == (True, 850)  # 0.5 and 0.8 at once
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def worker(i):
        rng = random.Random(i)
        try:
            with connect(fresh_db, autocommit=False) as c:
                barrier.wait()
                while True:
                    still = producing.is_set()
                    rows = c.execute(PROCESS, (5,)).fetchall()
                    if rows:
                        batches[i] += 1
                        time.sleep(rng.random() * 0.004)
                    c.commit()
                    returned[i].extend(rows)
                    if not rows and not still:
                        return
                    if not rows:
                        time.sleep(0.002)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    producers = [threading.Thread(target=producer, args=(tenants[k::2],)) for k in range(2)]
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in producers + workers:
        t.start()
    for t in producers:
        t.join()
    producing.clear()
    for t in workers:
        t.join()
    assert not errors, errors
    keys = [(r[0], r[1], r[3]) for w in returned for r in w]
    assert len(keys) == 400, len(keys)
    assert len(set(keys)) == 400, "an alert was returned twice"
    assert set(keys) == {(t, "api", Decimal(x)) for t in tenants for x in ("0.5", "0.8")}
    # What the workers returned is the rows as written: used 850 of 1000, processed.
    assert all(r[4] == 850 and r[5] == 1000 and r[7] is not None for w in returned for r in w)
    assert all(n > 0 for n in batches), batches  # all four took batches
    with connect(fresh_db) as su:
        assert one(su, "SELECT count(*) FROM flux.usage_alerts WHERE processed_at IS NULL") == 0
        assert one(su, "SELECT count(*) FROM flux.usage_alerts") == 400
        # Nothing left for a fifth worker.
        assert su.execute(PROCESS, (100,)).fetchall() == []


# ---------------------------------------------------------------------------
# 4. kill -9


def test_sigkill_during_crossings_loses_no_committed_alert(fresh_db):
    """Eight clients consume random amounts for 40 tenants (limit 2000,
    eleven thresholds), in autocommit and in transactions of two or three
    consumes; a backend is killed with SIGKILL halfway. After recovery, for
    each tenant and threshold the row exists exactly when the recorded use
    reaches it; every crossing a client saw committed has its row with that
    client's total; no row is above the recorded use."""
    limit = 2000
    thresholds = (0.1, 0.2, 0.25, 0.3333, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1)
    tenants = [f"k{i:02}" for i in range(40)]
    with clocked(fresh_db) as su:
        catalogue(su, limit, thresholds, tenants=tenants)
    committed = []  # (tenant, used, amount) seen committed
    in_flight = [None] * 8  # [(tenant, amount)] of the batch in progress
    pids, crashed = [], []
    stop = threading.Event()

    def worker(i):
        rng = random.Random(i)
        try:
            conn = psycopg.connect(dsn(fresh_db), autocommit=True, options=CLOCK)
        except psycopg.Error:
            return
        pids.append(conn.info.backend_pid)
        try:
            while not stop.is_set():
                if rng.random() < 0.7:
                    batch = [(rng.choice(tenants), rng.randint(1, 60))]
                else:
                    # Sorted by tenant: two transactions never wait on each other in a cycle.
                    batch = sorted((t, rng.randint(1, 60)) for t in rng.sample(tenants, rng.randint(2, 3)))
                in_flight[i] = batch
                try:
                    if len(batch) == 1:
                        ok, used = consume(conn, batch[0][1], tenant=batch[0][0])
                        done = [(batch[0][0], used, batch[0][1])] if ok else []
                    else:
                        done = []
                        with conn.transaction():
                            for t, a in batch:
                                ok, used = consume(conn, a, tenant=t)
                                if ok:
                                    done.append((t, used, a))
                except psycopg.Error:
                    crashed.append(i)
                    return  # the crash: the batch in flight may or may not have committed
                committed.extend(done)
                in_flight[i] = None
        finally:
            try:
                conn.close()
            except psycopg.Error:
                pass

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 30
        while time.time() < deadline and (len(pids) < 8 or sum(a for _, _, a in committed) < 0.55 * limit * len(tenants)):
            time.sleep(0.05)
        assert len(pids) == 8
        # SIGKILL of one server process: the postmaster kills every other
        # and restarts the cluster through crash recovery.
        os.kill(pids[0], signal.SIGKILL)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
        wait_until_up(fresh_db)
    assert len(crashed) == 8, crashed
    flight = [b for b in in_flight if b is not None]
    with clocked(fresh_db) as su:
        used = dict(su.execute("SELECT tenant, used FROM flux.usage WHERE feature = 'api'").fetchall())
        recovered = alerts(su)
    # Recorded use is what was seen committed, plus at most what was in flight.
    for t in tenants:
        seen = sum(a for tt, _, a in committed if tt == t)
        maybe = sum(a for b in flight for tt, a in b if tt == t)
        assert seen <= used.get(t, 0) <= seen + maybe, (t, seen, maybe, used.get(t))
    # Each tenant's row set is exactly the thresholds its recorded use reaches.
    missing, extra = [], []
    for t in tenants:
        u = used.get(t, 0)
        for th in thresholds:
            reached = Decimal(u) >= Decimal(str(th)) * limit
            has = (t, dec(th)) in recovered
            if reached and not has:
                missing.append((t, th, u))
            if has and not reached:
                extra.append((t, th, u, recovered[(t, dec(th))]))
    assert not missing, missing[:10]
    assert not extra, extra[:10]
    assert len(recovered) == sum(1 for t in tenants for th in thresholds
                                 if Decimal(used.get(t, 0)) >= Decimal(str(th)) * limit)
    # A crossing seen committed has its row, with that consume's total.
    crossings = 0
    for t, u, a in committed:
        for th in crossed(thresholds, limit, u - a, u):
            crossings += 1
            assert recovered[(t, dec(th))][:2] == (u, limit), (t, th, u, recovered[(t, dec(th))])
    assert crossings > 100, crossings
    # Every row's total lies in its threshold's crossing range and within the recorded use.
    for (t, th), (u, lim, period, at, processed) in recovered.items():
        assert th * limit <= u <= used[t] and lim == limit and period == PERIOD and at == NOW and not processed
    # After the restart, thresholds still fire: a tenant short of the limit is taken to it.
    short = sorted((t for t in tenants if used.get(t, 0) < limit * Decimal("0.9")), key=lambda t: used.get(t, 0))
    assert short, used
    t = short[0]
    lc = listener(fresh_db)
    with clocked(fresh_db) as su:
        before = used.get(t, 0)
        assert consume(su, limit - before, tenant=t) == (True, limit)
        want = {dec(th) for th in crossed(thresholds, limit, before, limit)}
        assert {th for th, r in alerts(su, t).items() if r[0] == limit} == want
    assert {dec(p["threshold"]) for _, p in drain(lc)} == want
    lc.close()


# ---------------------------------------------------------------------------
# 5. pg_dump / pg_restore


def alerts_snapshot(db):
    with clocked(db) as c:
        c.execute("SET timezone = 'UTC'")
        return {t: c.execute(f"SELECT x::text FROM flux.{t} x ORDER BY 1").fetchall()
                for t in ("alerts", "usage_alerts", "usage", "grants")}


def test_dump_and_restore_keep_thresholds_and_alerts(fresh_db):
    with clocked(fresh_db) as c:
        catalogue(c, 1000, (0.5, 0.8, 1), tenants=("acme", "globex"))
        c.execute("""
            SELECT flux_define_feature('seats', 'limit');
            SELECT flux_grant('pro', 'seats', 10);
            SELECT flux_alert('seats', 0.5);
            SELECT flux_alert('seats', 1.0);
            SELECT flux_alert('seats', 2);
            SELECT flux_alert('seats', 3);
            SELECT flux_alert_clear('seats', 3);
        """)
        assert consume(c, 850) == (True, 850)
        assert consume(c, 6, feature="seats") == (True, 6)
        c.execute("UPDATE flux.usage_alerts SET processed_at = '2026-12-01 10:05+00' WHERE threshold = 0.5 AND feature = 'api'")
    before = alerts_snapshot(fresh_db)
    assert len(before["alerts"]) == 6 and len(before["usage_alerts"]) == 3, before

    def check(target):
        after = alerts_snapshot(target)
        for k in before:
            assert after[k] == before[k], k
        lc = listener(target)
        with clocked(target) as c:
            assert c.execute("SELECT feature, threshold FROM flux.alerts ORDER BY 1, 2").fetchall() == [
                ("api", Decimal("0.5")), ("api", Decimal("0.8")), ("api", Decimal("1")),
                ("seats", Decimal("0.5")), ("seats", Decimal("1")), ("seats", Decimal("2"))]
            # Old crossings do not repeat: 850 -> 950 crosses nothing new.
            assert consume(c, 100) == (True, 950)
            assert drain(lc, quiet=0.3) == []
            # A release and a new consume of seats cross 0.5 again: no second row.
            c.execute("SELECT flux_release('acme', 'seats', 3)")
            assert consume(c, 3, feature="seats") == (True, 6)
            assert drain(lc, quiet=0.3) == []
            # New crossings fire: api's limit, seats' limit, globex's first 0.5 and 0.8.
            assert consume(c, 50) == (True, 1000)
            assert consume(c, 4, feature="seats") == (True, 10)
            assert consume(c, 800, tenant="globex") == (True, 800)
            c.execute("SET timezone = 'UTC'")
            rows = {(r[0], r[1], r[2]): r[3:] for r in c.execute(
                "SELECT tenant, feature, threshold, used, \"limit\", period_start::text, processed_at IS NOT NULL"
                "  FROM flux.usage_alerts").fetchall()}
            assert rows == {
                ("acme", "api", Decimal("0.5")): (850, 1000, "2026-12-01 00:00:00+00", True),
                ("acme", "api", Decimal("0.8")): (850, 1000, "2026-12-01 00:00:00+00", False),
                ("acme", "api", Decimal("1")): (1000, 1000, "2026-12-01 00:00:00+00", False),
                ("acme", "seats", Decimal("0.5")): (6, 10, NEG_INF, False),
                ("acme", "seats", Decimal("1")): (10, 10, NEG_INF, False),
                ("globex", "api", Decimal("0.5")): (800, 1000, "2026-12-01 00:00:00+00", False),
                ("globex", "api", Decimal("0.8")): (800, 1000, "2026-12-01 00:00:00+00", False),
            }, rows
        notes = sorted(((p["tenant"], p["feature"], dec(p["threshold"]), p["used"], p["limit"], str(stamp(p)))
                        for _, p in drain(lc)), key=str)
        lc.close()
        assert notes == sorted([
            ("acme", "api", Decimal("1"), 1000, 1000, str(PERIOD)),
            ("acme", "seats", Decimal("1"), 10, 10, NEG_INF),
            ("globex", "api", Decimal("0.5"), 800, 1000, str(PERIOD)),
            ("globex", "api", Decimal("0.8"), 800, 1000, str(PERIOD)),
        ], key=str), notes

    dump_and_restore(fresh_db, check)


# ---------------------------------------------------------------------------
# 6. Hot standby


def replica(db, options=CLOCK):
    return psycopg.connect(f"host={STANDBY_DIR} port={STANDBY_PORT} user=postgres dbname={db}",
                           autocommit=True, options=options)


def test_the_standby_reads_alerts_and_the_billable_view_and_refuses_flux_alert(fresh_db):
    with clocked(fresh_db) as c:
        catalogue(c, 1000, (0.5, 0.8, 1), tenants=("acme", "globex"), cap=None, soft=True)
        assert consume(c, 1200) == (True, 1200)
        assert consume(c, 300, tenant="globex") == (True, 300)
    shutil.rmtree(STANDBY_DIR, ignore_errors=True)
    os.makedirs(os.path.dirname(STANDBY_DIR), exist_ok=True)
    as_postgres(f"{BIN}/pg_basebackup", "-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres",
                "-D", STANDBY_DIR, "-R", "-X", "stream", "-c", "fast")
    with open(os.path.join(STANDBY_DIR, "postgresql.conf"), "a") as f:
        f.write(f"\nport = {STANDBY_PORT}\nunix_socket_directories = '{STANDBY_DIR}'\nhot_standby = on\n")
    as_postgres(f"{BIN}/pg_ctl", "-D", STANDBY_DIR, "-l", os.path.join(STANDBY_DIR, "server.log"), "-w", "start")
    view = "SELECT * FROM flux.billable_usage ORDER BY tenant, feature, period_start"
    table = "SELECT * FROM flux.usage_alerts ORDER BY tenant, feature, period_start, threshold"
    try:
        with clocked(fresh_db) as primary, replica(fresh_db) as rep:
            wait_for_replay(primary, rep)
            assert one(rep, "SELECT pg_is_in_recovery()") is True
            billable = rep.execute(view).fetchall()
            assert billable == primary.execute(view).fetchall()
            assert billable == [
                ("acme", "api", PERIOD, NEXT_PERIOD, 1000, 1200, 200, "pro"),
                ("globex", "api", PERIOD, NEXT_PERIOD, 1000, 300, 0, "pro"),
            ], billable
            got = rep.execute(table).fetchall()
            assert got == primary.execute(table).fetchall()
            assert [(r[0], r[3], r[4], r[5]) for r in got] == [
                ("acme", Decimal("0.5"), 1200, 1000), ("acme", Decimal("0.8"), 1200, 1000), ("acme", Decimal("1"), 1200, 1000)]
            for q in ("SELECT flux_alert('api', 0.9)",
                      "SELECT flux_alert('api', 0.5)",  # already set: still a write
                      "SELECT flux_alert_clear('api', 0.8)",
                      "SELECT flux_consume('globex', 'api', 300)",
                      PROCESS % 10):
                assert sqlstate_of(rep, q) == "25006", q
            # A crossing on the primary is read on the standby after replay.
            assert consume(primary, 250, tenant="globex") == (True, 550)
            wait_for_replay(primary, rep)
            assert rep.execute("SELECT used, \"limit\" FROM flux.usage_alerts WHERE tenant = 'globex'").fetchall() == [(550, 1000)]
            assert rep.execute("SELECT used, overage FROM flux.billable_usage WHERE tenant = 'globex'").fetchone() == (550, 0)
    finally:
        as_postgres(f"{BIN}/pg_ctl", "-D", STANDBY_DIR, "-m", "immediate", "-w", "stop")
        shutil.rmtree(STANDBY_DIR, ignore_errors=True)


# ---------------------------------------------------------------------------
# 7. Privileges


@pytest.fixture
def roles(fresh_db):
    r = Roles(fresh_db, "alrt")
    yield r
    r.cleanup()


def test_a_plain_role_cannot_set_or_read_alerts_and_its_consumes_still_alert(fresh_db, roles):
    with connect(fresh_db) as su:
        catalogue(su, 1000, (0.5, 0.8, 1), tenants=("acme", "globex"))
        assert consume(su, 900, tenant="globex") == (True, 900)
    app = roles.make("app")
    lc = listener(fresh_db)
    with connect(fresh_db) as su, login(fresh_db, app) as a:
        before = su.execute("SELECT x::text FROM flux.usage_alerts x ORDER BY 1").fetchall()
        assert len(before) == 2
        assert one(a, "SELECT pg_has_role(current_user, 'flux_admin', 'USAGE')") is False
        for q in ("SELECT flux_alert('api', 0.9)",
                  "SELECT flux_alert('api', 0.5)",
                  "SELECT flux_alert_clear('api', 0.8)",
                  "SELECT * FROM flux.usage_alerts",
                  "SELECT count(*) FROM flux.usage_alerts",
                  "UPDATE flux.usage_alerts SET processed_at = now()",
                  PROCESS % 10,
                  "DELETE FROM flux.usage_alerts",
                  "INSERT INTO flux.usage_alerts VALUES ('acme', 'api', now(), 0.1, 1, 1, now())",
                  "SELECT * FROM flux.alerts",
                  "INSERT INTO flux.alerts (feature, threshold) VALUES ('api', 0.9)",
                  "DELETE FROM flux.alerts",
                  "SELECT * FROM flux.billable_usage",
                  "SELECT count(*) FROM flux.billable_usage",
                  "SELECT * FROM flux._billable_usage()",
                  "SELECT flux._check_alert('api', 0.9)"):
            assert sqlstate_of(a, q) == "42501", q
        assert su.execute("SELECT feature, threshold FROM flux.alerts ORDER BY 2").fetchall() == [
            ("api", Decimal("0.5")), ("api", Decimal("0.8")), ("api", Decimal("1"))]
        assert su.execute("SELECT x::text FROM flux.usage_alerts x ORDER BY 1").fetchall() == before
        # No current tenant, or another one: refused, nothing written.
        assert sqlstate_of(a, "SELECT flux_consume('acme', 'api', 900)") == "42501"
        a.execute("SET flux.tenant = 'acme'")
        assert sqlstate_of(a, "SELECT flux_consume('globex', 'api', 100)") == "42501"
        assert su.execute("SELECT x::text FROM flux.usage_alerts x ORDER BY 1").fetchall() == before
        assert drain(lc, quiet=0.3) == []
        # Its own tenant: the consumes write the alerts, as the table's owner.
        assert consume(a, 499) == (True, 499)
        assert consume(a, 400) == (True, 899)
        assert consume(a, 101) == (True, 1000)
        pid = a.info.backend_pid
        period = one(su, "SELECT date_trunc('month', now(), 'UTC')")
        rows = su.execute("SELECT threshold, used, \"limit\", period_start = %s, at <= now() + interval '1 minute' AND at > now() - interval '1 hour'"
                          "  FROM flux.usage_alerts WHERE tenant = 'acme' ORDER BY 1", (period,)).fetchall()
        assert rows == [(Decimal("0.5"), 899, 1000, True, True), (Decimal("0.8"), 899, 1000, True, True),
                        (Decimal("1"), 1000, 1000, True, True)], rows
        # A rolled-back one of its own leaves nothing.
        a.execute("SET flux.tenant = 'globex'")
        with a.transaction():
            assert consume(a, 100, tenant="globex") == (True, 1000)
            raise psycopg.Rollback()
        assert one(su, "SELECT count(*) FROM flux.usage_alerts WHERE tenant = 'globex'") == 2
        assert one(su, "SELECT flux_usage('globex', 'api')") == 900
    notes = drain(lc)
    lc.close()
    assert sorted((pid_, p["tenant"], dec(p["threshold"]), p["used"]) for pid_, p in notes) == [
        (pid, "acme", Decimal("0.5"), 899), (pid, "acme", Decimal("0.8"), 899), (pid, "acme", Decimal("1"), 1000)], notes


# ---------------------------------------------------------------------------
# 8. Semantics the races rely on


def test_thresholds_fire_at_or_past_once_per_period(fresh_db):
    """To or past (not before); two in one jump, both; a refused consume,
    none; a second crossing in the period (release, raised limit), none; the
    next month's first crossing, a new row; a soft grant's 1.5 at 1.5 x the
    limit, not the cap; a limit feature's rows on -infinity."""
    with clocked(fresh_db) as c:
        catalogue(c, 1000, (0.5, 0.8, 1, 1.5), soft=True, cap=600)
        c.execute("SELECT flux_define_feature('seats', 'limit'); SELECT flux_grant('pro', 'seats', 4); SELECT flux_alert('seats', 0.75)")
        lc = listener(fresh_db)
        assert consume(c, 499) == (True, 499)
        assert alerts(c, "acme") == {} and drain(lc, quiet=0.3) == []
        assert consume(c, 1) == (True, 500)
        assert alerts(c, "acme") == {Decimal("0.5"): (500, 1000, PERIOD, NOW, False)}
        assert consume(c, 700) == (True, 1200)  # 0.8 and 1 at once
        assert alerts(c, "acme") == {Decimal("0.5"): (500, 1000, PERIOD, NOW, False),
                                     Decimal("0.8"): (1200, 1000, PERIOD, NOW, False),
                                     Decimal("1"): (1200, 1000, PERIOD, NOW, False)}
        assert consume(c, 401) == (False, 1200)  # past the cap of 1600: refused, nothing
        assert consume(c, 299) == (True, 1499)
        assert consume(c, 1) == (True, 1500)  # 1.5 x 1000, under the cap
        assert alerts(c, "acme")[Decimal("1.5")] == (1500, 1000, PERIOD, NOW, False)
        assert [(dec(p["threshold"]), p["used"], p["limit"]) for _, p in drain(lc)] == [
            (Decimal("0.5"), 500, 1000), (Decimal("0.8"), 1200, 1000), (Decimal("1"), 1200, 1000), (Decimal("1.5"), 1500, 1000)]
        # A raised limit and a second crossing in the period: no repeat.
        c.execute("SELECT flux_grant('pro', 'api', 2000, 'month')")
        assert consume(c, 100) == (True, 1600)  # 0.8 x 2000 again
        assert drain(lc, quiet=0.3) == [] and len(alerts(c, "acme")) == 4
        # A limit feature: 3 of 4 reaches 0.75; released and taken again, once.
        assert consume(c, 3, feature="seats") == (True, 3)
        c.execute("SELECT flux_release('acme', 'seats', 2)")
        assert consume(c, 2, feature="seats") == (True, 3)
        assert c.execute("SELECT threshold, used, \"limit\", period_start::text FROM flux.usage_alerts WHERE feature = 'seats'").fetchall() == [
            (Decimal("0.75"), 3, 4, NEG_INF)]
        notes = drain(lc)
        assert [(p["feature"], p["period_start"], p["used"]) for _, p in notes] == [("seats", "-infinity", 3)]
    # The next month: a new period, its own crossings.
    with clocked(fresh_db, options="-c flux.now=2027-01-02T08:00:00Z") as c:
        assert consume(c, 1000) == (True, 1000)  # 0.5 of 2000
        rows = c.execute("SELECT threshold, used, \"limit\", at FROM flux.usage_alerts WHERE feature = 'api' AND period_start = %s",
                         (NEXT_PERIOD,)).fetchall()
        assert rows == [(Decimal("0.5"), 1000, 2000, datetime.datetime(2027, 1, 2, 8, 0, tzinfo=datetime.timezone.utc))]
        assert [(stamp(p), dec(p["threshold"])) for _, p in drain(lc)] == [(NEXT_PERIOD, Decimal("0.5"))]
    lc.close()


def test_a_warm_session_sees_a_new_and_a_cleared_threshold(fresh_db):
    """The thresholds are cached with the catalogue: a session that already
    consumed sees one set (and one cleared) by another session at its next
    consume."""
    with clocked(fresh_db) as su:
        catalogue(su, 1000, (0.5,), tenants=("acme", "globex", "initech"))
    with clocked(fresh_db) as warm, clocked(fresh_db) as admin:
        assert consume(warm, 100) == (True, 100)
        assert consume(warm, 100, tenant="globex") == (True, 100)
        admin.execute("SELECT flux_alert('api', 0.25)")
        assert consume(warm, 150) == (True, 250)
        assert alerts(admin, "acme") == {Decimal("0.25"): (250, 1000, PERIOD, NOW, False)}
        admin.execute("SELECT flux_alert_clear('api', 0.25)")
        assert consume(warm, 200, tenant="globex") == (True, 300)
        assert alerts(admin, "globex") == {}
        # Cleared: the rows written stay; setting 0.50 is the 0.5 there is.
        admin.execute("SELECT flux_alert('api', 0.50)")
        assert one(admin, "SELECT count(*) FROM flux.alerts") == 1
        assert consume(warm, 500, tenant="initech") == (True, 500)
        assert alerts(admin, "initech") == {Decimal("0.5"): (500, 1000, PERIOD, NOW, False)}
        assert len(alerts(admin)) == 2


def test_a_hold_crosses_like_a_consume(fresh_db):
    """A hold counts as use: flux_hold past 0.8 writes the row, a settle
    above the hold reaching the limit writes 1, a settle below writes nothing."""
    with clocked(fresh_db) as c:
        catalogue(c, 1000, (0.5, 0.8, 1), tenants=("acme", "globex"))
        lc = listener(fresh_db)
        ok, used, h = c.execute("SELECT allowed, used, hold_id FROM flux_hold('acme', 'api', 850)").fetchone()
        assert (ok, used) == (True, 850)
        assert alerts(c, "acme") == {Decimal("0.5"): (850, 1000, PERIOD, NOW, False), Decimal("0.8"): (850, 1000, PERIOD, NOW, False)}
        assert c.execute("SELECT allowed, used FROM flux_settle(%s, 1000)", (h,)).fetchone() == (True, 1000)
        assert alerts(c, "acme")[Decimal("1")] == (1000, 1000, PERIOD, NOW, False)
        ok, used, g = c.execute("SELECT allowed, used, hold_id FROM flux_hold('globex', 'api', 900)").fetchone()
        assert (ok, used) == (True, 900)
        assert c.execute("SELECT allowed, used FROM flux_settle(%s, 400)", (g,)).fetchone() == (True, 400)
        assert alerts(c, "globex") == {Decimal("0.5"): (900, 1000, PERIOD, NOW, False), Decimal("0.8"): (900, 1000, PERIOD, NOW, False)}
        assert [(p["tenant"], dec(p["threshold"]), p["used"]) for _, p in drain(lc)] == [
            ("acme", Decimal("0.5"), 850), ("acme", Decimal("0.8"), 850), ("acme", Decimal("1"), 1000),
            ("globex", Decimal("0.5"), 900), ("globex", Decimal("0.8"), 900)]
        lc.close()


def test_the_payload_names_one_instant_whatever_the_consumer_time_zone(fresh_db):
    """Two consumers in other TimeZones: the payloads' period_start is the
    same instant as the row's (the month in UTC), so listeners can compare it."""
    with clocked(fresh_db) as su:
        catalogue(su, 1000, (0.5,), tenants=("acme", "globex"))
    lc = listener(fresh_db)
    with clocked(fresh_db, options=CLOCK + " -c TimeZone=America/New_York") as ny, \
            clocked(fresh_db, options=CLOCK + " -c TimeZone=Asia/Tokyo") as tokyo:
        assert consume(ny, 500) == (True, 500)
        assert consume(tokyo, 500, tenant="globex") == (True, 500)
    notes = drain(lc)
    lc.close()
    assert sorted((p["tenant"], stamp(p)) for _, p in notes) == [("acme", PERIOD), ("globex", PERIOD)], notes
    with clocked(fresh_db) as su:
        assert set(r[2] for r in alerts(su).values()) == {PERIOD}
