\set t random(1, :n)
\set f random(1, 200)
SELECT g.enabled FROM flux.tenants t JOIN flux.grants g ON g.plan = t.plan WHERE t.id = 'c' || :t AND g.feature = 'f' || :f;
