"""Crash safety: a backend killed with SIGKILL while several clients
consume; after crash recovery, recorded usage equals what clients saw
committed (a statement in flight when the server went down may or may not
have committed, and is counted as such)."""
import os
import signal
import threading
import time

import psycopg

from conftest import connect, dsn, wait_until_up




def test_sigkill_during_consumes_loses_nothing_committed(fresh_db):
    with connect(fresh_db) as c:
        c.execute("""
            SELECT flux_define_feature('api', 'metered');
            SELECT flux_define_plan('pro');
            SELECT flux_grant('pro', 'api', NULL, 'month');
            SELECT flux_subscribe('acme', 'pro');
        """)
    committed = [0] * 6
    in_flight = [0] * 6
    pids = []
    stop = threading.Event()

    def worker(i):
        try:
            conn = psycopg.connect(dsn(fresh_db), autocommit=True)
        except psycopg.Error:
            return
        pids.append(conn.info.backend_pid)
        with conn:
            while not stop.is_set():
                in_flight[i] = 1
                try:
                    ok = conn.execute("SELECT allowed FROM flux_consume('acme', 'api')").fetchone()[0]
                except psycopg.Error:
                    return  # the crash: this statement's outcome is unknown
                in_flight[i] = 0
                if ok:
                    committed[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    os.kill(pids[0], signal.SIGKILL)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    wait_until_up(fresh_db)
    with connect(fresh_db) as c:
        used = c.execute("SELECT flux_usage('acme', 'api')").fetchone()[0]
    seen, unknown = sum(committed), sum(in_flight)
    assert seen > 100, seen
    assert seen <= used <= seen + unknown, (seen, unknown, used)
