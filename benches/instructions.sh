#!/usr/bin/env bash
# Instructions per call, flux against its baseline, counted by valgrind's
# callgrind in a single-user backend: the same figure on every run, where
# the TPS ratios of benches/run.sh move with the machine's neighbours.
#
# Each figure is (instructions of a run of N2 calls - those of N1 calls) /
# (N2 - N1), after the same warm-up (WARM passes over every key), on a fresh copy of
# the same cluster, so start-up, cache loads and the warm-up cancel out.
# Both sides of a pair return one row (single-user mode prints it).
#
# Usage: benches/instructions.sh  (or make bench-instructions). Needs
# valgrind; takes a few minutes. STATS=1: the backend preloads the library
# (decision statistics on), and a row compares each flux statement with
# itself without the preload.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${FLUX_PGBIN:-/usr/lib/postgresql/15/bin}
ROOT=${PGX_ROOT:-/tmp/flux-pg}
DIR=${INSTRUCTIONS_DIR:-$ROOT/instructions}
PORT=${INSTRUCTIONS_PORT:-5496}
N1=${N1:-1000}
N2=${N2:-3000}
# Passes over every key first: the tables' pages then hold room for the next
# versions (a freshly loaded page has none), as in a running system.
WARM=${WARM:-5}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK" "$DIR.run"' EXIT
chmod 755 "$WORK"

command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)"; exit 1; }
scripts/pg.sh destroy "$DIR" >/dev/null 2>&1 || true
scripts/pg.sh start "$DIR" "$PORT"
PSQL=("$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U postgres)
"${PSQL[@]}" -d postgres -c "CREATE DATABASE flux_bench"
"${PSQL[@]}" -d flux_bench -v rows=1000 -f benches/setup.sql >/dev/null 2>&1
scripts/pg.sh stop "$DIR"

# name, flux statement, baseline statement (each with one int parameter)
cases=(
    "flux_consume over 1,000 tenants / UPDATE by primary key RETURNING the count@SELECT allowed FROM flux_consume('t' || \$1, 'api_calls')@UPDATE bench_counters SET n = n + 1 WHERE id = \$1 RETURNING n"
    "flux_consume charging a subject's counter and the tenant's / the same UPDATE@SELECT allowed FROM flux_consume('t' || \$1, 'member_calls', 1, NULL, 'u' || (\$1 % 20))@UPDATE bench_counters SET n = n + 1 WHERE id = \$1 RETURNING n"
    "flux_check / SELECT ('t' || \$1) IS NOT NULL@SELECT flux_check('t' || \$1, 'export')@SELECT ('t' || \$1) IS NOT NULL"
)

script() { # file statement calls
    {
        echo "PREPARE s(int) AS $2;"
        for _ in $(seq "$WARM"); do for i in $(seq 1 1000); do echo "EXECUTE s($i);"; done; done
        awk -v n="$3" 'BEGIN { srand(1); for (i = 0; i < n; i++) printf "EXECUTE s(%d);\n", int(rand() * 1000) + 1 }'
    } >"$1"
    chmod 644 "$1"
}

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

count() { # statement calls [postgres options] -> instructions of a whole single-user run
    script "$WORK/run.sql" "$1" "$2"
    rm -rf "$DIR.run" && cp -a "$DIR" "$DIR.run"
    # shellcheck disable=SC2086 # the options are words
    as_pg valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        "$BIN/postgres" --single ${3:-} -D "$DIR.run" flux_bench <"$WORK/run.sql" 2>"$WORK/vg.err" >/dev/null
    awk '/Collected/ {print $4}' "$WORK/vg.err"
}

per_call() { # statement [postgres options]
    local a b
    a=$(count "$1" "$N1" "${2:-}"); b=$(count "$1" "$N2" "${2:-}")
    echo $(((b - a) / (N2 - N1)))
}

printf '%-78s %10s %10s %8s\n' "instructions per call" "flux" "baseline" "ratio"
for c in "${cases[@]}"; do
    IFS='@' read -r name fx base <<<"$c"
    f=$(per_call "$fx"); b=$(per_call "$base")
    printf '%-78s %10d %10d %8.3f\n' "$name" "$f" "$b" "$(echo "$f / $b" | bc -l)"
    if [ "${STATS:-0}" = 1 ]; then
        s=$(per_call "$fx" "-c shared_preload_libraries=flux_entitlements")
        printf '%-78s %10d %10d %8.3f\n' "  the same, statistics on / off" "$s" "$f" "$(echo "$s / $f" | bc -l)"
    fi
done
echo "(callgrind, single-user backend, mean of calls $N1..$N2 after $WARM passes over every key; ratio: flux / baseline, lower is better)"
scripts/pg.sh destroy "$DIR" >/dev/null
