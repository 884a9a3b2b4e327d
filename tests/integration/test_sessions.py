"""A committed change is seen by another session's next statement; a
rolled-back change is never seen."""
from conftest import connect

CATALOGUE = """
SELECT flux_define_feature('export');
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_plan('free', rank => 0, is_default => true);
SELECT flux_define_plan('starter', rank => 1);
SELECT flux_define_plan('pro', rank => 2);
SELECT flux_grant('pro', 'export');
SELECT flux_grant('starter', 'seats', 3);
SELECT flux_grant('pro', 'seats', 10);
SELECT flux_subscribe('acme', 'starter');
"""


def check(conn, tenant, feature):
    return conn.execute("SELECT flux_check(%s, %s)", (tenant, feature)).fetchone()[0]


def limit(conn, tenant, feature):
    return conn.execute('SELECT "limit" FROM flux_decide(%s, %s)', (tenant, feature)).fetchone()[0]


def test_commit_is_seen_by_the_next_statement_of_another_session(fresh_db):
    with connect(fresh_db) as admin, connect(fresh_db) as app:
        admin.execute(CATALOGUE)
        assert check(app, "acme", "export") is False
        admin.execute("SELECT flux_subscribe('acme', 'pro')")
        assert check(app, "acme", "export") is True
        # Plain DML, a downgrade.
        admin.execute("UPDATE flux.tenants SET plan = 'starter' WHERE id = 'acme'")
        assert check(app, "acme", "export") is False
        assert limit(app, "acme", "seats") == 3


def test_commit_is_seen_inside_an_open_read_committed_transaction(fresh_db):
    with connect(fresh_db) as admin, connect(fresh_db, autocommit=False) as app:
        admin.execute(CATALOGUE)
        assert check(app, "acme", "export") is False
        admin.execute("SELECT flux_override('acme', 'export')")
        assert check(app, "acme", "export") is True  # same transaction, next statement
        app.rollback()


def test_uncommitted_and_rolled_back_changes_are_never_seen(fresh_db):
    with connect(fresh_db) as admin, connect(fresh_db) as app:
        admin.execute(CATALOGUE)
    writer = connect(fresh_db, autocommit=False)
    with writer, connect(fresh_db) as app:
        writer.execute("SELECT flux_subscribe('acme', 'pro')")
        writer.execute("UPDATE flux.grants SET \"limit\" = 99 WHERE plan = 'starter'")
        # Not committed yet: the other session still sees the old state...
        assert check(app, "acme", "export") is False
        assert limit(app, "acme", "seats") == 3
        # ...while the writer sees its own change at once.
        assert check(writer, "acme", "export") is True
        writer.rollback()
        assert check(app, "acme", "export") is False
        assert limit(app, "acme", "seats") == 3
        assert check(writer, "acme", "export") is False


def test_a_failed_admin_call_writes_nothing(fresh_db):
    with connect(fresh_db) as admin:
        admin.execute(CATALOGUE)
        before = admin.execute("SELECT count(*) FROM flux.grants").fetchone()[0]
        try:
            admin.execute(
                "INSERT INTO flux.grants (plan, feature) VALUES ('starter', 'export'), ('nope', 'export')"
            )
            raise AssertionError("the insert should fail")
        except Exception as e:  # noqa: BLE001
            assert getattr(e, "sqlstate", None) == "23503", e
            assert "unknown plan \"nope\"" in str(e)
        assert admin.execute("SELECT count(*) FROM flux.grants").fetchone()[0] == before
        assert limit(admin, "acme", "seats") == 3


def test_garbage_input_leaves_the_server_up(fresh_db):
    with connect(fresh_db) as c:
        c.execute(CATALOGUE)
        for tenant, feature in [("x" * 1_000_000, "export"), ("", ""), ("日本語", "🚀"), ("acme", "e\u0301xport")]:
            assert check(c, tenant, feature) is False
        for bad in ["SELECT flux_define_feature(repeat('k', 1000000))", "SELECT flux_grant('pro', 'seats', -1)"]:
            try:
                c.execute(bad)
                raise AssertionError(bad)
            except Exception as e:  # noqa: BLE001
                assert getattr(e, "sqlstate", None) not in (None, "XX000"), e
                assert len(str(e)) < 300
        assert c.execute("SELECT 1").fetchone()[0] == 1
