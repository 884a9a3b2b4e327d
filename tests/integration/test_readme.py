"""The README's SQL runs, and where an output block follows it, psql prints
exactly that output."""
import os
import re
import subprocess

from conftest import BIN, HOST, PORT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOCK = re.compile(r"```(sql|text)\n(.*?)```", re.S)


def psql(db, sql):
    r = subprocess.run(
        [f"{BIN}/psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-p", str(PORT), "-U", "postgres", "-d", db],
        input=sql,
        capture_output=True,
        text=True,
    )
    return r


def test_readme_sql_runs_and_prints_what_the_readme_shows(fresh_db):
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = BLOCK.findall(f.read())
    # The extension is created by the first block itself.
    psql(fresh_db, "DROP EXTENSION flux_entitlements")
    ran = compared = 0
    for i, (lang, body) in enumerate(blocks):
        if lang != "sql":
            continue
        # A statement followed by a '-- ERROR:  message' line must fail with it.
        expected_error = None
        if "-- ERROR:" in body:
            head, error = body.split("-- ERROR:")
            body, failing = head.rstrip("\n").rsplit("\n", 1)
            expected_error = (failing, "ERROR:  " + error.strip())
        r = psql(fresh_db, body)
        if expected_error:
            e = psql(fresh_db, expected_error[0])
            assert e.returncode != 0 and expected_error[1] in e.stderr, e.stderr
        assert r.returncode == 0, f"README block {i} failed:\n{body}\n{r.stderr}"
        ran += 1
        if i + 1 < len(blocks) and blocks[i + 1][0] == "text":
            want = [line.rstrip() for line in blocks[i + 1][1].splitlines()]
            got = [line.rstrip() for line in r.stdout.splitlines()]
            assert got == want, f"README block {i} printed:\n{r.stdout}"
            compared += 1
    assert ran >= 5 and compared >= 3
