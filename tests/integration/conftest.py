"""Integration tests: real connections to a throwaway cluster started by
`make integration` (FLUX_PGHOST / FLUX_PGPORT point at it)."""
import os
import time
import uuid

import psycopg
from psycopg import sql
import pytest

HOST = os.environ.get("FLUX_PGHOST", "/tmp/flux-pg/regress")
PORT = int(os.environ.get("FLUX_PGPORT", "5498"))
# The server binaries of the version under test (the Makefile sets it from PG=).
BIN = os.environ.get("FLUX_PGBIN") or "/usr/lib/postgresql/15/bin"


def dsn(dbname):
    return f"host={HOST} port={PORT} user=postgres dbname={dbname}"


def connect(dbname, autocommit=True, **kw):
    return psycopg.connect(dsn(dbname), autocommit=autocommit, **kw)


@pytest.fixture
def fresh_db():
    """A new database with the extension; dropped afterwards."""
    name = "flux_it_" + uuid.uuid4().hex[:10]
    with connect("postgres") as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    with connect(name) as c:
        c.execute("CREATE EXTENSION flux_entitlements")
    yield name
    with connect("postgres") as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# Roles and logins as them (test_security.py, test_callers.py).


def role_dsn(db, role):
    return f"host={HOST} port={PORT} user={role} dbname={db}"


def login(db, role, *, autocommit=True, options=None):
    """A real login as `role` (local connections are trust in the test cluster)."""
    kw = {"options": options} if options else {}
    c = psycopg.connect(role_dsn(db, role), autocommit=autocommit, **kw)
    c.notices = []
    c.add_notice_handler(lambda d: c.notices.append(f"{d.severity}: {d.message_primary}"))
    return c


class Roles:
    """Login roles made for one test, dropped (with what they own) after it."""

    def __init__(self, db, prefix="sec"):
        self.db = db
        self.prefix = prefix
        self.names = []

    def make(self, what, *, login=True, member_of=()):
        name = f"{self.prefix}_{what}_{uuid.uuid4().hex[:8]}"
        with connect(self.db) as c:
            c.execute(sql.SQL("CREATE ROLE {} " + ("LOGIN" if login else "NOLOGIN")).format(sql.Identifier(name)))
            for r in member_of:
                c.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(r), sql.Identifier(name)))
        self.names.append(name)
        return name

    def cleanup(self):
        with connect(self.db) as c:
            for n in reversed(self.names):
                c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s AND pid <> pg_backend_pid()", (n,))
            for n in reversed(self.names):
                if c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (n,)).fetchone():
                    c.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(n)))
                    c.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(n)))


def sqlstate_of(c, query, params=None):
    """'ok' or the SQLSTATE, in a savepoint when a transaction is open."""
    try:
        if c.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
            with c.transaction():
                c.execute(query, params)
        else:
            c.execute(query, params)
        return "ok"
    except psycopg.Error as e:
        return e.sqlstate


def wait_until_up(db, timeout=60, connect=connect):
    """Until the server accepts connections again (after a crash); `connect`
    for a cluster of a test's own."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with connect(db) as c:
                c.execute("SELECT 1")
                return
        except psycopg.Error:
            time.sleep(0.2)
    raise AssertionError("the server did not come back")
