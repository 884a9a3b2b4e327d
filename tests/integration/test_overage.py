"""Soft limits (CONTRACT "Soft limits, overage and usage alerts", first
part) over real connections: eight clients racing past the limit stop
exactly at limit + cap, every decision's overage matches its used, and a
dump / restore keeps the grant soft."""
import threading

from conftest import connect
from test_credits import dump_and_restore, one

CLOCK = "-c flux.now=2026-12-01T10:00:00Z"


def catalogue(c, limit=100, cap=50):
    c.execute("""
        SELECT flux_define_feature('api_calls', 'metered');
        SELECT flux_define_plan('enterprise');
        SELECT flux_define_plan('pro');
    """)
    c.execute("SELECT flux_grant('enterprise', 'api_calls', %s, 'month')", (limit,))
    c.execute("SELECT flux_grant('pro', 'api_calls', %s, 'month')", (limit,))
    c.execute("SELECT flux_set_overage('enterprise', 'api_calls', cap => %s)", (cap,))
    c.execute("SELECT flux_subscribe('acme', 'enterprise')")


def test_eight_clients_past_the_limit_stop_exactly_at_the_cap(fresh_db):
    with connect(fresh_db, options=CLOCK) as su:
        catalogue(su)
    results, errors = [], []

    def client():
        try:
            with connect(fresh_db, options=CLOCK) as c:
                for _ in range(40):
                    results.append(c.execute(
                        "SELECT allowed, used, overage FROM flux_consume('acme', 'api_calls', 1)").fetchone())
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    allowed = [r for r in results if r[0]]
    assert len(allowed) == 150 and len(results) == 320
    # Each allowed consume saw its own total, once: 1..150, and overage is
    # what is past 100.
    assert sorted(r[1] for r in allowed) == list(range(1, 151))
    assert all(r[2] == max(r[1] - 100, 0) for r in results)
    with connect(fresh_db, options=CLOCK) as su:
        assert one(su, "SELECT used FROM flux.usage WHERE feature = 'api_calls'") == 150
        assert su.execute("SELECT allowed, overage FROM flux_decide('acme', 'api_calls')").fetchone() == (False, 50)


def test_dump_and_restore_keep_the_grant_soft(fresh_db):
    with connect(fresh_db, options=CLOCK) as su:
        catalogue(su, cap=20)
        su.execute("SELECT flux_consume('acme', 'api_calls', 110)")

    def check(target):
        with connect(target, options=CLOCK) as c:
            assert c.execute("SELECT overage, overage_cap FROM flux.grants WHERE plan = 'enterprise'").fetchone() == (True, 20)
            assert c.execute("SELECT allowed, used, overage FROM flux_consume('acme', 'api_calls', 10)").fetchone() == (True, 120, 20)
            assert one(c, "SELECT allowed FROM flux_consume('acme', 'api_calls', 1)") is False

    dump_and_restore(fresh_db, check)
