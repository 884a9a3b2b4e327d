-- Every scenario starts here (\i tests/pg_regress/common/setup.sql): the
-- extension, terse errors, UTC and ISO dates, and try(sql), which runs a
-- statement and shows 'ok' or 'SQLSTATE: message'.
CREATE EXTENSION flux_entitlements;
\set VERBOSITY terse
SET timezone = 'UTC';
SET datestyle = 'ISO, YMD';
CREATE OR REPLACE FUNCTION try(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE sql; RETURN 'ok';
EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE || ': ' || SQLERRM; END $$;
