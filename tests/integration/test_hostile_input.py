"""Hostile input: random, huge, empty, unicode and NULL arguments to every
public function. No backend crash, no XX000, no Rust panic text."""
import random

import psycopg

from conftest import connect

SETUP = """
SELECT flux_define_feature('export');
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_feature('api', 'metered');
SELECT flux_define_feature('rate', 'rate');
SELECT flux_define_plan('pro');
SELECT flux_grant('pro', 'export');
SELECT flux_grant('pro', 'seats', 5);
SELECT flux_grant('pro', 'api', 100, 'day');
SELECT flux_grant('pro', 'rate', 10, '1 minute');
SELECT flux_subscribe('acme', 'pro');
"""

# name, argument SQL types
FUNCTIONS = [
    ("flux_check", ["text", "text"]),
    ("flux_check", ["text"]),
    ("flux_decide", ["text", "text", "text"]),
    ("flux_entitlements", ["text"]),
    ("flux_value", ["text", "text"]),
    ("flux_usage", ["text", "text"]),
    ("flux_consume", ["text", "text", "bigint", "text"]),
    ("flux_release", ["text", "text", "bigint"]),
    ("flux_authenticate", ["text"]),
    ("flux_define_feature", ["text", "text", "text"]),
    ("flux_define_plan", ["text", "text", "int", "boolean", "interval"]),
    ("flux_grant", ["text", "text", "bigint", "text", "jsonb"]),
    ("flux_revoke", ["text", "text"]),
    ("flux_subscribe", ["text", "text", "text", "timestamptz", "timestamptz"]),
    ("flux_override", ["text", "text", "boolean", "bigint", "timestamptz", "timestamptz", "text"]),
    ("flux_define_addon", ["text", "text"]),
    ("flux_grant_addon", ["text", "text", "bigint", "jsonb"]),
    ("flux_attach_addon", ["text", "text", "int"]),
    ("flux_set_flag", ["text", "boolean", "numeric"]),
    ("flux_flag_allow", ["text", "text"]),
    ("flux_flag_deny", ["text", "text"]),
    ("flux_flag_clear", ["text", "text"]),
    ("flux_create_api_key", ["text", "text", "timestamptz"]),
    ("flux_revoke_api_key", ["text"]),
    ("flux_history", ["text"]),
    ("flux_map_price", ["text", "text", "text"]),
    ("flux_apply_stripe_event", ["jsonb"]),
    ("flux_verify_stripe_signature", ["text", "text", "text", "interval"]),
]

TEXTS = ["", " ", "acme", "export", "seats", "api", "rate", "pro", "x" * 1_000_000, "日本語", "🚀" * 1000,
         "a\tb", "'; DROP TABLE flux.tenants; --", "flux_000000000000_" + "0" * 64, "%s%n", "\\", "NULL",
         "month", "day", "billing_period", "1 hour", "boolean", "limit", "metered", "trialing", "past_due"]


def value(rng, typ):
    if rng.random() < 0.15:
        return None
    if typ == "text":
        return rng.choice(TEXTS) if rng.random() < 0.8 else "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(0, 50)))
    if typ in ("bigint", "int"):
        return rng.choice([0, 1, -1, 5, 2**31 - 1, -(2**31), 10**12] + ([2**63 - 1, -(2**63)] if typ == "bigint" else []))
    if typ == "boolean":
        return rng.random() < 0.5
    if typ == "numeric":
        return rng.choice(["0", "100", "100.0001", "-1", "1e400", "NaN", "12.25", "0.00001"])
    if typ == "interval":
        return rng.choice(["1 day", "-1 day", "1000000 years", "0"])
    if typ == "timestamptz":
        return rng.choice(["2026-01-01", "infinity", "-infinity", "4713-01-01 BC", "294276-12-31"])
    if typ == "jsonb":
        return rng.choice(["null", "[]", "{}", '"x"', "[" * 200 + "]" * 200, '{"a": ' * 100 + "1" + "}" * 100,
                           '{"id": "e", "type": "customer.subscription.updated", "created": 1, "data": {"object": {"id": "s", "status": "active", "metadata": {"tenant_id": "acme"}, "items": {"data": [{"price": "p", "quantity": -5}]}}}}',
                           '{"id": "e2", "type": "invoice.paid", "created": 9e99, "data": {"object": {}}}'])
    raise AssertionError(typ)


def test_random_calls_never_crash_or_leak_internals(fresh_db):
    rng = random.Random(7)
    with connect(fresh_db) as c:
        c.execute(SETUP)
    calls = errors = 0
    with connect(fresh_db) as c:
        for _ in range(2500):
            name, types = rng.choice(FUNCTIONS)
            args = [value(rng, t) for t in types]
            placeholders = ", ".join(f"%s::{t}" for t in types)
            sql = f"SELECT {name}({placeholders})"
            if name in ("flux_entitlements", "flux_history"):
                sql = f"SELECT count(*) FROM {name}({placeholders})"
            try:
                c.execute(sql, args).fetchall()
            except psycopg.Error as e:
                assert not c.closed, f"connection lost on {name}{args!r:.200}: {str(e)[:300]}"

                errors += 1
                assert e.sqlstate not in (None, "XX000"), f"{name}: {str(e)[:500]}"
                text = str(e)
                assert "panicked" not in text and "RUST_BACKTRACE" not in text and ".rs:" not in text, text[:500]
                assert len(text) < 2000, f"{name}: message of {len(text)} characters: {text[:300]}"
            calls += 1
        assert c.execute("SELECT 1").fetchone()[0] == 1
    assert calls == 2500 and 0 < errors < calls
