"""Change events: NOTIFY flux_changes after commit, seen by a LISTEN in
another real connection; a rolled-back change sends nothing."""
import json

from conftest import connect


def drain(listener, timeout=2.0):
    return [json.loads(n.payload) for n in listener.notifies(timeout=timeout, stop_after=None)]


def test_committed_changes_are_announced_and_rolled_back_ones_are_not(fresh_db):
    with connect(fresh_db) as listener, connect(fresh_db) as admin:
        listener.execute("LISTEN flux_changes")
        admin.execute("SELECT flux_define_feature('sso')")
        admin.execute("SELECT flux_define_plan('pro')")
        admin.execute("SELECT flux_subscribe('acme', 'pro')")
        with admin.transaction():
            admin.execute("SELECT flux_override('acme', 'sso', reason => 'trial')")
        admin.execute("BEGIN")
        admin.execute("SELECT flux_override('acme', 'sso', enabled => false)")
        admin.execute("SELECT flux_subscribe('globex', 'pro')")
        admin.execute("ROLLBACK")
        events = drain(listener, timeout=1.0)
    keys = [(e["entity"], e["key"], e["tenant"], e["action"]) for e in events]
    assert ("features", "sso", None, "insert") in keys
    assert ("tenants", "acme", "acme", "insert") in keys
    assert ("overrides", "acme/sso", "acme", "insert") in keys
    assert not any(e["key"] == "globex" for e in events), events
    assert not any(e["entity"] == "overrides" and e["action"] == "update" for e in events), events


def test_nothing_is_sent_before_commit(fresh_db):
    with connect(fresh_db) as listener, connect(fresh_db, autocommit=False) as admin:
        listener.execute("LISTEN flux_changes")
        admin.execute("SELECT flux_define_feature('export')")
        assert drain(listener, timeout=0.5) == []
        admin.commit()
        assert [e["key"] for e in drain(listener, timeout=2.0)] == ["export"]
