\set t random(1, 1000)
SELECT flux_check('t' || :t, 'export');
