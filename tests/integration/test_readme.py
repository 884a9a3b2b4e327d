"""The README's SQL runs, and where an output block follows it, psql prints
exactly that output. Blocks fenced ```sql stats need the library preloaded
(the Insights section): test_stats.py runs the whole README, those
included, on its preloaded cluster."""
import os
import re
import subprocess

from conftest import BIN, HOST, PORT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOCK = re.compile(r"```(sql stats|sql|text)\n(.*?)```", re.S)


def psql(db, sql, host=HOST, port=PORT):
    r = subprocess.run(
        [f"{BIN}/psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", host, "-p", str(port), "-U", "postgres", "-d", db],
        input=sql,
        capture_output=True,
        text=True,
    )
    return r


def run_readme(db, host=HOST, port=PORT, stats=False):
    """Run the README's SQL blocks in order in `db` (which has the extension:
    the first block creates it again), comparing each output block with what
    psql printed. `stats`: the ```sql stats blocks too. Returns (ran,
    compared)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = BLOCK.findall(f.read())
    psql(db, "DROP EXTENSION flux_entitlements", host, port)
    ran = compared = 0
    for i, (lang, body) in enumerate(blocks):
        if lang == "text" or (lang == "sql stats" and not stats):
            continue
        # A statement followed by a '-- ERROR:  message' line must fail with it.
        expected_error = None
        if "-- ERROR:" in body:
            head, error = body.split("-- ERROR:")
            body, failing = head.rstrip("\n").rsplit("\n", 1)
            expected_error = (failing, "ERROR:  " + error.strip())
        r = psql(db, body, host, port)
        if expected_error:
            e = psql(db, expected_error[0], host, port)
            assert e.returncode != 0 and expected_error[1] in e.stderr, e.stderr
        assert r.returncode == 0, f"README block {i} failed:\n{body}\n{r.stderr}"
        ran += 1
        if i + 1 < len(blocks) and blocks[i + 1][0] == "text":
            want = [line.rstrip() for line in blocks[i + 1][1].splitlines()]
            got = [line.rstrip() for line in r.stdout.splitlines()]
            assert got == want, f"README block {i} printed:\n{r.stdout}"
            compared += 1
    return ran, compared


def test_readme_sql_runs_and_prints_what_the_readme_shows(fresh_db):
    ran, compared = run_readme(fresh_db)
    assert ran >= 5 and compared >= 3
