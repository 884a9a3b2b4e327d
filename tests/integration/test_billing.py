"""The same Stripe event delivered twice at the same moment by two
connections is applied once: a unique key, not a read-then-insert."""
import json
import threading

from conftest import connect

EVENT = {
    "id": "evt_race",
    "type": "customer.subscription.updated",
    "created": 1795000000,
    "data": {"object": {
        "id": "sub_race", "object": "subscription", "customer": "cus_race", "status": "active",
        "metadata": {"tenant_id": "racer"}, "cancel_at_period_end": False,
        "items": {"data": [{"price": {"id": "price_pro"}, "quantity": 1,
                            "current_period_start": 1795000000, "current_period_end": 1797592000}]},
    }},
}


def test_two_deliveries_at_once_apply_once(fresh_db):
    with connect(fresh_db) as c:
        c.execute("SELECT flux_define_plan('pro')")
        c.execute("SELECT flux_map_price('price_pro', plan => 'pro')")
    outcomes = []
    barrier = threading.Barrier(2)

    def deliver():
        with connect(fresh_db, autocommit=False) as c:
            barrier.wait()
            outcomes.append(c.execute("SELECT flux_apply_stripe_event(%s::jsonb)", (json.dumps(EVENT),)).fetchone()[0])
            c.commit()

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["applied", "duplicate"]
    with connect(fresh_db) as c:
        assert c.execute("SELECT outcome, deliveries FROM flux.billing_events").fetchall() == [("applied", 2)]
        assert c.execute("SELECT count(*) FROM flux.audit_log WHERE entity = 'tenants' AND actor = 'evt_race'").fetchone()[0] == 1
