#!/usr/bin/env bash
# flux_entitlements benchmarks: each figure is a ratio to a baseline measured
# interleaved in the same run (flux, baseline, flux, baseline, ...), median of
# ROUNDS. Usage: benches/run.sh  (or make bench). Environment: SECONDS_PER_RUN
# (default 5), ROUNDS (default 3), ROWS for the per-row table (default 100000).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${FLUX_PGBIN:-/usr/lib/postgresql/15/bin}
DIR=${BENCH_DIR:-${PGX_ROOT:-/tmp/flux-pg}/bench}
PORT=${BENCH_PORT:-5497}
T=${SECONDS_PER_RUN:-5}
ROUNDS=${ROUNDS:-3}
ROWS=${ROWS:-100000}
scripts/pg.sh start "$DIR" "$PORT"
PSQL=("$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U postgres)
"${PSQL[@]}" -d postgres -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS flux_bench" -c "CREATE DATABASE flux_bench"
"${PSQL[@]}" -d flux_bench -v rows="$ROWS" -f benches/setup.sql >/dev/null 2>&1
"${PSQL[@]}" -d flux_bench -f benches/rls_setup.sql >/dev/null 2>&1

tps() { # script clients [user]
    PGOPTIONS="-c flux.tenant=t1" "$BIN/pgbench" -n -M prepared -h "$DIR" -p "$PORT" -U "${3:-postgres}" \
        -c "$2" -j "$2" -T "$T" -f "benches/$1" flux_bench 2>/dev/null | awk '/^tps/ {print $3; exit}'
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

# name, flux script, baseline script, clients, goal, direction (ge: ratio >= goal is good)
cases=(
    "check (pgbench -M prepared -c 2) / SELECT ('t' || :t) IS NOT NULL@check.sql@check_baseline.sql@2@0.90@ge"
    "check as a flux_service member, not a superuser (-c 2) / the same baseline@check.sql@check_baseline.sql@2@0.90@ge@flux_bench_service"
    "consume over 1,000 tenants / UPDATE by primary key (-c 2)@consume.sql@consume_baseline.sql@2@0.85@ge"
    "consume, one hot tenant, 8 clients / single-row UPDATE@hot_consume.sql@hot_baseline.sql@8@0.70@ge"
    "per-row WHERE flux_check over $ROWS rows, 1,000 tenants: cost / trivial predicate@perrow.sql@perrow_baseline.sql@1@1.60@le"
    "RLS count(*) of 1M rows of one tenant (flux_protect) / unprotected copy with WHERE tenant_id@rls.sql@rls_baseline.sql@1@1.15@le@flux_bench_app"
)
printf '%-92s %10s %10s %8s %6s\n' "benchmark" "flux" "baseline" "ratio" "goal"
for c in "${cases[@]}"; do
    IFS='@' read -r name fx base clients goal dir user <<<"$c"
    ratios=(); fl=(); bl=()
    for _ in $(seq "$ROUNDS"); do
        a=$(tps "$fx" "$clients" "$user"); b=$(tps "$base" "$clients" "$user")
        fl+=("$a"); bl+=("$b")
        if [ "$dir" = ge ]; then ratios+=("$(echo "$a / $b" | bc -l)"); else ratios+=("$(echo "$b / $a" | bc -l)"); fi
    done
    r=$(printf '%s\n' "${ratios[@]}" | median)
    f=$(printf '%s\n' "${fl[@]}" | median); b=$(printf '%s\n' "${bl[@]}" | median)
    mark=$([ "$dir" = ge ] && echo ">=" || echo "<=")
    printf '%-92s %10.1f %10.1f %8.3f %3s%s\n' "$name" "$f" "$b" "$r" "$mark" "$goal"
done
# Scale: warm check latency with SCALE_TENANTS tenants / with 1,000 tenants.
SCALE=${SCALE_TENANTS:-1000000}
scale_us() { # tenants
    "${PSQL[@]}" -d flux_bench -c "SET client_min_messages = warning" -c "TRUNCATE flux.tenants CASCADE" >/dev/null
    # Bulk set-up: skip the row triggers (validation, audit log and its
    # NOTIFY per row); the checks below run in a new session, cache cold.
    "${PSQL[@]}" -d flux_bench -c "ALTER TABLE flux.tenants DISABLE TRIGGER tenants_validate, DISABLE TRIGGER audit" \
        -c "INSERT INTO flux.tenants (id, plan) SELECT 's' || i, 'pro' FROM generate_series(1, $1) i" \
        -c "ALTER TABLE flux.tenants ENABLE TRIGGER tenants_validate, ENABLE TRIGGER audit" >/dev/null
    "${PSQL[@]}" -d flux_bench -At -v n="$1" -v checks=200000 -f benches/scale.sql
}
small=(); large=()
for _ in $(seq "$ROUNDS"); do small+=("$(scale_us 1000)"); large+=("$(scale_us "$SCALE")"); done
s_us=$(printf '%s\n' "${small[@]}" | median); l_us=$(printf '%s\n' "${large[@]}" | median)
printf '%-92s %10s %10s %8.3f %3s%s\n' "warm flux_check latency, $SCALE tenants / 1,000 tenants (us per check, 200k checks)" \
    "$l_us" "$s_us" "$(echo "$l_us / $s_us" | bc -l)" "<=" "1.30"
echo "(flux / baseline in transactions per second, median of $ROUNDS interleaved runs of ${T}s;"
echo " per-row: the ratio is cost, baseline TPS / flux TPS. Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), PostgreSQL $("$BIN/postgres" --version | awk '{print $3}'))"
