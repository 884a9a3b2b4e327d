"""flux.usage altered by an admin (security issue 14, findings 6 and 7):
counters.rs reads and writes counter rows with heap and index access, which
is only right for a plain heap table of the shape it expects. Each test
changes the table as a superuser would, then checks flux_usage and
flux_consume give the SQL path's answer (or a clear error, never XX000 or
a crashed backend), in a new session and in one that used the direct path
before the change."""
import random

import psycopg
import pytest

from conftest import connect

NOW = "2026-11-22 10:00+00"


def session(db):
    c = connect(db)
    c.execute(f"SET flux.now = '{NOW}'")
    return c


def metered(c, tenants=("acme",), limit=10):
    """Feature api, metered at `limit` a day, for `tenants` on plan plan."""
    c.execute("SELECT flux_define_feature('api', 'metered')")
    c.execute("SELECT flux_define_plan('plan')")
    c.execute(f"SELECT flux_grant('plan', 'api', {limit}, 'day')")
    for t in tenants:
        c.execute("SELECT flux_subscribe(%s, 'plan')", (t,))


def consume(c, tenant, amount=1):
    return c.execute(
        "SELECT allowed, used FROM flux_consume(%s, 'api', %s)", (tenant, amount)
    ).fetchone()


def usage(c, tenant):
    return c.execute("SELECT flux_usage(%s, 'api')", (tenant,)).fetchone()[0]


def stored(c, tenant):
    return c.execute(
        "SELECT sum(used) FROM flux.usage WHERE tenant = %s AND feature = 'api'", (tenant,)
    ).fetchone()[0]


def own(c, *tables):
    """Tables an admin made, given to flux's owner (flux works as it)."""
    owner = c.execute(
        "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'flux'"
    ).fetchone()[0]
    for t in tables:
        c.execute(f'ALTER TABLE {t} OWNER TO "{owner}"')


def alive(c):
    assert c.execute("SELECT 1").fetchone() == (1,)


def test_partitioned_usage_is_read_and_written_through_sql(fresh_db):
    with session(fresh_db) as before:
        metered(before, ("acme", "beta"))
        assert consume(before, "acme", 3) == (True, 3)
        assert consume(before, "acme", 1) == (True, 4)  # the direct path
        assert usage(before, "acme") == 4
        before.execute("""
            ALTER TABLE flux.usage RENAME TO usage_plain;
            CREATE TABLE flux.usage (LIKE flux.usage_plain INCLUDING ALL)
                PARTITION BY HASH (tenant);
            CREATE TABLE flux.usage_p0 PARTITION OF flux.usage
                FOR VALUES WITH (MODULUS 2, REMAINDER 0);
            CREATE TABLE flux.usage_p1 PARTITION OF flux.usage
                FOR VALUES WITH (MODULUS 2, REMAINDER 1);
            INSERT INTO flux.usage SELECT * FROM flux.usage_plain;
        """)
        own(before, "flux.usage", "flux.usage_p0", "flux.usage_p1")
        # The session that probed the plain table (its remembered places,
        # its checked index) sees a partitioned one now.
        assert usage(before, "acme") == 4
        assert consume(before, "acme", 2) == (True, 6)
        alive(before)
        with session(fresh_db) as c:
            assert usage(c, "acme") == 6
            assert consume(c, "acme", 1) == (True, 7)
            assert consume(c, "acme", 5) == (False, 7)  # does not fit
            assert consume(c, "beta", 2) == (True, 2)  # a new row
            assert usage(c, "beta") == 2
            alive(c)
            assert stored(c, "acme") == 7 and stored(c, "beta") == 2
            assert c.execute("SELECT count(*) FROM ONLY flux.usage_plain").fetchone()[0] == 1


def test_inherited_usage_counts_the_children(fresh_db):
    with session(fresh_db) as c:
        metered(c)
        assert consume(c, "acme", 2) == (True, 2)
        # A child by inheritance holds the row now: a query of flux.usage
        # reads and updates it, the parent's own heap does not have it.
        c.execute("""
            CREATE TABLE flux.usage_child () INHERITS (flux.usage);
        """)
        own(c, "flux.usage_child")
        c.execute("""
            WITH moved AS (DELETE FROM ONLY flux.usage RETURNING *)
            INSERT INTO flux.usage_child SELECT * FROM moved;
        """)
        assert usage(c, "acme") == 2
        assert consume(c, "acme", 1) == (True, 3)
        assert c.execute("SELECT used FROM flux.usage_child").fetchone()[0] == 3


def test_stored_generated_column_is_computed(fresh_db):
    with session(fresh_db) as c:
        metered(c)
        assert consume(c, "acme", 1) == (True, 1)
        assert consume(c, "acme", 1) == (True, 2)  # the direct path
        c.execute(
            "ALTER TABLE flux.usage ADD COLUMN used_twice bigint GENERATED ALWAYS AS (used * 2) STORED"
        )
        assert consume(c, "acme", 3) == (True, 5)
        assert c.execute(
            "SELECT used, used_twice FROM flux.usage WHERE tenant = 'acme'"
        ).fetchone() == (5, 10)
        assert usage(c, "acme") == 5


def test_do_also_rule_fires(fresh_db):
    with session(fresh_db) as c:
        metered(c)
        assert consume(c, "acme", 1) == (True, 1)
        assert consume(c, "acme", 1) == (True, 2)  # the direct path
        c.execute("""
            CREATE TABLE public.usage_log (tenant text, used bigint);
        """)
        own(c, "public.usage_log")
        c.execute("""
            CREATE RULE usage_log AS ON UPDATE TO flux.usage
                DO ALSO INSERT INTO public.usage_log VALUES (NEW.tenant, NEW.used);
        """)
        assert consume(c, "acme", 3) == (True, 5)
        assert consume(c, "acme", 1) == (True, 6)
        assert c.execute("SELECT tenant, used FROM public.usage_log ORDER BY used").fetchall() == [
            ("acme", 5),
            ("acme", 6),
        ]
        assert usage(c, "acme") == 6


def mixed_case_names(n):
    """Names whose order under an ICU collation differs from byte order."""
    rng = random.Random(14)
    letters = "abcdefghijklmnopqrstuvwxyz"
    names = set()
    while len(names) < n:
        word = "".join(rng.choice(letters) for _ in range(6))
        names.add("".join(ch.upper() if rng.random() < 0.5 else ch for ch in word))
    return sorted(names)


def has_collation(c, name):
    return c.execute("SELECT 1 FROM pg_collation WHERE collname = %s", (name,)).fetchone()


def test_key_collation_change_keeps_counts(fresh_db):
    tenants = mixed_case_names(300)
    with session(fresh_db) as c:
        if not has_collation(c, "und-x-icu"):
            pytest.skip("no ICU collations in this build")
        metered(c, tenants)
        for t in tenants:
            assert consume(c, t, 10) == (True, 10)
        for t in tenants[:5]:
            assert consume(c, t, 1) == (False, 10)  # full, the direct path
        c.execute('ALTER TABLE flux.usage ALTER COLUMN tenant TYPE text COLLATE "und-x-icu"')
        c.execute("ALTER TABLE flux.usage ALTER COLUMN feature TYPE text COLLATE \"und-x-icu\"")
        for s in (c, session(fresh_db)):
            with s:
                unused = [t for t in tenants if usage(s, t) != 10]
                assert unused == []
                refused = [t for t in tenants if consume(s, t, 1) != (False, 10)]
                assert refused == []
        # Below its limit a counter still takes units.
        with session(fresh_db) as s:
            s.execute("UPDATE flux.usage SET used = 4 WHERE tenant = %s", (tenants[0],))
            assert consume(s, tenants[0], 1) == (True, 5)
            assert consume(s, tenants[0], 1) == (True, 6)
            assert usage(s, tenants[0]) == 6


def test_nondeterministic_key_collation_goes_to_sql(fresh_db):
    # Mixed case (so the collation's order is not the bytes'), and distinct
    # ignoring case: a case-insensitive primary key holds each once.
    tenants = [t + str(i) for i, t in enumerate(mixed_case_names(100))]
    with session(fresh_db) as c:
        if not has_collation(c, "und-x-icu"):
            pytest.skip("no ICU collations in this build")
        metered(c, tenants)
        for t in tenants:
            assert consume(c, t, 7) == (True, 7)
        c.execute(
            "CREATE COLLATION public.ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)"
        )
        # A foreign key's columns need compatible collations: ours go first.
        c.execute("""
            ALTER TABLE flux.usage DROP CONSTRAINT usage_tenant_fkey;
            ALTER TABLE flux.usage ALTER COLUMN tenant TYPE text COLLATE public.ci;
        """)
        used = dict.fromkeys(tenants, 7)
        for s, some in ((c, tenants[:20]), (session(fresh_db), tenants[20:40])):
            with s:
                assert [t for t in tenants if usage(s, t) != used[t]] == []
                for t in some:
                    assert consume(s, t, 1) == (True, 8)
                    used[t] = 8
                assert [t for t in tenants if usage(s, t) != used[t]] == []
                alive(s)
        with session(fresh_db) as s:
            assert consume(s, tenants[0], 2) == (True, 10)
            assert consume(s, tenants[0], 1) == (False, 10)
            assert s.execute(
                "SELECT count(*) FROM flux.usage WHERE tenant = %s", (tenants[0],)
            ).fetchone()[0] == 1


def test_retyped_used_is_a_clear_error(fresh_db):
    with session(fresh_db) as c:
        metered(c)
        assert consume(c, "acme", 3) == (True, 3)
        c.execute("ALTER TABLE flux.usage ALTER COLUMN used TYPE numeric")
        for s in (c, session(fresh_db)):
            with s:
                for call in (lambda: usage(s, "acme"), lambda: consume(s, "acme", 1)):
                    with pytest.raises(psycopg.Error) as e:
                        call()
                    assert e.value.sqlstate == "42804", e.value
                    assert "used" in str(e.value) and "bigint" in str(e.value)
                alive(s)
                # Under REPEATABLE READ too (which never took the direct path).
                s.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                with pytest.raises(psycopg.Error) as e:
                    consume(s, "acme", 1)
                assert e.value.sqlstate == "42804", e.value
                s.execute("ROLLBACK")
        with session(fresh_db) as s:
            s.execute("ALTER TABLE flux.usage ALTER COLUMN used TYPE bigint")
            assert consume(s, "acme", 1) == (True, 4)


def test_retyped_key_goes_to_sql(fresh_db):
    with session(fresh_db) as c:
        metered(c, ("acme", "beta"))
        assert consume(c, "acme", 3) == (True, 3)
        assert consume(c, "acme", 1) == (True, 4)
        c.execute("ALTER TABLE flux.usage ALTER COLUMN tenant TYPE varchar(100)")
        for s in (c, session(fresh_db)):
            with s:
                assert usage(s, "acme") == 4
        with session(fresh_db) as s:
            assert consume(s, "acme", 2) == (True, 6)
            assert consume(s, "beta", 1) == (True, 1)
            assert consume(s, "acme", 9) == (False, 6)
            assert stored(s, "acme") == 6 and stored(s, "beta") == 1


def test_publication_rules_are_what_an_update_gets(fresh_db):
    with session(fresh_db) as c:
        metered(c, ("acme", "beta"))
        assert consume(c, "acme", 1) == (True, 1)
        assert consume(c, "acme", 1) == (True, 2)
        # A row filter on a column outside the replica identity: PostgreSQL
        # refuses UPDATEs of the table, and so must consume.
        c.execute("CREATE PUBLICATION big FOR TABLE flux.usage WHERE (used > 5)")
        with pytest.raises(psycopg.Error) as e:
            consume(c, "acme", 1)
        assert e.value.sqlstate not in (None, "XX000"), e.value
        assert usage(c, "acme") == 2
        alive(c)
        # A filter on the key is valid: the update goes through.
        c.execute("ALTER PUBLICATION big SET TABLE flux.usage WHERE (tenant = 'acme')")
        assert consume(c, "acme", 1) == (True, 3)
        # No replica identity while published for updates: refused too.
        c.execute("DROP PUBLICATION big")
        c.execute("CREATE PUBLICATION every FOR ALL TABLES")
        assert consume(c, "acme", 1) == (True, 4)  # the primary key identifies
        c.execute("ALTER TABLE flux.usage REPLICA IDENTITY NOTHING")
        with pytest.raises(psycopg.Error) as e:
            consume(c, "acme", 1)
        assert e.value.sqlstate not in (None, "XX000"), e.value
        assert usage(c, "acme") == 4
