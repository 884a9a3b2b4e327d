\set t random(1, 1000)
SELECT allowed FROM flux_consume('t' || :t, 'quota_alerted');
