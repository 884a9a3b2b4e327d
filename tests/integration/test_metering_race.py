"""Usage is exact under concurrency: real connections racing."""
import threading

import pytest

from conftest import connect


def require_amcheck(c):
    """amcheck verifies the heap and indexes the direct writer touched. The
    PostgreSQL 16 build from PyPI ships without it: skipped there, never on
    15 or 18."""
    major = int(c.execute("SHOW server_version_num").fetchone()[0]) // 10000
    missing = not c.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'amcheck'").fetchone()
    if missing and major == 16:
        pytest.skip("the PostgreSQL 16 build from PyPI has no amcheck (contrib)")
    c.execute("CREATE EXTENSION IF NOT EXISTS amcheck")


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


def test_counter_writes_keep_every_index_whole(fresh_db):
    """Consume writes the counter row without SQL (counters.rs): a HOT
    update when it can, new entries in every index when it cannot. An index
    a DBA adds on `used` makes every update non-HOT; amcheck then checks
    that every row version is in every index."""
    with connect(fresh_db) as c:
        c.execute(SETUP)
        require_amcheck(c)
        # HOT updates first: no index entry may point at a heap-only version
        # (an index scan would then count the row twice), and the heap's
        # update chains must be whole.
        c.execute("SELECT flux_consume('acme', 'exports')")
        race(fresh_db, 4, 30, "SELECT allowed FROM flux_consume('acme', 'exports')")
        c.execute("SET enable_seqscan = off")
        assert c.execute("SELECT count(*) FROM flux.usage WHERE tenant = 'acme'").fetchone()[0] == 1
        assert c.execute("SELECT count(*) FROM verify_heapam('flux.usage')").fetchone()[0] == 0
        c.execute("RESET enable_seqscan")
        c.execute("CREATE INDEX usage_used ON flux.usage (used)")
        race(fresh_db, 4, 60, "SELECT allowed FROM flux_consume('acme', 'exports')")
        assert c.execute("SELECT flux_usage('acme', 'exports')").fetchone()[0] == 361
        for index in ("flux.usage_pkey", "flux.usage_feature", "flux.usage_used"):
            c.execute("SELECT bt_index_check(%s::regclass, true)", (index,))
        c.execute("SET enable_seqscan = off")
        assert c.execute("SELECT count(*) FROM flux.usage WHERE used = 361").fetchone()[0] == 1
        assert c.execute("SELECT count(*) FROM flux.usage WHERE used = 360").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM verify_heapam('flux.usage')").fetchone()[0] == 0


def test_a_trigger_on_usage_still_fires(fresh_db):
    """With a user trigger on flux.usage, consume goes through SQL so the
    trigger sees every change."""
    with connect(fresh_db) as c:
        c.execute(SETUP)
        c.execute("CREATE TABLE seen (used bigint)")
        # Usage is written as flux_owner, so the trigger runs with its rights
        # (never a superuser's): it needs the grant like any other role.
        c.execute("GRANT INSERT ON seen TO flux_owner")
        c.execute(
            "CREATE FUNCTION note() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN INSERT INTO public.seen VALUES (NEW.used); RETURN NEW; END $$"
        )
        c.execute("CREATE TRIGGER note AFTER INSERT OR UPDATE ON flux.usage FOR EACH ROW EXECUTE FUNCTION note()")
        for _ in range(3):
            c.execute("SELECT flux_consume('acme', 'exports')")
        assert [r[0] for r in c.execute("SELECT used FROM seen ORDER BY 1")] == [1, 2, 3]


def test_repeatable_read_consumers_get_serialization_failures(fresh_db):
    """Under REPEATABLE READ a counter changed since the snapshot raises
    40001, as the UPDATE it stands for does; nothing is double counted."""
    import psycopg

    with connect(fresh_db) as c:
        c.execute(SETUP)
        c.execute("SELECT flux_consume('acme', 'exports')")
    with connect(fresh_db, autocommit=False) as a, connect(fresh_db) as b:
        a.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        assert a.execute("SELECT flux_usage('acme', 'exports')").fetchone()[0] == 1
        b.execute("SELECT flux_consume('acme', 'exports')")
        try:
            a.execute("SELECT flux_consume('acme', 'exports')")
            raise AssertionError("expected a serialization failure")
        except psycopg.errors.SerializationFailure:
            a.rollback()
        assert b.execute("SELECT flux_usage('acme', 'exports')").fetchone()[0] == 2


def test_rebuilding_usage_under_a_live_session(fresh_db):
    """counters.rs finds flux.usage and its primary key by name on each
    call: a rebuilt index (a new OID) is used at once."""
    with connect(fresh_db) as c, connect(fresh_db) as dba:
        c.execute(SETUP)
        for _ in range(2):
            c.execute("SELECT flux_consume('acme', 'exports')")
        dba.execute("REINDEX INDEX CONCURRENTLY flux.usage_pkey")
        dba.execute("VACUUM ANALYZE flux.usage")
        for _ in range(2):
            c.execute("SELECT flux_consume('acme', 'exports')")
        assert c.execute("SELECT flux_usage('acme', 'exports')").fetchone()[0] == 4
        require_amcheck(dba)
        dba.execute("SELECT bt_index_check('flux.usage_pkey'::regclass, true)")


def test_a_remembered_row_place_that_now_holds_another_row(fresh_db):
    """counters.rs remembers where each counter row was found. When that
    row is deleted and vacuumed and another counter takes its slot, the
    next consume must not count against the other row."""
    with connect(fresh_db) as c, connect(fresh_db) as dba:
        c.execute(SETUP)
        c.execute("SELECT flux_subscribe('globex', 'pro')")
        c.execute("SELECT flux_subscribe('initech', 'pro')")
        # acme's row first in the page, then globex's; the second consume
        # of acme finds its row and keeps the place (the chain's root).
        c.execute("SELECT flux_consume('acme', 'exports')")
        (place,) = dba.execute("SELECT ctid FROM flux.usage WHERE tenant = 'acme'").fetchone()
        for t in ("globex", "acme"):
            c.execute("SELECT flux_consume(%s, 'exports')", (t,))
        dba.execute("DELETE FROM flux.usage WHERE tenant = 'acme'")
        dba.execute("VACUUM flux.usage")
        dba.execute("SELECT flux_consume('initech', 'exports', 7)")
        # The slot was reused (else this test proves nothing).
        assert dba.execute("SELECT tenant FROM flux.usage WHERE ctid = %s", (place,)).fetchone() == ("initech",)
        d = c.execute("SELECT used FROM flux_consume('acme', 'exports')").fetchone()
        assert d == (1,)
        rows = dict(dba.execute("SELECT tenant, used FROM flux.usage").fetchall())
        assert rows == {"acme": 1, "globex": 1, "initech": 7}
        assert c.execute("SELECT flux_usage('initech', 'exports')").fetchone()[0] == 7


def test_a_remembered_row_place_past_the_end_of_a_truncated_table(fresh_db):
    """A vacuum that truncates flux.usage leaves remembered places past its
    end: consume and usage reads go on, exact, without an error."""
    with connect(fresh_db) as c, connect(fresh_db) as dba:
        c.execute(SETUP)
        dba.execute("SELECT count(flux_subscribe('t' || i, 'pro')) FROM generate_series(1, 1500) i")
        dba.execute("SELECT count(flux_consume('t' || i, 'exports')) FROM generate_series(1, 1500) i")
        c.execute("SELECT flux_consume('t1500', 'exports')")
        assert c.execute("SELECT flux_usage('t1500', 'exports')").fetchone()[0] == 2
        pages = dba.execute("SELECT pg_relation_size('flux.usage') / 8192").fetchone()[0]
        assert pages > 3
        dba.execute("DELETE FROM flux.usage WHERE tenant <> 't1'")
        dba.execute("VACUUM flux.usage")
        assert dba.execute("SELECT pg_relation_size('flux.usage') / 8192").fetchone()[0] < pages
        assert c.execute("SELECT flux_usage('t1500', 'exports')").fetchone()[0] == 0
        assert c.execute("SELECT used FROM flux_consume('t1500', 'exports')").fetchone()[0] == 1
        # A rewrite (new file, new places) in the same session.
        dba.execute("VACUUM FULL flux.usage")
        assert c.execute("SELECT used FROM flux_consume('t1500', 'exports')").fetchone()[0] == 2
        assert c.execute("SELECT used FROM flux_consume('t1', 'exports')").fetchone()[0] == 2
        assert dba.execute("SELECT count(*), sum(used) FROM flux.usage").fetchone() == (2, 4)


def test_counter_updates_stay_hot_and_the_table_small(fresh_db):
    """flux_consume prunes a page only when the next version might not fit
    (counters.rs, Prune::WhenNeeded): every update must stay a HOT update
    and the dead versions must still be removed, so 20,000 consumes over
    100 counters leave a table of a few pages."""
    with connect(fresh_db) as c:
        c.execute(SETUP)
        c.execute("SELECT flux_grant('pro', 'exports', NULL, 'month')")
        c.execute("SELECT count(flux_subscribe('t' || i, 'pro')) FROM generate_series(1, 100) i")
        c.execute("SELECT count(flux_consume('t' || i, 'exports')) FROM generate_series(1, 100) i")
        c.execute(
            "CREATE PROCEDURE spend(n int) LANGUAGE plpgsql AS $$ BEGIN "
            "FOR i IN 1..n LOOP PERFORM flux_consume('t' || (i % 100 + 1), 'exports'); COMMIT; END LOOP; END $$"
        )
        c.execute("CALL spend(20000)")
        c.execute("SELECT pg_stat_force_next_flush()")
        updated, hot, pages = c.execute(
            "SELECT n_tup_upd, n_tup_hot_upd, pg_relation_size(relid) / 8192 "
            "FROM pg_stat_user_tables WHERE relid = 'flux.usage'::regclass"
        ).fetchone()
        assert updated >= 20000
        assert hot == updated
        assert pages <= 4, f"flux.usage grew to {pages} pages"
        assert c.execute("SELECT sum(used) FROM flux.usage").fetchone()[0] == 20100
        require_amcheck(c)
        assert c.execute("SELECT count(*) FROM verify_heapam('flux.usage')").fetchone()[0] == 0


def test_counter_rows_with_long_ids_and_a_later_column(fresh_db):
    """counters.rs reads and rewrites a counter row in place: its texts may
    have long headers (over 126 bytes) after padding, and a column added to
    flux.usage later leaves rows with a null bitmap. Every count stays exact
    and the added column keeps its value across consumes."""
    feature = "f" * 150
    tenants = ["a", "é" * 200]
    with connect(fresh_db) as c:
        c.execute(SETUP)
        c.execute("SELECT flux_define_feature(%s, 'metered')", (feature,))
        c.execute("SELECT flux_grant('pro', %s, 1000, 'month')", (feature,))
        for t in tenants:
            c.execute("SELECT flux_subscribe(%s, 'pro')", (t,))
        for f in (feature, "exports"):
            for i, t in enumerate(tenants):
                for _ in range(i + 2):
                    c.execute("SELECT flux_consume(%s, %s)", (t, f))
        c.execute("ALTER TABLE flux.usage ADD COLUMN note text")
        c.execute("SELECT flux_subscribe('late', 'pro')")
        for t in tenants + ["late"]:
            c.execute("SELECT flux_consume(%s, %s, 10)", (t, feature))
        c.execute("UPDATE flux.usage SET note = 'kept' WHERE tenant = 'late'")
        c.execute("SELECT flux_consume('late', %s, 5)", (feature,))
        got = {
            (t, f[:1]): (used, note)
            for t, f, used, note in c.execute("SELECT tenant, feature, used, note FROM flux.usage").fetchall()
        }
        assert got == {
            ("a", "f"): (12, None),
            (tenants[1], "f"): (13, None),
            ("late", "f"): (15, "kept"),
            ("a", "e"): (2, None),
            (tenants[1], "e"): (3, None),
        }
        for t, n in zip(tenants + ["late"], (12, 13, 15)):
            assert c.execute("SELECT flux_usage(%s, %s)", (t, feature)).fetchone()[0] == n
        require_amcheck(c)
        assert c.execute("SELECT count(*) FROM verify_heapam('flux.usage')").fetchone()[0] == 0


def test_a_new_owner_of_schema_flux_is_seen_by_a_live_session(fresh_db):
    """The tables are read and written as the owner of schema flux, which
    privilege.rs keeps until pg_namespace changes. Another session's
    ALTER SCHEMA ... OWNER TO must apply to this session's next call."""
    role = "flux_it_owner_" + fresh_db[-10:]
    with connect(fresh_db) as c, connect(fresh_db) as dba:
        c.execute(SETUP)
        c.execute("SELECT flux_consume('acme', 'seats')")
        dba.execute(f"CREATE ROLE {role} NOLOGIN")
        try:
            dba.execute(f"ALTER SCHEMA flux OWNER TO {role}")
            # The new owner has no privilege on the tables: the next write
            # of a new counter row (SQL, as the owner) is refused.
            try:
                c.execute("SELECT flux_consume('acme', 'exports')")
                raise AssertionError("consumed as the previous owner")
            except Exception as e:  # noqa: BLE001
                assert "permission denied" in str(e), e
            dba.execute("ALTER SCHEMA flux OWNER TO postgres")
            assert c.execute("SELECT used FROM flux_consume('acme', 'exports')").fetchone() == (1,)
        finally:
            dba.execute("ALTER SCHEMA flux OWNER TO postgres")
            dba.execute(f"DROP ROLE {role}")
