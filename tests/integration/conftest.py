"""Integration tests: real connections to a throwaway cluster started by
`make integration` (FLUX_PGHOST / FLUX_PGPORT point at it)."""
import os
import uuid

import psycopg
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
