#!/usr/bin/env bash
# What counting decisions costs (issue 19): the same workloads against two
# new clusters made alike (same build, settings and data), one with
# shared_preload_libraries = 'flux_entitlements' (statistics on), one
# without (off), run interleaved (on, off, on, off, ...), median of ROUNDS.
# Called by benches/run.sh (STATS=0 skips it), or alone: benches/stats.sh.
# Environment as for run.sh; the clusters are BENCH_DIR-stats-on /
# BENCH_PORT - 5 and BENCH_DIR-stats-off / BENCH_PORT - 4.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${FLUX_PGBIN:-/usr/lib/postgresql/15/bin}
DIR=${BENCH_DIR:-${PGX_ROOT:-/tmp/flux-pg}/bench}
PORT=${BENCH_PORT:-5497}
ON_DIR=$DIR-stats-on
ON_PORT=$((PORT - 5))
OFF_DIR=$DIR-stats-off
OFF_PORT=$((PORT - 4))
T=${SECONDS_PER_RUN:-5}
ROUNDS=${ROUNDS:-3}
ROWS=${ROWS:-100000}

# New clusters each run: alike but for the preload line, and the counts
# start from nothing.
scripts/pg.sh destroy "$ON_DIR"
scripts/pg.sh destroy "$OFF_DIR"
FLUX_PGBIN=$BIN FLUX_PG_CONF="shared_preload_libraries = 'flux_entitlements'" scripts/pg.sh start "$ON_DIR" "$ON_PORT"
FLUX_PGBIN=$BIN scripts/pg.sh start "$OFF_DIR" "$OFF_PORT"
trap 'scripts/pg.sh destroy "$ON_DIR"; scripts/pg.sh destroy "$OFF_DIR"' EXIT

setup() { # dir port
    local p=("$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$1" -p "$2" -U postgres)
    "${p[@]}" -d postgres -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS flux_stats_bench" -c "CREATE DATABASE flux_stats_bench"
    "${p[@]}" -d flux_stats_bench -v rows="$ROWS" -f benches/setup.sql >/dev/null 2>&1
}
setup "$OFF_DIR" "$OFF_PORT"
setup "$ON_DIR" "$ON_PORT"

tps() { # dir port script clients
    "$BIN/pgbench" -n -M prepared -h "$1" -p "$2" -U postgres -c "$4" -j "$4" -T "$T" \
        -f "benches/$3" flux_stats_bench 2>/dev/null | awk '/^tps/ {print $3; exit}'
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

cases=(
    "flux_check, 1,000 tenants, statistics on / off (-c 2)@check.sql@2"
    "flux_check, 1,000 tenants, statistics on / off (-c 8)@check.sql@8"
    "flux_consume, 1,000 tenants, statistics on / off (-c 2)@consume.sql@2"
    "flux_consume, 1,000 tenants, statistics on / off (-c 8)@consume.sql@8"
    "per-row WHERE flux_check over $ROWS rows (one decision per tenant), on / off@perrow.sql@1"
)
for c in "${cases[@]}"; do
    IFS='@' read -r name script clients <<<"$c"
    on=(); off=(); ratios=()
    for r in $(seq "$ROUNDS"); do
        # Which cluster goes first alternates, so that an order effect
        # (warm caches, the CPU's clock) favours neither.
        if [ $((r % 2)) = 1 ]; then
            a=$(tps "$ON_DIR" "$ON_PORT" "$script" "$clients")
            b=$(tps "$OFF_DIR" "$OFF_PORT" "$script" "$clients")
        else
            b=$(tps "$OFF_DIR" "$OFF_PORT" "$script" "$clients")
            a=$(tps "$ON_DIR" "$ON_PORT" "$script" "$clients")
        fi
        on+=("$a"); off+=("$b"); ratios+=("$(echo "$a / $b" | bc -l)")
    done
    printf '%-92s %10.1f %10.1f %8.3f %3s%s\n' "$name" \
        "$(printf '%s\n' "${on[@]}" | median)" "$(printf '%s\n' "${off[@]}" | median)" \
        "$(printf '%s\n' "${ratios[@]}" | median)" ">=" "0.97"
done
# The counts are real: what the preloaded cluster counted.
"$BIN/psql" -X -At -h "$ON_DIR" -p "$ON_PORT" -U postgres -d flux_stats_bench \
    -c "SELECT '  counted: ' || to_char(sum(decisions), 'FM999,999,999,999') || ' decisions in ' || count(*) || ' entries' FROM flux_decision_stats()"
