-- Credits (0.2): a pool of credits that features draw from. A plan gives
-- 1,000 a month (no rollover); a customer buys 5,000 more that expire in a
-- year; a chat message costs 1 and an image 20. Draws take the month's
-- allowance first, then top-ups by earliest expiry, each one ledger row,
-- all in the caller's transaction.
SET client_min_messages = warning;
DROP ROLE IF EXISTS credits_app;
RESET client_min_messages;
\i tests/pg_regress/common/setup.sql
CREATE ROLE credits_app LOGIN;

SELECT flux_define_feature('ai_credits', 'credits', 'Credits for AI features');
SELECT flux_define_feature('chat', 'metered');
SELECT flux_define_feature('image');
SELECT flux_define_plan('free', rank => 0, is_default => true);
SELECT flux_define_plan('pro', rank => 1);
SELECT flux_grant('pro', 'ai_credits', 1000, 'month');
SELECT flux_grant('pro', 'chat', NULL, 'month');
SELECT flux_grant('pro', 'image');
SELECT flux_set_cost('chat', 'ai_credits', 1);
SELECT flux_set_cost('image', 'ai_credits', 20);
SELECT key, kind, cost_pool, cost_credits FROM flux.features ORDER BY key;
SET flux.now = '2026-12-01 10:00+00';
SELECT flux_subscribe('acme', 'pro');
SELECT flux_subscribe('globex', 'free');

-- 1. The month's allowance: the pool's decision shows it.
SELECT allowed, reason, "limit", used, remaining, balance, message FROM flux_decide('acme', 'ai_credits');
SELECT flux_balance('acme', 'ai_credits');

-- 2. A top-up of 5,000 expiring in a year; the same order id twice adds once.
SELECT flux_add_credits('acme', 'ai_credits', 5000, '2027-12-01', 'order-1', 'bought 5,000');
SELECT flux_add_credits('acme', 'ai_credits', 5000, '2027-12-01', 'order-1', 'bought 5,000');
SELECT action, entity, tenant, new ->> 'amount' AS amount, new ->> 'reason' AS reason
  FROM flux.audit_log WHERE entity = 'credit_ledger';

-- 3. A chat message (1) and an image (20): the allowance pays first.
SELECT allowed, reason, balance, message FROM flux_consume('acme', 'chat');
SELECT allowed, reason, balance, message FROM flux_consume('acme', 'image');
SELECT "limit", used, remaining, balance FROM flux_decide('acme', 'ai_credits');

-- 4. 50 images (1,000 credits) take the 979 left of the allowance, then 21
-- of the top-up; the ledger says so, row by row.
SELECT allowed, balance FROM flux_consume('acme', 'image', 50);
SELECT amount, balance_after, feature, remaining, expires_at FROM flux.credit_ledger WHERE tenant = 'acme' ORDER BY id;
SELECT used FROM flux.usage WHERE tenant = 'acme' AND feature = 'ai_credits';

-- 5. Two more top-ups: one that expires sooner is drawn first, one that
-- never expires last.
SELECT flux_add_credits('acme', 'ai_credits', 100, '2026-12-15', 'promo-dec', 'December promotion');
SELECT flux_add_credits('acme', 'ai_credits', 50, NULL, 'gift', 'goodwill');
SELECT allowed, balance FROM flux_consume('acme', 'ai_credits', 60);   -- the pool itself
SELECT amount, remaining, expires_at FROM flux.credit_ledger WHERE tenant = 'acme' AND amount > 0 ORDER BY id;

-- 6. What is left of the promotion (40) stops counting on the 15th, by the
-- clock; a new month brings a new allowance.
SET flux.now = '2026-12-16 10:00+00';
SELECT flux_balance('acme', 'ai_credits');
SET flux.now = '2027-01-02 10:00+00';
SELECT flux_balance('acme', 'ai_credits');

-- 7. Rolled back: refunded, allowance and top-ups alike.
BEGIN;
SELECT allowed, balance FROM flux_consume('acme', 'image', 100);
ROLLBACK;
SELECT flux_balance('acme', 'ai_credits');

-- 8. An idempotency key draws once.
SELECT allowed, balance FROM flux_consume('acme', 'image', 1, 'request-7');
SELECT allowed, balance FROM flux_consume('acme', 'image', 1, 'request-7');
SELECT count(*) FROM flux.credit_ledger WHERE idempotency_key = 'request-7';

-- 9. Not enough: refused with what is left and what it costs; nothing is
-- written (not the pool, not the feature's own counter).
SELECT allowed, reason, balance, message FROM flux_consume('acme', 'image', 1000);
SELECT allowed, reason, message FROM flux_decide('acme', 'ai_credits');
SELECT count(*) FROM flux.credit_ledger WHERE tenant = 'acme';

-- 10. A tenant whose plan has no allowance: not_in_plan until it buys some,
-- then what it bought.
SELECT allowed, reason, "limit", remaining, message FROM flux_decide('globex', 'ai_credits');
SELECT flux_add_credits('globex', 'ai_credits', 30);
SELECT allowed, reason, "limit", remaining, message FROM flux_decide('globex', 'ai_credits');
SELECT allowed, reason, balance, message FROM flux_consume('globex', 'ai_credits', 25);
SELECT allowed, reason, balance, message FROM flux_consume('globex', 'ai_credits', 25);
-- Drawing needs the feature as usual: free has no image.
SELECT allowed, reason, message FROM flux_consume('globex', 'image');

-- 11. Bad input: clear errors, nothing written.
SELECT try($$SELECT flux_set_cost('image', 'chat', 3)$$);
SELECT try($$SELECT flux_set_cost('image', 'image', 3)$$);
SELECT try($$SELECT flux_set_cost('ai_credits', 'ai_credits', 3)$$);
SELECT try($$SELECT flux_set_cost('image', 'ai_credits', 0)$$);
SELECT try($$SELECT flux_set_cost('nope', 'ai_credits', 3)$$);
SELECT try($$UPDATE flux.features SET cost_pool = 'chat', cost_credits = 2 WHERE key = 'image'$$);
SELECT try($$SELECT flux_define_feature('ai_credits', 'metered')$$);
SELECT try($$SELECT flux_add_credits('acme', 'ai_credits', 0)$$);
SELECT try($$SELECT flux_add_credits('acme', 'ai_credits', -5)$$);
SELECT try($$SELECT flux_add_credits('acme', 'chat', 5)$$);
SELECT try($$SELECT flux_add_credits('nobody', 'ai_credits', 5)$$);
SELECT try($$SELECT flux_add_credits('acme', 'ai_credits', 5, '2026-01-01')$$);
SELECT try($$SELECT flux_balance('acme', 'chat')$$);
SELECT cost_pool, cost_credits FROM flux.features WHERE key = 'image';
SELECT count(*) FROM flux.credit_ledger WHERE tenant = 'acme';

-- 12. A price removed: image draws nothing any more.
SELECT flux_set_cost('image', 'ai_credits', NULL);
SELECT allowed, balance FROM flux_consume('acme', 'image');
SELECT flux_set_cost('image', 'ai_credits', 20);

-- 13. An application role: it may read its own balance and draw by
-- consuming, but neither price, top up nor touch the ledger.
GRANT flux_service TO credits_app;
SET ROLE credits_app;
SELECT flux_balance('acme', 'ai_credits');
SELECT try($$SELECT flux_add_credits('acme', 'ai_credits', 1000000)$$);
SELECT try($$SELECT flux_set_cost('image', 'ai_credits', 1)$$);
SELECT try($$UPDATE flux.credit_ledger SET remaining = 1000000$$);
SELECT try($$INSERT INTO flux.credit_ledger (tenant, pool, amount, remaining) VALUES ('acme', 'ai_credits', 1000000, 1000000)$$);
SELECT try($$SELECT count(*) FROM flux.credit_ledger$$);
SELECT allowed, balance FROM flux_consume('acme', 'chat');
RESET ROLE;
REVOKE flux_service FROM credits_app;

-- 14. A pool's allowance is a limit like any other: an addon adds to it
-- (500 per unit), an override replaces it, and the draw follows.
SELECT flux_define_addon('credit_pack');
SELECT flux_grant_addon('credit_pack', 'ai_credits', 500);
SELECT flux_subscribe('hooli', 'pro');
SELECT flux_attach_addon('hooli', 'credit_pack', 2);
SELECT "limit", remaining, balance FROM flux_decide('hooli', 'ai_credits');
SELECT allowed, balance FROM flux_consume('hooli', 'image', 100);
SELECT allowed, reason, message FROM flux_consume('hooli', 'image');
SELECT flux_override('hooli', 'ai_credits', "limit" => 2020);
SELECT "limit", used, remaining FROM flux_decide('hooli', 'ai_credits');
SELECT allowed, balance FROM flux_consume('hooli', 'image');
SELECT allowed, reason FROM flux_consume('hooli', 'image');

DROP EXTENSION flux_entitlements CASCADE;
DROP ROLE credits_app;
