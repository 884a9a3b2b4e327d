#!/usr/bin/env python3
"""What the decision cache costs a backend, measured on a running cluster
(`make bench` runs it; or benches/cache_costs.py HOST PORT):

- a catalogue reload (200 features x 10 plans: 2,000 grants): the first
  check after another session changed a plan, minus a warm check;
- a new connection: LOAD of the library, then the first check (catalogue
  and one tenant loaded), each timed on the server side;
- a tenant outside the cache: a check of a tenant never seen, minus a warm
  check;
- memory: the backend's RSS growth after checking 10,000 and 100,000
  tenants with flux.cache_tenants set to that many.

Times are medians of several runs, in microseconds, taken with
clock_timestamp() around the call on the server (no network in them)."""
import os
import statistics
import sys

import psycopg

HOST = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("BENCH_DIR", "/tmp/flux-pg/bench")
PORT = int(sys.argv[2] if len(sys.argv) > 2 else os.environ.get("BENCH_PORT", "5497"))
TENANTS = int(os.environ.get("COSTS_TENANTS", "100000"))
DB = "flux_costs"


def connect(db=DB, **kw):
    return psycopg.connect(host=HOST, port=PORT, user="postgres", dbname=db, autocommit=True, **kw)


TIMED = """
DO $$ DECLARE t0 timestamptz := clock_timestamp(); BEGIN
  {statement};
  PERFORM set_config('costs.us', (extract(epoch FROM clock_timestamp() - t0) * 1e6)::text, false);
END $$"""


def timed(c, call, statement=None):
    c.execute(TIMED.format(statement=statement or f"PERFORM {call}"))
    return float(c.execute("SELECT current_setting('costs.us')").fetchone()[0])


def rss_kb(c):
    pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def setup():
    with connect("postgres") as a:
        a.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        a.execute(f"CREATE DATABASE {DB}")
    with connect() as c:
        c.execute("SET client_min_messages = warning")
        c.execute("CREATE EXTENSION flux_entitlements")
        c.execute("SELECT flux_define_feature('f' || i) FROM generate_series(1, 200) i")
        c.execute("SELECT flux_define_plan('p' || i, rank => i) FROM generate_series(1, 10) i")
        c.execute("SELECT flux_grant('p' || p, 'f' || f) FROM generate_series(1, 10) p, generate_series(1, 200) f")
        # Bulk: skip the validation and audit row triggers (not the cache's).
        c.execute("ALTER TABLE flux.tenants DISABLE TRIGGER tenants_validate, DISABLE TRIGGER audit")
        c.execute(f"INSERT INTO flux.tenants (id, plan) SELECT 's' || i, 'p' || (1 + i % 10) FROM generate_series(1, {TENANTS}) i")
        c.execute("ALTER TABLE flux.tenants ENABLE TRIGGER tenants_validate, ENABLE TRIGGER audit")
        c.execute("VACUUM ANALYZE flux.tenants")


def main():
    setup()
    out = []
    with connect() as c, connect() as admin:
        timed(c, "flux_check('s1', 'f1')")
        warm = statistics.median(timed(c, "flux_check('s1', 'f1')") for _ in range(50))
        reload = []
        for i in range(30):
            admin.execute(f"UPDATE flux.plans SET name = 'plan {i}' WHERE key = 'p1'")
            reload.append(timed(c, "flux_check('s1', 'f1')") - warm)
        out.append(("catalogue reload, 2,000 grants (first check after a plan change - warm check)", statistics.median(reload), "us"))
        # 1,000 checks in one statement: of tenants never seen, then the
        # same again (warm).
        miss = []
        for k in range(5):
            ids = f"'s' || (1 + (i * 97 + {k * 1000}) % {TENANTS})"
            call = f"(SELECT count(*) FROM generate_series(1, 1000) i WHERE flux_check({ids}, 'f2'))"
            cold = timed(c, call)
            miss.append((cold - timed(c, call)) / 1000)
        out.append(("tenant outside the cache: a check of a tenant never seen - a warm check", statistics.median(miss), "us"))
        out.append(("warm check", warm, "us"))
    load, first = [], []
    for _ in range(15):
        with connect() as c:
            load.append(timed(c, None, "EXECUTE 'LOAD ''flux_entitlements'''"))
            first.append(timed(c, "flux_check('s7', 'f3')"))
    out.append(("new connection: LOAD 'flux_entitlements'", statistics.median(load), "us"))
    out.append(("new connection: first check after LOAD (catalogue + one tenant)", statistics.median(first), "us"))
    for n in (10_000, 100_000):
        if n > TENANTS:
            continue
        with connect(options=f"-c flux.cache_tenants={n}") as c:
            timed(c, "flux_check('s1', 'f1')")
            before = rss_kb(c)
            c.execute(f"SELECT count(*) FILTER (WHERE flux_check('s' || i, 'f1')) FROM generate_series(1, {n}) i")
            held = c.execute("SELECT tenants_cached FROM flux._cache_stats()").fetchone()[0]
            out.append((f"memory: RSS growth after checking {n:,} tenants (cache_tenants = {n:,}, {held:,} held)", (rss_kb(c) - before) / 1024, "MiB"))
    for name, v, unit in out:
        print(f"{name:<92} {v:10.1f} {unit}")


if __name__ == "__main__":
    main()
