\set t random(1, :n)
\set f random(1, 200)
SELECT flux_check('c' || :t, 'f' || :f);
