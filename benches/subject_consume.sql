\set t random(1, 1000)
\set u random(1, 20)
SELECT allowed FROM flux_consume('t' || :t, 'member_calls', 1, NULL, 'u' || :u);
