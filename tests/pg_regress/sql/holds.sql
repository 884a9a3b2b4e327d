-- Holds (0.2): work that outlives a transaction (a streamed LLM answer, a
-- long export) reserves units first, then settles at what it really used,
-- or releases them. A hold counts as used (or is reserved in its credits
-- pool) until settled, released or its ttl passes; expiry follows the
-- clock, flux.now included, with no job. Hold ids are random: they are
-- kept in psql variables and hidden in messages.
SET client_min_messages = warning;
DROP ROLE IF EXISTS holds_app;
RESET client_min_messages;
\i tests/pg_regress/common/setup.sql
CREATE ROLE holds_app LOGIN;
CREATE FUNCTION try_hold(sql text, hold text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE sql; RETURN 'ok';
EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE || ': ' || replace(SQLERRM, hold, '<hold>'); END $$;

SELECT flux_define_feature('ai_credits', 'credits');
SELECT flux_define_feature('answer_tokens', 'metered', 'Tokens of streamed answers');
SELECT flux_define_feature('image');
SELECT flux_define_feature('seats', 'limit');
SELECT flux_define_feature('export');
SELECT flux_define_feature('calls', 'rate');
SELECT flux_define_plan('pro', rank => 1);
SELECT flux_grant('pro', 'ai_credits', 1000, 'month');
SELECT flux_grant('pro', 'answer_tokens', 100000, 'month');
SELECT flux_grant('pro', 'image');
SELECT flux_grant('pro', 'seats', 5);
SELECT flux_grant('pro', 'export');
SELECT flux_grant('pro', 'calls', 10, '1 minute');
SELECT flux_set_cost('answer_tokens', 'ai_credits', 1);
SELECT flux_set_cost('image', 'ai_credits', 20);
SET flux.now = '2026-12-01 10:00+00';
SELECT flux_subscribe('acme', 'pro');
SELECT flux_subscribe('globex', 'pro');

-- 1. A streamed answer: hold 400 tokens (400 credits) before streaming.
SELECT allowed, reason, used, balance, message, hold_id IS NOT NULL AS held
  FROM flux_hold('acme', 'answer_tokens', 400, '10 minutes');
SELECT id AS answer FROM flux.holds WHERE tenant = 'acme' AND feature = 'answer_tokens' \gset
SELECT flux_balance('acme', 'ai_credits');
SELECT balance, message FROM flux_decide('acme', 'ai_credits');
-- While it streams, images draw from what is not held: 30 fit, a 31st not.
SELECT allowed, balance FROM flux_consume('acme', 'image', 30);
SELECT allowed, reason, balance, message FROM flux_consume('acme', 'image');

-- 2. The answer used 312 tokens: 312 credits drawn, 88 back in the pool.
SELECT allowed, reason, used, balance, message, hold_id = :'answer' AS same
  FROM flux_settle(:'answer', 312);
SELECT flux_balance('acme', 'ai_credits');
SELECT amount, balance_after, feature, replace(reason, :'answer', '<hold>') AS reason
  FROM flux.credit_ledger WHERE tenant = 'acme' ORDER BY id;
SELECT amount, actual, settled_at, released_at FROM flux.holds WHERE id = :'answer';
SELECT caller, amount, open FROM flux.hold_charges WHERE hold_id = :'answer' ORDER BY caller;
SELECT flux_usage('acme', 'answer_tokens');
-- Settled once: again, or released after, is an error.
SELECT try_hold(format('SELECT flux_settle(%L, 1)', :'answer'), :'answer');
SELECT try_hold(format('SELECT flux_release_hold(%L)', :'answer'), :'answer');

-- 3. Settling more than was held: when it fits it is recorded; when it
-- does not, nothing changes and the hold stays open.
SELECT hold_id AS small FROM flux_hold('acme', 'answer_tokens', 50) \gset
SELECT allowed, balance FROM flux_settle(:'small', 60);
SELECT hold_id AS tiny FROM flux_hold('acme', 'answer_tokens', 20) \gset
SELECT allowed, reason, balance, message FROM flux_settle(:'tiny', 500);
SELECT flux_balance('acme', 'ai_credits');
SELECT settled_at IS NULL AS still_open FROM flux.holds WHERE id = :'tiny';
SELECT flux_release_hold(:'tiny');
SELECT flux_release_hold(:'tiny');
SELECT flux_balance('acme', 'ai_credits');

-- 4. Expiry by the clock: a hold of 20 for 5 minutes; at 10:06 it no
-- longer counts, with nothing written, and settling it is an error.
SELECT hold_id AS late FROM flux_hold('acme', 'answer_tokens', 20, '5 minutes') \gset
SELECT flux_balance('acme', 'ai_credits');
SET flux.now = '2026-12-01 10:06+00';
SELECT flux_balance('acme', 'ai_credits');
SELECT try_hold(format('SELECT flux_settle(%L, 20)', :'late'), :'late');
SELECT flux_release_hold(:'late');

-- 5. A limit: 3 of 5 seats held; a consume of 3 is refused, then allowed
-- once the hold is released.
SELECT hold_id AS seats_hold FROM flux_hold('acme', 'seats', 3) \gset
SELECT used, remaining FROM flux_decide('acme', 'seats');
SELECT allowed, reason, used, message FROM flux_consume('acme', 'seats', 3);
SELECT flux_check('acme', 'seats');
SELECT flux_release_hold(:'seats_hold');
SELECT allowed, used FROM flux_consume('acme', 'seats', 3);
-- A hold that expires on a limit: the next consume gives it back.
SELECT hold_id AS seats_late FROM flux_hold('acme', 'seats', 2, '1 minute') \gset
SELECT flux_usage('acme', 'seats');
SET flux.now = '2026-12-01 10:08+00';
SELECT flux_usage('acme', 'seats');
SELECT allowed, used FROM flux_consume('acme', 'seats', 2);
SELECT open FROM flux.hold_charges WHERE hold_id = :'seats_late';

-- 6. An idempotency key makes one hold; another amount with it is refused.
SELECT (flux_hold('globex', 'answer_tokens', 10, idempotency_key => 'req-1')).hold_id AS first \gset
SELECT hold_id = :'first' AS same, message LIKE 'hold % was made with this idempotency key%' AS says
  FROM flux_hold('globex', 'answer_tokens', 10, idempotency_key => 'req-1');
SELECT count(*) FROM flux.holds WHERE tenant = 'globex';
SELECT try($$SELECT flux_hold('globex', 'answer_tokens', 11, idempotency_key => 'req-1')$$);

-- 7. Rolled back: no hold, nothing counted.
BEGIN;
SELECT allowed FROM flux_hold('globex', 'seats', 4);
ROLLBACK;
SELECT count(*) FROM flux.holds WHERE tenant = 'globex' AND feature = 'seats';
SELECT flux_usage('globex', 'seats');

-- 8. Bad input: nothing written.
SELECT try($$SELECT flux_hold('acme', 'seats', 0)$$);
SELECT try($$SELECT flux_hold('acme', 'seats', -1)$$);
SELECT try($$SELECT flux_hold('acme', 'seats', 1, '0 minutes')$$);
SELECT try($$SELECT flux_hold('acme', 'seats', 1, '-5 minutes')$$);
SELECT try($$SELECT flux_hold('acme', 'seats', 1, NULL)$$);
SELECT try($$SELECT flux_hold('acme', 'export', 1)$$);
SELECT try($$SELECT flux_hold('acme', 'calls', 1)$$);
SELECT try($$SELECT flux_hold('acme', 'seats', 1, idempotency_key => '')$$);
SELECT try($$SELECT flux_settle('no-such-hold', 1)$$);
SELECT try($$SELECT flux_settle(NULL, 1)$$);
SELECT try($$SELECT flux_release_hold('no-such-hold')$$);
SELECT try_hold(format('SELECT flux_settle(%L, -1)', :'first'), :'first');
SELECT allowed, reason, hold_id FROM flux_hold('acme', 'answer_tokens', 9223372036854775807);
SELECT allowed, reason, hold_id FROM flux_hold('nobody', 'seats', 1);
SELECT allowed, reason, hold_id FROM flux_hold('acme', 'nothing', 1);
SELECT count(*) FROM flux.holds WHERE tenant = 'acme' AND feature = 'seats';

-- 9. An application role acting for acme (flux.tenant): it holds and
-- settles acme's, cannot touch globex's, and cannot write the tables.
SET ROLE holds_app;
SET flux.tenant = 'acme';
SELECT allowed, hold_id IS NOT NULL AS held FROM flux_hold('acme', 'answer_tokens', 1);
SELECT try($$SELECT flux_hold('globex', 'seats', 1)$$);
SELECT try_hold(format('SELECT flux_settle(%L, 1)', :'first'), :'first');
SELECT try_hold(format('SELECT flux_release_hold(%L)', :'first'), :'first');
SELECT try($$SELECT count(*) FROM flux.holds$$);
SELECT try($$UPDATE flux.hold_charges SET open = false$$);
SELECT try($$DELETE FROM flux.held_features$$);
RESET flux.tenant;
RESET ROLE;
SELECT settled_at IS NULL AND released_at IS NULL AS untouched FROM flux.holds WHERE id = :'first';

-- 10. The features whose counters count holds out: those that had one.
-- Marking them is not a catalogue change in the audit log.
SELECT DISTINCT feature FROM flux.held_features ORDER BY feature;
SELECT key, new ->> 'cost_pool' AS cost_pool FROM flux.audit_log
 WHERE entity = 'features' AND action = 'update' ORDER BY id;

RESET flux.now;
DROP EXTENSION flux_entitlements CASCADE;
DROP ROLE holds_app;
