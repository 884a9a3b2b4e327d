#!/usr/bin/env python3
"""Soak: 16 clients for 30 seconds mixing checks, consumes and admin changes
against a running cluster. Prints operations, errors, stale answers and usage,
and exits non-zero when any error, stale answer or usage mismatch is seen.

A check counts as stale when it started after an admin change had committed,
no other change was in flight, and it still answered the state before it.

    FLUX_PGHOST=... FLUX_PGPORT=... python3 tests/soak.py [seconds]
"""
import os
import random
import sys
import threading
import time
import uuid

import psycopg

HOST = os.environ.get("FLUX_PGHOST", "/tmp/flux-pg/regress")
PORT = os.environ.get("FLUX_PGPORT", "5498")
SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
CLIENTS = 16


def dsn(db):
    return f"host={HOST} port={PORT} user=postgres dbname={db}"


def main():
    db = "flux_soak_" + uuid.uuid4().hex[:8]
    with psycopg.connect(dsn("postgres"), autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{db}"')
    try:
        return run(db)
    finally:
        with psycopg.connect(dsn("postgres"), autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def run(db):
    with psycopg.connect(dsn(db), autocommit=True) as c:
        c.execute("""
            CREATE EXTENSION flux_entitlements;
            SELECT flux_define_feature('export');
            SELECT flux_define_feature('api', 'metered');
            SELECT flux_define_plan('starter', rank => 1);
            SELECT flux_define_plan('pro', rank => 2);
            SELECT flux_grant('pro', 'export');
            SELECT flux_grant('starter', 'api', NULL, 'month');
            SELECT flux_grant('pro', 'api', NULL, 'month');
            SELECT count(flux_subscribe('t' || i, 'pro')) FROM generate_series(1, 50) i;
            SELECT flux_subscribe('soak', 'pro');
        """)
    state = {"seq": 0, "in_flight": False, "expected": True}
    lock = threading.Lock()
    stats = {"checks": 0, "consumes": 0, "admin": 0, "errors": 0, "stale": 0, "allowed_consumes": 0}
    stats_lock = threading.Lock()
    deadline = time.time() + SECONDS

    def admin():
        rng = random.Random(1)
        with psycopg.connect(dsn(db), autocommit=True) as c:
            while time.time() < deadline:
                plan = rng.choice(["starter", "pro"])
                with lock:
                    state["in_flight"] = True
                try:
                    if rng.random() < 0.5:
                        c.execute("SELECT flux_subscribe('soak', %s)", (plan,))
                    else:
                        c.execute("UPDATE flux.tenants SET plan = %s WHERE id = 'soak'", (plan,))
                    with stats_lock:
                        stats["admin"] += 1
                except psycopg.Error:
                    with stats_lock:
                        stats["errors"] += 1
                with lock:
                    state["expected"] = plan == "pro"
                    state["seq"] += 1
                    state["in_flight"] = False
                time.sleep(0.01)

    def client(i):
        rng = random.Random(100 + i)
        local = {"checks": 0, "consumes": 0, "errors": 0, "stale": 0, "allowed_consumes": 0}
        with psycopg.connect(dsn(db), autocommit=True) as c:
            while time.time() < deadline:
                try:
                    if rng.random() < 0.75:
                        with lock:
                            seq, busy, want = state["seq"], state["in_flight"], state["expected"]
                        got = c.execute("SELECT flux_check('soak', 'export')").fetchone()[0]
                        with lock:
                            unchanged = state["seq"] == seq and not state["in_flight"]
                        if not busy and unchanged and got != want:
                            local["stale"] += 1
                        local["checks"] += 1
                    else:
                        t = f"t{rng.randint(1, 50)}"
                        if c.execute("SELECT allowed FROM flux_consume(%s, 'api')", (t,)).fetchone()[0]:
                            local["allowed_consumes"] += 1
                        local["consumes"] += 1
                except psycopg.Error as e:
                    local["errors"] += 1
                    print(f"client {i}: {e}", file=sys.stderr)
        with stats_lock:
            for k, v in local.items():
                stats[k] += v

    threads = [threading.Thread(target=admin)] + [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS - 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with psycopg.connect(dsn(db), autocommit=True) as c:
        recorded = c.execute("SELECT coalesce(sum(used), 0) FROM flux.usage WHERE feature = 'api'").fetchone()[0]
    ops = stats["checks"] + stats["consumes"] + stats["admin"]
    print(f"soak: {SECONDS:.0f} s, {CLIENTS} clients: {ops} operations ({stats['checks']} checks, "
          f"{stats['consumes']} consumes, {stats['admin']} admin changes), {stats['errors']} errors, "
          f"{stats['stale']} stale answers, usage recorded {recorded} / expected {stats['allowed_consumes']}")
    ok = stats["errors"] == 0 and stats["stale"] == 0 and recorded == stats["allowed_consumes"] and stats["admin"] > 0
    print("soak: " + ("1 passed, 0 failed" if ok else "0 passed, 1 failed"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
