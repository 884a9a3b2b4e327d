\set t random(1, 1000)
SELECT ('t' || :t) IS NOT NULL;
