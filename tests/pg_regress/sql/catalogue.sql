-- Defining the catalogue: features, plans, grants, addons; idempotent upserts;
-- bad input named in the error with a fitting SQLSTATE.
\i tests/pg_regress/common/setup.sql

SELECT flux_define_feature('export', 'metered', 'Export reports');
SELECT flux_define_feature('sso');
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_feature('api_rate', 'rate');
SELECT flux_define_plan('free', 'Free', 0, true);
SELECT flux_define_plan('pro', 'Pro', rank => 2);
SELECT flux_define_plan('enterprise', rank => 3);
SELECT flux_grant('pro', 'export', 50, 'day');
SELECT flux_grant('enterprise', 'export');
SELECT flux_grant('pro', 'seats', 10);
SELECT flux_grant('free', 'api_rate', 10, '1 minute');

-- Idempotent: the same call twice changes nothing; a NULL description keeps the old one.
SELECT flux_define_feature('export', 'metered');
SELECT flux_grant('pro', 'export', 50, 'day');
SELECT key, kind, description FROM flux.features ORDER BY key;
-- A metered grant without a period resets monthly.
SELECT flux_grant('enterprise', 'export');
SELECT plan, feature, enabled, "limit", period, value FROM flux.grants ORDER BY plan, feature;

-- Bad input: the message names the value and what would be right.
SELECT try($$SELECT flux_define_feature('x', 'bool')$$);
SELECT try($$SELECT flux_define_feature('', 'boolean')$$);
SELECT try($$SELECT flux_define_feature(' padded')$$);
SELECT try($$SELECT flux_define_feature(repeat('k', 1000000))$$);
SELECT try($$SELECT flux_grant('pro', 'export', 10, 'fortnight')$$);
SELECT try($$SELECT flux_grant('pro', 'seats', -1)$$);
SELECT try($$SELECT flux_grant('pro', 'sso', 5)$$);
SELECT try($$SELECT flux_grant('pro', 'seats', 5, 'day')$$);
SELECT try($$SELECT flux_grant('pro', 'api_rate', 5)$$);
SELECT try($$SELECT flux_grant('pro', 'api_rate', 5, '1 month')$$);
SELECT try($$SELECT flux_grant('gold', 'export')$$);
SELECT try($$SELECT flux_grant('pro', 'exprot')$$);
SELECT try($$SELECT flux_revoke('gold', 'export')$$);
SELECT try($$SELECT flux_define_plan('free2', is_default => true)$$);
SELECT try($$SELECT flux_define_plan('cheap', grace_period => '-1 day')$$);
SELECT try($$SELECT flux_define_feature(NULL)$$);
-- Nothing was half-written by the failures above.
SELECT count(*) AS features FROM flux.features;
SELECT count(*) AS plans FROM flux.plans;
SELECT count(*) AS grants FROM flux.grants;

-- Changing a feature's kind must keep its grants valid.
SELECT try($$SELECT flux_define_feature('seats', 'boolean')$$);
SELECT try($$SELECT flux_define_feature('export', 'rate')$$);

-- Revoke is idempotent.
SELECT flux_revoke('pro', 'seats');
SELECT flux_revoke('pro', 'seats');
SELECT count(*) FROM flux.grants WHERE plan = 'pro' AND feature = 'seats';

-- Addons.
SELECT flux_define_addon('seat_pack', 'Five seats');
SELECT flux_grant_addon('seat_pack', 'seats', 5);
SELECT try($$SELECT flux_grant_addon('seat_pack', 'seats', -5)$$);
SELECT try($$SELECT flux_grant_addon('nope', 'seats', 5)$$);
SELECT * FROM flux.addon_grants;

DROP EXTENSION flux_entitlements;
DROP FUNCTION try(text);
