\set t random(1, 1000)
SELECT allowed FROM flux_settle((SELECT hold_id FROM flux_hold('t' || :t, 'held_calls', 10)), 7);
