-- flux_entitlements: privileges and documentation of the functions.
-- Runs last, once every Rust function exists.

-- Functions taking or returning jsonb are SQL wrappers around Rust bodies
-- that see the value as text: a jsonb value is stored and returned exactly
-- as given, and never parsed in Rust (where a deeply nested document would
-- hit the parser's recursion limit).
CREATE FUNCTION flux_grant(plan text, feature text, "limit" bigint DEFAULT NULL, period text DEFAULT NULL,
                           value jsonb DEFAULT NULL, subject_limit bigint DEFAULT NULL)
RETURNS void LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$ SELECT flux._grant(plan, feature, "limit", period, value::pg_catalog.text, subject_limit) $$;
CREATE FUNCTION flux_override(tenant text, feature text, enabled boolean DEFAULT true, "limit" bigint DEFAULT NULL,
                              starts_at timestamptz DEFAULT NULL, expires_at timestamptz DEFAULT NULL,
                              reason text DEFAULT NULL, value jsonb DEFAULT NULL)
RETURNS void LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$ SELECT flux._override(tenant, feature, enabled, "limit", starts_at, expires_at, reason, value::pg_catalog.text) $$;
CREATE FUNCTION flux_grant_addon(addon text, feature text, "limit" bigint DEFAULT NULL, value jsonb DEFAULT NULL)
RETURNS void LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$ SELECT flux._grant_addon(addon, feature, "limit", value::pg_catalog.text) $$;
CREATE FUNCTION flux_apply_stripe_event(event jsonb)
RETURNS text LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$ SELECT flux._apply_stripe_event(event::pg_catalog.text) $$;
COMMENT ON FUNCTION flux_apply_stripe_event(jsonb) IS 'Admin: apply one Stripe webhook event to the tenant''s subscription in this transaction; answers applied, duplicate, stale, unmapped or ignored; malformed events raise 22023';
COMMENT ON FUNCTION flux._apply_stripe_event(text) IS 'The body of flux_apply_stripe_event (the event as jsonb text)';
-- flux_value's result is made by jsonb_in from the stored text (src/reads.rs).
CREATE FUNCTION flux_value(tenant text, feature text)
RETURNS jsonb LANGUAGE c STABLE STRICT PARALLEL SAFE
AS 'MODULE_PATHNAME', 'flux_value_wrapper';
COMMENT ON FUNCTION flux._grant(text, text, bigint, text, text, bigint) IS 'The body of flux_grant (value as jsonb text)';
COMMENT ON FUNCTION flux._override(text, text, boolean, bigint, timestamptz, timestamptz, text, text) IS 'The body of flux_override (value as jsonb text)';
COMMENT ON FUNCTION flux._grant_addon(text, text, bigint, text) IS 'The body of flux_grant_addon (value as jsonb text)';

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
-- Nor is silencing one's own alerts (flux.alert_notify).
GRANT SET ON PARAMETER flux.alert_notify TO flux_admin;

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

-- Audit and change events (src/audit.rs): one row trigger per table, its
-- arguments the key columns.
COMMENT ON FUNCTION flux._audit() IS 'Trigger: appends the change to flux.audit_log (role: the real role; actor: flux.actor or the role) and announces it with NOTIFY flux_changes (entity, key, tenant, action) at commit; runs only on the flux tables';

DO $$
DECLARE
    spec text[];
BEGIN
    FOREACH spec SLICE 1 IN ARRAY ARRAY[
        ['features', 'key', ''], ['plans', 'key', ''], ['grants', 'plan', 'feature'],
        ['tenants', 'id', ''], ['addons', 'key', ''], ['addon_grants', 'addon', 'feature'],
        ['tenant_addons', 'tenant', 'addon'], ['overrides', 'tenant', 'feature'],
        ['flags', 'feature', ''], ['flag_lists', 'feature', 'id'], ['api_keys', 'id', ''],
        ['billing_prices', 'price', ''], ['key_limits', 'key_id', 'feature'],
        ['alerts', 'feature', 'threshold']
    ] LOOP
        EXECUTE pg_catalog.format('CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON flux.%I '
                                  'FOR EACH ROW EXECUTE FUNCTION flux._audit(%s)', spec[1],
                                  CASE WHEN spec[3] OPERATOR(pg_catalog.=) '' THEN pg_catalog.quote_literal(spec[2])
                                       ELSE pg_catalog.format('%L, %L', spec[2], spec[3]) END);
    END LOOP;
END
$$;

-- Top-ups are changes people make (flux_add_credits): audited. Draws are
-- usage, as flux.usage is: not.
CREATE TRIGGER audit AFTER INSERT ON flux.credit_ledger
    FOR EACH ROW WHEN (NEW.amount OPERATOR(pg_catalog.>) 0) EXECUTE FUNCTION flux._audit('id');

-- What changed for a tenant, and who did it.
CREATE FUNCTION flux_history(tenant text, since timestamptz DEFAULT NULL)
RETURNS SETOF flux.audit_log LANGUAGE sql STABLE
AS $$ SELECT * FROM flux.audit_log a
       WHERE a.tenant OPERATOR(pg_catalog.=) $1 AND ($2 IS NULL OR a.at OPERATOR(pg_catalog.>=) $2)
       ORDER BY a.id $$;
COMMENT ON FUNCTION flux_history(text, timestamptz) IS 'Admin: the audit log of one tenant (its subscription, addons, overrides, API keys and flag-list entries), oldest first';

-- flux_enforce_limit takes regclass and name as the contract says; the
-- work is in Rust (src/row_limits.rs).
CREATE FUNCTION flux_enforce_limit(tbl regclass, feature text, tenant_column name DEFAULT 'tenant_id')
RETURNS void LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$ SELECT flux._enforce_limit_setup(tbl::pg_catalog.oid, feature, tenant_column::pg_catalog.text) $$;

-- Cache invalidation (src/cache/invalidation.rs): every table the decision
-- reads announces its changes, whoever makes them (functions or plain DML).
-- Row-level, and enabled ALWAYS: a logical replication subscriber's apply
-- worker fires only such triggers (and no statement-level ones for INSERT,
-- UPDATE or DELETE), so warm sessions on a subscriber stay fresh too. A
-- catalogue row names its table (every backend reloads the catalogue); a
-- tenant's row names its tenant's bucket (backends forget that tenant).
DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['features', 'plans', 'grants', 'addons', 'addon_grants',
                             'flags', 'flag_lists', 'alerts'] LOOP
        EXECUTE pg_catalog.format('CREATE TRIGGER cache_invalidate AFTER INSERT OR UPDATE OR DELETE ON flux.%I '
                       'FOR EACH ROW EXECUTE FUNCTION flux._cache_invalidate()', t);
    END LOOP;
    FOREACH t IN ARRAY ARRAY['tenants:id', 'tenant_addons:tenant', 'overrides:tenant'] LOOP
        EXECUTE pg_catalog.format('CREATE TRIGGER cache_invalidate AFTER INSERT OR UPDATE OR DELETE ON flux.%I '
                       'FOR EACH ROW EXECUTE FUNCTION flux._tenant_invalidate(%L)',
                       pg_catalog.split_part(t, ':', 1), pg_catalog.split_part(t, ':', 2));
    END LOOP;
    FOREACH t IN ARRAY ARRAY['features', 'plans', 'grants', 'tenants', 'addons', 'addon_grants',
                             'tenant_addons', 'overrides', 'flags', 'flag_lists', 'alerts'] LOOP
        EXECUTE pg_catalog.format('CREATE TRIGGER cache_invalidate_truncate AFTER TRUNCATE ON flux.%I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION flux._cache_invalidate()', t);
        EXECUTE pg_catalog.format('ALTER TABLE flux.%I ENABLE ALWAYS TRIGGER cache_invalidate, '
                       'ENABLE ALWAYS TRIGGER cache_invalidate_truncate', t);
    END LOOP;
END
$$;
COMMENT ON FUNCTION flux._cache_invalidate() IS 'Trigger: tells every backend''s decision cache that this table changed (relcache invalidation, delivered at commit)';
COMMENT ON FUNCTION flux._tenant_invalidate() IS 'Trigger (argument: the tenant column): tells every backend''s decision cache that this row''s tenant changed (an invalidation of its bucket of tenants, delivered at commit)';
COMMENT ON FUNCTION flux._cache_stats() IS 'Internal: this backend''s decision cache counters (catalogue loads, tenant loads, tenants held, times every tenant was forgotten)';

-- flux_protect, likewise (src/rls.rs). force => true also applies the
-- policies to the table's owner (FORCE ROW LEVEL SECURITY).
CREATE FUNCTION flux_protect(tbl regclass, feature text, tenant_column name DEFAULT 'tenant_id',
                             force boolean DEFAULT false)
RETURNS void LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$ SELECT flux._protect_setup(tbl::pg_catalog.oid, feature, tenant_column::pg_catalog.text, force) $$;

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

-- PUBLIC may use the schema (for the type flux.decision) and call the
-- reads, consume, release, flux_current_tenant and flux_authenticate; it
-- gets no privilege on the tables: the functions read and write them as
-- their owner (src/privilege.rs), so an application role can neither
-- rewrite its plan or usage nor read other tenants' rows or key hashes.
GRANT USAGE ON SCHEMA flux TO PUBLIC;
-- Writes: flux_admin (and the owner) only.
GRANT SELECT, INSERT, UPDATE, DELETE ON flux.features, flux.plans, flux.grants, flux.tenants,
    flux.addons, flux.addon_grants, flux.tenant_addons, flux.overrides, flux.flags, flux.flag_lists,
    flux.usage, flux.rate_state, flux.usage_keys, flux.api_keys, flux.key_limits, flux.caller_usage,
    flux.caller_rate_state TO flux_admin;
GRANT SELECT ON flux.audit_log TO flux_admin;
-- The ledger is written by flux_consume and flux_add_credits only, so that it
-- always adds up to the balances.
GRANT SELECT ON flux.credit_ledger TO flux_admin;
-- Holds are written by flux_hold, flux_settle and flux_release_hold only.
GRANT SELECT ON flux.holds, flux.hold_charges, flux.held_features TO flux_admin;
-- Alerts are written by the consumes that cross them; the application
-- marks what it handled (README, "Overage and alerts").
GRANT SELECT, INSERT, UPDATE, DELETE ON flux.alerts TO flux_admin;
GRANT SELECT, DELETE, UPDATE (processed_at) ON flux.usage_alerts TO flux_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON flux.billing_prices, flux.billing_events, flux.billing_subscriptions TO flux_admin;
-- flux_consume and flux_release write usage as the tables' owner (src/usage/),
-- so PUBLIC needs no write grant on any flux table.

REVOKE EXECUTE ON FUNCTION flux_define_feature, flux_define_plan, flux_grant, flux_revoke,
    flux_subscribe, flux_override, flux_define_addon, flux_grant_addon, flux_attach_addon,
    flux_set_flag, flux_flag_allow, flux_flag_deny, flux_flag_clear, flux_enforce_limit,
    flux_prune_usage_keys, flux._enforce_limit_setup, flux_create_api_key, flux_revoke_api_key,
    flux_protect, flux._protect_setup, flux_history, flux._grant, flux._override, flux._grant_addon,
    flux_apply_stripe_event, flux._apply_stripe_event, flux_map_price, flux_key_limit, flux_limit_report,
    flux_decision_stats, flux_denials, flux_stats_reset, flux_stats_info, flux_set_cost, flux_add_credits,
    flux_set_overage, flux_alert, flux_alert_clear, flux_schedule_change, flux_cancel_scheduled_change,
    flux_plan_impact, flux_copy_plan, flux_move_tenants
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION flux_define_feature, flux_define_plan, flux_grant, flux_revoke,
    flux_subscribe, flux_override, flux_define_addon, flux_grant_addon, flux_attach_addon,
    flux_set_flag, flux_flag_allow, flux_flag_deny, flux_flag_clear, flux_enforce_limit,
    flux_prune_usage_keys, flux._enforce_limit_setup, flux_create_api_key, flux_revoke_api_key,
    flux_protect, flux._protect_setup, flux_history, flux._grant, flux._override, flux._grant_addon,
    flux_apply_stripe_event, flux._apply_stripe_event, flux_map_price, flux_key_limit, flux_limit_report,
    flux_decision_stats, flux_denials, flux_stats_reset, flux_stats_info, flux_set_cost, flux_add_credits,
    flux_set_overage, flux_alert, flux_alert_clear, flux_schedule_change, flux_cancel_scheduled_change,
    flux_plan_impact, flux_copy_plan, flux_move_tenants
    TO flux_admin;

COMMENT ON FUNCTION flux_check(text, text) IS 'May the tenant use the feature right now? false for unknown tenants or features, NULL for NULL input';
COMMENT ON FUNCTION flux_check(text) IS 'flux_check for the session''s tenant, flux_current_tenant(); NULL when there is none';
COMMENT ON FUNCTION flux_decide(text, text, text) IS 'The decision with its reason (unknown_feature, unknown_tenant, not_permitted, feature_disabled, not_in_rollout, subscription_inactive, not_in_plan, limit_reached, rate_limited, ok), a message to show, the plan, limit and upgrade_plans';
COMMENT ON FUNCTION flux_entitlements(text) IS 'One decision per feature for the tenant, ordered by feature key';
COMMENT ON FUNCTION flux_value(text, text) IS 'The effective grant value (override, else plan, else addon) when the tenant is entitled, else NULL';
COMMENT ON FUNCTION flux_current_tenant() IS 'The session''s tenant: setting flux.tenant, else the claim flux.jwt_tenant_claim (default tenant_id) of request.jwt.claims, else NULL';
COMMENT ON FUNCTION flux_define_feature(text, text, text) IS 'Admin: define or redefine a feature (kind boolean, limit, metered, rate or credits); a NULL description keeps the current one';
COMMENT ON FUNCTION flux_define_plan(text, text, integer, boolean, interval) IS 'Admin: define or redefine a plan (rank orders plans cheapest first; at most one is_default); NULL name or grace_period keeps the current one';
COMMENT ON FUNCTION flux_grant(text, text, bigint, text, jsonb, bigint) IS 'Admin: grant a feature on a plan with a limit (NULL = unlimited), a period (metered: minute..billing_period; rate: an interval), a value and each subject''s own allowance inside the tenant''s (subject_limit)';
COMMENT ON FUNCTION flux_revoke(text, text) IS 'Admin: remove a feature from a plan';
COMMENT ON FUNCTION flux_subscribe(text, text, text, timestamptz, timestamptz, timestamptz, boolean) IS 'Admin: set a tenant''s plan and subscription status, creating the tenant when new';
COMMENT ON FUNCTION flux_override(text, text, boolean, bigint, timestamptz, timestamptz, text, jsonb) IS 'Admin: grant (enabled true), revoke (enabled false) or change the limit of one feature for one tenant, between starts_at and expires_at';
COMMENT ON FUNCTION flux_define_addon(text, text) IS 'Admin: define an addon';
COMMENT ON FUNCTION flux_grant_addon(text, text, bigint, jsonb) IS 'Admin: what one unit of an addon grants (limits add up: quantity x limit)';
COMMENT ON FUNCTION flux_attach_addon(text, text, integer) IS 'Admin: set a tenant''s quantity of an addon; 0 detaches it';
COMMENT ON FUNCTION flux._clock() IS 'The clock of every time rule: setting flux.now when set, else the transaction start';
COMMENT ON FUNCTION flux._check_feature(text, text, text) IS 'Validator used by the features trigger';
COMMENT ON FUNCTION flux._check_plan(text, boolean, interval, text) IS 'Validator used by the plans trigger';
COMMENT ON FUNCTION flux._check_plan_unused(text) IS 'Refuses to delete a plan that tenants are on';
COMMENT ON FUNCTION flux._check_grant(text, text, bigint, text) IS 'Validator used by the grants trigger; returns the period to store';
COMMENT ON FUNCTION flux._check_tenant(text, text, text, timestamptz, timestamptz, timestamptz, text) IS 'Validator used by the tenants trigger';
COMMENT ON FUNCTION flux._check_addon(text) IS 'Validator used by the addons trigger';
COMMENT ON FUNCTION flux._check_addon_unused(text) IS 'Refuses to delete an addon that tenants hold';
COMMENT ON FUNCTION flux._check_addon_grant(text, text, bigint) IS 'Validator used by the addon_grants trigger';
COMMENT ON FUNCTION flux._check_tenant_addon(text, text, integer) IS 'Validator used by the tenant_addons trigger';
COMMENT ON FUNCTION flux._check_override(text, text, bigint, timestamptz, timestamptz) IS 'Validator used by the overrides trigger';
COMMENT ON FUNCTION flux_set_flag(text, boolean, numeric, text) IS 'Admin: set a feature''s flag: kill switch (enabled) and rollout percentage (0..100, up to 4 decimals); NULL salt keeps the current one (default: the feature key)';
COMMENT ON FUNCTION flux_flag_allow(text, text) IS 'Admin: let a tenant or subject id in whatever the rollout percentage (the deny list and the kill switch still win)';
COMMENT ON FUNCTION flux_flag_deny(text, text) IS 'Admin: keep a tenant or subject id out whatever the percentage and the allow list';
COMMENT ON FUNCTION flux_flag_clear(text, text) IS 'Admin: take an id off both lists of a flag';
COMMENT ON FUNCTION flux._check_flag(text, numeric, text) IS 'Validator used by the flags trigger';
COMMENT ON FUNCTION flux._check_flag_list(text, text, text) IS 'Validator used by the flag_lists trigger';
COMMENT ON FUNCTION flux_consume(text, text, bigint, text, text) IS 'Atomically check and record usage: allowed records amount and returns the new used / remaining; denied records nothing; a repeated idempotency_key returns the first decision; rolls back with the caller''s transaction. Also charges the current API key''s counter and the subject''s, in one step with the tenant''s (all or none)';
COMMENT ON FUNCTION flux_release(text, text, bigint, text) IS 'Give units of a limit feature back (a seat freed); returns the tenant''s new used (never below 0); the current API key''s and the subject''s counters get them back too';
COMMENT ON FUNCTION flux_usage(text, text, text) IS 'Units used in the current period (limit: held now; rate: calls in the window), by the tenant or (subject) by one subject inside it; NULL for unknown keys and boolean features';
COMMENT ON FUNCTION flux_prune_usage_keys() IS 'Admin: delete idempotency keys older than flux.idempotency_ttl; returns how many';
COMMENT ON FUNCTION flux_enforce_limit(regclass, text, name) IS 'Admin: refuse INSERTs (and tenant changes) that would take a tenant''s row count in tbl past its limit of feature; existing rows are never touched';
COMMENT ON FUNCTION flux._enforce_limit_setup(oid, text, text) IS 'The body of flux_enforce_limit';
COMMENT ON FUNCTION flux._enforce_limit() IS 'Trigger made by flux_enforce_limit (arguments: feature, tenant column): refuses a row that would take its tenant past the limit of a feature, counting under a row lock of flux.limit_locks; runs only under the trigger names flux_enforce_limit gives';
COMMENT ON FUNCTION flux._cached_tenants() IS 'How many tenants this backend''s decision cache holds (at most flux.cache_tenants)';
COMMENT ON FUNCTION flux_create_api_key(text, text, timestamptz, text[]) IS 'Admin: create an API key for a tenant, optionally scoped to some features; returns flux_<id>_<secret> once, stores only SHA-256 of the secret';
COMMENT ON FUNCTION flux_authenticate(text) IS 'Check an API key; sets flux.tenant and makes the key current (its scopes and allowances apply) for the current transaction, and returns the tenant; unknown, revoked or expired keys raise 28000';
COMMENT ON FUNCTION flux_current_api_key() IS 'The id of the API key flux_authenticate made current in this transaction, else NULL';
COMMENT ON FUNCTION flux_current_subject() IS 'The session''s subject: setting flux.subject, else the claim flux.jwt_subject_claim (default sub) of request.jwt.claims, else NULL';
COMMENT ON FUNCTION flux_key_limit(text, text, bigint, text) IS 'Admin: an API key''s own allowance of a limit, metered or rate feature (period as in flux_grant), on top of its tenant''s; limit NULL removes it';
COMMENT ON FUNCTION flux_limit_report(numeric) IS 'Admin: every tenant and limit or metered feature whose use this period is at least threshold (default 0.8) of the limit it has now, most pressed first; one pass over the counters, each judged by the decision''s rules';
COMMENT ON FUNCTION flux_decision_stats() IS 'Admin: decisions of flux_check, flux_decide, flux_consume and the flux_protect policies by feature, plan and reason since the last reset, most frequent first (a check counts once per statement for each tenant); needs shared_preload_libraries = ''flux_entitlements''';
COMMENT ON FUNCTION flux_denials(text) IS 'Admin: denials by tenant, feature and reason, the tenants denied most first; only the given feature''s when not NULL; needs shared_preload_libraries = ''flux_entitlements''';
COMMENT ON FUNCTION flux_stats_reset() IS 'Admin: forget every decision and denial count, of every database (the statistics table is the server''s)';
COMMENT ON FUNCTION flux_stats_info() IS 'Admin: entries in the statistics table, the most it keeps (flux.stats_max), entries evicted to make room, and the last reset';
COMMENT ON FUNCTION flux_key_usage(text, text) IS 'Units an API key used of a feature in the current period (of its own allowance''s period, else its tenant''s grant''s)';
COMMENT ON FUNCTION flux._check_scopes(text[]) IS 'Validator used by the api_keys trigger: scopes name defined features';
COMMENT ON FUNCTION flux._check_key_limit(text, text, bigint, text) IS 'Validator used by the key_limits trigger; returns the period to store';
COMMENT ON FUNCTION flux._check_subject_limit(text, bigint) IS 'Validator used by the grants trigger: subject_limit only on limited kinds';
COMMENT ON FUNCTION flux._check_overage(text, boolean, bigint) IS 'Validator used by the grants trigger: overage only on limit and metered features, a cap >= 0 only with overage on';
COMMENT ON FUNCTION flux_set_overage(text, text, boolean, bigint) IS 'Admin: make a plan''s grant of a limit or metered feature soft: consumes past the limit are allowed up to limit + cap (NULL: no cap) and reported as overage; enabled => false makes it hard again';
COMMENT ON FUNCTION flux_alert(text, numeric) IS 'Admin: alert when a tenant''s use of a limit or metered feature in a period reaches threshold x its limit (0.8 = 80%, 1 = the limit; at most 10, four decimals): the first consume to get there writes one flux.usage_alerts row and sends NOTIFY flux_usage at commit';
COMMENT ON FUNCTION flux_alert_clear(text, numeric) IS 'Admin: stop alerting at this threshold of the feature (alerts written stay)';
COMMENT ON FUNCTION flux._check_alert(text, numeric) IS 'Validator used by the alerts trigger: a limit or metered feature, a threshold in (0, 10] with at most four decimals';
COMMENT ON FUNCTION flux._billable_usage() IS 'The body of the view flux.billable_usage';
COMMENT ON FUNCTION flux._check_cost(text, text, text, bigint) IS 'Validator used by the features trigger: a price draws from another feature of kind credits, and a pool stays one while features draw from it';
COMMENT ON FUNCTION flux_set_cost(text, text, bigint) IS 'Admin: each unit of feature consumed draws credits from pool (a feature of kind credits); credits => NULL removes the price';
COMMENT ON FUNCTION flux_add_credits(text, text, bigint, timestamptz, text, text) IS 'Admin: a purchased top-up of a credits pool (one flux.credit_ledger row, audited); a repeated idempotency_key adds nothing; returns the balance';
COMMENT ON FUNCTION flux_hold(text, text, bigint, interval, text) IS 'Reserve amount units of a limit, metered or credits feature or of a priced feature (counted as used, or reserved in its pool) until flux_settle, flux_release_hold or the ttl passes (by the clock, flux.now included); the decision''s hold_id names it; a repeated idempotency_key returns the first hold';
COMMENT ON FUNCTION flux_settle(text, bigint) IS 'Turn a hold into actual units of usage (more than held only if it fits, else a limit_reached decision and the hold stays open) and free the rest; an unknown, foreign, settled, released or expired hold is an error';
COMMENT ON FUNCTION flux_release_hold(text) IS 'Give a hold back whole; releasing it again, or once it has expired, does nothing more';
COMMENT ON FUNCTION flux_balance(text, text) IS 'What is left of a credits pool for the tenant now: the period''s allowance left plus live top-ups (NULL: unlimited)';
COMMENT ON FUNCTION flux_revoke_api_key(text) IS 'Admin: revoke the API key with this flux.api_keys.id';
COMMENT ON FUNCTION flux_protect(regclass, text, name, boolean) IS 'Admin: row-level security on tbl: rows of the session''s tenant only, and only while it is entitled to feature (decided once per statement); force => true applies it to the table owner too';
COMMENT ON FUNCTION flux._protect_setup(oid, text, text, boolean) IS 'The body of flux_protect';
COMMENT ON FUNCTION flux_map_price(text, text, text) IS 'Admin: map a Stripe price id or lookup_key to a plan or to an addon (exactly one)';
COMMENT ON FUNCTION flux_verify_stripe_signature(text, text, text, interval) IS 'Stripe-Signature check: HMAC-SHA256 of t.payload against any v1 entry, constant-time, false when t is outside the tolerance of the flux clock';

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
    flux._check_scopes, flux._check_key_limit, flux._check_subject_limit, flux._check_cost,
    flux._check_overage, flux._check_alert, flux._billable_usage()
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
