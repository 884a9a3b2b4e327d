"""pg_dump / pg_restore round-trips every row and every decision."""
import os
import subprocess
import tempfile
import uuid

from conftest import BIN, HOST, PORT, connect

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DECISIONS = """
SET flux.now = '2026-11-22 12:00+00';
SELECT t.id, d.feature, d.allowed, d.reason, d.plan, d."limit", d.message, d.upgrade_plans,
       flux_value(t.id, d.feature)::text
  FROM flux.tenants t, flux_entitlements(t.id) d ORDER BY 1, 2;
"""
TABLES = ["features", "plans", "grants", "tenants", "addons", "addon_grants", "tenant_addons", "overrides", "flags", "flag_lists", "usage", "audit_log", "billing_prices", "billing_events"]


def snapshot(db):
    with connect(db) as c:
        c.execute("SET timezone = 'UTC'")
        rows = {t: c.execute(f"SELECT x::text FROM flux.{t} x ORDER BY 1").fetchall() for t in TABLES}
        cur = c.cursor()
        for stmt in DECISIONS.strip().split(";\n"):
            if stmt.strip():
                cur.execute(stmt)
        rows["decisions"] = cur.fetchall()
        return rows


def test_dump_and_restore_keep_every_row_and_decision(fresh_db):
    with open(os.path.join(ROOT, "examples", "saas.sql")) as f:
        sql = f.read()
    with connect(fresh_db) as c:
        c.execute(sql)
    before = snapshot(fresh_db)
    assert len(before["tenants"]) == 10 and len(before["flags"]) == 1 and len(before["usage"]) == 5 and len(before["decisions"]) == 70
    target = "flux_restored_" + uuid.uuid4().hex[:8]
    conn_args = ["-h", HOST, "-p", str(PORT), "-U", "postgres"]
    with tempfile.TemporaryDirectory() as tmp:
        dump = os.path.join(tmp, "flux.dump")
        subprocess.run([f"{BIN}/pg_dump", *conn_args, "-Fc", "-f", dump, fresh_db], check=True)
        subprocess.run([f"{BIN}/createdb", *conn_args, target], check=True)
        try:
            r = subprocess.run(
                [f"{BIN}/pg_restore", *conn_args, "--exit-on-error", "-d", target, dump],
                capture_output=True,
                text=True,
            )
            assert r.returncode == 0, r.stderr
            after = snapshot(target)
        finally:
            subprocess.run([f"{BIN}/dropdb", *conn_args, "--force", target], check=True)
    for table in TABLES + ["decisions"]:
        assert after[table] == before[table], table
