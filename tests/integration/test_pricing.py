"""Pricing changes (CONTRACT "Pricing changes", issue 22) over real
connections: scheduled plan changes (flux_schedule_change /
flux_cancel_scheduled_change), flux_preview, flux_plan_impact,
grandfathering (flux_copy_plan, flux_move_tenants), flux_pricing_table and
the view flux.plan_matrix.

A scheduled change is two columns of flux.tenants: the decision takes the
scheduled plan from its instant by the clock with no job, a warm session's
caches never outlive the instant, and the row's next write after it makes
the change the plan (the tenants trigger).

1. A warm session answers across the instant of a scheduled downgrade by
   the real clock (no flux.now), flux_check, flux_decide, flux_entitlements
   and a protected table (RLS); then by flux.now across midnight, with
   flux_consume, SET LOCAL, the clock going back, the trigger's fold.
2. flux_move_tenants of 10,000 tenants now and scheduled: counts, every row,
   one audited update per tenant, the decisions (runtimes printed).
3. flux_plan_impact over 100,000 tenants (bulk-loaded) agrees with the
   decisions once the new limit is granted (runtime printed).
4. flux_preview against the decisions after the tenant really moved (by
   flux_subscribe, flux_move_tenants and a scheduled change), also to a
   plan that counts the feature over another period.
5. Concurrency: a committed schedule seen by another session's next
   transaction; flux_move_tenants racing flux_subscribe, both orders;
   flux_schedule_change racing flux_subscribe (no lost update).
6. pg_dump / pg_restore keeps scheduled_plan, scheduled_at and plans.listed.
7. A role without flux_admin: 42501 for the admin functions and the view,
   its own pricing table and preview only.

Superuser connections that need a fixed clock set flux.now; test 1's first
half and test 7 use the real clock.
"""
import datetime
import random
import time

import psycopg
import pytest

from conftest import Roles, connect, login, sqlstate_of
from test_credits import dump_and_restore, in_thread, one, wait_blocked

UTC = datetime.timezone.utc


def clocked(db, now, autocommit=True):
    """A superuser connection on a fixed clock (flux.now)."""
    c = connect(db, autocommit=autocommit)
    c.execute("SELECT set_config('flux.now', %s, false)", (now,))
    return c


def set_clock(c, now):
    c.execute("SELECT set_config('flux.now', %s, false)", (now,))


CATALOGUE = """
SELECT flux_define_feature('export');
SELECT flux_define_feature('sso');
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_feature('api', 'metered');
SELECT flux_define_plan('free', rank => 0, is_default => true);
SELECT flux_define_plan('starter', rank => 1);
SELECT flux_define_plan('pro', rank => 2);
SELECT flux_define_plan('team', rank => 3);
SELECT flux_grant('free', 'seats', 1);
SELECT flux_grant('starter', 'seats', 3);
SELECT flux_grant('starter', 'api', 100, 'month');
SELECT flux_grant('pro', 'export');
SELECT flux_grant('pro', 'seats', 10);
SELECT flux_grant('pro', 'api', 1000, 'month');
SELECT flux_grant('team', 'export');
SELECT flux_grant('team', 'sso');
SELECT flux_grant('team', 'seats', 50);
SELECT flux_grant('team', 'api', 10000, 'month');
SELECT flux_define_addon('pack');
SELECT flux_grant_addon('pack', 'seats', 5);
"""


def decision(c, tenant, feature, cols="allowed, reason, plan, \"limit\", used"):
    return c.execute(f"SELECT {cols} FROM flux_decide(%s, %s)", (tenant, feature)).fetchone()


def audit_mark(c):
    return one(c, "SELECT coalesce(max(id), 0) FROM flux.audit_log")


def tenant_updates_since(c, mark):
    return one(c, "SELECT count(*) FROM flux.audit_log WHERE id > %s AND entity = 'tenants' AND action = 'update'",
               (mark,))


# ---------------------------------------------------------------------------
# 1. A warm session across the instant


POLL = """
SELECT now(),
       (SELECT count(*) FILTER (WHERE flux_check(%(t)s, 'export')) FROM generate_series(1, 20)),
       (flux_decide(%(t)s, 'export')).plan,
       (flux_decide(%(t)s, 'seats'))."limit",
       (SELECT allowed FROM flux_entitlements(%(t)s) WHERE feature = 'export')
"""


def warm(c, tenant, n=30):
    """Answer flux_check / flux_decide for the tenant many times (per-backend
    caches and the per-instant memo)."""
    for _ in range(n):
        c.execute("SELECT count(*) FILTER (WHERE flux_check(%s, 'export')) FROM generate_series(1, 100)", (tenant,))
        c.execute("SELECT (flux_decide(%s, 'export')).allowed, (flux_decide(%s, 'seats')).\"limit\"", (tenant, tenant))
        c.execute("SELECT count(*) FROM flux_entitlements(%s)", (tenant,))


def test_a_warm_session_answers_across_the_instant_by_the_real_clock(fresh_db):
    roles = Roles(fresh_db, "prc")
    try:
        app_role = roles.make("rls", login=False)
        with connect(fresh_db) as su:
            su.execute(CATALOGUE)
            su.execute("SELECT flux_subscribe('rt', 'pro')")
            su.execute("CREATE TABLE reports (id serial PRIMARY KEY, tenant_id text NOT NULL, title text)")
            su.execute("INSERT INTO reports (tenant_id, title) SELECT 'rt', 'r' || i FROM generate_series(1, 4) i")
            su.execute("SELECT flux_protect('reports', 'export')")
            su.execute(f'GRANT SELECT ON reports TO "{app_role}"')
        with connect(fresh_db) as w, connect(fresh_db) as app, connect(fresh_db) as admin:
            app.execute(f'SET ROLE "{app_role}"')
            app.execute("SET flux.tenant = 'rt'")
            warm(w, "rt")
            for _ in range(30):
                assert app.execute("SELECT count(*), flux_check('rt', 'export') FROM reports").fetchone() == (4, True)
            # The change, committed by another session, about 2 s ahead.
            at = one(admin, "SELECT flux_schedule_change('rt', 'starter', now() + interval '2 seconds')")
            assert one(admin, "SELECT scheduled_at FROM flux.tenants WHERE id = 'rt'") == at
            # Still warm after the change was committed (before its instant).
            warm(w, "rt", 10)
            polls, rls = [], []
            while True:
                polls.append(w.execute(POLL, {"t": "rt"}).fetchone())
                rls.append(app.execute("SELECT now(), count(*), flux_check('rt', 'export') FROM reports").fetchone())
                if polls[-1][0] > at + datetime.timedelta(seconds=0.5) and rls[-1][0] > at + datetime.timedelta(seconds=0.5):
                    break
                time.sleep(0.005)
        before = [p for p in polls if p[0] < at]
        after = [p for p in polls if p[0] >= at]
        assert len(before) >= 20 and len(after) >= 5, (len(before), len(after))
        wrong = [p for p in before if p[1:] != (20, "pro", 10, True)]
        wrong += [p for p in after if p[1:] != (0, "starter", 3, False)]
        assert not wrong, f"instant {at}: {len(wrong)} wrong answers, first {wrong[:3]}"
        # The first answer after the instant came within 0.3 s of it, and was
        # already the new plan's.
        assert after[0][0] - at < datetime.timedelta(seconds=0.3), (at, after[0])
        rls_wrong = [r for r in rls if (r[1:] != (4, True) if r[0] < at else r[1:] != (0, False))]
        assert not rls_wrong, f"instant {at}: RLS session wrong {rls_wrong[:3]}"
        assert any(r[0] < at for r in rls) and any(r[0] >= at for r in rls)
    finally:
        roles.cleanup()


def test_a_warm_session_answers_across_midnight_by_flux_now(fresh_db):
    before, midnight = "2026-12-31 23:59:59.999999+00", "2027-01-01 00:00+00"
    with clocked(fresh_db, "2026-12-15 12:00+00") as su:
        su.execute(CATALOGUE)
        su.execute("SELECT flux_subscribe('acme', 'pro', current_period_start => '2026-12-01', "
                   "current_period_end => '2027-01-01')")
        for _ in range(5):
            su.execute("SELECT flux_consume('acme', 'seats')")
    with clocked(fresh_db, before) as w, clocked(fresh_db, "2026-12-20 00:00+00") as admin:
        warm(w, "acme")
        # Default instant: the end of the billing period.
        at = one(admin, "SELECT flux_schedule_change('acme', 'starter')")
        assert at == datetime.datetime(2027, 1, 1, tzinfo=UTC)
        assert admin.execute("SELECT plan, scheduled_plan, scheduled_at FROM flux.tenants WHERE id = 'acme'").fetchone() \
            == ("pro", "starter", at)
        warm(w, "acme", 10)
        assert w.execute(POLL, {"t": "acme"}).fetchone()[1:] == (20, "pro", 10, True)
        assert decision(w, "acme", "export", "message") == (
            "acme may use export on the pro plan; downgrades to starter on 2027-01-01, which does not include it",)
        assert decision(w, "acme", "seats", "message") == (
            "seats: 5 of 10 used on the pro plan; downgrades to starter on 2027-01-01 (limit 3)",)
        # Midnight.
        set_clock(w, midnight)
        assert w.execute(POLL, {"t": "acme"}).fetchone()[1:] == (0, "starter", 3, False)
        assert decision(w, "acme", "export", "allowed, reason, plan, upgrade_plans") == (
            False, "not_in_plan", "starter", ["pro", "team"])
        assert w.execute("SELECT allowed, reason, plan, \"limit\", used FROM flux_consume('acme', 'seats')").fetchone() \
            == (False, "limit_reached", "starter", 3, 5)
        # Back before midnight (a clock set backwards): the old plan again.
        set_clock(w, before)
        assert w.execute(POLL, {"t": "acme"}).fetchone()[1:] == (20, "pro", 10, True)
        assert w.execute("SELECT allowed, plan, \"limit\", used FROM flux_consume('acme', 'seats')").fetchone() \
            == (True, "pro", 10, 6)
        # Within one transaction, SET LOCAL across the instant.
        w.execute("BEGIN")
        w.execute("SET LOCAL flux.now = '2026-12-31 23:59:59+00'")
        assert w.execute(POLL, {"t": "acme"}).fetchone()[1:] == (20, "pro", 10, True)
        w.execute("SET LOCAL flux.now = '2027-01-01 00:00:00+00'")
        assert w.execute(POLL, {"t": "acme"}).fetchone()[1:] == (0, "starter", 3, False)
        w.execute("SET LOCAL flux.now = '2026-12-31 23:59:59+00'")
        assert w.execute(POLL, {"t": "acme"}).fetchone()[1:] == (20, "pro", 10, True)
        w.execute("COMMIT")
        # No job folded it: the row still says pro until its next write after
        # the instant (a write before it leaves it pending).
        admin.execute("UPDATE flux.tenants SET billing_customer = 'cus_1' WHERE id = 'acme'")
        assert admin.execute("SELECT plan, scheduled_plan FROM flux.tenants WHERE id = 'acme'").fetchone() \
            == ("pro", "starter")
        set_clock(admin, midnight)
        admin.execute("UPDATE flux.tenants SET billing_customer = 'cus_2' WHERE id = 'acme'")
        assert admin.execute("SELECT plan, scheduled_plan, scheduled_at FROM flux.tenants WHERE id = 'acme'").fetchone() \
            == ("starter", None, None)
        # Folded: the change is the plan at any clock now.
        set_clock(w, before)
        assert w.execute(POLL, {"t": "acme"}).fetchone()[1:] == (0, "starter", 3, False)


# ---------------------------------------------------------------------------
# 2. Moving 10,000 tenants


def test_moving_ten_thousand_tenants_now_and_scheduled(fresh_db):
    n = 10_000
    with clocked(fresh_db, "2026-12-10 00:00+00") as su:
        su.execute(CATALOGUE)
        su.execute("SELECT flux_copy_plan('pro', 'pro_2026', 'Pro (2026)')")
        # m1 .. m9998 on pro, loaded with the row triggers off (as test 3).
        with su.transaction():
            su.execute("SET LOCAL session_replication_role = replica")
            su.execute("INSERT INTO flux.tenants (id, plan, status, current_period_start) "
                       "SELECT 'm' || i, 'pro', 'active', '2026-12-01 00:00+00' FROM generate_series(1, %s) i", (n - 2,))
        su.execute("ANALYZE flux.tenants")
        # Two more whose plan in force is pro by a scheduled change: one due
        # (on starter until its instant passed), one still pending away from
        # pro (the move replaces it). And one on starter with a pending move
        # to pro: not on pro now, not moved.
        su.execute("SELECT flux_subscribe('due', 'starter')")
        su.execute("SELECT flux_schedule_change('due', 'pro', '2026-12-15 00:00+00')")
        su.execute("SELECT flux_subscribe('pending', 'pro')")
        su.execute("SELECT flux_schedule_change('pending', 'starter', '2027-02-01 00:00+00')")
        su.execute("SELECT flux_subscribe('later', 'starter')")
        su.execute("SELECT flux_schedule_change('later', 'pro', '2027-02-01 00:00+00')")
        set_clock(su, "2026-12-20 00:00+00")
        assert one(su, "SELECT count(*) FROM flux.tenants WHERE plan = 'pro'") == n - 1

        mark = audit_mark(su)
        t0 = time.perf_counter()
        moved = one(su, "SELECT flux_move_tenants('pro', 'pro_2026')")
        took_now = time.perf_counter() - t0
        print(f"\nflux_move_tenants of {n} tenants now: {took_now:.3f} s")
        assert moved == n
        assert su.execute("SELECT plan, scheduled_plan IS NULL, count(*) FROM flux.tenants GROUP BY 1, 2 ORDER BY 1, 2").fetchall() \
            == [("pro_2026", True, n), ("starter", False, 1)]
        assert su.execute("SELECT id FROM flux.tenants WHERE plan <> 'pro_2026'").fetchall() == [("later",)]
        assert tenant_updates_since(su, mark) == n
        assert one(su, "SELECT count(*) FROM flux.audit_log WHERE id > %s", (mark,)) == n
        assert one(su, "SELECT count(DISTINCT key) FROM flux.audit_log WHERE id > %s AND new ->> 'plan' = 'pro_2026' "
                       "AND old ->> 'plan' IS DISTINCT FROM 'pro_2026'", (mark,)) == n
        assert one(su, "SELECT count(DISTINCT xact) FROM flux.audit_log WHERE id > %s", (mark,)) == 1
        sample = ["m1", "m777", f"m{n - 2}", "due", "pending"] + [f"m{i}" for i in random.Random(22).sample(range(1, n - 1), 20)]
        for t in sample:
            assert decision(su, t, "seats", "allowed, plan, \"limit\"") == (True, "pro_2026", 10), t
        assert decision(su, "later", "seats", "plan, \"limit\"") == ("starter", 3)

        # A scheduled move of the same 10,000 back to pro on 2027-03-01.
        mark = audit_mark(su)
        t0 = time.perf_counter()
        moved = one(su, "SELECT flux_move_tenants('pro_2026', 'pro', '2027-03-01 00:00+00')")
        took_later = time.perf_counter() - t0
        print(f"flux_move_tenants of {n} tenants scheduled: {took_later:.3f} s")
        assert moved == n
        assert su.execute("SELECT plan, scheduled_plan, scheduled_at, count(*) FROM flux.tenants "
                          "WHERE id <> 'later' GROUP BY 1, 2, 3").fetchall() \
            == [("pro_2026", "pro", datetime.datetime(2027, 3, 1, tzinfo=UTC), n)]
        assert tenant_updates_since(su, mark) == n
        assert one(su, "SELECT count(*) FROM flux.audit_log WHERE id > %s", (mark,)) == n
        for t in sample:
            assert decision(su, t, "seats", "plan, \"limit\"") == ("pro_2026", 10), t
        set_clock(su, "2027-03-01 00:00+00")
        for t in sample:
            assert decision(su, t, "export", "allowed, plan") == (True, "pro"), t
            assert decision(su, t, "seats", "plan, \"limit\"") == ("pro", 10), t
        # In force now: a move from pro moves them again, from pro_2026 none.
        assert one(su, "SELECT flux_move_tenants('pro_2026', 'starter')") == 0


# ---------------------------------------------------------------------------
# 3. flux_plan_impact over 100,000 tenants


IMPACT_NOW = "2026-12-15 12:00+00"


def bulk_tenants(c, n):
    """n tenants c1..cn on pro (a few otherwise, see below) with seat usage
    i % 20 and this month's api usage (i * 7) % 1500 (plus last month's
    1,000,000 for every hundredth tenant), loaded as postgres with the row
    triggers off (session_replication_role = replica skips validation, the
    audit log and the foreign keys; the cache's ALWAYS triggers still fire).
      i % 5000 = 1: team;            = 2: pro, due change to team (not pro);
      i % 5000 = 3: team, due change to pro (pro);  = 4: pro, pending change to team (pro).
    """
    with c.transaction():
        c.execute("SET LOCAL session_replication_role = replica")
        c.execute("""
            INSERT INTO flux.tenants (id, plan, status, current_period_start, scheduled_plan, scheduled_at)
            SELECT 'c' || i,
                   CASE WHEN i %% 5000 IN (1, 3) THEN 'team' ELSE 'pro' END, 'active', '2026-11-15 00:00+00',
                   CASE i %% 5000 WHEN 2 THEN 'team' WHEN 3 THEN 'pro' WHEN 4 THEN 'team' END,
                   CASE i %% 5000 WHEN 2 THEN timestamptz '2026-12-10 00:00+00' WHEN 3 THEN '2026-12-10 00:00+00'
                                 WHEN 4 THEN '2027-01-01 00:00+00' END
              FROM generate_series(1, %s) i""", (n,))
        c.execute("""
            INSERT INTO flux.usage (tenant, feature, period_start, used)
            SELECT 'c' || i, 'seats', timestamptz '-infinity', i %% 20 FROM generate_series(1, %s) i WHERE i %% 20 > 0
            UNION ALL
            SELECT 'c' || i, 'api', '2026-12-01 00:00+00', (i * 7) %% 1500 FROM generate_series(1, %s) i
            UNION ALL
            SELECT 'c' || i, 'api', '2026-11-01 00:00+00', 1000000 FROM generate_series(1, %s) i WHERE i %% 100 = 0""",
                  (n, n, n))
    c.execute("ANALYZE flux.tenants")
    c.execute("ANALYZE flux.usage")


def expected_impact(n, new_limit, used_of, limit_of):
    """[(tenant, used, over_by)] as flux_plan_impact orders them."""
    out = []
    for i in range(1, n + 1):
        if i % 5000 in (1, 2):
            continue
        t = f"c{i}"
        used, limit = used_of(i), limit_of(t, new_limit)
        if limit is not None and used > limit:
            out.append((t, used, used - limit))
    out.sort(key=lambda r: (-r[2], r[0]))
    return out


def test_plan_impact_over_a_hundred_thousand_tenants_agrees_with_the_decisions(fresh_db):
    n = 100_000
    with clocked(fresh_db, IMPACT_NOW) as su:
        su.execute(CATALOGUE)
        t0 = time.perf_counter()
        bulk_tenants(su, n)
        print(f"\nbulk load of {n} tenants and {2 * n - n // 20 + n // 100} usage rows: {time.perf_counter() - t0:.2f} s")
        # Addons and overrides on a few, as the decision counts them.
        su.execute("SELECT flux_attach_addon('c17', 'pack', 1)")   # seats 17, limit 5 + 5
        su.execute("SELECT flux_attach_addon('c19', 'pack', 3)")   # seats 19, limit 5 + 15: under
        su.execute("SELECT flux_override('c18', 'seats', \"limit\" => 100)")  # under
        su.execute("SELECT flux_override('c38', 'seats', \"limit\" => 2)")    # 18 - 2
        su.execute("SELECT flux_override('c39', 'seats', enabled => false)")  # not entitled: none
        su.execute("SELECT flux_override('c58', 'api', \"limit\" => 5)")      # (58 * 7) % 1500 - 5
        extra = {"c17": ("add", 5), "c19": ("add", 15), "c18": ("set", 100), "c38": ("set", 2), "c39": ("set", None)}

        def seat_limit(t, new):
            kind, v = extra.get(t, ("add", 0))
            return new + v if kind == "add" else v

        t0 = time.perf_counter()
        seats = su.execute("SELECT tenant, used, over_by FROM flux_plan_impact('pro', 'seats', 5)").fetchall()
        took = time.perf_counter() - t0
        print(f"flux_plan_impact('pro', 'seats', 5) over {n} tenants: {took:.3f} s, {len(seats)} rows")
        want = expected_impact(n, 5, lambda i: i % 20, seat_limit)
        assert len(want) == 69_997, len(want)
        assert seats == want
        t0 = time.perf_counter()
        api = su.execute("SELECT tenant, used, over_by FROM flux_plan_impact('pro', 'api', 800)").fetchall()
        took = time.perf_counter() - t0
        print(f"flux_plan_impact('pro', 'api', 800) over {n} tenants: {took:.3f} s, {len(api)} rows")
        api_want = expected_impact(n, 800, lambda i: (i * 7) % 1500,
                                   lambda t, new: 5 if t == "c58" else new)
        assert api == api_want
        assert ("c58", 406, 401) in api

        # Grant the new limits; the decisions must agree for a sample.
        rng = random.Random(20261202)
        sample = sorted({f"c{i}" for i in rng.sample(range(1, n + 1), 300)}
                        | {"c17", "c18", "c19", "c38", "c39", "c58", "c5001", "c5002", "c5003", "c5004", "c10003"})
        su.execute("SELECT flux_grant('pro', 'seats', 5)")
        su.execute("SELECT flux_grant('pro', 'api', 800, 'month')")
        for feature, rows in (("seats", seats), ("api", api)):
            impact = {r[0]: r for r in rows}
            got = su.execute("SELECT t, d.allowed, d.reason, d.plan, d.\"limit\", d.used "
                             "FROM unnest(%s::text[]) t, flux_decide(t, %s) d ORDER BY t", (sample, feature)).fetchall()
            wrong = []
            for t, allowed, reason, plan, limit, used in got:
                entitled = allowed or reason == "limit_reached"
                if t in impact:
                    _, i_used, over_by = impact[t]
                    if not (entitled and plan == "pro" and used == i_used and limit == i_used - over_by):
                        wrong.append((t, allowed, reason, plan, limit, used, impact[t]))
                elif plan == "pro" and entitled and limit is not None and used is not None and used > limit:
                    wrong.append((t, allowed, reason, plan, limit, used, "missing from impact"))
            assert not wrong, f"{feature}: {wrong[:5]}"
            in_sample = [t for t in sample if t in impact]
            assert len(in_sample) > 50, feature


# ---------------------------------------------------------------------------
# 4. flux_preview against the decision after moving


PREVIEW_NOW = "2026-12-15 12:00+00"


def preview(c, tenant, plan):
    return {r[0]: r[1:] for r in c.execute(
        "SELECT feature, allowed_now, allowed_after, limit_now, limit_after, used, over_by FROM flux_preview(%s, %s)",
        (tenant, plan))}


def decisions(c, tenant):
    """{feature: (entitled, limit, used, kind)}, entitled = allowed or only
    over its limit."""
    return {r[0]: ((r[1] or r[2] == "limit_reached"), r[3] if (r[1] or r[2] == "limit_reached") else None, r[4], r[5])
            for r in c.execute("SELECT feature, allowed, reason, \"limit\", used, kind FROM flux_entitlements(%s)",
                               (tenant,))}


def test_preview_agrees_with_the_decision_after_moving(fresh_db):
    with clocked(fresh_db, PREVIEW_NOW) as su:
        su.execute(CATALOGUE)
        su.execute("SELECT flux_define_feature('projects', 'limit')")
        su.execute("SELECT flux_grant('pro', 'projects', 5)")
        su.execute("SELECT flux_grant('starter', 'projects', 2)")
        # Two identical tenants on team: one moved by flux_subscribe, one by
        # flux_move_tenants (alone on its plan), a third by a scheduled change.
        su.execute("SELECT flux_copy_plan('team', 'team_a')")
        su.execute("SELECT flux_copy_plan('team', 'team_b')")
        su.execute("SELECT flux_copy_plan('team', 'team_c')")
        for t, p in (("acme", "team_a"), ("globex", "team_b"), ("initech", "team_c")):
            su.execute("SELECT flux_subscribe(%s, %s, current_period_start => '2026-12-01', current_period_end => '2027-01-01')",
                       (t, p))
            su.execute("SELECT flux_attach_addon(%s, 'pack', 2)", (t,))          # seats + 10
            su.execute("SELECT flux_override(%s, 'projects', \"limit\" => 4)", (t,))  # whatever the plan
            su.execute("SELECT flux_override(%s, 'sso', enabled => false)", (t,))
            assert one(su, "SELECT used FROM flux_consume(%s, 'seats', 15)", (t,)) == 15
            assert one(su, "SELECT used FROM flux_consume(%s, 'api', 300)", (t,)) == 300
            assert one(su, "SELECT used FROM flux_consume(%s, 'projects', 3)", (t,)) == 3
        mismatches = []
        for target in ("starter", "pro", "free", "team"):
            old = {t: one(su, "SELECT plan FROM flux.tenants WHERE id = %s", (t,)) for t in ("acme", "globex", "initech")}
            now = decisions(su, "acme")
            pv = {t: preview(su, t, target) for t in ("acme", "globex", "initech")}
            assert pv["acme"] == pv["globex"] == pv["initech"], target
            p = pv["acme"]
            assert set(p) == set(now) == {"api", "export", "projects", "seats", "sso"}
            for f, (a_now, _, l_now, _, _, _) in p.items():
                if (a_now, l_now) != now[f][:2]:
                    mismatches.append((target, f, "now", (a_now, l_now), now[f][:2]))
            # Move for real, three ways.
            su.execute("SELECT flux_subscribe('acme', %s, current_period_start => '2026-12-01', current_period_end => '2027-01-01')",
                       (target,))
            assert one(su, "SELECT flux_move_tenants(%s, %s)", (old["globex"], target)) == 1
            su.execute("SELECT flux_schedule_change('initech', %s, '2026-12-15 13:00+00')", (target,))
            after = {"acme": decisions(su, "acme"), "globex": decisions(su, "globex")}
            set_clock(su, "2026-12-15 13:00+00")
            after["initech"] = decisions(su, "initech")
            set_clock(su, PREVIEW_NOW)
            for t, d in after.items():
                for f, (_, a_after, _, l_after, used, over_by) in p.items():
                    entitled, limit, d_used, kind = d[f]
                    if (a_after, l_after) != (entitled, limit):
                        mismatches.append((target, t, f, "allowed/limit", (a_after, l_after), (entitled, limit)))
                    if kind in ("limit", "metered") and entitled:
                        want_over = max(0, d_used - limit) if limit is not None else 0
                        if (used, over_by) != (d_used, want_over):
                            mismatches.append((target, t, f, "used/over_by", (used, over_by), (d_used, want_over)))
                    elif kind in ("limit", "metered") and over_by != used:
                        # Not included after: all of what it uses is over.
                        mismatches.append((target, t, f, "over_by (not included)", (used, over_by)))
            # Back where they were for the next plan (initech: fold it, then back).
            su.execute("SELECT flux_subscribe('acme', %s, current_period_start => '2026-12-01', current_period_end => '2027-01-01')",
                       (old["acme"],))
            su.execute("SELECT flux_subscribe('globex', %s, current_period_start => '2026-12-01', current_period_end => '2027-01-01')",
                       (old["globex"],))
            su.execute("SELECT flux_cancel_scheduled_change('initech')")
        assert not mismatches, mismatches
        # The figures for the downgrade to starter, exactly.
        assert preview(su, "acme", "starter") == {
            "api": (True, True, 10000, 100, 300, 200),
            "export": (True, False, None, None, None, None),
            "projects": (True, True, 4, 4, 3, 0),
            "seats": (True, True, 60, 13, 15, 2),
            "sso": (False, False, None, None, None, None),
        }


def test_preview_of_a_plan_counting_another_period_agrees_with_the_decision(fresh_db):
    """calls: 1,000 a month on team, 50 a day on starter. 300 used this
    month, all on 2026-12-14: on 2026-12-15 starter's counter (the day's)
    is 0, so after the move the tenant is 0 of 50, not 250 over."""
    with clocked(fresh_db, "2026-12-14 12:00+00") as su:
        su.execute(CATALOGUE)
        su.execute("SELECT flux_define_feature('calls', 'metered')")
        su.execute("SELECT flux_grant('team', 'calls', 1000, 'month')")
        su.execute("SELECT flux_grant('starter', 'calls', 50, 'day')")
        su.execute("SELECT flux_subscribe('acme', 'team')")
        assert one(su, "SELECT used FROM flux_consume('acme', 'calls', 300)") == 300
        set_clock(su, PREVIEW_NOW)
        p = preview(su, "acme", "starter")["calls"]
        su.execute("SELECT flux_subscribe('acme', 'starter')")
        d = decision(su, "acme", "calls", "allowed, \"limit\", used")
        assert d == (True, 50, 0)
        assert p == (True, True, 1000, 50, d[2], 0), p


# ---------------------------------------------------------------------------
# 5. Concurrency


def test_a_committed_schedule_is_seen_by_the_next_transaction(fresh_db):
    with clocked(fresh_db, "2026-12-10 00:00+00") as su:
        su.execute(CATALOGUE)
        su.execute("SELECT flux_subscribe('acme', 'pro')")
    with clocked(fresh_db, "2026-12-10 00:00+00", autocommit=False) as a, \
            clocked(fresh_db, "2026-12-20 00:00+00", autocommit=False) as b:
        a.commit()
        b.commit()
        warm(b, "acme", 5)
        assert decision(b, "acme", "export", "allowed, plan") == (True, "pro")
        b.commit()
        a.execute("SELECT flux_schedule_change('acme', 'starter', '2026-12-15 00:00+00')")
        # Not committed: b sees pro, in a new transaction too.
        assert decision(b, "acme", "export", "allowed, plan") == (True, "pro")
        b.commit()
        assert decision(b, "acme", "export", "allowed, plan") == (True, "pro")
        a.commit()
        # b's transaction, open since before the commit (read committed), sees
        # it on its next statement (as test_cache.py's remembered answers);
        # its next transaction certainly.
        assert decision(b, "acme", "export", "allowed, plan") == (False, "starter")
        b.commit()
        assert decision(b, "acme", "export", "allowed, plan") == (False, "starter")
        assert one(b, "SELECT flux_check('acme', 'export')") is False
        b.commit()
        # Cancel it: b follows back.
        set_clock(a, "2026-12-11 00:00+00")
        assert one(a, "SELECT flux_cancel_scheduled_change('acme')") is True
        a.commit()
        assert decision(b, "acme", "export", "allowed, plan") == (True, "pro")
        b.commit()


def _tenant_audit(c, tenant, mark):
    return c.execute("SELECT old ->> 'plan', new ->> 'plan' FROM flux.audit_log "
                     "WHERE id > %s AND entity = 'tenants' AND key = %s ORDER BY id", (mark, tenant)).fetchall()


@pytest.mark.parametrize("first", ["move", "subscribe"])
def test_move_tenants_racing_a_subscribe_loses_neither(fresh_db, first):
    """first = move: the move holds the row, the subscribe waits and then
    applies on top (final: the subscribe's plan; the audit log has both
    changes of t5). first = subscribe: the subscribe holds t5, the move
    waits, re-checks t5 (no longer on pro) and leaves it (final: team; the
    move moved the other 9)."""
    with clocked(fresh_db, "2026-12-10 00:00+00") as su:
        su.execute(CATALOGUE)
        su.execute("SELECT flux_subscribe('t' || i, 'pro') FROM generate_series(1, 10) i")
        mark = audit_mark(su)
    with clocked(fresh_db, "2026-12-10 00:00+00", autocommit=False) as a, \
            clocked(fresh_db, "2026-12-10 00:00+00", autocommit=False) as b, connect(fresh_db) as watch:
        move = "SELECT flux_move_tenants('pro', 'starter')"
        sub = "SELECT flux_subscribe('t5', 'team')"
        holder, waiter = (a, b)
        first_sql, second_sql = (move, sub) if first == "move" else (sub, move)
        holder.execute(first_sql)
        pid = one(waiter, "SELECT pg_backend_pid()")

        def second():
            r = waiter.execute(second_sql).fetchone()[0]
            waiter.commit()
            return r

        th, out = in_thread(second)
        wait_blocked(watch, pid)
        holder.commit()
        th.join(20)
        assert not th.is_alive() and "error" not in out, out
        with connect(fresh_db) as c:
            plans = dict(c.execute("SELECT id, plan FROM flux.tenants").fetchall())
            if first == "move":
                assert plans.pop("t5") == "team"
                assert set(plans.values()) == {"starter"}
                assert _tenant_audit(c, "t5", mark) == [("pro", "starter"), ("starter", "team")]
                assert tenant_updates_since(c, mark) == 11
            else:
                assert out["value"] == 9
                assert plans.pop("t5") == "team"
                assert set(plans.values()) == {"starter"}
                assert _tenant_audit(c, "t5", mark) == [("pro", "team")]
                assert tenant_updates_since(c, mark) == 10
            assert decision(c, "t5", "sso", "allowed, plan") == (True, "team")
            assert decision(c, "t4", "seats", "plan, \"limit\"") == ("starter", 3)


def test_schedule_change_racing_a_subscribe_keeps_the_subscribed_plan(fresh_db):
    """flux_schedule_change blocked on a subscribe's row lock: after the
    subscribe commits, the schedule must not write back the plan it read
    before (team is the plan, the change to starter is pending on top)."""
    with clocked(fresh_db, "2026-12-10 00:00+00") as su:
        su.execute(CATALOGUE)
        su.execute("SELECT flux_subscribe('acme', 'pro')")
        mark = audit_mark(su)
    with clocked(fresh_db, "2026-12-10 00:00+00", autocommit=False) as a, \
            clocked(fresh_db, "2026-12-10 00:00+00", autocommit=False) as b, connect(fresh_db) as watch:
        a.execute("SELECT flux_subscribe('acme', 'team')")
        pid = one(b, "SELECT pg_backend_pid()")

        def schedule():
            r = one(b, "SELECT flux_schedule_change('acme', 'starter', '2027-01-01 00:00+00')")
            b.commit()
            return r

        th, out = in_thread(schedule)
        wait_blocked(watch, pid)
        a.commit()
        th.join(20)
        assert not th.is_alive() and "error" not in out, out
        with connect(fresh_db) as c:
            row = c.execute("SELECT plan, scheduled_plan, scheduled_at FROM flux.tenants WHERE id = 'acme'").fetchone()
            audit = _tenant_audit(c, "acme", mark)
            assert row == ("team", "starter", datetime.datetime(2027, 1, 1, tzinfo=UTC)), (row, audit)


# ---------------------------------------------------------------------------
# 6. pg_dump / pg_restore


def test_dump_and_restore_keep_scheduled_changes_and_listed(fresh_db):
    with clocked(fresh_db, "2026-12-10 00:00+00") as su:
        su.execute(CATALOGUE)
        su.execute("SELECT flux_copy_plan('pro', 'pro_2026', 'Pro (2026)')")
        su.execute("SELECT flux_subscribe('acme', 'pro', current_period_end => '2027-01-01 00:00+00')")
        su.execute("SELECT flux_subscribe('globex', 'pro_2026')")
        su.execute("SELECT flux_subscribe('initech', 'starter')")
        su.execute("SELECT flux_schedule_change('acme', 'starter')")
        su.execute("SELECT flux_schedule_change('globex', 'team', '2027-02-01 12:30+00')")
        tenants = su.execute("SELECT id, plan, scheduled_plan, scheduled_at FROM flux.tenants ORDER BY 1").fetchall()
        plans = su.execute("SELECT key, name, rank, listed FROM flux.plans ORDER BY 1").fetchall()
        pricing = one(su, "SELECT flux_pricing_table()")
        assert [p["key"] for p in pricing["plans"]] == ["free", "starter", "pro", "team"]
        assert ("pro_2026", "Pro (2026)", 2, False) in plans

    def check(target):
        with clocked(target, "2026-12-10 00:00+00") as c:
            assert c.execute("SELECT id, plan, scheduled_plan, scheduled_at FROM flux.tenants ORDER BY 1").fetchall() == tenants
            assert c.execute("SELECT key, name, rank, listed FROM flux.plans ORDER BY 1").fetchall() == plans
            assert one(c, "SELECT flux_pricing_table()") == pricing
            assert decision(c, "acme", "export", "allowed, plan") == (True, "pro")
            assert decision(c, "initech", "export", "upgrade_plans") == (["pro", "team"],)
            set_clock(c, "2027-01-01 00:00+00")
            assert decision(c, "acme", "export", "allowed, reason, plan") == (False, "not_in_plan", "starter")
            assert decision(c, "globex", "sso", "allowed, plan") == (False, "pro_2026")
            set_clock(c, "2027-02-01 12:30+00")
            assert decision(c, "globex", "sso", "allowed, plan") == (True, "team")
            # Still a change to come after the restore: cancellable before it.
            set_clock(c, "2027-01-15 00:00+00")
            assert one(c, "SELECT flux_cancel_scheduled_change('globex')") is True
            set_clock(c, "2027-02-01 12:30+00")
            assert decision(c, "globex", "sso", "allowed, plan") == (False, "pro_2026")

    dump_and_restore(fresh_db, check)


# ---------------------------------------------------------------------------
# 7. An unprivileged role


@pytest.fixture
def roles(fresh_db):
    r = Roles(fresh_db, "prc")
    yield r
    r.cleanup()


def test_a_plain_role_gets_its_pricing_table_and_own_preview_only(fresh_db, roles):
    with connect(fresh_db) as su:
        su.execute(CATALOGUE)
        su.execute("SELECT flux_copy_plan('pro', 'pro_2026', 'Pro (2026)')")
        su.execute("SELECT flux_subscribe('acme', 'pro')")
        su.execute("SELECT flux_subscribe('globex', 'pro')")
        su.execute("SELECT flux_consume('acme', 'seats', 4)")
        su.execute("SELECT flux_schedule_change('globex', 'starter', now() + interval '30 days')")
        want_preview = preview(su, "acme", "starter")
        want_pricing = one(su, "SELECT flux_pricing_table()")
        tenants_before = su.execute("SELECT id, plan, scheduled_plan, scheduled_at FROM flux.tenants ORDER BY 1").fetchall()
        plans_before = su.execute("SELECT key FROM flux.plans ORDER BY 1").fetchall()
    app = roles.make("app")
    ops = roles.make("ops", member_of=["flux_admin"])
    with login(fresh_db, app) as c:
        for q in ("SELECT flux_schedule_change('acme', 'team')",
                  "SELECT flux_schedule_change('acme', 'team', now() + interval '1 day')",
                  "SELECT flux_cancel_scheduled_change('globex')",
                  "SELECT * FROM flux_plan_impact('pro', 'seats', 1)",
                  "SELECT flux_copy_plan('pro', 'mine')",
                  "SELECT flux_move_tenants('pro', 'team')",
                  "SELECT flux_move_tenants('pro', 'team', now() + interval '1 day')",
                  "SELECT * FROM flux.plan_matrix",
                  "SELECT count(*) FROM flux.plan_matrix"):
            assert sqlstate_of(c, q) == "42501", q
        # The pricing table: listed plans only, the same as the admin's.
        got = one(c, "SELECT flux_pricing_table()")
        assert got == want_pricing
        assert [p["key"] for p in got["plans"]] == ["free", "starter", "pro", "team"]
        assert "pro_2026" not in str(got)
        assert [a["key"] for a in got["addons"]] == ["pack"]
        # No current tenant: no preview of anyone's.
        assert sqlstate_of(c, "SELECT * FROM flux_preview('acme', 'starter')") == "42501"
        c.execute("SET flux.tenant = 'acme'")
        assert preview(c, "acme", "starter") == want_preview
        assert want_preview["seats"] == (True, True, 10, 3, 4, 1)
        with pytest.raises(psycopg.Error) as e:
            c.execute("SELECT * FROM flux_preview('globex', 'starter')")
        assert e.value.sqlstate == "42501"
        assert "globex" in str(e.value), str(e.value)
        assert sqlstate_of(c, "SELECT flux_schedule_change('acme', 'team')") == "42501"
        # Nor the other tenant's decision (its scheduled change).
        assert sqlstate_of(c, "SELECT flux_decide('globex', 'seats')") == "42501"
    with connect(fresh_db) as su:
        assert su.execute("SELECT id, plan, scheduled_plan, scheduled_at FROM flux.tenants ORDER BY 1").fetchall() == tenants_before
        assert su.execute("SELECT key FROM flux.plans ORDER BY 1").fetchall() == plans_before
    # flux_admin may do all of it (the refusals above are of privilege).
    with login(fresh_db, ops) as c:
        assert one(c, "SELECT count(*) FROM flux.plan_matrix WHERE plan = 'pro_2026' AND NOT listed") == 4
        assert c.execute("SELECT * FROM flux_plan_impact('pro', 'seats', 1)").fetchall() == [("acme", 4, 3)]
        assert one(c, "SELECT flux_cancel_scheduled_change('globex')") is True
        assert one(c, "SELECT flux_schedule_change('acme', 'team', now() + interval '1 day')") is not None
        c.execute("SELECT flux_copy_plan('pro', 'mine')")
        assert one(c, "SELECT flux_move_tenants('pro', 'mine')") == 2
