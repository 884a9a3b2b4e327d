"""Released versions are frozen.

- sql/released/X.sql is the install script of released version X, exactly as
  shipped. While Cargo.toml still says X, the schema the build installs must
  be the one released (a schema change needs a new version and an upgrade
  script sql/flux_entitlements--X--Y.sql).
- For every earlier release, install it, fill it with the example catalogue,
  ALTER EXTENSION ... UPDATE, and compare objects and data with a fresh
  install of the current version.
- Released upgrade scripts never change: sql/released/SHA256SUMS pins them.
"""
import glob
import hashlib
import os
import re
import shutil
import subprocess
import uuid

import pytest

from conftest import BIN, HOST, PORT, connect

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXT_DIR = subprocess.run([f"{BIN}/pg_config", "--sharedir"], capture_output=True, text=True).stdout.strip() + "/extension"


def version_key(v):
    return tuple(int(x) for x in v.split("."))


def current_version():
    with open(os.path.join(ROOT, "Cargo.toml")) as f:
        return re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)


def released():
    return sorted((os.path.basename(p)[:-4] for p in glob.glob(os.path.join(ROOT, "sql/released/*.sql"))), key=version_key)


DESCRIBE = """
WITH ext AS (SELECT oid, extconfig FROM pg_extension WHERE extname = 'flux_entitlements')
SELECT pg_describe_object(d.classid, d.objid, d.objsubid) AS object,
       CASE d.classid
         WHEN 'pg_proc'::regclass THEN
           pg_get_functiondef(d.objid) || coalesce(obj_description(d.objid, 'pg_proc'), '')
           || coalesce((SELECT proacl::text FROM pg_proc WHERE oid = d.objid), '')
         WHEN 'pg_class'::regclass THEN
           coalesce((SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull
                                       || ' ' || coalesce(pg_get_expr(ad.adbin, ad.adrelid), '')
                                       || ' ' || coalesce(col_description(a.attrelid, a.attnum), ''), ', ' ORDER BY a.attnum)
                       FROM pg_attribute a LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
                      WHERE a.attrelid = d.objid AND a.attnum > 0 AND NOT a.attisdropped), '')
           || ' | ' || coalesce(obj_description(d.objid, 'pg_class'), '')
           || ' | ' || coalesce((SELECT relacl::text FROM pg_class WHERE oid = d.objid), '')
           || ' | ' || coalesce((SELECT string_agg(conname || ' ' || pg_get_constraintdef(c.oid), '; ' ORDER BY conname)
                                   FROM pg_constraint c WHERE c.conrelid = d.objid), '')
           || ' | ' || coalesce((SELECT string_agg(pg_get_indexdef(indexrelid), '; ' ORDER BY 1)
                                   FROM pg_index WHERE indrelid = d.objid), '')
           || ' | ' || coalesce((SELECT string_agg(pg_get_triggerdef(t.oid), '; ' ORDER BY t.tgname)
                                   FROM pg_trigger t WHERE t.tgrelid = d.objid AND NOT t.tgisinternal), '')
           || ' | ' || coalesce((SELECT string_agg(p.polname || ' ' || pg_get_expr(p.polqual, p.polrelid), '; ')
                                   FROM pg_policy p WHERE p.polrelid = d.objid), '')
         WHEN 'pg_type'::regclass THEN coalesce(obj_description(d.objid, 'pg_type'), '')
         WHEN 'pg_namespace'::regclass THEN coalesce(obj_description(d.objid, 'pg_namespace'), '')
         ELSE ''
       END AS definition
  FROM pg_depend d, ext
 WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'
UNION ALL
SELECT 'extconfig', (SELECT string_agg(c::regclass::text, ', ' ORDER BY c::regclass::text) FROM ext, unnest(ext.extconfig) c)
ORDER BY 1, 2
"""


def schema_dump(db):
    """Every object of the extension with its definition, comments and grants."""
    with connect(db) as c:
        return c.execute(DESCRIBE).fetchall()


def new_db():
    name = "flux_rel_" + uuid.uuid4().hex[:8]
    with connect("postgres") as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_db(name):
    with connect("postgres") as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def install_released_as(version, label):
    """Make released `version` installable as extension version `label`."""
    target = os.path.join(EXT_DIR, f"flux_entitlements--{label}.sql")
    shutil.copy(os.path.join(ROOT, f"sql/released/{version}.sql"), target)
    return target


def test_released_upgrade_scripts_are_unchanged():
    sums = os.path.join(ROOT, "sql/released/SHA256SUMS")
    pinned = {}
    if os.path.exists(sums):
        for line in open(sums):
            digest, name = line.split()
            pinned[name] = digest
    for name, digest in pinned.items():
        with open(os.path.join(ROOT, "sql", name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, f"released upgrade script {name} was edited"
    for path in glob.glob(os.path.join(ROOT, "sql/flux_entitlements--*--*.sql")):
        to_version = os.path.basename(path).split("--")[2][:-4]
        if to_version in released():
            assert os.path.basename(path) in pinned, f"{path} is released: pin it in sql/released/SHA256SUMS"


def test_the_current_version_installs_what_was_released():
    version = current_version()
    if version not in released():
        pytest.skip(f"{version} is not released yet")
    label = f"{version}-as-released"
    script = install_released_as(version, label)
    a, b = new_db(), new_db()
    try:
        with connect(a) as c:
            c.execute("CREATE EXTENSION flux_entitlements")
        with connect(b) as c:
            c.execute(f"CREATE EXTENSION flux_entitlements VERSION '{label}'")
        assert schema_dump(a) == schema_dump(b), (
            f"the schema differs from released {version}: bump the version in Cargo.toml "
            f"and add sql/flux_entitlements--{version}--NEW.sql"
        )
    finally:
        drop_db(a)
        drop_db(b)
        os.remove(script)


@pytest.mark.parametrize("old", [v for v in released() if version_key(v) < version_key(current_version())] or [None])
def test_upgrade_from_each_release_matches_a_fresh_install(old):
    if old is None:
        pytest.skip("no release older than the current version")
    with open(os.path.join(ROOT, "examples/saas.sql")) as f:
        catalogue = f.read().replace("CREATE EXTENSION IF NOT EXISTS flux_entitlements;", "")
    script = install_released_as(old, old)
    up, fresh = new_db(), new_db()
    try:
        with connect(up) as c:
            c.execute(f"CREATE EXTENSION flux_entitlements VERSION '{old}'")
            c.execute(catalogue)
            c.execute("ALTER EXTENSION flux_entitlements UPDATE")
        with connect(fresh) as c:
            c.execute("CREATE EXTENSION flux_entitlements")
            c.execute(catalogue)
        assert schema_dump(up) == schema_dump(fresh)
        q = "SELECT t.id, d.* FROM flux.tenants t, flux_entitlements(t.id) d ORDER BY 1, feature"
        with connect(up) as u, connect(fresh) as f:
            u.execute("SET flux.now = '2026-11-22 12:00+00'")
            f.execute("SET flux.now = '2026-11-22 12:00+00'")
            assert u.execute(q).fetchall() == f.execute(q).fetchall()
    finally:
        drop_db(up)
        drop_db(fresh)
        os.remove(script)
