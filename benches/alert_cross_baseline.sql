\set t random(1, 1000)
BEGIN;
DELETE FROM flux.usage_alerts WHERE tenant = 't' || :t AND feature = 'seat_plain';
SELECT flux_release('t' || :t, 'seat_plain', 1);
SELECT allowed FROM flux_consume('t' || :t, 'seat_plain');
COMMIT;
