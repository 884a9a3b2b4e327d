-- flux_entitlements: the catalogue schema.
--
-- Loaded first (bootstrap) so the type and tables exist before the Rust
-- functions that use them. The tables are the source of truth; the admin
-- functions are upserts on them, and plain INSERT / UPDATE / DELETE in psql go
-- through the same triggers, which call the validators in src/validate.rs so
-- that both paths give the same errors.

-- Text reaches the Rust functions as &str, which must be UTF-8: in a
-- SQL_ASCII or LATIN1 database any argument with a non-ASCII byte would end
-- in an internal error. Refuse the database up front, with what to do.
DO $$
BEGIN
    IF pg_catalog.getdatabaseencoding() OPERATOR(pg_catalog.<>) 'UTF8' THEN
        RAISE EXCEPTION USING
            ERRCODE = '22021',
            MESSAGE = pg_catalog.format('flux_entitlements needs a UTF8 database; %s is %s',
                                        pg_catalog.current_database(), pg_catalog.getdatabaseencoding()),
            HINT = 'Create the database with ENCODING ''UTF8'' (and TEMPLATE template0).';
    END IF;
END
$$;

CREATE SCHEMA flux;
COMMENT ON SCHEMA flux IS 'flux_entitlements: features, plans, grants, tenants, addons and overrides; the flux_* functions live in the extension''s schema';

-- The answer to "may this tenant use this feature?".
CREATE TYPE flux.decision AS (
    allowed boolean,
    reason text,
    message text,
    tenant text,
    feature text,
    plan text,
    "limit" bigint,
    used bigint,
    remaining bigint,
    resets_at timestamptz,
    retry_after interval,
    upgrade_plans text[],
    kind text,
    subject text,
    api_key text,
    overage bigint,
    balance bigint,
    hold_id text
);
COMMENT ON TYPE flux.decision IS 'A decision: allowed, a typed reason (unknown_feature, unknown_tenant, not_permitted, feature_disabled, not_in_rollout, subscription_inactive, not_in_plan, limit_reached, rate_limited, ok), a sentence to show, and the figures behind it';
COMMENT ON COLUMN flux.decision.api_key IS 'The id of the API key current in the transaction (flux_authenticate) when it is the tenant''s; its scopes and allowances applied';
COMMENT ON COLUMN flux.decision.overage IS 'Units past a soft limit this period (NULL where it does not apply)';
COMMENT ON COLUMN flux.decision.balance IS 'Credits left in the pool (NULL where it does not apply)';
COMMENT ON COLUMN flux.decision.hold_id IS 'The hold a reservation made (NULL where it does not apply)';

CREATE TABLE flux.features (
    key         text PRIMARY KEY,
    kind        text NOT NULL DEFAULT 'boolean'
                CONSTRAINT features_kind_check CHECK (kind IN ('boolean', 'limit', 'metered', 'rate', 'credits')),
    description text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Last, where ALTER TABLE ... ADD COLUMN puts them in a database
    -- upgraded from 0.1.0.
    cost_pool   text REFERENCES flux.features (key) ON UPDATE CASCADE,
    cost_credits bigint CONSTRAINT features_cost_credits_check CHECK (cost_credits > 0),
    CONSTRAINT features_cost_check CHECK ((cost_pool IS NULL) = (cost_credits IS NULL))
);
COMMENT ON TABLE flux.features IS 'Capabilities the application gates, by key; application code checks these, never plan names';
COMMENT ON COLUMN flux.features.key IS 'Stable key used by flux_check (e.g. export, seats, api_calls)';
COMMENT ON COLUMN flux.features.kind IS 'boolean (on/off), limit (non-resetting allowance such as seats), metered (quota that resets each period), rate (calls per sliding window) or credits (a pool other features draw from)';
COMMENT ON COLUMN flux.features.cost_pool IS 'The credits pool each unit of this feature draws from (flux_set_cost); NULL: not priced';
COMMENT ON COLUMN flux.features.cost_credits IS 'Credits one unit of this feature draws from cost_pool';

CREATE TABLE flux.plans (
    key          text PRIMARY KEY,
    name         text,
    rank         integer NOT NULL DEFAULT 0,
    is_default   boolean NOT NULL DEFAULT false,
    grace_period interval
                 CONSTRAINT plans_grace_period_check CHECK (grace_period IS NULL OR grace_period >= interval '0'),
    created_at   timestamptz NOT NULL DEFAULT now(),
    listed       boolean NOT NULL DEFAULT true
);
-- At most one default plan: the free tier that tenants fall back to.
CREATE UNIQUE INDEX plans_one_default ON flux.plans (is_default) WHERE is_default;
COMMENT ON TABLE flux.plans IS 'Named bundles of grants; rank orders them cheapest first; at most one is_default plan applies to tenants with no live subscription';
COMMENT ON COLUMN flux.plans.rank IS 'Order of plans, cheapest first; upgrade_plans lists plans by rank';
COMMENT ON COLUMN flux.plans.listed IS 'Shown by flux_pricing_table; false for plans not sold any more (flux_copy_plan''s grandfathered copies)';
COMMENT ON COLUMN flux.plans.is_default IS 'The fallback (free) plan for tenants whose subscription is not live; at most one plan';
COMMENT ON COLUMN flux.plans.grace_period IS 'How long a past_due subscription stays live; NULL uses the setting flux.default_grace_period';
COMMENT ON INDEX flux.plans_one_default IS 'Enforces at most one default plan';

CREATE TABLE flux.grants (
    plan    text NOT NULL REFERENCES flux.plans (key) ON UPDATE CASCADE ON DELETE CASCADE,
    feature text NOT NULL REFERENCES flux.features (key) ON UPDATE CASCADE ON DELETE CASCADE,
    enabled boolean NOT NULL DEFAULT true,
    "limit" bigint CONSTRAINT grants_limit_check CHECK ("limit" >= 0),
    period  text,
    value   jsonb,
    subject_limit bigint CONSTRAINT grants_subject_limit_check CHECK (subject_limit >= 0),
    overage boolean NOT NULL DEFAULT false,
    overage_cap bigint CONSTRAINT grants_overage_cap_check CHECK (overage_cap >= 0),
    CONSTRAINT grants_overage_check CHECK (overage OR overage_cap IS NULL),
    PRIMARY KEY (plan, feature)
);
CREATE INDEX grants_feature ON flux.grants (feature);
COMMENT ON TABLE flux.grants IS 'What a plan grants: plan x feature, with a limit, a period and a value. Deleting the plan or the feature deletes its grants';
COMMENT ON COLUMN flux.grants.enabled IS 'false keeps the row but grants nothing';
COMMENT ON COLUMN flux.grants."limit" IS 'limit / metered / rate features: the allowance; NULL = unlimited';
COMMENT ON COLUMN flux.grants.overage IS 'limit / metered features: a soft limit (flux_set_overage): consumes past the limit are allowed up to limit + overage_cap and reported as overage';
COMMENT ON COLUMN flux.grants.overage_cap IS 'With overage: how far past the limit a period may go; NULL = no cap';
COMMENT ON COLUMN flux.grants.period IS 'metered: minute, hour, day, week, month or billing_period (default month); rate: the window as an interval such as 1 hour';
COMMENT ON COLUMN flux.grants.value IS 'Configuration the application reads with flux_value (e.g. ["csv","pdf"])';
COMMENT ON COLUMN flux.grants.subject_limit IS 'limit / metered / rate features: each subject''s (user''s) own allowance inside the tenant''s, in the same period; NULL = none';

CREATE TABLE flux.tenants (
    id                   text PRIMARY KEY,
    plan                 text REFERENCES flux.plans (key) ON UPDATE CASCADE ON DELETE RESTRICT,
    status               text NOT NULL DEFAULT 'active'
                         CONSTRAINT tenants_status_check CHECK (status IN ('trialing', 'active', 'past_due', 'canceled', 'paused')),
    trial_ends_at        timestamptz,
    current_period_start timestamptz,
    current_period_end   timestamptz,
    cancel_at_period_end boolean NOT NULL DEFAULT false,
    past_due_since       timestamptz,
    grace_until          timestamptz,
    billing_customer     text CONSTRAINT tenants_billing_customer_key UNIQUE,
    created_at           timestamptz NOT NULL DEFAULT now(),
    scheduled_plan       text REFERENCES flux.plans (key) ON UPDATE CASCADE ON DELETE RESTRICT,
    scheduled_at         timestamptz,
    CONSTRAINT tenants_scheduled_check CHECK ((scheduled_plan IS NULL) = (scheduled_at IS NULL))
);
CREATE INDEX tenants_plan ON flux.tenants (plan);
CREATE INDEX tenants_scheduled_plan ON flux.tenants (scheduled_plan) WHERE scheduled_plan IS NOT NULL;
COMMENT ON TABLE flux.tenants IS 'Accounts that pay, by id, each with one subscription: plan, status, trial and period timestamps';
COMMENT ON COLUMN flux.tenants.plan IS 'The subscribed plan; NULL means no subscription (the default plan applies). A plan with tenants cannot be deleted';
COMMENT ON COLUMN flux.tenants.status IS 'trialing, active, past_due, canceled or paused; see flux_decide for when each is live';
COMMENT ON COLUMN flux.tenants.trial_ends_at IS 'trialing: the subscription is live until this moment (required while trialing)';
COMMENT ON COLUMN flux.tenants.current_period_start IS 'Start of the current billing period (anchors billing_period quotas)';
COMMENT ON COLUMN flux.tenants.current_period_end IS 'End of the current billing period; with cancel_at_period_end the subscription ends here';
COMMENT ON COLUMN flux.tenants.cancel_at_period_end IS 'true: an active subscription stops being live at current_period_end';
COMMENT ON COLUMN flux.tenants.past_due_since IS 'Set from the clock when status becomes past_due, cleared when it leaves it';
COMMENT ON COLUMN flux.tenants.billing_customer IS 'The billing system''s customer id (Stripe cus_...), unique; how events without tenant metadata find their tenant';
COMMENT ON COLUMN flux.tenants.scheduled_plan IS 'A plan change to come (flux_schedule_change): the plan from scheduled_at on, by the clock, with no job; a write that sets plan replaces it';
COMMENT ON COLUMN flux.tenants.scheduled_at IS 'When scheduled_plan takes effect (set together with it); the row''s next write after it makes it the plan';
COMMENT ON COLUMN flux.tenants.grace_until IS 'past_due: live until this moment; NULL means past_due_since + the plan''s grace period';

CREATE TABLE flux.addons (
    key        text PRIMARY KEY,
    name       text,
    created_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE flux.addons IS 'Bundles of grants bought in a quantity on top of a plan (extra seats, more API calls)';

CREATE TABLE flux.addon_grants (
    addon   text NOT NULL REFERENCES flux.addons (key) ON UPDATE CASCADE ON DELETE CASCADE,
    feature text NOT NULL REFERENCES flux.features (key) ON UPDATE CASCADE ON DELETE CASCADE,
    "limit" bigint CONSTRAINT addon_grants_limit_check CHECK ("limit" >= 0),
    value   jsonb,
    PRIMARY KEY (addon, feature)
);
CREATE INDEX addon_grants_feature ON flux.addon_grants (feature);
COMMENT ON TABLE flux.addon_grants IS 'What one unit of an addon grants; limits add up (quantity x limit), NULL = unlimited';
COMMENT ON COLUMN flux.addon_grants."limit" IS 'Per unit of the addon; NULL = unlimited';

CREATE TABLE flux.tenant_addons (
    tenant   text NOT NULL REFERENCES flux.tenants (id) ON UPDATE CASCADE ON DELETE CASCADE,
    addon    text NOT NULL REFERENCES flux.addons (key) ON UPDATE CASCADE ON DELETE RESTRICT,
    quantity integer NOT NULL DEFAULT 1 CONSTRAINT tenant_addons_quantity_check CHECK (quantity > 0),
    PRIMARY KEY (tenant, addon)
);
CREATE INDEX tenant_addons_addon ON flux.tenant_addons (addon);
COMMENT ON TABLE flux.tenant_addons IS 'Addons a tenant has bought, with quantities; an addon that tenants hold cannot be deleted';

CREATE TABLE flux.overrides (
    tenant     text NOT NULL REFERENCES flux.tenants (id) ON UPDATE CASCADE ON DELETE CASCADE,
    feature    text NOT NULL REFERENCES flux.features (key) ON UPDATE CASCADE ON DELETE CASCADE,
    enabled    boolean NOT NULL DEFAULT true,
    "limit"    bigint CONSTRAINT overrides_limit_check CHECK ("limit" >= 0),
    starts_at  timestamptz,
    expires_at timestamptz,
    reason     text,
    value      jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, feature),
    CONSTRAINT overrides_window_check CHECK (starts_at IS NULL OR expires_at IS NULL OR expires_at > starts_at)
);
CREATE INDEX overrides_feature ON flux.overrides (feature);
COMMENT ON TABLE flux.overrides IS 'Per-tenant grants, limit changes and revocations of one feature (promotions, single-feature trials, enterprise deals); they apply whatever the subscription state';
COMMENT ON COLUMN flux.overrides.enabled IS 'true grants the feature; false revokes it';
COMMENT ON COLUMN flux.overrides."limit" IS 'Replaces the limit computed from plan and addons; NULL = unlimited';
COMMENT ON COLUMN flux.overrides.starts_at IS 'The override applies from this moment (NULL: at once)';
COMMENT ON COLUMN flux.overrides.expires_at IS 'The override stops applying at this moment (NULL: never)';
COMMENT ON COLUMN flux.overrides.reason IS 'Why it was given, for people (e.g. "enterprise deal #42")';
COMMENT ON COLUMN flux.overrides.value IS 'Replaces the grant value when not NULL';

CREATE TABLE flux.flags (
    feature         text PRIMARY KEY REFERENCES flux.features (key) ON UPDATE CASCADE ON DELETE CASCADE,
    enabled         boolean NOT NULL DEFAULT true,
    rollout_percent numeric NOT NULL DEFAULT 100
                    CONSTRAINT flags_rollout_percent_check CHECK (rollout_percent >= 0 AND rollout_percent <= 100),
    salt            text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE flux.flags IS 'Rollout gates on features: a kill switch and a deterministic percentage; a feature with no flag is enabled at 100%. Checked before entitlement';
COMMENT ON COLUMN flux.flags.enabled IS 'false is the kill switch: nobody passes, not even the allow list';
COMMENT ON COLUMN flux.flags.rollout_percent IS '0 to 100, up to 4 decimal places; an id is in when xxh3_64(salt || 0x00 || id) mod 1000000 < rollout_percent x 10000';
COMMENT ON COLUMN flux.flags.salt IS 'Hash salt for bucketing; NULL means the feature key, so flags roll out independently';

CREATE TABLE flux.flag_lists (
    feature text NOT NULL REFERENCES flux.flags (feature) ON UPDATE CASCADE ON DELETE CASCADE,
    id      text NOT NULL,
    list    text NOT NULL CONSTRAINT flag_lists_list_check CHECK (list IN ('allow', 'deny')),
    PRIMARY KEY (feature, id, list)
);
COMMENT ON TABLE flux.flag_lists IS 'Allow and deny lists of a flag, by tenant id or subject id; deny wins over allow, the kill switch over both';
COMMENT ON COLUMN flux.flag_lists.id IS 'A tenant id or a subject (user) id';
COMMENT ON COLUMN flux.flag_lists.list IS 'allow: in whatever the percentage; deny: out whatever the percentage';

-- Usage: written by flux_consume / flux_release, one row per tenant, feature
-- and period; history is kept (it is billing data).
CREATE TABLE flux.usage (
    tenant       text NOT NULL REFERENCES flux.tenants (id) ON UPDATE CASCADE ON DELETE CASCADE,
    feature      text NOT NULL REFERENCES flux.features (key) ON UPDATE CASCADE ON DELETE CASCADE,
    period_start timestamptz NOT NULL,
    used         bigint NOT NULL DEFAULT 0 CONSTRAINT usage_used_check CHECK (used >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, feature, period_start)
) WITH (fillfactor = 50);
CREATE INDEX usage_feature ON flux.usage (feature);
COMMENT ON TABLE flux.usage IS 'Recorded usage of limit and metered features: one row per tenant, feature and period, kept as billing history; the current period is one primary-key probe. Half of each page is kept free (fillfactor 50) for the next versions of its rows';
COMMENT ON COLUMN flux.usage.period_start IS 'metered: the start of the period (UTC calendar, or the billing period); limit: -infinity (never resets)';
COMMENT ON COLUMN flux.usage.used IS 'Units consumed in the period (limit features: held now, after releases)';

CREATE TABLE flux.rate_state (
    tenant  text NOT NULL REFERENCES flux.tenants (id) ON UPDATE CASCADE ON DELETE CASCADE,
    feature text NOT NULL REFERENCES flux.features (key) ON UPDATE CASCADE ON DELETE CASCADE,
    tat     timestamptz NOT NULL,
    PRIMARY KEY (tenant, feature)
);
COMMENT ON TABLE flux.rate_state IS 'Rate limiter state (GCRA): one theoretical arrival time per tenant and feature';
COMMENT ON COLUMN flux.rate_state.tat IS 'Theoretical arrival time: each allowed call moves it window / limit ahead; a call passes while it stays within one window of now';

CREATE TABLE flux.usage_keys (
    tenant          text NOT NULL,
    feature         text NOT NULL,
    idempotency_key text NOT NULL,
    decision        jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, feature, idempotency_key)
);
CREATE INDEX usage_keys_created_at ON flux.usage_keys (created_at);
COMMENT ON COLUMN flux.usage_keys.decision IS 'The first decision, returned again for a repeated key';
COMMENT ON TABLE flux.usage_keys IS 'Idempotency keys of flux_consume with the first decision; kept flux.idempotency_ttl (default 7 days), then pruned by flux_prune_usage_keys()';

CREATE TABLE flux.api_keys (
    id          text PRIMARY KEY,
    tenant      text NOT NULL REFERENCES flux.tenants (id) ON UPDATE CASCADE ON DELETE CASCADE,
    name        text NOT NULL,
    secret_hash bytea NOT NULL CONSTRAINT api_keys_secret_hash_check CHECK (length(secret_hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz,
    scopes      text[]
);
CREATE INDEX api_keys_tenant ON flux.api_keys (tenant);
COMMENT ON TABLE flux.api_keys IS 'API keys of tenants: the public id and SHA-256 of the secret, never the key; readable only by flux_admin and the owner';
COMMENT ON COLUMN flux.api_keys.id IS 'Public part of the key (flux_<id>_<secret>), 12 hex digits';
COMMENT ON COLUMN flux.api_keys.secret_hash IS 'SHA-256 of the 256-bit secret; the key itself is shown once by flux_create_api_key';
COMMENT ON COLUMN flux.api_keys.expires_at IS 'The key stops working at this moment (NULL: never)';
COMMENT ON COLUMN flux.api_keys.revoked_at IS 'Set by flux_revoke_api_key: the key stops working from this moment';
COMMENT ON COLUMN flux.api_keys.scopes IS 'The feature keys this key may use (a decision for another is not_permitted); NULL = every feature';

-- What one API key may use of a feature, on top of its tenant's allowance.
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

-- Usage of callers inside a tenant: API keys and subjects (users). Rows are
-- keyed by tenant first, as flux.usage's: no row is shared across tenants.
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

-- The audit log: every change to the catalogue, tenants, flags and API keys,
-- written in the same transaction by triggers (a rolled-back change leaves
-- nothing). Usage is not audited: it is billing data with its own table.
CREATE TABLE flux.audit_log (
    id     bigserial PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT now(),
    actor  text NOT NULL,
    action text NOT NULL CONSTRAINT audit_log_action_check CHECK (action IN ('insert', 'update', 'delete')),
    entity text NOT NULL,
    key    text NOT NULL,
    tenant text,
    old    jsonb,
    new    jsonb,
    xact   bigint NOT NULL DEFAULT txid_current(),
    -- Last, where ALTER TABLE ... ADD COLUMN puts it in a database upgraded
    -- from 0.1.0, so both have the same row type.
    role   text
);
CREATE INDEX audit_log_tenant ON flux.audit_log (tenant, at);
CREATE INDEX audit_log_entity ON flux.audit_log (entity, key, at);
COMMENT ON TABLE flux.audit_log IS 'Who changed what: one row per inserted, updated or deleted row of the flux catalogue, tenants, flags and API keys (never a key''s hash), written in the same transaction';
COMMENT ON COLUMN flux.audit_log.at IS 'Transaction time of the change';
COMMENT ON COLUMN flux.audit_log.actor IS 'The setting flux.actor when set (e.g. a Stripe event id), else the role that made the change (current_user); only superusers and members of flux_admin can set flux.actor';
COMMENT ON COLUMN flux.audit_log.role IS 'The role that made the change (current_user at the time, which flux.actor cannot change)';
COMMENT ON COLUMN flux.audit_log.entity IS 'The table: features, plans, grants, tenants, addons, addon_grants, tenant_addons, overrides, flags, flag_lists, api_keys, key_limits or credit_ledger (top-ups)';
COMMENT ON COLUMN flux.audit_log.key IS 'The row''s key, parts joined by / (e.g. pro/export for a grant)';
COMMENT ON COLUMN flux.audit_log.tenant IS 'The tenant the change concerns, when there is one (for flag lists: the listed id)';
COMMENT ON COLUMN flux.audit_log.old IS 'The row before the change (NULL for an insert); API keys without their hash';
COMMENT ON COLUMN flux.audit_log.new IS 'The row after the change (NULL for a delete)';
COMMENT ON SEQUENCE flux.audit_log_id_seq IS 'Numbers the audit log in the order changes were written';
COMMENT ON COLUMN flux.audit_log.xact IS 'Transaction id: changes made together share it';

-- Billing sync (src/billing.rs).
CREATE TABLE flux.billing_prices (
    price text PRIMARY KEY,
    plan  text REFERENCES flux.plans (key) ON UPDATE CASCADE ON DELETE CASCADE,
    addon text REFERENCES flux.addons (key) ON UPDATE CASCADE ON DELETE CASCADE,
    CONSTRAINT billing_prices_one_target CHECK (num_nonnulls(plan, addon) = 1)
);
COMMENT ON COLUMN flux.billing_prices.price IS 'A Stripe price id (price_...) or a price lookup_key';
COMMENT ON TABLE flux.billing_prices IS 'Stripe price ids or lookup keys mapped to a plan or to an addon (exactly one)';

CREATE TABLE flux.billing_events (
    id           text PRIMARY KEY,
    type         text NOT NULL,
    created      timestamptz NOT NULL,
    tenant       text,
    outcome      text CONSTRAINT billing_events_outcome_check
                 CHECK (outcome IN ('applied', 'duplicate', 'stale', 'unmapped', 'ignored')),
    deliveries   integer NOT NULL DEFAULT 1,
    received_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_events_tenant ON flux.billing_events (tenant, created);
COMMENT ON COLUMN flux.billing_events.created IS 'The event''s created time in Stripe (its order)';
COMMENT ON COLUMN flux.billing_events.outcome IS 'applied, duplicate, stale, unmapped or ignored (what flux_apply_stripe_event answered)';
COMMENT ON COLUMN flux.billing_events.deliveries IS 'How many times the event arrived; all but the first answered duplicate';
COMMENT ON TABLE flux.billing_events IS 'Every Stripe event received, once per event id, with its outcome; deliveries counts repeats (each answered duplicate)';

CREATE TABLE flux.billing_subscriptions (
    id                 text PRIMARY KEY,
    tenant             text,
    last_event_created bigint
);
COMMENT ON TABLE flux.billing_subscriptions IS 'Per Stripe subscription, the created time (Unix seconds) of the last event applied: older events are stale';

-- Validation triggers: thin wrappers that hand the row to the Rust validators
-- (src/validate.rs), so psql DML gets the same errors as the admin functions.

CREATE FUNCTION flux._features_validate() RETURNS trigger LANGUAGE plpgsql
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
CREATE TRIGGER features_validate BEFORE INSERT OR UPDATE ON flux.features
    FOR EACH ROW EXECUTE FUNCTION flux._features_validate();

CREATE FUNCTION flux._plans_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.plans'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._plans_validate()', 'flux.plans', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_plan(NEW.key, NEW.is_default, NEW.grace_period, CASE WHEN TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN OLD.key END);
    RETURN NEW;
END $$;
CREATE TRIGGER plans_validate BEFORE INSERT OR UPDATE ON flux.plans
    FOR EACH ROW EXECUTE FUNCTION flux._plans_validate();

CREATE FUNCTION flux._plans_guard_delete() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.plans'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._plans_guard_delete()', 'flux.plans', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_plan_unused(OLD.key);
    RETURN OLD;
END $$;
CREATE TRIGGER plans_guard_delete BEFORE DELETE ON flux.plans
    FOR EACH ROW EXECUTE FUNCTION flux._plans_guard_delete();

CREATE FUNCTION flux._grants_validate() RETURNS trigger LANGUAGE plpgsql
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
CREATE TRIGGER grants_validate BEFORE INSERT OR UPDATE ON flux.grants
    FOR EACH ROW EXECUTE FUNCTION flux._grants_validate();

CREATE FUNCTION flux._tenants_validate() RETURNS trigger LANGUAGE plpgsql
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
CREATE TRIGGER tenants_validate BEFORE INSERT OR UPDATE ON flux.tenants
    FOR EACH ROW EXECUTE FUNCTION flux._tenants_validate();

CREATE FUNCTION flux._addons_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.addons'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._addons_validate()', 'flux.addons', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_addon(NEW.key);
    RETURN NEW;
END $$;
CREATE TRIGGER addons_validate BEFORE INSERT OR UPDATE ON flux.addons
    FOR EACH ROW EXECUTE FUNCTION flux._addons_validate();

CREATE FUNCTION flux._addons_guard_delete() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.addons'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._addons_guard_delete()', 'flux.addons', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_addon_unused(OLD.key);
    RETURN OLD;
END $$;
CREATE TRIGGER addons_guard_delete BEFORE DELETE ON flux.addons
    FOR EACH ROW EXECUTE FUNCTION flux._addons_guard_delete();

CREATE FUNCTION flux._addon_grants_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.addon_grants'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._addon_grants_validate()', 'flux.addon_grants', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_addon_grant(NEW.addon, NEW.feature, NEW."limit");
    RETURN NEW;
END $$;
CREATE TRIGGER addon_grants_validate BEFORE INSERT OR UPDATE ON flux.addon_grants
    FOR EACH ROW EXECUTE FUNCTION flux._addon_grants_validate();

CREATE FUNCTION flux._tenant_addons_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.tenant_addons'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._tenant_addons_validate()', 'flux.tenant_addons', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_tenant_addon(NEW.tenant, NEW.addon, NEW.quantity);
    RETURN NEW;
END $$;
CREATE TRIGGER tenant_addons_validate BEFORE INSERT OR UPDATE ON flux.tenant_addons
    FOR EACH ROW EXECUTE FUNCTION flux._tenant_addons_validate();

CREATE FUNCTION flux._overrides_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.overrides'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._overrides_validate()', 'flux.overrides', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_override(NEW.tenant, NEW.feature, NEW."limit", NEW.starts_at, NEW.expires_at);
    RETURN NEW;
END $$;
CREATE TRIGGER overrides_validate BEFORE INSERT OR UPDATE ON flux.overrides
    FOR EACH ROW EXECUTE FUNCTION flux._overrides_validate();

CREATE FUNCTION flux._flags_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.flags'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._flags_validate()', 'flux.flags', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_flag(NEW.feature, NEW.rollout_percent, NEW.salt);
    RETURN NEW;
END $$;
CREATE TRIGGER flags_validate BEFORE INSERT OR UPDATE ON flux.flags
    FOR EACH ROW EXECUTE FUNCTION flux._flags_validate();

CREATE FUNCTION flux._flag_lists_validate() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'flux.flag_lists'::pg_catalog.regclass THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = pg_catalog.format(
            '%s is the trigger of %s, not of %s', 'flux._flag_lists_validate()', 'flux.flag_lists', TG_RELID::pg_catalog.regclass);
    END IF;
    PERFORM flux._check_flag_list(NEW.feature, NEW.id, NEW.list);
    RETURN NEW;
END $$;
CREATE TRIGGER flag_lists_validate BEFORE INSERT OR UPDATE ON flux.flag_lists
    FOR EACH ROW EXECUTE FUNCTION flux._flag_lists_validate();

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

COMMENT ON FUNCTION flux._features_validate() IS 'Trigger: validates a feature row (flux._check_feature)';
COMMENT ON FUNCTION flux._plans_validate() IS 'Trigger: validates a plan row (flux._check_plan)';
COMMENT ON FUNCTION flux._plans_guard_delete() IS 'Trigger: refuses to delete a plan that tenants are on';
COMMENT ON FUNCTION flux._grants_validate() IS 'Trigger: validates a grant and normalises its period (flux._check_grant)';
COMMENT ON FUNCTION flux._tenants_validate() IS 'Trigger: keeps past_due_since in step with status, makes a due scheduled plan change the plan (a write that sets the plan replaces one to come), and validates the subscription (flux._check_tenant)';
COMMENT ON FUNCTION flux._addons_validate() IS 'Trigger: validates an addon row';
COMMENT ON FUNCTION flux._addons_guard_delete() IS 'Trigger: refuses to delete an addon that tenants hold';
COMMENT ON FUNCTION flux._addon_grants_validate() IS 'Trigger: validates an addon grant';
COMMENT ON FUNCTION flux._tenant_addons_validate() IS 'Trigger: validates a tenant''s addon quantity';
COMMENT ON FUNCTION flux._overrides_validate() IS 'Trigger: validates an override';
COMMENT ON FUNCTION flux._flags_validate() IS 'Trigger: validates a flag (flux._check_flag)';
COMMENT ON FUNCTION flux._flag_lists_validate() IS 'Trigger: validates an allow / deny list entry';
COMMENT ON FUNCTION flux._api_keys_validate() IS 'Trigger: an API key''s scopes name defined features';
COMMENT ON FUNCTION flux._key_limits_validate() IS 'Trigger: validates an API key''s allowance (its feature''s kind and period)';

-- pg_dump / pg_restore carry every row of these tables.
SELECT pg_catalog.pg_extension_config_dump('flux.features', '');
SELECT pg_catalog.pg_extension_config_dump('flux.plans', '');
SELECT pg_catalog.pg_extension_config_dump('flux.grants', '');
SELECT pg_catalog.pg_extension_config_dump('flux.tenants', '');
SELECT pg_catalog.pg_extension_config_dump('flux.addons', '');
SELECT pg_catalog.pg_extension_config_dump('flux.addon_grants', '');
SELECT pg_catalog.pg_extension_config_dump('flux.tenant_addons', '');
SELECT pg_catalog.pg_extension_config_dump('flux.overrides', '');
SELECT pg_catalog.pg_extension_config_dump('flux.flags', '');
SELECT pg_catalog.pg_extension_config_dump('flux.flag_lists', '');
SELECT pg_catalog.pg_extension_config_dump('flux.usage', '');
SELECT pg_catalog.pg_extension_config_dump('flux.rate_state', '');
SELECT pg_catalog.pg_extension_config_dump('flux.usage_keys', '');
SELECT pg_catalog.pg_extension_config_dump('flux.api_keys', '');
SELECT pg_catalog.pg_extension_config_dump('flux.key_limits', '');
SELECT pg_catalog.pg_extension_config_dump('flux.caller_usage', '');
SELECT pg_catalog.pg_extension_config_dump('flux.caller_rate_state', '');
SELECT pg_catalog.pg_extension_config_dump('flux.credit_ledger', '');
SELECT pg_catalog.pg_extension_config_dump('flux.credit_ledger_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('flux.holds', '');
SELECT pg_catalog.pg_extension_config_dump('flux.hold_charges', '');
SELECT pg_catalog.pg_extension_config_dump('flux.held_features', '');
SELECT pg_catalog.pg_extension_config_dump('flux.alerts', '');
SELECT pg_catalog.pg_extension_config_dump('flux.usage_alerts', '');
SELECT pg_catalog.pg_extension_config_dump('flux.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('flux.audit_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('flux.billing_prices', '');
SELECT pg_catalog.pg_extension_config_dump('flux.billing_events', '');
SELECT pg_catalog.pg_extension_config_dump('flux.billing_subscriptions', '');
