"""Usage is exact under concurrency: real connections racing."""
import threading

from conftest import connect

SETUP = """
SELECT flux_define_feature('exports', 'metered');
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_feature('api_rate', 'rate');
SELECT flux_define_plan('pro');
SELECT flux_grant('pro', 'exports', 500, 'month');
SELECT flux_grant('pro', 'seats', 5);
SELECT flux_grant('pro', 'api_rate', 100, '1 hour');
SELECT flux_subscribe('acme', 'pro');
"""


def race(db, clients, per_client, sql, args=(), **kw):
    """Run `sql` per_client times on each of `clients` connections at once;
    return the list of first-column results."""
    results, errors = [], []
    barrier = threading.Barrier(clients)

    def worker():
        try:
            with connect(db, **kw) as c:
                barrier.wait()
                for _ in range(per_client):
                    results.append(c.execute(sql, args).fetchone()[0])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_eight_clients_cannot_pass_a_quota(fresh_db):
    with connect(fresh_db) as c:
        c.execute(SETUP)
    outcomes = race(fresh_db, 8, 250, "SELECT allowed FROM flux_consume('acme', 'exports')")
    assert len(outcomes) == 2000
    assert outcomes.count(True) == 500
    with connect(fresh_db) as c:
        assert c.execute("SELECT flux_usage('acme', 'exports')").fetchone()[0] == 500


def test_eight_clients_cannot_pass_a_rate_limit(fresh_db):
    with connect(fresh_db) as c:
        c.execute(SETUP)
    # Everyone shares one clock instant, so exactly the burst (100) passes.
    sql = "SELECT allowed FROM flux_consume('acme', 'api_rate')"
    outcomes = race(fresh_db, 8, 40, sql, options="-c flux.now=2026-11-22T12:00:00Z")
    assert outcomes.count(True) == 100


def test_rolled_back_consumes_are_not_counted(fresh_db):
    with connect(fresh_db) as c:
        c.execute(SETUP)
    committed = []

    def worker(i):
        with connect(fresh_db, autocommit=False) as c:
            for j in range(20):
                ok = c.execute("SELECT allowed FROM flux_consume('acme', 'exports', 3)").fetchone()[0]
                if (i + j) % 2:
                    c.rollback()
                else:
                    c.commit()
                    if ok:
                        committed.append(3)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with connect(fresh_db) as c:
        assert c.execute("SELECT flux_usage('acme', 'exports')").fetchone()[0] == sum(committed)


def test_the_same_idempotency_key_at_the_same_moment_records_once(fresh_db):
    with connect(fresh_db) as c:
        c.execute(SETUP)
    used = race(fresh_db, 8, 5, "SELECT used FROM flux_consume('acme', 'exports', 7, 'order-42')")
    assert set(used) == {7}
    with connect(fresh_db) as c:
        assert c.execute("SELECT flux_usage('acme', 'exports')").fetchone()[0] == 7


def test_concurrent_inserts_at_the_limit_cannot_both_pass(fresh_db):
    with connect(fresh_db) as c:
        c.execute(SETUP)
        c.execute("CREATE TABLE members (id serial PRIMARY KEY, tenant_id text NOT NULL)")
        c.execute("SELECT flux_enforce_limit('members', 'seats')")
        c.execute("INSERT INTO members (tenant_id) SELECT 'acme' FROM generate_series(1, 4)")
    inserted = []

    def worker():
        with connect(fresh_db) as c:
            try:
                c.execute("INSERT INTO members (tenant_id) VALUES ('acme')")
                inserted.append(1)
            except Exception as e:  # noqa: BLE001
                assert e.sqlstate == "23P01", e

    for _ in range(3):
        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    with connect(fresh_db) as c:
        assert c.execute("SELECT count(*) FROM members WHERE tenant_id = 'acme'").fetchone()[0] == 5
    assert len(inserted) == 1
