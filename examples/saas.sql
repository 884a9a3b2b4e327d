-- An example SaaS catalogue: four plans, features of every kind, tenants in
-- every subscription state, an addon and overrides. Loaded by `make demo`.
-- Times are relative to now() so the demo reads the same any day.

CREATE EXTENSION IF NOT EXISTS flux_entitlements;

-- Capabilities the application checks (never plan names).
SELECT flux_define_feature('export',    'metered', 'Export reports; a daily quota');
SELECT flux_define_feature('sso',       'boolean', 'Single sign-on (SAML / OIDC)');
SELECT flux_define_feature('reports',   'boolean', 'Scheduled reports; value = allowed formats');
SELECT flux_define_feature('seats',     'limit',   'Members in the workspace');
SELECT flux_define_feature('api_calls', 'metered', 'API calls per month');
SELECT flux_define_feature('api_rate',  'rate',    'API requests per minute');
SELECT flux_define_feature('analytics', 'boolean', 'The new analytics dashboard (rolling out)');

-- Plans, cheapest first; free is the fallback for tenants with no live subscription.
SELECT flux_define_plan('free',       'Free',       rank => 0, is_default => true);
SELECT flux_define_plan('starter',    'Starter',    rank => 1);
SELECT flux_define_plan('pro',        'Pro',        rank => 2, grace_period => '14 days');
SELECT flux_define_plan('enterprise', 'Enterprise', rank => 3);

-- export: only on Pro (50 a day) and Enterprise (unlimited).
SELECT flux_grant('pro',        'export', 50,   'day');
SELECT flux_grant('enterprise', 'export', NULL, 'day');
SELECT flux_grant('enterprise', 'sso');
SELECT flux_grant('starter',    'reports', value => '["csv"]');
SELECT flux_grant('pro',        'reports', value => '["csv", "pdf"]');
SELECT flux_grant('enterprise', 'reports', value => '["csv", "pdf", "xlsx"]');
SELECT flux_grant('free',       'seats', 1);
SELECT flux_grant('starter',    'seats', 3);
SELECT flux_grant('pro',        'seats', 10);
SELECT flux_grant('enterprise', 'seats');
SELECT flux_grant('free',       'api_calls', 1000,   'month');
SELECT flux_grant('starter',    'api_calls', 10000,  'month');
SELECT flux_grant('pro',        'api_calls', 100000, 'month');
SELECT flux_grant('enterprise', 'api_calls', NULL,   'month');
SELECT flux_grant('free',       'api_rate', 10,   '1 minute');
SELECT flux_grant('starter',    'api_rate', 60,   '1 minute');
SELECT flux_grant('pro',        'api_rate', 600,  '1 minute');
SELECT flux_grant('enterprise', 'api_rate', 6000, '1 minute');

-- analytics: only on Pro and Enterprise, and rolled out to 20% of tenants;
-- acme is a design partner.
SELECT flux_grant('pro',        'analytics');
SELECT flux_grant('enterprise', 'analytics');
SELECT flux_set_flag('analytics', rollout_percent => 20);
SELECT flux_flag_allow('analytics', 'acme');

-- An addon: five more seats per pack.
SELECT flux_define_addon('seat_pack', 'Five extra seats');
SELECT flux_grant_addon('seat_pack', 'seats', 5);

-- Tenants in every lifecycle state.
SELECT flux_subscribe('acme',     'pro');
SELECT flux_subscribe('initech',  'starter');
SELECT flux_subscribe('globex',   'pro', 'trialing', trial_ends_at => now() + interval '14 days');
SELECT flux_subscribe('hooli',    'enterprise', 'past_due');     -- just failed to pay: in grace
SELECT flux_subscribe('umbrella', 'pro');
UPDATE flux.tenants SET status = 'past_due', past_due_since = now() - interval '20 days'
 WHERE id = 'umbrella';                                            -- grace (14 days) is over
SELECT flux_subscribe('soylent',  'pro', current_period_end => now() + interval '10 days',
                      cancel_at_period_end => true);              -- canceling, still live
SELECT flux_subscribe('stark',    'starter', 'canceled');
SELECT flux_subscribe('wayne',    'pro', 'paused');
SELECT flux_subscribe('oscorp',   'starter');
SELECT flux_attach_addon('oscorp', 'seat_pack', 2);               -- 3 + 2 x 5 = 13 seats
SELECT flux_subscribe('piedpiper', NULL);                         -- no subscription: free

-- Overrides: a promotion and a revocation.
SELECT flux_override('initech', 'sso', starts_at => now() - interval '1 day',
                     expires_at => now() + interval '30 days', reason => 'SSO trial for the security review');
SELECT flux_override('acme', 'export', enabled => false, reason => 'export abuse under review');

-- Some usage: exports today, seats held, API calls this month.
SELECT flux_consume('globex',  'export', 12);
SELECT flux_consume('soylent', 'export', 50);
SELECT flux_consume('acme',    'seats', 4);
SELECT flux_consume('oscorp',  'seats', 13);
SELECT flux_consume('initech', 'api_calls', 9990);

-- Billing: Stripe prices mapped to plans and addons; acme's Stripe customer.
SELECT flux_map_price('price_pro_monthly', plan => 'pro');
SELECT flux_map_price('price_enterprise_monthly', plan => 'enterprise');
SELECT flux_map_price('price_seat_pack', addon => 'seat_pack');
UPDATE flux.tenants SET billing_customer = 'cus_acme' WHERE id = 'acme';
