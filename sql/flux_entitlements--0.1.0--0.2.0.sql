-- flux_entitlements 0.1.0 -> 0.2.0: the security model of release 0.2
-- (../shared/CONTRACT.md, "Security model"): the role flux_owner owns
-- everything and nothing runs as the superuser who installed 0.1.0; internal
-- functions are no longer PUBLIC; flux.now and flux.actor are superuser-only
-- (and flux_admin's); every SQL body is schema-qualified under a pinned
-- search_path; flux_enforce_limit's trigger is Rust and locks rows of
-- flux.limit_locks instead of advisory locks; flux_value is made in Rust;
-- audit_log records the real role; the decision cache is invalidated per
-- tenant, by row-level triggers that also fire on a logical subscriber.
\echo Use "ALTER EXTENSION flux_entitlements UPDATE TO '0.2.0'" to load this file. \quit
-- The roles: created when missing, never dropped (other objects may depend
-- on them after the extension is gone).
--   flux_admin    the people who run pricing: admin functions, DML on the tables;
--   flux_service  trusted application backends: may act for any tenant
--                 (everyone else only for its current tenant);
--   flux_owner    owns schema flux, its tables and functions; flux runs with
--                 its rights where it must (src/privilege.rs). NOLOGIN, not a
--                 superuser, and nobody should be made a member of it.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['flux_admin', 'flux_service', 'flux_owner'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) r) THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$$;
COMMENT ON ROLE flux_service IS 'flux_entitlements: grant to trusted application backends that act for any tenant (flux_consume(tenant, ...) for a tenant other than flux_current_tenant())';
COMMENT ON ROLE flux_owner IS 'flux_entitlements: owns schema flux and runs flux''s table access; NOLOGIN, never a superuser, no members';

-- The clock, the grace period and the audit log's actor are not the
-- caller's to move: the settings are superuser-only (PGC_SUSET), and
-- flux_admin may set them.
GRANT SET ON PARAMETER flux.now, flux.actor, flux.default_grace_period TO flux_admin;

-- The row locks flux_enforce_limit's trigger queues on, one per (table,
-- feature, tenant): a table only flux_owner can touch, so no other role can
-- hold a tenant's insert lock (an advisory lock's key is visible to every
-- role in pg_locks). No user data: not dumped.
CREATE TABLE flux.limit_locks (
    tbl     pg_catalog.oid NOT NULL,
    feature pg_catalog.text NOT NULL,
    tenant  pg_catalog.text NOT NULL,
    PRIMARY KEY (tbl, feature, tenant)
);
COMMENT ON TABLE flux.limit_locks IS 'Internal: the row each flux_enforce_limit check locks for (table, feature, tenant) while it counts; no user data';

-- The audit log records the real role beside actor (added last: a fresh
-- install puts it last too).
ALTER TABLE flux.audit_log ADD COLUMN role text;
COMMENT ON COLUMN flux.audit_log.actor IS 'The setting flux.actor when set (e.g. a Stripe event id), else the role that made the change (current_user); only superusers and members of flux_admin can set flux.actor';
COMMENT ON COLUMN flux.audit_log.role IS 'The role that made the change (current_user at the time, which flux.actor cannot change)';

-- Credits (CONTRACT.md, "Credits and holds"): kind credits, and a feature's
-- price in a pool (before the features trigger below reads them).
ALTER TABLE flux.features DROP CONSTRAINT features_kind_check,
    ADD CONSTRAINT features_kind_check CHECK (kind IN ('boolean', 'limit', 'metered', 'rate', 'credits')),
    ADD COLUMN cost_pool text REFERENCES flux.features (key) ON UPDATE CASCADE,
    ADD COLUMN cost_credits bigint CONSTRAINT features_cost_credits_check CHECK (cost_credits > 0),
    ADD CONSTRAINT features_cost_check CHECK ((cost_pool IS NULL) = (cost_credits IS NULL));
COMMENT ON COLUMN flux.features.kind IS 'boolean (on/off), limit (non-resetting allowance such as seats), metered (quota that resets each period), rate (calls per sliding window) or credits (a pool other features draw from)';
COMMENT ON COLUMN flux.features.cost_pool IS 'The credits pool each unit of this feature draws from (flux_set_cost); NULL: not priced';
COMMENT ON COLUMN flux.features.cost_credits IS 'Credits one unit of this feature draws from cost_pool';
CREATE FUNCTION flux."_check_cost"(
	"key" TEXT,
	"kind" TEXT,
	"cost_pool" TEXT,
	"cost_credits" bigint
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_check_cost_wrapper';

-- The validation triggers: a pinned search_path, qualified names, and a
-- refusal to run on any table but their own.
CREATE OR REPLACE FUNCTION flux._features_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.features'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._features_validate()', 'flux.features', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_feature(NEW.key, NEW.kind, CASE WHEN TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN OLD.key END);
    PERFORM flux._check_cost(NEW.key, NEW.kind, NEW.cost_pool, NEW.cost_credits);
    RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION flux._plans_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.plans'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._plans_validate()', 'flux.plans', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_plan(NEW.key, NEW.is_default, NEW.grace_period, CASE WHEN TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN OLD.key END);
    RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION flux._plans_guard_delete() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.plans'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._plans_guard_delete()', 'flux.plans', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_plan_unused(OLD.key);
    RETURN OLD;
END $$;
CREATE OR REPLACE FUNCTION flux._grants_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.grants'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._grants_validate()', 'flux.grants', TG_RELID::pg_catalog.regclass);
    END IF;
    NEW.period := flux._check_grant(NEW.plan, NEW.feature, NEW."limit", NEW.period);
    RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION flux._tenants_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.tenants'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._tenants_validate()', 'flux.tenants', TG_RELID::pg_catalog.regclass);
    END IF;
    -- past_due_since follows the status: set from the clock when it becomes
    -- past_due (unless this statement sets it), cleared when it leaves.
    IF NEW.status OPERATOR(pg_catalog.=) 'past_due' THEN
        IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
            NEW.past_due_since := coalesce(NEW.past_due_since, flux._clock());
        -- The status becomes past_due and past_due_since is not being set
        -- (IS [NOT] DISTINCT FROM spelled out with the qualified =).
        ELSIF (OLD.status OPERATOR(pg_catalog.=) 'past_due') IS NOT TRUE
              AND coalesce(NEW.past_due_since OPERATOR(pg_catalog.=) OLD.past_due_since,
                           NEW.past_due_since IS NULL AND OLD.past_due_since IS NULL) THEN
            NEW.past_due_since := flux._clock();
        ELSIF NEW.past_due_since IS NULL THEN
            NEW.past_due_since := flux._clock();
        END IF;
    ELSE
        NEW.past_due_since := NULL;
        NEW.grace_until := NULL;
    END IF;
    PERFORM flux._check_tenant(NEW.id, NEW.plan, NEW.status, NEW.trial_ends_at,
                               NEW.current_period_start, NEW.current_period_end,
                               CASE WHEN TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN OLD.id END);
    RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION flux._addons_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.addons'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._addons_validate()', 'flux.addons', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_addon(NEW.key);
    RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION flux._addons_guard_delete() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.addons'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._addons_guard_delete()', 'flux.addons', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_addon_unused(OLD.key);
    RETURN OLD;
END $$;
CREATE OR REPLACE FUNCTION flux._addon_grants_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.addon_grants'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._addon_grants_validate()', 'flux.addon_grants', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_addon_grant(NEW.addon, NEW.feature, NEW."limit");
    RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION flux._tenant_addons_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.tenant_addons'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._tenant_addons_validate()', 'flux.tenant_addons', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_tenant_addon(NEW.tenant, NEW.addon, NEW.quantity);
    RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION flux._overrides_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.overrides'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._overrides_validate()', 'flux.overrides', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_override(NEW.tenant, NEW.feature, NEW."limit", NEW.starts_at, NEW.expires_at);
    RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION flux._flags_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.flags'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._flags_validate()', 'flux.flags', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_flag(NEW.feature, NEW.rollout_percent, NEW.salt);
    RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION flux._flag_lists_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.flag_lists'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._flag_lists_validate()', 'flux.flag_lists', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_flag_list(NEW.feature, NEW.id, NEW.list);
    RETURN NEW;
END $$;
COMMENT ON FUNCTION flux._features_validate() IS 'Trigger: validates a feature row (flux._check_feature)';
COMMENT ON FUNCTION flux._plans_validate() IS 'Trigger: validates a plan row (flux._check_plan)';
COMMENT ON FUNCTION flux._plans_guard_delete() IS 'Trigger: refuses to delete a plan that tenants are on';
COMMENT ON FUNCTION flux._grants_validate() IS 'Trigger: validates a grant and normalises its period (flux._check_grant)';
COMMENT ON FUNCTION flux._tenants_validate() IS 'Trigger: keeps past_due_since in step with status and validates the subscription (flux._check_tenant)';
COMMENT ON FUNCTION flux._addons_validate() IS 'Trigger: validates an addon row';
COMMENT ON FUNCTION flux._addons_guard_delete() IS 'Trigger: refuses to delete an addon that tenants hold';
COMMENT ON FUNCTION flux._addon_grants_validate() IS 'Trigger: validates an addon grant';
COMMENT ON FUNCTION flux._tenant_addons_validate() IS 'Trigger: validates a tenant''s addon quantity';
COMMENT ON FUNCTION flux._overrides_validate() IS 'Trigger: validates an override';
COMMENT ON FUNCTION flux._flags_validate() IS 'Trigger: validates a flag (flux._check_flag)';
COMMENT ON FUNCTION flux._flag_lists_validate() IS 'Trigger: validates an allow / deny list entry';

-- flux_enforce_limit's trigger is now Rust (src/row_limits.rs); the triggers
-- already made keep pointing at it. The function it called is gone.
CREATE OR REPLACE FUNCTION flux._enforce_limit() RETURNS trigger LANGUAGE c
AS 'MODULE_PATHNAME', '_enforce_limit_wrapper';
-- Internal functions 0.1.0 left PUBLIC could be used by anyone's views or
-- functions; such objects must not keep a database on 0.1.0 (any role could
-- block the upgrade that closes its holes), so they go with the function,
-- named in a NOTICE.
DO $$
DECLARE
    f pg_catalog.regprocedure;
    dep text;
BEGIN
    FOREACH f IN ARRAY ARRAY['flux._check_row_limit(oid, text, text, text)'::pg_catalog.regprocedure,
                             'flux._value(text, text)'::pg_catalog.regprocedure] LOOP
        FOR dep IN SELECT pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid)
                     FROM pg_catalog.pg_depend d
                    WHERE d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
                      AND d.refobjid OPERATOR(pg_catalog.=) f::pg_catalog.oid
                      AND d.deptype OPERATOR(pg_catalog.=) 'n' LOOP
            RAISE NOTICE 'dropping %, which depends on %, an internal function of flux_entitlements 0.1.0', dep, f;
        END LOOP;
        EXECUTE pg_catalog.format('DROP FUNCTION %s CASCADE', f);
    END LOOP;
END
$$;

-- flux_value makes its jsonb in Rust: no internal body to keep PUBLIC.
-- flux_value's result is made by jsonb_in from the stored text (src/reads.rs).
CREATE OR REPLACE FUNCTION flux_value(tenant text, feature text)
RETURNS jsonb LANGUAGE c STABLE STRICT PARALLEL SAFE
AS 'MODULE_PATHNAME', 'flux_value_wrapper';

-- The SQL wrappers, qualified. flux_grant takes subject_limit (Callers,
-- below): made again with its body, which takes it too.
DROP FUNCTION flux_grant(text, text, bigint, text, jsonb);
DROP FUNCTION flux._grant(text, text, bigint, text, text);
CREATE FUNCTION flux."_grant"(
	"plan" TEXT,
	"feature" TEXT,
	"limit" bigint,
	"period" TEXT,
	"value" TEXT,
	"subject_limit" bigint
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_grant_v2_wrapper';
CREATE FUNCTION flux_grant(plan text, feature text, "limit" bigint DEFAULT NULL, period text DEFAULT NULL,
                           value jsonb DEFAULT NULL, subject_limit bigint DEFAULT NULL)
RETURNS void LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$ SELECT flux._grant(plan, feature, "limit", period, value::pg_catalog.text, subject_limit) $$;
REVOKE EXECUTE ON FUNCTION flux_grant(text, text, bigint, text, jsonb, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flux_grant(text, text, bigint, text, jsonb, bigint),
    flux._grant(text, text, bigint, text, text, bigint) TO flux_admin;
COMMENT ON FUNCTION flux._grant(text, text, bigint, text, text, bigint) IS 'The body of flux_grant (value as jsonb text)';
CREATE OR REPLACE FUNCTION flux_override(tenant text, feature text, enabled boolean DEFAULT true, "limit" bigint DEFAULT NULL,
                              starts_at timestamptz DEFAULT NULL, expires_at timestamptz DEFAULT NULL,
                              reason text DEFAULT NULL, value jsonb DEFAULT NULL)
RETURNS void LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$ SELECT flux._override(tenant, feature, enabled, "limit", starts_at, expires_at, reason, value::pg_catalog.text) $$;
CREATE OR REPLACE FUNCTION flux_grant_addon(addon text, feature text, "limit" bigint DEFAULT NULL, value jsonb DEFAULT NULL)
RETURNS void LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$ SELECT flux._grant_addon(addon, feature, "limit", value::pg_catalog.text) $$;
CREATE OR REPLACE FUNCTION flux_apply_stripe_event(event jsonb)
RETURNS text LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$ SELECT flux._apply_stripe_event(event::pg_catalog.text) $$;
CREATE OR REPLACE FUNCTION flux_history(tenant text, since timestamptz DEFAULT NULL)
RETURNS SETOF flux.audit_log LANGUAGE sql STABLE
AS $$ SELECT * FROM flux.audit_log a
       WHERE a.tenant OPERATOR(pg_catalog.=) $1 AND ($2 IS NULL OR a.at OPERATOR(pg_catalog.>=) $2)
       ORDER BY a.id $$;
CREATE OR REPLACE FUNCTION flux_enforce_limit(tbl regclass, feature text, tenant_column name DEFAULT 'tenant_id')
RETURNS void LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$ SELECT flux._enforce_limit_setup(tbl::pg_catalog.oid, feature, tenant_column::pg_catalog.text) $$;
CREATE OR REPLACE FUNCTION flux_protect(tbl regclass, feature text, tenant_column name DEFAULT 'tenant_id',
                             force boolean DEFAULT false)
RETURNS void LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$ SELECT flux._protect_setup(tbl::pg_catalog.oid, feature, tenant_column::pg_catalog.text, force) $$;

-- The decision cache forgets only what changed (src/cache/invalidation.rs):
-- row-level triggers, enabled ALWAYS so that a logical replication
-- subscriber's apply worker fires them; a tenant's row invalidates its
-- tenant's bucket, a catalogue row its table; TRUNCATE forgets everything.
CREATE FUNCTION flux._tenant_invalidate() RETURNS trigger LANGUAGE c
AS 'MODULE_PATHNAME', '_tenant_invalidate_wrapper';
CREATE FUNCTION flux._cache_stats() RETURNS TABLE (catalogue_loads bigint, tenant_loads bigint,
    tenants_cached integer, full_forgets bigint)
VOLATILE PARALLEL UNSAFE STRICT LANGUAGE c AS 'MODULE_PATHNAME', '_cache_stats_wrapper';
DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['features', 'plans', 'grants', 'tenants', 'addons', 'addon_grants',
                             'tenant_addons', 'overrides', 'flags', 'flag_lists'] LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER cache_invalidate ON flux.%I', t);
    END LOOP;
    FOREACH t IN ARRAY ARRAY['features', 'plans', 'grants', 'addons', 'addon_grants',
                             'flags', 'flag_lists'] LOOP
        EXECUTE pg_catalog.format('CREATE TRIGGER cache_invalidate AFTER INSERT OR UPDATE OR DELETE ON flux.%I '
                       'FOR EACH ROW EXECUTE FUNCTION flux._cache_invalidate()', t);
    END LOOP;
    FOREACH t IN ARRAY ARRAY['tenants:id', 'tenant_addons:tenant', 'overrides:tenant'] LOOP
        EXECUTE pg_catalog.format('CREATE TRIGGER cache_invalidate AFTER INSERT OR UPDATE OR DELETE ON flux.%I '
                       'FOR EACH ROW EXECUTE FUNCTION flux._tenant_invalidate(%L)',
                       pg_catalog.split_part(t, ':', 1), pg_catalog.split_part(t, ':', 2));
    END LOOP;
    FOREACH t IN ARRAY ARRAY['features', 'plans', 'grants', 'tenants', 'addons', 'addon_grants',
                             'tenant_addons', 'overrides', 'flags', 'flag_lists'] LOOP
        EXECUTE pg_catalog.format('CREATE TRIGGER cache_invalidate_truncate AFTER TRUNCATE ON flux.%I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION flux._cache_invalidate()', t);
        EXECUTE pg_catalog.format('ALTER TABLE flux.%I ENABLE ALWAYS TRIGGER cache_invalidate, '
                       'ENABLE ALWAYS TRIGGER cache_invalidate_truncate', t);
    END LOOP;
END
$$;
COMMENT ON FUNCTION flux._tenant_invalidate() IS 'Trigger (argument: the tenant column): tells every backend''s decision cache that this row''s tenant changed (an invalidation of its bucket of tenants, delivered at commit)';
COMMENT ON FUNCTION flux._cache_stats() IS 'Internal: this backend''s decision cache counters (catalogue loads, tenant loads, tenants held, times every tenant was forgotten)';

-- Callers (CONTRACT.md, "Callers: API keys and subjects"): an API key's
-- scopes and own allowances, each subject's allowance inside its tenant's,
-- their counters, and the decision's new columns (api_key; overage,
-- balance and hold_id, NULL until their features land).
ALTER TYPE flux.decision ADD ATTRIBUTE api_key text, ADD ATTRIBUTE overage bigint,
    ADD ATTRIBUTE balance bigint, ADD ATTRIBUTE hold_id text;
COMMENT ON TYPE flux.decision IS 'A decision: allowed, a typed reason (unknown_feature, unknown_tenant, not_permitted, feature_disabled, not_in_rollout, subscription_inactive, not_in_plan, limit_reached, rate_limited, ok), a sentence to show, and the figures behind it';
COMMENT ON COLUMN flux.decision.api_key IS 'The id of the API key current in the transaction (flux_authenticate) when it is the tenant''s; its scopes and allowances applied';
COMMENT ON COLUMN flux.decision.overage IS 'Units past a soft limit this period (NULL where it does not apply)';
COMMENT ON COLUMN flux.decision.balance IS 'Credits left in the pool (NULL where it does not apply)';
COMMENT ON COLUMN flux.decision.hold_id IS 'The hold a reservation made (NULL where it does not apply)';

ALTER TABLE flux.grants ADD COLUMN subject_limit bigint CONSTRAINT grants_subject_limit_check CHECK (subject_limit >= 0);
COMMENT ON COLUMN flux.grants.subject_limit IS 'limit / metered / rate features: each subject''s (user''s) own allowance inside the tenant''s, in the same period; NULL = none';
ALTER TABLE flux.api_keys ADD COLUMN scopes text[];
COMMENT ON COLUMN flux.api_keys.scopes IS 'The feature keys this key may use (a decision for another is not_permitted); NULL = every feature';

CREATE TABLE flux.key_limits (
    key_id  text NOT NULL REFERENCES flux.api_keys (id) ON UPDATE CASCADE ON DELETE CASCADE,
    feature text NOT NULL REFERENCES flux.features (key) ON UPDATE CASCADE ON DELETE CASCADE,
    "limit" bigint NOT NULL CONSTRAINT key_limits_limit_check CHECK ("limit" >= 0),
    period  text,
    PRIMARY KEY (key_id, feature)
);
CREATE INDEX key_limits_feature ON flux.key_limits (feature);
COMMENT ON TABLE flux.key_limits IS 'API keys'' own allowances (flux_key_limit): a consume under the key must fit both this and the tenant''s';
COMMENT ON COLUMN flux.key_limits."limit" IS 'The key''s allowance of a limit, metered or rate feature';
COMMENT ON COLUMN flux.key_limits.period IS 'As for flux.grants: metered, minute..billing_period (default month); rate, the window';

CREATE TABLE flux.caller_usage (
    tenant       text NOT NULL REFERENCES flux.tenants (id) ON UPDATE CASCADE ON DELETE CASCADE,
    feature      text NOT NULL REFERENCES flux.features (key) ON UPDATE CASCADE ON DELETE CASCADE,
    period_start timestamptz NOT NULL,
    used         bigint NOT NULL DEFAULT 0 CONSTRAINT caller_usage_used_check CHECK (used >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    caller       text NOT NULL CONSTRAINT caller_usage_caller_check
                 CHECK (caller LIKE 'key:%' OR caller LIKE 'subject:%'),
    PRIMARY KEY (tenant, feature, period_start, caller)
) WITH (fillfactor = 50);
CREATE INDEX caller_usage_feature ON flux.caller_usage (feature);
COMMENT ON TABLE flux.caller_usage IS 'Recorded usage of an API key or a subject inside its tenant: one row per tenant, feature, period and caller, written with the tenant''s in one step';
COMMENT ON COLUMN flux.caller_usage.period_start IS 'As in flux.usage: the period of the key''s or the grant''s allowance; -infinity for limit features';
COMMENT ON COLUMN flux.caller_usage.caller IS 'key:<api key id> or subject:<subject id>';

CREATE TABLE flux.caller_rate_state (
    tenant  text NOT NULL REFERENCES flux.tenants (id) ON UPDATE CASCADE ON DELETE CASCADE,
    feature text NOT NULL REFERENCES flux.features (key) ON UPDATE CASCADE ON DELETE CASCADE,
    caller  text NOT NULL CONSTRAINT caller_rate_state_caller_check
            CHECK (caller LIKE 'key:%' OR caller LIKE 'subject:%'),
    tat     timestamptz NOT NULL,
    PRIMARY KEY (tenant, feature, caller)
);
COMMENT ON TABLE flux.caller_rate_state IS 'Rate limiter state (GCRA) of an API key or a subject inside its tenant';
SELECT pg_catalog.pg_extension_config_dump('flux.key_limits', '');
SELECT pg_catalog.pg_extension_config_dump('flux.caller_usage', '');
SELECT pg_catalog.pg_extension_config_dump('flux.caller_rate_state', '');
GRANT SELECT, INSERT, UPDATE, DELETE ON flux.key_limits, flux.caller_usage, flux.caller_rate_state TO flux_admin;
COMMENT ON COLUMN flux.audit_log.entity IS 'The table: features, plans, grants, tenants, addons, addon_grants, tenant_addons, overrides, flags, flag_lists, api_keys, key_limits or credit_ledger (top-ups)';

-- Counter rows are updated in place (HOT): half of each page is kept free
-- for their next versions, so a page is pruned every few dozen updates
-- instead of every other one (pruning was a quarter of a consume). Pages
-- written from now on; VACUUM FULL flux.usage applies it to the rest.
ALTER TABLE flux.usage SET (fillfactor = 50);
COMMENT ON TABLE flux.usage IS 'Recorded usage of limit and metered features: one row per tenant, feature and period, kept as billing history; the current period is one primary-key probe. Half of each page is kept free (fillfactor 50) for the next versions of its rows';

-- Their validators and triggers.
CREATE FUNCTION flux."_check_scopes"(
	"scopes" TEXT[]
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_check_scopes_wrapper';
CREATE FUNCTION flux."_check_key_limit"(
	"key_id" TEXT,
	"feature" TEXT,
	"limit" bigint,
	"period" TEXT
) RETURNS TEXT
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_check_key_limit_wrapper';
CREATE FUNCTION flux."_check_subject_limit"(
	"feature" TEXT,
	"subject_limit" bigint
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_check_subject_limit_wrapper';

CREATE OR REPLACE FUNCTION flux._grants_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.grants'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._grants_validate()', 'flux.grants', TG_RELID::pg_catalog.regclass);
    END IF;
    NEW.period := flux._check_grant(NEW.plan, NEW.feature, NEW."limit", NEW.period);
    PERFORM flux._check_subject_limit(NEW.feature, NEW.subject_limit);
    RETURN NEW;
END $$;
CREATE FUNCTION flux._api_keys_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.api_keys'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._api_keys_validate()', 'flux.api_keys', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_scopes(NEW.scopes);
    RETURN NEW;
END $$;
CREATE TRIGGER api_keys_validate BEFORE INSERT OR UPDATE OF scopes ON flux.api_keys
    FOR EACH ROW EXECUTE FUNCTION flux._api_keys_validate();
CREATE FUNCTION flux._key_limits_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.key_limits'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._key_limits_validate()', 'flux.key_limits', TG_RELID::pg_catalog.regclass);
    END IF;
    NEW.period := flux._check_key_limit(NEW.key_id, NEW.feature, NEW."limit", NEW.period);
    RETURN NEW;
END $$;
CREATE TRIGGER key_limits_validate BEFORE INSERT OR UPDATE ON flux.key_limits
    FOR EACH ROW EXECUTE FUNCTION flux._key_limits_validate();
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON flux.key_limits
    FOR EACH ROW EXECUTE FUNCTION flux._audit('key_id', 'feature');
COMMENT ON FUNCTION flux._api_keys_validate() IS 'Trigger: an API key''s scopes name defined features';
COMMENT ON FUNCTION flux._key_limits_validate() IS 'Trigger: validates an API key''s allowance (its feature''s kind and period)';
COMMENT ON FUNCTION flux._check_scopes(text[]) IS 'Validator used by the api_keys trigger: scopes name defined features';
COMMENT ON FUNCTION flux._check_key_limit(text, text, bigint, text) IS 'Validator used by the key_limits trigger; returns the period to store';
COMMENT ON FUNCTION flux._check_subject_limit(text, bigint) IS 'Validator used by the grants trigger: subject_limit only on limited kinds';

-- Functions that take a subject or scopes now: made again (a call with the
-- old arguments resolves to the new one through its defaults).
DROP FUNCTION flux_consume(text, text, bigint, text);
DROP FUNCTION flux_usage(text, text);
DROP FUNCTION flux_create_api_key(text, text, timestamptz);
DROP FUNCTION flux_release(text, text, bigint);
CREATE FUNCTION "flux_release"(
	"tenant" TEXT,
	"feature" TEXT,
	"amount" bigint DEFAULT 1,
	"subject" TEXT DEFAULT NULL
) RETURNS bigint
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_release_v2_wrapper';
COMMENT ON FUNCTION flux_release(text, text, bigint, text) IS 'Give units of a limit feature back (a seat freed); returns the tenant''s new used (never below 0); the current API key''s and the subject''s counters get them back too';
CREATE FUNCTION "flux_consume"(
	"tenant" TEXT,
	"feature" TEXT,
	"amount" bigint DEFAULT 1,
	"idempotency_key" TEXT DEFAULT NULL,
	"subject" TEXT DEFAULT NULL
) RETURNS flux.decision
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_consume_v2_wrapper';
CREATE FUNCTION "flux_create_api_key"(
	"tenant" TEXT,
	"name" TEXT,
	"expires_at" timestamp with time zone DEFAULT NULL,
	"scopes" TEXT[] DEFAULT NULL
) RETURNS TEXT
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_create_api_key_v2_wrapper';
CREATE FUNCTION "flux_usage"(
	"tenant" TEXT,
	"feature" TEXT,
	"subject" TEXT DEFAULT NULL
) RETURNS bigint
STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_usage_v2_wrapper';
CREATE FUNCTION "flux_key_limit"(
	"key_id" TEXT,
	"feature" TEXT,
	"limit" bigint,
	"period" TEXT DEFAULT NULL
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_key_limit_wrapper';
CREATE FUNCTION "flux_key_usage"(
	"key_id" TEXT,
	"feature" TEXT
) RETURNS bigint
STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_key_usage_wrapper';
CREATE FUNCTION "flux_current_api_key"() RETURNS TEXT
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_current_api_key_wrapper';
CREATE FUNCTION "flux_current_subject"() RETURNS TEXT
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_current_subject_wrapper';
REVOKE EXECUTE ON FUNCTION flux_create_api_key(text, text, timestamptz, text[]),
    flux_key_limit(text, text, bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flux_create_api_key(text, text, timestamptz, text[]),
    flux_key_limit(text, text, bigint, text) TO flux_admin;
COMMENT ON FUNCTION flux_grant(text, text, bigint, text, jsonb, bigint) IS 'Admin: grant a feature on a plan with a limit (NULL = unlimited), a period (metered: minute..billing_period; rate: an interval), a value and each subject''s own allowance inside the tenant''s (subject_limit)';
COMMENT ON FUNCTION flux_consume(text, text, bigint, text, text) IS 'Atomically check and record usage: allowed records amount and returns the new used / remaining; denied records nothing; a repeated idempotency_key returns the first decision; rolls back with the caller''s transaction. Also charges the current API key''s counter and the subject''s, in one step with the tenant''s (all or none)';
COMMENT ON FUNCTION flux_usage(text, text, text) IS 'Units used in the current period (limit: held now; rate: calls in the window), by the tenant or (subject) by one subject inside it; NULL for unknown keys and boolean features';
COMMENT ON FUNCTION flux_create_api_key(text, text, timestamptz, text[]) IS 'Admin: create an API key for a tenant, optionally scoped to some features; returns flux_<id>_<secret> once, stores only SHA-256 of the secret';
COMMENT ON FUNCTION flux_authenticate(text) IS 'Check an API key; sets flux.tenant and makes the key current (its scopes and allowances apply) for the current transaction, and returns the tenant; unknown, revoked or expired keys raise 28000';
COMMENT ON FUNCTION flux_current_api_key() IS 'The id of the API key flux_authenticate made current in this transaction, else NULL';
COMMENT ON FUNCTION flux_current_subject() IS 'The session''s subject: setting flux.subject, else the claim flux.jwt_subject_claim (default sub) of request.jwt.claims, else NULL';
COMMENT ON FUNCTION flux_key_limit(text, text, bigint, text) IS 'Admin: an API key''s own allowance of a limit, metered or rate feature (period as in flux_grant), on top of its tenant''s; limit NULL removes it';
COMMENT ON FUNCTION flux_key_usage(text, text) IS 'Units an API key used of a feature in the current period (of its own allowance''s period, else its tenant''s grant''s)';
COMMENT ON FUNCTION flux_decide(text, text, text) IS 'The decision with its reason (unknown_feature, unknown_tenant, not_permitted, feature_disabled, not_in_rollout, subscription_inactive, not_in_plan, limit_reached, rate_limited, ok), a message to show, the plan, limit and upgrade_plans';

-- Who is pushing their limit (CONTRACT.md, "Decision statistics and limit
-- reports").
CREATE FUNCTION "flux_limit_report"(
	"threshold" NUMERIC DEFAULT 0.8
) RETURNS TABLE (
	"tenant" TEXT,
	"feature" TEXT,
	"plan" TEXT,
	"limit" bigint,
	"used" bigint,
	"ratio" NUMERIC,
	"resets_at" timestamp with time zone
)
STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_limit_report_wrapper';
REVOKE EXECUTE ON FUNCTION flux_limit_report(numeric) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flux_limit_report(numeric) TO flux_admin;
COMMENT ON FUNCTION flux_limit_report(numeric) IS 'Admin: every tenant and limit or metered feature whose use this period is at least threshold (default 0.8) of the limit it has now, most pressed first; one pass over the counters, each judged by the decision''s rules';

-- Decision statistics in shared memory (src/stats/; CONTRACT.md, "Decision
-- statistics and limit reports").
CREATE FUNCTION "flux_decision_stats"() RETURNS TABLE (
	"feature" TEXT,
	"plan" TEXT,
	"reason" TEXT,
	"decisions" bigint,
	"first_at" timestamp with time zone,
	"last_at" timestamp with time zone
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_decision_stats_wrapper';
CREATE FUNCTION "flux_denials"(
	"feature" TEXT DEFAULT NULL
) RETURNS TABLE (
	"tenant" TEXT,
	"feature" TEXT,
	"reason" TEXT,
	"denials" bigint,
	"last_at" timestamp with time zone
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_denials_wrapper';
CREATE FUNCTION "flux_stats_info"() RETURNS TABLE (
	"entries" bigint,
	"max" INT,
	"evictions" bigint,
	"reset_at" timestamp with time zone
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_stats_info_wrapper';
CREATE FUNCTION "flux_stats_reset"() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_stats_reset_wrapper';
REVOKE EXECUTE ON FUNCTION flux_decision_stats, flux_denials, flux_stats_reset, flux_stats_info FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flux_decision_stats, flux_denials, flux_stats_reset, flux_stats_info TO flux_admin;
COMMENT ON FUNCTION flux_decision_stats() IS 'Admin: decisions of flux_check, flux_decide, flux_consume and the flux_protect policies by feature, plan and reason since the last reset, most frequent first (a check counts once per statement for each tenant); needs shared_preload_libraries = ''flux_entitlements''';
COMMENT ON FUNCTION flux_denials(text) IS 'Admin: denials by tenant, feature and reason, the tenants denied most first; only the given feature''s when not NULL; needs shared_preload_libraries = ''flux_entitlements''';
COMMENT ON FUNCTION flux_stats_reset() IS 'Admin: forget every decision and denial count, of every database (the statistics table is the server''s)';
COMMENT ON FUNCTION flux_stats_info() IS 'Admin: entries in the statistics table, the most it keeps (flux.stats_max), entries evicted to make room, and the last reset';

-- Credits (src/usage/credits.rs): every top-up and every draw of a pool,
-- keyed by tenant first. A top-up's remaining is what is left of it; draws
-- take the period's allowance (flux.usage of the pool) first, then top-ups
-- by earliest expiry.
CREATE TABLE flux.credit_ledger (
    id              bigserial PRIMARY KEY,
    tenant          text NOT NULL REFERENCES flux.tenants (id) ON UPDATE CASCADE ON DELETE CASCADE,
    pool            text NOT NULL REFERENCES flux.features (key) ON UPDATE CASCADE ON DELETE CASCADE,
    amount          bigint NOT NULL CONSTRAINT credit_ledger_amount_check CHECK (amount <> 0),
    balance_after   bigint,
    feature         text,
    at              timestamptz NOT NULL DEFAULT now(),
    idempotency_key text,
    reason          text,
    expires_at      timestamptz,
    remaining       bigint CONSTRAINT credit_ledger_remaining_check
                    CHECK (remaining >= 0 AND remaining <= amount),
    CONSTRAINT credit_ledger_topup_check CHECK ((amount > 0) = (remaining IS NOT NULL))
);
CREATE UNIQUE INDEX credit_ledger_topup_key ON flux.credit_ledger (tenant, pool, idempotency_key)
    WHERE amount > 0 AND idempotency_key IS NOT NULL;
CREATE INDEX credit_ledger_live ON flux.credit_ledger (tenant, pool, expires_at) WHERE remaining > 0;
CREATE INDEX credit_ledger_tenant ON flux.credit_ledger (tenant, pool, at);
CREATE INDEX credit_ledger_pool ON flux.credit_ledger (pool);
COMMENT ON TABLE flux.credit_ledger IS 'Credits: one row per top-up (flux_add_credits, amount > 0; also in the audit log) and per draw (a consume of a priced feature or of the pool, amount < 0), written in the caller''s transaction';
COMMENT ON COLUMN flux.credit_ledger.amount IS 'Credits added (> 0) or drawn (< 0)';
COMMENT ON COLUMN flux.credit_ledger.balance_after IS 'The pool''s balance after this row (allowance left + live top-ups); NULL when the allowance is unlimited';
COMMENT ON COLUMN flux.credit_ledger.feature IS 'A draw: the feature consumed (the pool itself when consumed directly)';
COMMENT ON COLUMN flux.credit_ledger.idempotency_key IS 'A top-up: its key (a repeat adds nothing); a draw: the consume''s key';
COMMENT ON COLUMN flux.credit_ledger.expires_at IS 'A top-up: when what is left of it stops counting (NULL: never)';
COMMENT ON COLUMN flux.credit_ledger.remaining IS 'A top-up: what draws have left of it (NULL for a draw)';

SELECT pg_catalog.pg_extension_config_dump('flux.credit_ledger', '');
SELECT pg_catalog.pg_extension_config_dump('flux.credit_ledger_id_seq', '');
GRANT SELECT ON flux.credit_ledger TO flux_admin;
CREATE TRIGGER audit AFTER INSERT ON flux.credit_ledger
    FOR EACH ROW WHEN (NEW.amount OPERATOR(pg_catalog.>) 0) EXECUTE FUNCTION flux._audit('id');
CREATE FUNCTION "flux_set_cost"(
	"feature" TEXT,
	"pool" TEXT,
	"credits" bigint
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_set_cost_wrapper';
CREATE FUNCTION "flux_add_credits"(
	"tenant" TEXT,
	"pool" TEXT,
	"amount" bigint,
	"expires_at" timestamp with time zone DEFAULT NULL,
	"idempotency_key" TEXT DEFAULT NULL,
	"reason" TEXT DEFAULT NULL
) RETURNS bigint
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_add_credits_wrapper';
CREATE FUNCTION "flux_balance"(
	"tenant" TEXT,
	"pool" TEXT
) RETURNS bigint
STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_balance_wrapper';
REVOKE EXECUTE ON FUNCTION flux_set_cost, flux_add_credits FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flux_set_cost, flux_add_credits TO flux_admin;
COMMENT ON FUNCTION flux._check_cost(text, text, text, bigint) IS 'Validator used by the features trigger: a price draws from another feature of kind credits, and a pool stays one while features draw from it';
COMMENT ON FUNCTION flux_set_cost(text, text, bigint) IS 'Admin: each unit of feature consumed draws credits from pool (a feature of kind credits); credits => NULL removes the price';
COMMENT ON FUNCTION flux_add_credits(text, text, bigint, timestamptz, text, text) IS 'Admin: a purchased top-up of a credits pool (one flux.credit_ledger row, audited); a repeated idempotency_key adds nothing; returns the balance';
COMMENT ON FUNCTION flux_balance(text, text) IS 'What is left of a credits pool for the tenant now: the period''s allowance left plus live top-ups (NULL: unlimited)';
COMMENT ON FUNCTION flux_define_feature(text, text, text) IS 'Admin: define or redefine a feature (kind boolean, limit, metered, rate or credits); a NULL description keeps the current one';

-- Holds (src/usage/holds.rs): a reservation for work that outlives a
-- transaction. A hold's units are recorded on its counters as a consume's
-- are (so every check sees them, exactly), with one flux.hold_charges row
-- per counter; past expires_at a charge stops counting (the readers of a
-- feature with holds subtract it, and the next writer of that counter
-- gives it back), with no job. On a credits pool a hold is a reservation:
-- the balance counts it until it expires; settling draws what was used.
CREATE TABLE flux.holds (
    id              text PRIMARY KEY DEFAULT (pg_catalog.gen_random_uuid())::pg_catalog.text,
    tenant          text NOT NULL REFERENCES flux.tenants (id) ON UPDATE CASCADE ON DELETE CASCADE,
    feature         text NOT NULL REFERENCES flux.features (key) ON UPDATE CASCADE ON DELETE CASCADE,
    amount          bigint NOT NULL CONSTRAINT holds_amount_check CHECK (amount > 0),
    pool            text REFERENCES flux.features (key) ON UPDATE CASCADE ON DELETE CASCADE,
    credits         bigint CONSTRAINT holds_credits_check CHECK (credits > 0),
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    idempotency_key text,
    settled_at      timestamptz,
    actual          bigint CONSTRAINT holds_actual_check CHECK (actual >= 0),
    released_at     timestamptz,
    CONSTRAINT holds_pool_check CHECK ((pool IS NULL) = (credits IS NULL)),
    CONSTRAINT holds_expiry_check CHECK (expires_at > created_at),
    CONSTRAINT holds_closed_check CHECK ((settled_at IS NULL) = (actual IS NULL) AND (settled_at IS NULL OR released_at IS NULL))
);
CREATE UNIQUE INDEX holds_idempotency_key ON flux.holds (tenant, feature, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX holds_tenant ON flux.holds (tenant, created_at);
CREATE INDEX holds_feature ON flux.holds (feature);
CREATE INDEX holds_pool ON flux.holds (pool) WHERE pool IS NOT NULL;
COMMENT ON TABLE flux.holds IS 'Holds (flux_hold): units reserved for work that outlives a transaction, until settled (flux_settle), released (flux_release_hold) or expired (by the clock, flux.now included); kept as history';
COMMENT ON COLUMN flux.holds.id IS 'The hold_id flux_hold returns';
COMMENT ON COLUMN flux.holds.amount IS 'Units of feature held';
COMMENT ON COLUMN flux.holds.pool IS 'A priced feature or a pool: the credits pool the hold reserves credits of';
COMMENT ON COLUMN flux.holds.credits IS 'Credits reserved in pool (amount x the price)';
COMMENT ON COLUMN flux.holds.expires_at IS 'When the hold stops counting (created_at + ttl); settling it after then is an error';
COMMENT ON COLUMN flux.holds.actual IS 'Units recorded by flux_settle';

-- Features that have had a hold: their counters may carry holds past their
-- ttl, which readers then subtract (src/usage/holds.rs). A feature's first
-- hold inserts a row and invalidates every backend's catalogue; no key, so
-- that concurrent first holds never wait on each other.
CREATE TABLE flux.held_features (
    feature text NOT NULL REFERENCES flux.features (key) ON UPDATE CASCADE ON DELETE CASCADE,
    at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX held_features_feature ON flux.held_features (feature);
COMMENT ON TABLE flux.held_features IS 'Features that have had a hold (written by flux_hold, one row or a few per feature): their counters then count holds past their ttl out';

CREATE TABLE flux.hold_charges (
    hold_id      text NOT NULL REFERENCES flux.holds (id) ON DELETE CASCADE,
    caller       text NOT NULL CONSTRAINT hold_charges_caller_check
                 CHECK (caller IN ('', 'pool') OR caller LIKE 'key:%'),
    tenant       text NOT NULL,
    feature      text NOT NULL,
    period_start timestamptz NOT NULL,
    amount       bigint NOT NULL CONSTRAINT hold_charges_amount_check CHECK (amount > 0),
    expires_at   timestamptz NOT NULL,
    open         boolean NOT NULL DEFAULT true,
    PRIMARY KEY (hold_id, caller)
);
CREATE INDEX hold_charges_counter ON flux.hold_charges (tenant, feature, period_start, caller, expires_at)
    WHERE open;
COMMENT ON TABLE flux.hold_charges IS 'What each hold counts on: the tenant''s counter (caller empty), the current API key''s (key:<id>) and the pool''s balance (pool); open until settled, released, or given back after expires_at';
COMMENT ON COLUMN flux.hold_charges.period_start IS 'The counter''s period (as flux.usage.period_start); -infinity for a pool';
COMMENT ON COLUMN flux.hold_charges.amount IS 'Units counted (a pool: credits reserved)';
COMMENT ON COLUMN flux.hold_charges.open IS 'Still counted until expires_at; false once settled, released or given back';

SELECT pg_catalog.pg_extension_config_dump('flux.holds', '');
SELECT pg_catalog.pg_extension_config_dump('flux.hold_charges', '');
SELECT pg_catalog.pg_extension_config_dump('flux.held_features', '');
GRANT SELECT ON flux.holds, flux.hold_charges, flux.held_features TO flux_admin;
CREATE FUNCTION "flux_hold"(
	"tenant" TEXT,
	"feature" TEXT,
	"amount" bigint,
	"ttl" interval DEFAULT '15 minutes',
	"idempotency_key" TEXT DEFAULT NULL
) RETURNS flux.decision
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_hold_wrapper';
CREATE FUNCTION "flux_settle"(
	"hold_id" TEXT,
	"actual" bigint
) RETURNS flux.decision
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_settle_wrapper';
CREATE FUNCTION "flux_release_hold"(
	"hold_id" TEXT
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_release_hold_wrapper';
COMMENT ON FUNCTION flux_hold(text, text, bigint, interval, text) IS 'Reserve amount units of a limit, metered or credits feature or of a priced feature (counted as used, or reserved in its pool) until flux_settle, flux_release_hold or the ttl passes (by the clock, flux.now included); the decision''s hold_id names it; a repeated idempotency_key returns the first hold';
COMMENT ON FUNCTION flux_settle(text, bigint) IS 'Turn a hold into actual units of usage (more than held only if it fits, else a limit_reached decision and the hold stays open) and free the rest; an unknown, foreign, settled, released or expired hold is an error';
COMMENT ON FUNCTION flux_release_hold(text) IS 'Give a hold back whole; releasing it again, or once it has expired, does nothing more';

-- Soft limits (CONTRACT.md, "Soft limits, overage and usage alerts"): a
-- plan's grant may go past its limit, up to a cap.
ALTER TABLE flux.grants
    ADD COLUMN overage boolean NOT NULL DEFAULT false,
    ADD COLUMN overage_cap bigint CONSTRAINT grants_overage_cap_check CHECK (overage_cap >= 0),
    ADD CONSTRAINT grants_overage_check CHECK (overage OR overage_cap IS NULL);
COMMENT ON COLUMN flux.grants.overage IS 'limit / metered features: a soft limit (flux_set_overage): consumes past the limit are allowed up to limit + overage_cap and reported as overage';
COMMENT ON COLUMN flux.grants.overage_cap IS 'With overage: how far past the limit a period may go; NULL = no cap';
CREATE FUNCTION flux."_check_overage"(
	"feature" TEXT,
	"overage" bool,
	"cap" bigint
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_check_overage_wrapper';
CREATE OR REPLACE FUNCTION flux._grants_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.grants'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._grants_validate()', 'flux.grants', TG_RELID::pg_catalog.regclass);
    END IF;
    NEW.period := flux._check_grant(NEW.plan, NEW.feature, NEW."limit", NEW.period);
    PERFORM flux._check_subject_limit(NEW.feature, NEW.subject_limit);
    PERFORM flux._check_overage(NEW.feature, NEW.overage, NEW.overage_cap);
    RETURN NEW;
END $$;
CREATE FUNCTION "flux_set_overage"(
	"plan" TEXT,
	"feature" TEXT,
	"enabled" bool DEFAULT true,
	"cap" bigint DEFAULT NULL
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_set_overage_wrapper';
REVOKE EXECUTE ON FUNCTION flux_set_overage FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flux_set_overage TO flux_admin;
GRANT EXECUTE ON FUNCTION flux._check_overage TO flux_admin;
COMMENT ON FUNCTION flux._check_overage(text, boolean, bigint) IS 'Validator used by the grants trigger: overage only on limit and metered features, a cap >= 0 only with overage on';
COMMENT ON FUNCTION flux_set_overage(text, text, boolean, bigint) IS 'Admin: make a plan''s grant of a limit or metered feature soft: consumes past the limit are allowed up to limit + cap (NULL: no cap) and reported as overage; enabled => false makes it hard again';

-- Usage alerts (CONTRACT.md, "Soft limits, overage and usage alerts"): a
-- feature's thresholds, as fractions of the limit, cached with the
-- catalogue; the first consume taking a tenant to or past one in a period
-- writes a row of flux.usage_alerts and NOTIFY flux_usage, in its own
-- transaction (src/usage/alerts.rs).
CREATE TABLE flux.alerts (
    feature    text NOT NULL REFERENCES flux.features (key) ON UPDATE CASCADE ON DELETE CASCADE,
    threshold  numeric NOT NULL CONSTRAINT alerts_threshold_check
               CHECK (threshold > 0 AND threshold <= 10 AND threshold = pg_catalog.round(threshold, 4)),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (feature, threshold)
);
COMMENT ON TABLE flux.alerts IS 'Usage alert thresholds (flux_alert): when a tenant''s use of a limit or metered feature in a period reaches threshold x its limit, one row of flux.usage_alerts and NOTIFY flux_usage';
COMMENT ON COLUMN flux.alerts.threshold IS 'A fraction of the limit: 0.8 = 80%, 1 = the limit, above 1 past it (soft limits); in (0, 10], at most four decimals';

CREATE TABLE flux.usage_alerts (
    tenant       text NOT NULL REFERENCES flux.tenants (id) ON UPDATE CASCADE ON DELETE CASCADE,
    feature      text NOT NULL REFERENCES flux.features (key) ON UPDATE CASCADE ON DELETE CASCADE,
    period_start timestamptz NOT NULL,
    threshold    numeric NOT NULL,
    used         bigint NOT NULL,
    "limit"      bigint NOT NULL,
    at           timestamptz NOT NULL,
    processed_at timestamptz,
    PRIMARY KEY (tenant, feature, period_start, threshold)
);
CREATE INDEX usage_alerts_unprocessed ON flux.usage_alerts (at) WHERE processed_at IS NULL;
CREATE INDEX usage_alerts_feature ON flux.usage_alerts (feature);
COMMENT ON TABLE flux.usage_alerts IS 'One row per tenant, feature, period and threshold crossed, written by the consume that crossed it (in its transaction) and announced with NOTIFY flux_usage at commit; an application marks what it handled in processed_at';
COMMENT ON COLUMN flux.usage_alerts.period_start IS 'The counter''s period (as flux.usage.period_start; -infinity for a limit feature, whose count never resets)';
COMMENT ON COLUMN flux.usage_alerts.used IS 'Units used after the consume that crossed the threshold';
COMMENT ON COLUMN flux.usage_alerts."limit" IS 'The limit the threshold is a fraction of, at that consume';
COMMENT ON COLUMN flux.usage_alerts.at IS 'The consume''s clock (flux.now when set)';
COMMENT ON COLUMN flux.usage_alerts.processed_at IS 'NULL until the application has handled the alert (see the README: UPDATE ... FOR UPDATE SKIP LOCKED ... RETURNING)';
SELECT pg_catalog.pg_extension_config_dump('flux.alerts', '');
SELECT pg_catalog.pg_extension_config_dump('flux.usage_alerts', '');
CREATE FUNCTION "flux_alert"(
	"feature" TEXT,
	"threshold" NUMERIC
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_alert_wrapper';
CREATE FUNCTION "flux_alert_clear"(
	"feature" TEXT,
	"threshold" NUMERIC
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_alert_clear_wrapper';
CREATE FUNCTION flux."_check_alert"(
	"feature" TEXT,
	"threshold" NUMERIC
) RETURNS void
STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_check_alert_wrapper';
CREATE FUNCTION flux."_billable_usage"() RETURNS TABLE (
	"tenant" TEXT,
	"feature" TEXT,
	"period_start" timestamp with time zone,
	"period_end" timestamp with time zone,
	"included" bigint,
	"used" bigint,
	"overage" bigint,
	"plan" TEXT
)
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_billable_usage_wrapper';

CREATE FUNCTION flux._alerts_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.alerts'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._alerts_validate()', 'flux.alerts', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_alert(NEW.feature, NEW.threshold);
    -- 0.80 and 0.8 are one threshold.
    NEW.threshold := pg_catalog.trim_scale(NEW.threshold);
    RETURN NEW;
END $$;
CREATE TRIGGER alerts_validate BEFORE INSERT OR UPDATE ON flux.alerts
    FOR EACH ROW EXECUTE FUNCTION flux._alerts_validate();
COMMENT ON FUNCTION flux._alerts_validate() IS 'Trigger: validates an alert threshold (flux._check_alert) and stores it without trailing zeros';
CREATE TRIGGER cache_invalidate AFTER INSERT OR UPDATE OR DELETE ON flux.alerts
    FOR EACH ROW EXECUTE FUNCTION flux._cache_invalidate();
CREATE TRIGGER cache_invalidate_truncate AFTER TRUNCATE ON flux.alerts
    FOR EACH STATEMENT EXECUTE FUNCTION flux._cache_invalidate();
ALTER TABLE flux.alerts ENABLE ALWAYS TRIGGER cache_invalidate, ENABLE ALWAYS TRIGGER cache_invalidate_truncate;
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON flux.alerts
    FOR EACH ROW EXECUTE FUNCTION flux._audit('feature', 'threshold');
GRANT SELECT, INSERT, UPDATE, DELETE ON flux.alerts TO flux_admin;
GRANT SELECT, DELETE, UPDATE (processed_at) ON flux.usage_alerts TO flux_admin;
REVOKE EXECUTE ON FUNCTION flux_alert, flux_alert_clear FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flux_alert, flux_alert_clear TO flux_admin;
GRANT EXECUTE ON FUNCTION flux._check_alert, flux._billable_usage() TO flux_admin;
GRANT SET ON PARAMETER flux.alert_notify TO flux_admin;
COMMENT ON FUNCTION flux_alert(text, numeric) IS 'Admin: alert when a tenant''s use of a limit or metered feature in a period reaches threshold x its limit (0.8 = 80%, 1 = the limit; at most 10, four decimals): the first consume to get there writes one flux.usage_alerts row and sends NOTIFY flux_usage at commit';
COMMENT ON FUNCTION flux_alert_clear(text, numeric) IS 'Admin: stop alerting at this threshold of the feature (alerts written stay)';
COMMENT ON FUNCTION flux._check_alert(text, numeric) IS 'Validator used by the alerts trigger: a limit or metered feature, a threshold in (0, 10] with at most four decimals';
COMMENT ON FUNCTION flux._billable_usage() IS 'The body of the view flux.billable_usage';

-- What an invoice needs (src/reports.rs): one row per tenant, limit or
-- metered feature and recorded period, judged by the decision's rules.
CREATE VIEW flux.billable_usage AS
    SELECT tenant, feature, period_start, period_end, included, used, overage, plan
      FROM flux._billable_usage();
COMMENT ON VIEW flux.billable_usage IS 'Admin: one row per tenant, limit or metered feature and recorded period: included (the limit), used and overage (used past included); terms as the tenant''s rows stand, at the clock for the current period and at the last instant of a closed one (see the README, "Overage and alerts")';
COMMENT ON COLUMN flux.billable_usage.period_start IS 'The period''s start (a limit feature, whose count is standing: the current billing period''s, NULL without one)';
COMMENT ON COLUMN flux.billable_usage.period_end IS 'The period''s end (exclusive)';
COMMENT ON COLUMN flux.billable_usage.included IS 'The limit the tenant has for the period (plan, addons, override; 0 when not entitled; NULL: unlimited)';
COMMENT ON COLUMN flux.billable_usage.used IS 'Units used in the period (holds past their ttl not counted)';
COMMENT ON COLUMN flux.billable_usage.overage IS 'Units past included (0 when none, or unlimited)';
COMMENT ON COLUMN flux.billable_usage.plan IS 'The plan whose terms apply (the default plan when the subscription is not live)';
GRANT SELECT ON flux.billable_usage TO flux_admin;

-- Pricing changes (CONTRACT.md, "Pricing changes"): a plan change
-- scheduled for a later instant, and plans not sold any more.
ALTER TABLE flux.tenants
    ADD COLUMN scheduled_plan text REFERENCES flux.plans (key) ON UPDATE CASCADE ON DELETE RESTRICT,
    ADD COLUMN scheduled_at timestamptz,
    ADD CONSTRAINT tenants_scheduled_check CHECK ((scheduled_plan IS NULL) = (scheduled_at IS NULL));
CREATE INDEX tenants_scheduled_plan ON flux.tenants (scheduled_plan) WHERE scheduled_plan IS NOT NULL;
ALTER TABLE flux.plans ADD COLUMN listed boolean NOT NULL DEFAULT true;
COMMENT ON COLUMN flux.plans.listed IS 'Shown by flux_pricing_table; false for plans not sold any more (flux_copy_plan''s grandfathered copies)';
COMMENT ON COLUMN flux.tenants.scheduled_plan IS 'A plan change to come (flux_schedule_change): the plan from scheduled_at on, by the clock, with no job; a write that sets plan replaces it';
COMMENT ON COLUMN flux.tenants.scheduled_at IS 'When scheduled_plan takes effect (set together with it); the row''s next write after it makes it the plan';
CREATE OR REPLACE FUNCTION flux._tenants_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.tenants'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._tenants_validate()', 'flux.tenants', TG_RELID::pg_catalog.regclass);
    END IF;
    -- past_due_since follows the status: set from the clock when it becomes
    -- past_due (unless this statement sets it), cleared when it leaves.
    IF NEW.status OPERATOR(pg_catalog.=) 'past_due' THEN
        IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
            NEW.past_due_since := coalesce(NEW.past_due_since, flux._clock());
        -- The status becomes past_due and past_due_since is not being set
        -- (IS [NOT] DISTINCT FROM spelled out with the qualified =).
        ELSIF (OLD.status OPERATOR(pg_catalog.=) 'past_due') IS NOT TRUE
              AND coalesce(NEW.past_due_since OPERATOR(pg_catalog.=) OLD.past_due_since,
                           NEW.past_due_since IS NULL AND OLD.past_due_since IS NULL) THEN
            NEW.past_due_since := flux._clock();
        ELSIF NEW.past_due_since IS NULL THEN
            NEW.past_due_since := flux._clock();
        END IF;
    ELSE
        NEW.past_due_since := NULL;
        NEW.grace_until := NULL;
    END IF;
    -- A scheduled plan change (flux_schedule_change) is in force from its
    -- instant by the clock with no job (decisions read it). The row's
    -- first write after that instant makes it the plan, unless the write
    -- sets another plan by hand: that plan replaces it. flux_subscribe,
    -- billing events and flux_move_tenants drop a change themselves when
    -- they set another plan; a plan key renamed (a cascade, from a
    -- trigger) keeps it. A change still to come is never touched here.
    IF NEW.scheduled_at OPERATOR(pg_catalog.<=) flux._clock() THEN
        IF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' AND pg_catalog.pg_trigger_depth() OPERATOR(pg_catalog.=) 1
           AND coalesce(NEW.plan OPERATOR(pg_catalog.<>) OLD.plan, (NEW.plan IS NULL) OPERATOR(pg_catalog.<>) (OLD.plan IS NULL)) THEN
            NEW.scheduled_plan := NULL;
            NEW.scheduled_at := NULL;
        ELSE
            NEW.plan := NEW.scheduled_plan;
            NEW.scheduled_plan := NULL;
            NEW.scheduled_at := NULL;
        END IF;
    END IF;
    PERFORM flux._check_tenant(NEW.id, NEW.plan, NEW.status, NEW.trial_ends_at,
                               NEW.current_period_start, NEW.current_period_end,
                               CASE WHEN TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN OLD.id END);
    RETURN NEW;
END $$;
CREATE FUNCTION "flux_schedule_change"(
	"tenant" TEXT,
	"plan" TEXT,
	"at" timestamp with time zone DEFAULT NULL
) RETURNS timestamp with time zone
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_schedule_change_wrapper';
CREATE FUNCTION "flux_cancel_scheduled_change"(
	"tenant" TEXT
) RETURNS bool
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_cancel_scheduled_change_wrapper';
CREATE FUNCTION "flux_preview"(
	"tenant" TEXT,
	"plan" TEXT
) RETURNS TABLE (
	"feature" TEXT,
	"allowed_now" bool,
	"allowed_after" bool,
	"limit_now" bigint,
	"limit_after" bigint,
	"used" bigint,
	"over_by" bigint
)
STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_preview_wrapper';
CREATE FUNCTION "flux_plan_impact"(
	"plan" TEXT,
	"feature" TEXT,
	"limit" bigint
) RETURNS TABLE (
	"tenant" TEXT,
	"used" bigint,
	"over_by" bigint
)
STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_plan_impact_wrapper';
CREATE FUNCTION "flux_copy_plan"(
	"source" TEXT,
	"target" TEXT,
	"name" TEXT DEFAULT NULL,
	"rank" INT DEFAULT NULL
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_copy_plan_wrapper';
CREATE FUNCTION "flux_move_tenants"(
	"from_plan" TEXT,
	"to_plan" TEXT,
	"at" timestamp with time zone DEFAULT NULL
) RETURNS bigint
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'flux_move_tenants_wrapper';
CREATE FUNCTION flux."_pricing_table"() RETURNS TEXT
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_pricing_table_wrapper';

-- Pricing changes (src/pricing.rs). The pricing table is for anyone (a
-- pricing page shows it; unlisted plans are left out): its body reads the
-- catalogue as flux_owner, under a pinned search_path.
CREATE FUNCTION flux_pricing_table() RETURNS jsonb LANGUAGE sql STABLE PARALLEL SAFE
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT flux._pricing_table()::pg_catalog.jsonb $$;
COMMENT ON FUNCTION flux_pricing_table() IS 'The listed plans by rank, each with its features (kind, limit, period, value, overage), and the addons with what one unit grants, as jsonb for a pricing page';
COMMENT ON FUNCTION flux._pricing_table() IS 'The body of flux_pricing_table (its JSON as text)';
-- Plan x feature, for people in psql:
--   SELECT feature, plan, included FROM flux.plan_matrix \crosstabview
CREATE VIEW flux.plan_matrix AS
    SELECT f.key AS feature, f.kind, p.key AS plan, p.rank,
           CASE WHEN g.plan IS NULL OR NOT g.enabled THEN '-'
                WHEN f.kind OPERATOR(pg_catalog.=) 'boolean' THEN 'yes'
                ELSE COALESCE(g."limit"::pg_catalog.text, 'unlimited')
                     OPERATOR(pg_catalog.||) COALESCE(' / ' OPERATOR(pg_catalog.||) g.period, '')
                     OPERATOR(pg_catalog.||) CASE WHEN NOT g.overage THEN ''
                          WHEN g.overage_cap IS NULL THEN ' + overage'
                          ELSE ' + ' OPERATOR(pg_catalog.||) g.overage_cap::pg_catalog.text OPERATOR(pg_catalog.||) ' overage' END
           END AS included,
           g."limit", g.period, g.value, p.listed
      FROM flux.features f CROSS JOIN flux.plans p
      LEFT JOIN flux.grants g ON g.plan OPERATOR(pg_catalog.=) p.key AND g.feature OPERATOR(pg_catalog.=) f.key
     ORDER BY f.key, p.rank, p.key;
COMMENT ON VIEW flux.plan_matrix IS 'Admin: every plan x feature with what the plan includes (yes, 1000 / month, unlimited, + 500 overage, - for nothing); SELECT feature, plan, included FROM flux.plan_matrix \crosstabview shows the matrix';
COMMENT ON COLUMN flux.plan_matrix.included IS 'What the plan grants, for people: yes (boolean), the limit and its period, unlimited, the overage past it; - when the plan does not grant it';
GRANT SELECT ON flux.plan_matrix TO flux_admin;
COMMENT ON FUNCTION flux_schedule_change(text, text, timestamptz) IS 'Admin: move the tenant to plan when the clock reaches at (default: its current_period_end), with no job; returns the instant; replaces a change already scheduled';
COMMENT ON FUNCTION flux_cancel_scheduled_change(text) IS 'Admin: drop the tenant''s scheduled plan change; false when there was none (a change whose instant has passed is in force)';
COMMENT ON FUNCTION flux_preview(text, text) IS 'Per feature: allowed and limit now and on plan (addons, overrides and the subscription''s state as they are), what the tenant uses, and over_by the new limit';
COMMENT ON FUNCTION flux_plan_impact(text, text, bigint) IS 'Admin: the plan''s tenants that limit, as its grant of feature, would put over it this period (used, over_by), most over first';
COMMENT ON FUNCTION flux_copy_plan(text, text, text, integer) IS 'Admin: a new, unlisted plan with source''s grants and overage settings (grandfathering: copy, move the old customers, then change the original)';
COMMENT ON FUNCTION flux_move_tenants(text, text, timestamptz) IS 'Admin: move every tenant on from_plan to to_plan now, or schedule the move at at; returns how many; one audited change per tenant';
REVOKE EXECUTE ON FUNCTION flux_schedule_change, flux_cancel_scheduled_change, flux_plan_impact,
    flux_copy_plan, flux_move_tenants FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flux_schedule_change, flux_cancel_scheduled_change, flux_plan_impact,
    flux_copy_plan, flux_move_tenants TO flux_admin;
COMMENT ON FUNCTION flux._tenants_validate() IS 'Trigger: keeps past_due_since in step with status, makes a due scheduled plan change the plan (a write that sets the plan replaces one to come), and validates the subscription (flux._check_tenant)';

-- Comments that changed.
COMMENT ON FUNCTION flux._audit() IS 'Trigger: appends the change to flux.audit_log (role: the real role; actor: flux.actor or the role) and announces it with NOTIFY flux_changes (entity, key, tenant, action) at commit; runs only on the flux tables';
COMMENT ON FUNCTION flux._enforce_limit() IS 'Trigger made by flux_enforce_limit (arguments: feature, tenant column): refuses a row that would take its tenant past the limit of a feature, counting under a row lock of flux.limit_locks; runs only under the trigger names flux_enforce_limit gives';

-- Internal functions are not PUBLIC (src/privilege.rs). Trigger functions
-- fire whoever changes the table (EXECUTE is checked only when a trigger is
-- created), so revoking them keeps anyone from attaching them to a table of
-- their own. flux_admin gets what the admin functions and the validation
-- triggers it fires call.
DO $$
DECLARE
    f pg_catalog.regprocedure;
BEGIN
    FOR f IN SELECT p.oid FROM pg_catalog.pg_proc p
              WHERE p.pronamespace OPERATOR(pg_catalog.=) 'flux'::pg_catalog.regnamespace LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$$;
GRANT EXECUTE ON FUNCTION flux._clock(), flux._check_feature, flux._check_plan, flux._check_plan_unused,
    flux._check_grant, flux._check_tenant, flux._check_addon, flux._check_addon_unused,
    flux._check_addon_grant, flux._check_tenant_addon, flux._check_override, flux._check_flag,
    flux._check_flag_list, flux._enforce_limit(), flux._cached_tenants(), flux._cache_stats(),
    flux._check_scopes, flux._check_key_limit, flux._check_subject_limit, flux._check_cost
    TO flux_admin;

-- Everything of the extension belongs to flux_owner, never to the superuser
-- who ran CREATE EXTENSION; pg_dump / pg_restore and ALTER EXTENSION UPDATE
-- rerun this script, so the owner survives them. Sequences owned by a
-- column follow their table.
DO $$
DECLARE
    o record;
BEGIN
    ALTER SCHEMA flux OWNER TO flux_owner;
    FOR o IN
        SELECT d.classid, d.objid
          FROM pg_catalog.pg_depend d
          JOIN pg_catalog.pg_extension e ON e.oid OPERATOR(pg_catalog.=) d.refobjid
         WHERE d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass
           AND e.extname OPERATOR(pg_catalog.=) 'flux_entitlements'
           AND d.deptype OPERATOR(pg_catalog.=) 'e'
    LOOP
        IF o.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass THEN
            EXECUTE pg_catalog.format('ALTER ROUTINE %s OWNER TO flux_owner', o.objid::pg_catalog.regprocedure);
        -- Array types and row types (which 18 also records as members)
        -- follow their element type or table.
        ELSIF o.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_type'::pg_catalog.regclass
              AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend s
                               WHERE s.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_type'::pg_catalog.regclass
                                 AND s.objid OPERATOR(pg_catalog.=) o.objid
                                 AND s.deptype OPERATOR(pg_catalog.=) 'i') THEN
            EXECUTE pg_catalog.format('ALTER TYPE %s OWNER TO flux_owner', o.objid::pg_catalog.regtype);
        ELSIF o.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
              AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend s
                               WHERE s.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                                 AND s.objid OPERATOR(pg_catalog.=) o.objid
                                 AND s.deptype OPERATOR(pg_catalog.=) 'a') THEN
            EXECUTE pg_catalog.format('ALTER TABLE %s OWNER TO flux_owner', o.objid::pg_catalog.regclass);
        END IF;
    END LOOP;
END
$$;
