"""Per-tenant cache invalidation (issue 16).

A committed change to one tenant's rows (flux.tenants, flux.tenant_addons,
flux.overrides) makes other backends forget that tenant's hash bucket only
(1 of 1024), so every other cached tenant survives; a catalogue change
reloads the catalogue; TRUNCATE and an invalidation queue overflow forget
everything. The triggers are enabled ALWAYS, so changes applied with
session_replication_role = replica (a logical subscriber's apply worker)
invalidate too.

Survival is proved with the per-backend counters of flux._cache_stats(),
never with timing:

    catalogue_loads  catalogue (re)loads in this backend so far
    tenant_loads     tenant loads (misses, absent tenants included) so far
    tenants_cached   tenants held now
    full_forgets     times this backend forgot every tenant at once

Until that function exists, each test first checks the answers (which must
already be fresh) and then fails on the counters with one clear message.
"""
import os
import random
import subprocess
import threading
import time
import uuid
from collections import namedtuple
from dataclasses import dataclass, field

import psycopg
import pytest

from conftest import BIN, connect

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CATALOGUE = """
SELECT flux_define_feature('export');
SELECT flux_define_feature('sso');
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_plan('free', rank => 0, is_default => true);
SELECT flux_define_plan('starter', rank => 1);
SELECT flux_define_plan('pro', rank => 2);
SELECT flux_grant('pro', 'export');
SELECT flux_grant('pro', 'seats', 10);
SELECT flux_grant('starter', 'seats', 3);
SELECT flux_grant('free', 'seats', 1);
SELECT flux_define_addon('ssopack');
SELECT flux_grant_addon('ssopack', 'sso');
SELECT count(flux_subscribe('b' || lpad(i::text, 2, '0'), 'pro')) FROM generate_series(1, 20) i;
"""
# Tenants whose cached entries must survive a change to tenant 'a'. Their
# buckets cannot be computed from SQL: with 20 of them, at most a couple
# (expected 20/1024) share a bucket with 'a'.
OTHERS = [f"b{i:02d}" for i in range(1, 21)]
SHARED_BUCKET_SLACK = 2

Stats = namedtuple("Stats", "catalogue_loads tenant_loads tenants_cached full_forgets")
NO_STATS = ("flux._cache_stats() does not exist yet (issue 16): the answers above were fresh, "
            "but what was reloaded and what survived cannot be shown without its counters")


def cache_stats(conn):
    """This backend's cache counters, or None while flux._cache_stats() is missing."""
    if conn.execute("SELECT to_regprocedure('flux._cache_stats()') IS NULL").fetchone()[0]:
        return None
    return Stats(*conn.execute(
        "SELECT catalogue_loads, tenant_loads, tenants_cached, full_forgets FROM flux._cache_stats()"
    ).fetchone())


def need_stats(*snapshots):
    if any(s is None for s in snapshots):
        pytest.fail(NO_STATS)


def check(conn, tenant, feature):
    """flux_check twice (the second may come from its answer memo) and
    flux_decide, in one statement: they must agree."""
    a, b, c = conn.execute(
        "SELECT flux_check(%s, %s), flux_check(%s, %s), (flux_decide(%s, %s)).allowed",
        (tenant, feature) * 3,
    ).fetchone()
    assert a == b == c, f"flux_check / memo / flux_decide disagree for {tenant}/{feature}: {a} {b} {c}"
    return a


def check_many(conn, tenants, feature):
    """flux_check for each tenant, in one statement."""
    return conn.execute(
        "SELECT array_agg(flux_check(t, %s) ORDER BY o) FROM unnest(%s::text[]) WITH ORDINALITY u(t, o)",
        (feature, tenants),
    ).fetchone()[0]


def backend_pid(conn):
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


# --- Per-tenant changes ---------------------------------------------------

@dataclass
class Change:
    """A change to tenant rows: `setup` runs before any session is
    warm, `sql` is the change, `checks` lists (tenant, feature, before, after)."""
    name: str
    setup: str
    sql: str
    checks: list = field(default_factory=list)


A_EXPORT_ON = [("a", "export", False, True)]
A_EXPORT_OFF = [("a", "export", True, False)]
A_SSO_ON = [("a", "sso", False, True)]
A_SSO_OFF = [("a", "sso", True, False)]
STARTER = "SELECT flux_subscribe('a', 'starter')"
PRO = "SELECT flux_subscribe('a', 'pro')"

TENANT_CHANGES = [
    Change("flux_subscribe", STARTER, "SELECT flux_subscribe('a', 'pro')", A_EXPORT_ON),
    Change("update_plan", STARTER, "UPDATE flux.tenants SET plan = 'pro' WHERE id = 'a'", A_EXPORT_ON),
    Change("update_status", PRO, "UPDATE flux.tenants SET status = 'canceled' WHERE id = 'a'", A_EXPORT_OFF),
    Change("insert_override", STARTER, "INSERT INTO flux.overrides (tenant, feature) VALUES ('a', 'sso')", A_SSO_ON),
    Change("flux_override_revoke", PRO, "SELECT flux_override('a', 'export', enabled => false)", A_EXPORT_OFF),
    Change("delete_override", STARTER + "; SELECT flux_override('a', 'sso')",
           "DELETE FROM flux.overrides WHERE tenant = 'a'", A_SSO_OFF),
    Change("flux_attach_addon", STARTER, "SELECT flux_attach_addon('a', 'ssopack', 1)", A_SSO_ON),
    Change("delete_tenant_addon", STARTER + "; SELECT flux_attach_addon('a', 'ssopack', 1)",
           "DELETE FROM flux.tenant_addons WHERE tenant = 'a'", A_SSO_OFF),
    # 'a' does not exist when the sessions warm up: it is remembered as absent.
    Change("new_tenant", "SELECT 1", "SELECT flux_subscribe('a', 'pro')", A_EXPORT_ON),
    Change("delete_tenant", PRO + "; SELECT flux_override('a', 'sso')",
           "DELETE FROM flux.tenants WHERE id = 'a'", A_EXPORT_OFF),
    # A new id for a tenant: both the old id and the new one change.
    Change("rename_tenant", "SELECT flux_subscribe('a0', 'pro')",
           "UPDATE flux.tenants SET id = 'a' WHERE id = 'a0'", A_EXPORT_ON + [("a0", "export", True, False)]),
]
CHANGE_IDS = [c.name for c in TENANT_CHANGES]


def prepare(db, setup):
    """The catalogue, the 20 other tenants, then `setup` for tenant a."""
    with connect(db) as admin:
        admin.execute(CATALOGUE)
        admin.execute(setup)


def warm(conn, change):
    for tenant, feature, before, _ in change.checks:
        assert check(conn, tenant, feature) is before
    assert check_many(conn, OTHERS, "export") == [True] * len(OTHERS)


@pytest.mark.parametrize("reader_mode", ["autocommit", "in_transaction"])
@pytest.mark.parametrize("change", TENANT_CHANGES, ids=CHANGE_IDS)
def test_a_tenant_change_is_seen_at_once_and_other_tenants_survive(fresh_db, change, reader_mode):
    """A change to tenant 'a' committed by another session is answered by a
    warm session's next statement (autocommit, or inside its open
    transaction); exactly the changed tenants are reloaded, the 20 others
    stay cached (a couple may share a's bucket), no full forget and no
    catalogue reload."""
    prepare(fresh_db, change.setup)
    with connect(fresh_db, autocommit=reader_mode == "autocommit") as reader, connect(fresh_db) as writer:
        warm(reader, change)
        s0 = cache_stats(reader)
        writer.execute(change.sql)
        for tenant, feature, _, after in change.checks:
            assert check(reader, tenant, feature) is after, f"stale answer for {tenant}/{feature} after {change.sql}"
        s1 = cache_stats(reader)
        assert check_many(reader, OTHERS, "export") == [True] * len(OTHERS)
        s2 = cache_stats(reader)
        need_stats(s0, s1, s2)
        changed = len(change.checks)
        assert s1.tenant_loads - s0.tenant_loads == changed, (
            f"checking the {changed} changed tenant(s) loaded {s1.tenant_loads - s0.tenant_loads}")
        assert s2.tenant_loads - s1.tenant_loads <= SHARED_BUCKET_SLACK, (
            f"{s2.tenant_loads - s1.tenant_loads} of {len(OTHERS)} unchanged tenants were reloaded: "
            "a change to one tenant forgot others")
        assert s2.full_forgets == s0.full_forgets, "a per-tenant change forgot every tenant"
        assert s2.catalogue_loads == s0.catalogue_loads, "a per-tenant change reloaded the catalogue"
        assert s2.tenants_cached >= len(OTHERS)
        if reader_mode == "in_transaction":
            reader.commit()


@pytest.mark.parametrize("change", TENANT_CHANGES, ids=CHANGE_IDS)
def test_another_sessions_rolled_back_change_is_never_seen_and_costs_nothing(fresh_db, change):
    """While another session's change is uncommitted, and after it rolls
    back, a warm session keeps the old answers; a rolled-back transaction
    sends no invalidation, so that session reloads nothing at all."""
    prepare(fresh_db, change.setup)
    with connect(fresh_db) as reader, connect(fresh_db) as writer:
        warm(reader, change)
        s0 = cache_stats(reader)
        writer.execute("BEGIN")
        writer.execute(change.sql)
        for tenant, feature, before, after in change.checks:
            assert check(writer, tenant, feature) is after  # the writer sees its own change
            assert check(reader, tenant, feature) is before, "an uncommitted change was seen"
        writer.execute("ROLLBACK")
        for tenant, feature, before, _ in change.checks:
            assert check(reader, tenant, feature) is before, "a rolled-back change was seen"
            assert check(writer, tenant, feature) is before, "the writer kept its rolled-back change"
        assert check_many(reader, OTHERS, "export") == [True] * len(OTHERS)
        s1 = cache_stats(reader)
        need_stats(s0, s1)
        assert s1.tenant_loads == s0.tenant_loads, "a rolled-back change made another backend reload"
        assert s1.full_forgets == s0.full_forgets


@pytest.mark.parametrize("change", TENANT_CHANGES, ids=CHANGE_IDS)
def test_a_sessions_own_change_is_seen_then_forgotten_on_rollback(fresh_db, change):
    """BEGIN; change; the same session's next statement sees it (another
    session does not); ROLLBACK; the next statement no longer sees it. The
    other tenants stay cached throughout."""
    prepare(fresh_db, change.setup)
    with connect(fresh_db, autocommit=False) as own, connect(fresh_db) as other:
        warm(own, change)
        warm(other, change)
        s0 = cache_stats(own)
        own.execute(change.sql)
        for tenant, feature, before, after in change.checks:
            assert check(own, tenant, feature) is after, "a session did not see its own change"
            assert check(other, tenant, feature) is before, "an uncommitted change was seen"
        own.rollback()
        for tenant, feature, before, _ in change.checks:
            assert check(own, tenant, feature) is before, "a rolled-back change stayed cached"
            assert check(other, tenant, feature) is before
        s1 = cache_stats(own)
        assert check_many(own, OTHERS, "export") == [True] * len(OTHERS)
        s2 = cache_stats(own)
        own.rollback()
        need_stats(s0, s1, s2)
        assert s2.tenant_loads - s1.tenant_loads <= SHARED_BUCKET_SLACK, (
            f"{s2.tenant_loads - s1.tenant_loads} unchanged tenants were reloaded after a rollback")
        assert s2.full_forgets == s0.full_forgets, "a per-tenant change or its rollback forgot every tenant"


# --- Catalogue changes and TRUNCATE ---------------------------------------

def test_a_catalogue_commit_reloads_the_catalogue_once(fresh_db):
    """Several grant rows changed in one transaction: the warm session's next
    statement answers from the new catalogue, loaded once, not per row."""
    prepare(fresh_db, STARTER)
    with connect(fresh_db) as reader, connect(fresh_db) as writer:
        assert check(reader, "a", "export") is False
        assert check(reader, "a", "sso") is False
        assert check_many(reader, OTHERS, "export") == [True] * len(OTHERS)
        s0 = cache_stats(reader)
        writer.execute("BEGIN")
        writer.execute("SELECT flux_grant('starter', 'export'), flux_grant('starter', 'sso')")
        writer.execute("UPDATE flux.grants SET enabled = false WHERE plan = 'pro' AND feature = 'export'")
        writer.execute("COMMIT")
        assert check(reader, "a", "export") is True
        assert check(reader, "a", "sso") is True
        assert check_many(reader, OTHERS, "export") == [False] * len(OTHERS)
        s1 = cache_stats(reader)
        need_stats(s0, s1)
        assert s1.catalogue_loads - s0.catalogue_loads == 1, "one catalogue commit, one reload"
        assert s1.full_forgets - s0.full_forgets <= 1


@pytest.mark.parametrize("table", ["overrides", "tenant_addons"])
def test_truncate_forgets_every_tenant(fresh_db, table):
    """TRUNCATE of a per-tenant table names no tenant: every backend forgets
    all tenants, and the warm session's next statement sees the change."""
    gives_sso = {"overrides": "SELECT flux_override('a', 'sso')",
                 "tenant_addons": "SELECT flux_attach_addon('a', 'ssopack', 1)"}
    prepare(fresh_db, STARTER + "; " + gives_sso[table])
    with connect(fresh_db) as reader, connect(fresh_db) as writer:
        assert check(reader, "a", "sso") is True
        assert check_many(reader, OTHERS, "export") == [True] * len(OTHERS)
        s0 = cache_stats(reader)
        writer.execute(f"TRUNCATE flux.{table}")
        assert check(reader, "a", "sso") is False, f"stale answer after TRUNCATE flux.{table}"
        s1 = cache_stats(reader)
        need_stats(s0, s1)
        assert s1.full_forgets > s0.full_forgets, "TRUNCATE did not forget every tenant"


# --- Invalidation queue overflow --------------------------------------------

# Each CREATE / DROP of a temporary table queues some 40 catalogue
# invalidation messages; 300 of them in one commit are several times the
# shared queue's 4096 slots, whatever the extension itself sends.
FLOOD = "DO $$ BEGIN FOR i IN 1..300 LOOP CREATE TEMP TABLE flux_inval_flood (a int); DROP TABLE flux_inval_flood; END LOOP; END $$"


def wait_until_waiting_on_a_lock(conn, pid, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if conn.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]:
            return
        time.sleep(0.02)
    raise AssertionError("the reader never waited on the lock")


def test_an_invalidation_queue_overflow_forgets_everything(fresh_db):
    """A warm session inside an open transaction falls behind the shared
    invalidation queue: tenant a changes, then more than 4096 messages are
    committed while it cannot read them. (It waits on a lock, where
    PostgreSQL does not process catch-up signals; a session idle in a
    transaction does process them and may keep up.) PostgreSQL resets its
    caches (relid 0): its next statement must see a's change, and it must
    have forgotten every tenant."""
    prepare(fresh_db, PRO)
    notices = []
    with connect(fresh_db, autocommit=False) as reader, connect(fresh_db) as writer, connect(fresh_db) as blocker:
        reader.add_notice_handler(lambda d: notices.append(d.message_primary))
        assert check(reader, "a", "export") is True
        assert check_many(reader, OTHERS, "export") == [True] * len(OTHERS)
        s0 = cache_stats(reader)
        reader_pid = backend_pid(reader)
        # DEBUG4 shows PostgreSQL's own "cache state reset": proof that the
        # queue did overflow for this backend.
        reader.execute("SET LOCAL client_min_messages = debug4")
        blocker.execute("SELECT pg_advisory_lock(461016)")
        waiter = threading.Thread(target=lambda: reader.execute("SELECT pg_advisory_xact_lock(461016)"))
        waiter.start()
        try:
            wait_until_waiting_on_a_lock(writer, reader_pid)
            writer.execute("UPDATE flux.tenants SET status = 'canceled' WHERE id = 'a'")
            writer.execute(FLOOD)
        finally:
            blocker.execute("SELECT pg_advisory_unlock(461016)")
            waiter.join(30)
        assert check(reader, "a", "export") is False, "stale answer after an invalidation queue overflow"
        assert check_many(reader, OTHERS, "export") == [True] * len(OTHERS)
        reader.execute("SET LOCAL client_min_messages = notice")
        assert "cache state reset" in notices, "the test did not overflow the invalidation queue"
        s1 = cache_stats(reader)
        reader.commit()
        need_stats(s0, s1)
        assert s1.full_forgets > s0.full_forgets, "the overflow did not forget every tenant"
        assert s1.tenant_loads - s0.tenant_loads >= len(OTHERS), "tenants survived an overflow"


# --- Changes applied in replica mode (what a logical apply worker does) ----

REPLICA_CHANGES = [
    Change("update_tenant", STARTER, "UPDATE flux.tenants SET plan = 'pro' WHERE id = 'a'", A_EXPORT_ON),
    Change("insert_override", STARTER, "INSERT INTO flux.overrides (tenant, feature) VALUES ('a', 'sso')", A_SSO_ON),
    Change("insert_tenant_addon", STARTER, "INSERT INTO flux.tenant_addons (tenant, addon) VALUES ('a', 'ssopack')", A_SSO_ON),
    Change("insert_tenant", "SELECT 1", "INSERT INTO flux.tenants (id, plan) VALUES ('a', 'pro')", A_EXPORT_ON),
    Change("insert_grant", STARTER, "INSERT INTO flux.grants (plan, feature) VALUES ('starter', 'export')", A_EXPORT_ON),
    Change("truncate_overrides", STARTER + "; SELECT flux_override('a', 'sso')", "TRUNCATE flux.overrides", A_SSO_OFF),
]


@pytest.mark.parametrize("change", REPLICA_CHANGES, ids=[c.name for c in REPLICA_CHANGES])
def test_a_change_made_in_replica_mode_reaches_warm_sessions(fresh_db, change):
    """With session_replication_role = replica (as in a logical subscriber's
    apply worker) ordinary triggers do not fire: the invalidation triggers,
    enabled ALWAYS, must still tell warm sessions."""
    prepare(fresh_db, change.setup)
    with connect(fresh_db) as reader, connect(fresh_db) as writer:
        warm(reader, change)
        writer.execute("BEGIN")
        writer.execute("SET LOCAL session_replication_role = replica")
        writer.execute(change.sql)
        writer.execute("COMMIT")
        with connect(fresh_db) as cold:
            for tenant, feature, _, after in change.checks:
                assert check(cold, tenant, feature) is after
        for tenant, feature, _, after in change.checks:
            assert check(reader, tenant, feature) is after, (
                f"a warm session kept its answer for {tenant}/{feature} after a change made in replica mode")


# --- DROP / ALTER EXTENSION under a live warm session -----------------------

NEW_DATA = """
SELECT flux_define_feature('export');
SELECT flux_define_plan('starter', rank => 1);
SELECT flux_define_plan('pro', rank => 2);
SELECT flux_grant('starter', 'export');
SELECT flux_subscribe('a', 'pro');
SELECT count(flux_subscribe('b' || lpad(i::text, 2, '0'), 'starter')) FROM generate_series(1, 20) i;
"""
CHECK_SQL = "SELECT flux_check(%s, %s)"


def test_drop_extension_then_create_it_again_under_a_warm_session(fresh_db):
    """DROP EXTENSION under a warm session: its next check (ad hoc or a
    prepared statement) is a clean SQL error, never the old answer, and the
    session and the server live on. CREATE EXTENSION again with other data:
    the new answers; and a per-tenant change afterwards still reaches the
    session and leaves the other tenants cached (new table OIDs watched)."""
    prepare(fresh_db, PRO)
    with connect(fresh_db) as reader, connect(fresh_db) as writer:
        pid = backend_pid(reader)
        assert reader.execute(CHECK_SQL, ("a", "export"), prepare=True).fetchone()[0] is True
        assert check_many(reader, OTHERS, "export") == [True] * len(OTHERS)
        writer.execute("DROP EXTENSION flux_entitlements")
        for prepared in (True, False):
            with pytest.raises(psycopg.Error) as e:
                reader.execute(CHECK_SQL, ("a", "export"), prepare=prepared)
            assert e.value.sqlstate is not None and not e.value.sqlstate.startswith("XX"), e.value
        assert reader.execute("SELECT 1").fetchone()[0] == 1
        writer.execute("CREATE EXTENSION flux_entitlements")
        writer.execute(NEW_DATA)
        assert reader.execute(CHECK_SQL, ("a", "export"), prepare=True).fetchone()[0] is False
        assert check(reader, "a", "export") is False
        assert check_many(reader, OTHERS, "export") == [True] * len(OTHERS)
        s0 = cache_stats(reader)
        writer.execute("UPDATE flux.tenants SET plan = 'starter' WHERE id = 'a'")
        assert check(reader, "a", "export") is True, "a change after CREATE EXTENSION was not seen"
        s1 = cache_stats(reader)
        assert check_many(reader, OTHERS, "export") == [True] * len(OTHERS)
        s2 = cache_stats(reader)
        assert backend_pid(reader) == pid
        need_stats(s0, s1, s2)
        assert s1.tenant_loads - s0.tenant_loads == 1
        assert s2.tenant_loads - s1.tenant_loads <= SHARED_BUCKET_SLACK, "after CREATE EXTENSION a tenant change forgot others"


def test_drop_and_create_extension_in_one_transaction_under_a_warm_session(fresh_db):
    """Another session drops and re-creates the extension with other data
    in one transaction: the warm session's next statement answers from the
    new data (the same keys, new table OIDs), ad hoc and prepared, and
    follows the new tables' changes."""
    prepare(fresh_db, PRO)
    with connect(fresh_db) as reader, connect(fresh_db) as writer:
        pid = backend_pid(reader)
        assert check(reader, "a", "export") is True
        assert reader.execute(CHECK_SQL, ("a", "export"), prepare=True).fetchone()[0] is True
        assert check_many(reader, OTHERS, "export") == [True] * len(OTHERS)
        writer.execute("BEGIN")
        writer.execute("DROP EXTENSION flux_entitlements")
        writer.execute("CREATE EXTENSION flux_entitlements")
        writer.execute(NEW_DATA)
        writer.execute("COMMIT")
        assert check(reader, "a", "export") is False, "the old extension's answer after DROP / CREATE"
        assert reader.execute(CHECK_SQL, ("a", "export"), prepare=True).fetchone()[0] is False
        assert check_many(reader, OTHERS, "export") == [True] * len(OTHERS)
        writer.execute("SELECT flux_subscribe('a', 'starter')")
        assert check(reader, "a", "export") is True
        assert backend_pid(reader) == pid
        with connect(fresh_db) as cold:
            assert check(cold, "a", "export") is True


def released_before_current():
    from test_release import current_version, released, version_key
    return [v for v in released() if version_key(v) < version_key(current_version())]


@pytest.mark.parametrize("old", released_before_current() or [None])
def test_alter_extension_update_under_a_warm_session(fresh_db, old):
    """A session warm on a released version while another session runs
    ALTER EXTENSION ... UPDATE together with a tenant change: the next
    statement answers the new data. After the upgrade, tenant changes are
    per tenant (the others stay cached) and changes in replica mode reach
    warm sessions too: the upgrade installs the same invalidation triggers,
    enabled the same way, as a fresh install."""
    if old is None:
        pytest.skip("no release older than the current version")
    from test_release import EXT_DIR, install_released_as

    existed = os.path.exists(os.path.join(EXT_DIR, f"flux_entitlements--{old}.sql"))
    script = install_released_as(old, old)
    try:
        with connect(fresh_db) as admin:
            admin.execute("DROP EXTENSION flux_entitlements")
            admin.execute(f"CREATE EXTENSION flux_entitlements VERSION '{old}'")
            admin.execute(CATALOGUE)
            admin.execute(PRO)
        with connect(fresh_db) as reader, connect(fresh_db) as writer:
            pid = backend_pid(reader)
            assert check(reader, "a", "export") is True
            assert check_many(reader, OTHERS, "export") == [True] * len(OTHERS)
            writer.execute("BEGIN")
            writer.execute("ALTER EXTENSION flux_entitlements UPDATE")
            writer.execute("UPDATE flux.tenants SET plan = 'starter' WHERE id = 'a'")
            writer.execute("COMMIT")
            assert check(reader, "a", "export") is False, "stale answer across ALTER EXTENSION UPDATE"
            assert check_many(reader, OTHERS, "export") == [True] * len(OTHERS)
            s0 = cache_stats(reader)
            writer.execute("SELECT flux_subscribe('a', 'pro')")
            assert check(reader, "a", "export") is True
            s1 = cache_stats(reader)
            assert check_many(reader, OTHERS, "export") == [True] * len(OTHERS)
            s2 = cache_stats(reader)
            writer.execute("BEGIN")
            writer.execute("SET LOCAL session_replication_role = replica")
            writer.execute("UPDATE flux.tenants SET plan = 'starter' WHERE id = 'a'")
            writer.execute("COMMIT")
            assert check(reader, "a", "export") is False, "after the upgrade, a change in replica mode was not seen"
            assert backend_pid(reader) == pid
            need_stats(s0, s1, s2)
            assert s1.tenant_loads - s0.tenant_loads == 1
            assert s2.tenant_loads - s1.tenant_loads <= SHARED_BUCKET_SLACK, "after the upgrade a tenant change forgot others"
            # Last: creating a database with the extension commits thousands of
            # invalidation messages at once, which may overflow the reader's
            # queue (PostgreSQL then resets it: everything is forgotten).
            with connect(fresh_db) as other:
                upgraded = trigger_states(other)
            with connect("postgres") as admin:
                admin.execute(f'CREATE DATABASE "{fresh_db}_fresh"')
            try:
                with connect(f"{fresh_db}_fresh") as other:
                    other.execute("CREATE EXTENSION flux_entitlements")
                    fresh = trigger_states(other)
            finally:
                with connect("postgres") as admin:
                    admin.execute(f'DROP DATABASE IF EXISTS "{fresh_db}_fresh" WITH (FORCE)')
            assert upgraded == fresh, "the upgrade left triggers that differ from a fresh install (kind or enabled state)"
    finally:
        if not existed:
            os.remove(script)


def trigger_states(conn):
    """Every trigger on the flux tables: table, name, kind (row/statement,
    events) and whether it fires in replica mode (tgenabled)."""
    return conn.execute("""
        SELECT c.relname, t.tgname, t.tgtype, t.tgenabled
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relnamespace = 'flux'::regnamespace AND NOT t.tgisinternal
         ORDER BY 1, 2""").fetchall()


# --- Randomized: warm sessions against a model that reloads everything -----

POOL = [f"t{i:02d}" for i in range(30)]           # t24..t29 start absent
FEATURES = ["export", "sso", "seats"]
PLANS = ["free", "starter", "pro"]
STATUSES = ["active", "past_due", "canceled", "paused"]
NOW = "2026-11-22 12:00+00"                       # answers do not depend on the wall clock
RANDOM_CATALOGUE = CATALOGUE.replace(
    "SELECT count(flux_subscribe('b' || lpad(i::text, 2, '0'), 'pro')) FROM generate_series(1, 20) i;",
    """SELECT flux_define_addon('seatpack');
       SELECT flux_grant_addon('seatpack', 'seats', 5);
       SELECT count(flux_subscribe('t' || lpad(i::text, 2, '0'), (ARRAY['free', 'starter', 'pro'])[i % 3 + 1]))
         FROM generate_series(0, 23) i;""")
ANSWERS = """
SELECT t, f, d.allowed, d.reason, d."limit", flux_check(t, f), flux_check(t, f)
  FROM unnest(%s::text[]) t, unnest(%s::text[]) f, flux_decide(t, f) d ORDER BY 1, 2
"""


def q(s):
    return "'" + s.replace("'", "''") + "'"


def tenant_change(r):
    t, u = r.choice(POOL), r.choice(POOL)
    f = r.choice(FEATURES)
    return r.choice([
        f"SELECT flux_subscribe({q(t)}, {q(r.choice(PLANS))})",
        f"UPDATE flux.tenants SET plan = {q(r.choice(PLANS))} WHERE id = {q(t)}",
        f"UPDATE flux.tenants SET status = {q(r.choice(STATUSES))} WHERE id = {q(t)}",
        f"UPDATE flux.tenants SET status = {q(r.choice(STATUSES))} WHERE id IN ({q(t)}, {q(u)})",
        f"SELECT flux_override({q(t)}, {q(f)}, enabled => {r.choice(['true', 'false'])}, \"limit\" => {r.choice(['NULL', '0', '2'])})",
        f"INSERT INTO flux.overrides (tenant, feature, enabled) VALUES ({q(t)}, {q(f)}, {r.choice(['true', 'false'])}) "
        "ON CONFLICT (tenant, feature) DO UPDATE SET enabled = NOT flux.overrides.enabled",
        f"DELETE FROM flux.overrides WHERE tenant = {q(t)}",
        f"DELETE FROM flux.overrides WHERE tenant = {q(t)} AND feature = {q(f)}",
        f"SELECT flux_attach_addon({q(t)}, {q(r.choice(['ssopack', 'seatpack']))}, {r.randint(0, 3)})",
        f"DELETE FROM flux.tenant_addons WHERE tenant = {q(t)}",
        f"DELETE FROM flux.tenants WHERE id = {q(t)}",
        f"UPDATE flux.tenants SET id = {q(u)} WHERE id = {q(t)}",
        f"UPDATE flux.tenants SET plan = {q(r.choice(PLANS))} WHERE id BETWEEN {q(min(t, u))} AND {q(max(t, u))}",
    ])


def catalogue_change(r):
    return r.choice([
        f"UPDATE flux.grants SET \"limit\" = {r.randint(0, 20)} WHERE plan = 'pro' AND feature = 'seats'",
        f"SELECT flux_grant({q(r.choice(['starter', 'pro']))}, 'sso')",
        f"SELECT flux_revoke({q(r.choice(['starter', 'pro']))}, 'sso')",
        f"SELECT flux_grant({q(r.choice(['free', 'starter']))}, 'export')",
        f"SELECT flux_revoke({q(r.choice(['free', 'starter']))}, 'export')",
        f"SELECT flux_set_flag('export', enabled => {r.choice(['true', 'false'])})",
        f"SELECT flux_grant_addon('seatpack', 'seats', {r.randint(1, 9)})",
    ])


def global_change(r):
    return r.choice(["TRUNCATE flux.overrides", "TRUNCATE flux.tenant_addons"])


def random_change(r):
    x = r.random()
    if x < 0.80:
        return "tenant", tenant_change(r)
    if x < 0.97:
        return "catalogue", catalogue_change(r)
    return "global", global_change(r)


def run_transaction(conn, statements, commit):
    """Run statements in one transaction; an error (a constraint a random
    change breaks) rolls it back. Returns whether it committed."""
    conn.execute("BEGIN")
    try:
        for s in statements:
            conn.execute(s)
    except psycopg.errors.LockNotAvailable:
        raise
    except psycopg.Error:
        conn.execute("ROLLBACK")
        return False
    conn.execute("COMMIT" if commit else "ROLLBACK")
    return commit


def test_randomized_changes_never_leave_a_stale_warm_answer(fresh_db):
    """600 seeded random changes (80% per tenant: subscribe, plan, status,
    overrides, addons, delete, rename, multi-tenant updates; then catalogue
    changes and a few TRUNCATEs), some grouped in one transaction, a quarter
    rolled back, some made by a warm session itself. After each, three warm
    sessions (autocommit; autocommit with a small tenant LRU; one inside an
    open transaction) answer every tenant x feature, compared with a fresh
    connection (a cache that loads everything anew): zero stale answers.
    Tenant loads stay far below what forgetting every tenant at each change
    would cost."""
    rng = random.Random(16_2026_1201)
    with connect(fresh_db) as admin:
        admin.execute(RANDOM_CATALOGUE)
    own = connect(fresh_db)                      # also makes changes itself
    small = connect(fresh_db)
    in_tx = connect(fresh_db, autocommit=False)  # commits every 10 steps
    readers = [own, small, in_tx]
    small.execute("SET flux.cache_tenants = 8")
    for r in readers:
        r.execute("SELECT set_config('flux.now', %s, false)", (NOW,))
    stale, checked, reached_own = [], 0, 0
    kinds = {"tenant": 0, "catalogue": 0, "global": 0}
    full_events = 1  # the first load
    try:
        with connect(fresh_db) as admin:
            for w in (admin, own):
                w.execute("SELECT set_config('flux.now', %s, false), set_config('lock_timeout', '10s', false)", (NOW,))
            for r in readers:
                r.execute(ANSWERS, (POOL, FEATURES)).fetchall()
            s0 = cache_stats(own)
            for step in range(600):
                changes = [random_change(rng)]
                if rng.random() < 0.15:
                    changes.append(random_change(rng))
                for kind, _ in changes:
                    kinds[kind] += 1
                statements = [sql for _, sql in changes]
                commit = rng.random() >= 0.25
                writer = own if rng.random() < 0.15 else admin
                if any(kind == "global" for kind, _ in changes):
                    in_tx.commit()  # TRUNCATE waits for the locks of its open transaction
                committed = run_transaction(writer, statements, commit)
                if committed or writer is own:
                    reached_own += 1
                    if committed and any(kind != "tenant" for kind, _ in changes):
                        full_events += 1
                with connect(fresh_db) as oracle:
                    oracle.execute("SELECT set_config('flux.now', %s, false)", (NOW,))
                    want = oracle.execute(ANSWERS, (POOL, FEATURES)).fetchall()
                for i, r in enumerate(readers):
                    got = r.execute(ANSWERS, (POOL, FEATURES)).fetchall()
                    checked += 1
                    if got != want:
                        diff = [(g, w) for g, w in zip(got, want) if g != w][:3]
                        stale.append((step, i, statements, "committed" if committed else "rolled back", diff))
                if step % 10 == 9:
                    in_tx.commit()
            s1 = cache_stats(own)
    finally:
        for r in readers:
            r.close()
    assert checked == 1800
    assert kinds["tenant"] > 400 and kinds["catalogue"] > 50
    assert not stale, f"{len(stale)} stale answers of {checked}; first: {stale[:3]}"
    need_stats(s0, s1)
    # Forgetting every tenant costs len(POOL) loads; a per-tenant change, a
    # few (renames and multi-tenant updates touch two or more).
    bound = len(POOL) * full_events + 12 * reached_own
    loads = s1.tenant_loads - s0.tenant_loads
    assert loads <= bound, (
        f"{loads} tenant loads over {reached_own} changes ({full_events} of them catalogue or TRUNCATE): "
        f"per-tenant changes forget more than their tenants (bound {bound})")


# --- Logical replication ----------------------------------------------------

REPL_DIR = os.environ.get("FLUX_INVAL_REPL_DIR", "/tmp/flux-inval/repl")
PUB_PORT = int(os.environ.get("FLUX_INVAL_PUB_PORT", "5480"))
SUB_PORT = int(os.environ.get("FLUX_INVAL_SUB_PORT", "5481"))
PG_SH = os.path.join(ROOT, "scripts/pg.sh")


def pg_sh(*args):
    env = dict(os.environ, FLUX_PGBIN=BIN)
    r = subprocess.run([PG_SH, *args], env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"scripts/pg.sh {' '.join(args)}: {r.stdout}{r.stderr}"


@dataclass
class Cluster:
    dir: str
    port: int

    def connect(self, db, autocommit=True):
        return psycopg.connect(f"host={self.dir} port={self.port} user=postgres dbname={db}", autocommit=autocommit)


def start_cluster(name, port, extra_conf=""):
    c = Cluster(os.path.join(REPL_DIR, name), port)
    pg_sh("destroy", c.dir)
    pg_sh("start", c.dir, str(port))
    if extra_conf:
        with open(os.path.join(c.dir, "postgresql.conf"), "a") as f:
            f.write(extra_conf)
        pg_sh("stop", c.dir)
        pg_sh("start", c.dir, str(port))
    return c


@pytest.fixture
def logical_pair():
    """A publisher (wal_level = logical) and a subscriber cluster, each with
    a database holding the extension; destroyed afterwards."""
    db = "flux_inval_" + uuid.uuid4().hex[:8]
    clusters = []
    try:
        pub = start_cluster("pub", PUB_PORT, "\nwal_level = logical\nmax_replication_slots = 8\nmax_wal_senders = 8\n")
        clusters.append(pub)
        sub = start_cluster("sub", SUB_PORT, "\nmax_logical_replication_workers = 4\n")
        clusters.append(sub)
        for c in (pub, sub):
            with c.connect("postgres") as admin:
                admin.execute(f'CREATE DATABASE "{db}"')
            with c.connect(db) as conn:
                conn.execute("CREATE EXTENSION flux_entitlements")
        yield pub, sub, db
    finally:
        if len(clusters) == 2:
            try:
                with clusters[1].connect(db) as conn:
                    conn.execute("DROP SUBSCRIPTION IF EXISTS flux_inval_sub")
            except psycopg.Error:
                pass
        for c in reversed(clusters):
            pg_sh("destroy", c.dir)


def wait_for(predicate, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_logical_subscribers_warm_sessions_follow_the_publisher(logical_pair):
    """A subscriber with the extension, fed by CREATE PUBLICATION ... FOR
    TABLES IN SCHEMA flux: once a change has replicated (a fresh subscriber
    session answers it), a warm subscriber session answers it too, for a
    tenant update, an override, a TRUNCATE and a catalogue change, although
    the apply worker runs with session_replication_role = replica. The other
    tenants stay cached across the per-tenant change."""
    pub, sub, db = logical_pair
    with pub.connect(db) as p:
        p.execute(CATALOGUE)
        p.execute(PRO)
        p.execute("CREATE PUBLICATION flux_inval_pub FOR TABLES IN SCHEMA flux")
    with sub.connect(db) as s:
        s.execute(f"CREATE SUBSCRIPTION flux_inval_sub CONNECTION 'host=127.0.0.1 port={PUB_PORT} user=postgres "
                  f"dbname={db}' PUBLICATION flux_inval_pub WITH (copy_data = true)")
        wait_for(lambda: s.execute(
            "SELECT count(*) > 0 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel").fetchone()[0],
            "the initial copy")

    def cold(tenant, feature):
        with sub.connect(db) as c:
            return check(c, tenant, feature)

    def replicated(sql, tenant, feature, want):
        with pub.connect(db) as p:
            p.execute(sql)
        wait_for(lambda: cold(tenant, feature) is want, f"{sql} to replicate")

    wait_for(lambda: cold("a", "export") is True, "the copied tenant")
    with sub.connect(db) as warm_session:
        assert check(warm_session, "a", "export") is True
        assert check_many(warm_session, OTHERS, "export") == [True] * len(OTHERS)
        s0 = cache_stats(warm_session)

        replicated("UPDATE flux.tenants SET plan = 'starter' WHERE id = 'a'", "a", "export", False)
        assert check(warm_session, "a", "export") is False, (
            "a warm subscriber session kept answering true for a tenant the publisher downgraded")
        s1 = cache_stats(warm_session)
        assert check_many(warm_session, OTHERS, "export") == [True] * len(OTHERS)
        s2 = cache_stats(warm_session)

        replicated("SELECT flux_override('a', 'export')", "a", "export", True)
        assert check(warm_session, "a", "export") is True, "a replicated override was not seen by a warm session"

        replicated("TRUNCATE flux.overrides", "a", "export", False)
        assert check(warm_session, "a", "export") is False, "a replicated TRUNCATE was not seen by a warm session"

        replicated("SELECT flux_revoke('pro', 'export')", "b01", "export", False)
        assert check_many(warm_session, OTHERS, "export") == [False] * len(OTHERS), (
            "a replicated catalogue change was not seen by a warm session")

        need_stats(s0, s1, s2)
        assert s1.tenant_loads - s0.tenant_loads == 1
        assert s2.tenant_loads - s1.tenant_loads <= SHARED_BUCKET_SLACK, "a replicated tenant change forgot others"
