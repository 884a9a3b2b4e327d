#!/usr/bin/env bash
# flux_entitlements benchmarks: each figure is a ratio to a baseline measured
# interleaved in the same run (flux, baseline, flux, baseline, ...), median of
# ROUNDS. Usage: benches/run.sh  (or make bench). Environment: SECONDS_PER_RUN
# (default 5), ROUNDS (default 3), ROWS for the per-row table (default 100000),
# SCALE_TENANTS for the warm-latency row (default 1000000), TRAFFIC: 1 (the
# default) runs the traffic rows of issue 16 after the others, 0 skips them,
# only runs nothing else; TRAFFIC_TENANTS (default 100000) and
# TRAFFIC_BIG_TENANTS (default 1000000) size their catalogue; STATS=0 skips
# the statistics on / off rows (benches/stats.sh); ONLY=regex runs only the
# first table's rows whose name matches.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${FLUX_PGBIN:-/usr/lib/postgresql/15/bin}
DIR=${BENCH_DIR:-${PGX_ROOT:-/tmp/flux-pg}/bench}
PORT=${BENCH_PORT:-5497}
T=${SECONDS_PER_RUN:-5}
ROUNDS=${ROUNDS:-3}
ROWS=${ROWS:-100000}
TRAFFIC=${TRAFFIC:-1}
case "$TRAFFIC" in 0 | 1 | only) ;; *) echo "TRAFFIC=$TRAFFIC: use 1, 0 or only" >&2; exit 2 ;; esac
scripts/pg.sh start "$DIR" "$PORT"
PSQL=("$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U postgres)

commas() { sed ':a;s/\B[0-9]\{3\}\>/,&/;ta' <<<"$1"; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
# One line of the table from the values of the rounds in fl, bl and ratios.
report() { # name goal direction
    local r f b mark
    r=$(printf '%s\n' "${ratios[@]}" | median)
    f=$(printf '%s\n' "${fl[@]}" | median); b=$(printf '%s\n' "${bl[@]}" | median)
    mark=$([ "$3" = ge ] && echo ">=" || echo "<=")
    printf '%-92s %10.1f %10.1f %8.3f %3s%s\n' "$1" "$f" "$b" "$r" "$mark" "$2"
}
# ge: flux / baseline, the goal a floor; le: baseline / flux (a cost or a
# slowdown), the goal a ceiling.
ratio() { if [ "$3" = ge ]; then echo "$1 / $2" | bc -l; else echo "$2 / $1" | bc -l; fi; }

printf '%-92s %10s %10s %8s %6s\n' "benchmark" "flux" "baseline" "ratio" "goal"

if [ "$TRAFFIC" != only ]; then
"${PSQL[@]}" -d postgres -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS flux_bench" -c "CREATE DATABASE flux_bench"
"${PSQL[@]}" -d flux_bench -v rows="$ROWS" -f benches/setup.sql >/dev/null 2>&1
"${PSQL[@]}" -d flux_bench -f benches/rls_setup.sql >/dev/null 2>&1

tps() { # script clients [user]
    PGOPTIONS="-c flux.tenant=t1" "$BIN/pgbench" -n -M prepared -h "$DIR" -p "$PORT" -U "${3:-postgres}" \
        -c "$2" -j "$2" -T "$T" -f "benches/$1" flux_bench 2>/dev/null | awk '/^tps/ {print $3; exit}'
}

# name, flux script, baseline script, clients, goal, direction (ge: ratio >= goal is good)
cases=(
    "check (pgbench -M prepared -c 2) / SELECT ('t' || :t) IS NOT NULL@check.sql@check_baseline.sql@2@0.90@ge"
    "check as a flux_service member, not a superuser (-c 2) / the same baseline@check.sql@check_baseline.sql@2@0.90@ge@flux_bench_service"
    "consume over 1,000 tenants / UPDATE by primary key (-c 2)@consume.sql@consume_baseline.sql@2@0.85@ge"
    "consume, one hot tenant, 8 clients / single-row UPDATE@hot_consume.sql@hot_baseline.sql@8@0.70@ge"
    "consume charging a subject's counter and the tenant's, 1,000 tenants / UPDATE by primary key (-c 2)@subject_consume.sql@consume_baseline.sql@2@0.80@ge"
    "flux_authenticate + consume (key's and tenant's counters) / key lookup + UPDATE, one transaction (-c 2)@key_consume.sql@key_baseline.sql@2@0.60@ge"
    "consume of a feature that has had holds (one more query: an expired hold?), 1,000 tenants / UPDATE by primary key (-c 2)@held_consume.sql@consume_baseline.sql@2@0.60@ge"
    "consume of a quota with alert thresholds it does not cross / the same quota without thresholds (-c 2)@alert_none.sql@alert_none_baseline.sql@2@0.95@ge"
    "free a seat + consume crossing an alert threshold (its row and NOTIFY; the script deletes the row) / the same without a threshold (-c 2)@alert_cross.sql@alert_cross_baseline.sql@2@0.55@ge"
    "flux_hold + flux_settle in one statement, 1,000 tenants / UPDATE + INSERT (-c 2)@hold_settle.sql@credits_baseline.sql@2@0.10@ge"
    "consume of a priced feature (its counter, a pool draw, a ledger row), 1,000 tenants, 8 clients / UPDATE + INSERT@credits_consume.sql@credits_baseline.sql@8@0.70@ge"
    "the same, one hot tenant's pool, 8 clients / UPDATE of one row + INSERT@credits_hot.sql@credits_hot_baseline.sql@8@0.60@ge"
    "per-row WHERE flux_check over $ROWS rows, 1,000 tenants: cost / trivial predicate@perrow.sql@perrow_baseline.sql@1@1.60@le"
    "RLS count(*) of 1M rows of one tenant (flux_protect) / unprotected copy with WHERE tenant_id@rls.sql@rls_baseline.sql@1@1.15@le@flux_bench_app"
)
for c in "${cases[@]}"; do
    IFS='@' read -r name fx base clients goal dir user <<<"$c"
    if [ -n "${ONLY:-}" ] && ! grep -qE "$ONLY" <<<"$name"; then continue; fi
    ratios=(); fl=(); bl=()
    for _ in $(seq "$ROUNDS"); do
        a=$(tps "$fx" "$clients" "$user"); b=$(tps "$base" "$clients" "$user")
        fl+=("$a"); bl+=("$b"); ratios+=("$(ratio "$a" "$b" "$dir")")
    done
    report "$name" "$goal" "$dir"
done
# Scale: warm check latency with SCALE_TENANTS tenants / with 1,000 tenants
# (SCALE_TENANTS=0 skips it).
SCALE=${SCALE_TENANTS:-1000000}
if [ "$SCALE" != 0 ]; then
scale_us() { # tenants
    "${PSQL[@]}" -d flux_bench -c "SET client_min_messages = warning" -c "TRUNCATE flux.tenants CASCADE" >/dev/null
    # Bulk set-up without the row triggers (validation, audit log and its
    # NOTIFY per row, cache invalidation), put back as they were; the checks
    # below run in a new session, cache cold.
    "${PSQL[@]}" -d flux_bench -v prefix=s -v from=1 -v to="$1" -v plan_expr="'pro'" -f benches/bulk_tenants.sql >/dev/null
    "${PSQL[@]}" -d flux_bench -At -v n="$1" -v checks=200000 -f benches/scale.sql
}
small=(); large=()
for _ in $(seq "$ROUNDS"); do small+=("$(scale_us 1000)"); large+=("$(scale_us "$SCALE")"); done
s_us=$(printf '%s\n' "${small[@]}" | median); l_us=$(printf '%s\n' "${large[@]}" | median)
printf '%-92s %10s %10s %8.3f %3s%s\n' "warm flux_check latency, $SCALE tenants / 1,000 tenants (us per check, 200k checks)" \
    "$l_us" "$s_us" "$(echo "$l_us / $s_us" | bc -l)" "<=" "1.30"
fi
fi

# flux_limit_report over 1M tenants and 200k counter rows / the same numbers
# by a hand-written join of plan grants only (benches/report_setup.sql).
if [ "${REPORT:-1}" != 0 ] && [ "$TRAFFIC" != only ]; then
"${PSQL[@]}" -d postgres -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS flux_report" -c "CREATE DATABASE flux_report"
"${PSQL[@]}" -d flux_report -f benches/report_setup.sql >/dev/null 2>&1
ms() { # script -> latency of one run, ms
    "$BIN/pgbench" -n -t 1 -h "$DIR" -p "$PORT" -U postgres -f "benches/$1" flux_report 2>/dev/null |
        awk '/^latency average/ {print $4; exit}'
}
# One run of a flux script and of its baseline, ROUNDS times interleaved;
# the medians of the latencies and of their ratios (cost: lower is better).
one_shot() { # name flux baseline goal
    local fl=() bl=() ratios=() a b f r
    for _ in $(seq "$ROUNDS"); do
        a=$(ms "$2"); b=$(ms "$3")
        fl+=("$a"); bl+=("$b"); ratios+=("$(echo "$a / $b" | bc -l)")
    done
    f=$(printf '%s\n' "${fl[@]}" | median); b=$(printf '%s\n' "${bl[@]}" | median)
    r=$(printf '%s\n' "${ratios[@]}" | median)
    printf '%-92s %10.1f %10.1f %8.3f %3s%s\n' "$1" "$f" "$b" "$r" "<=" "$4"
}
one_shot "flux_limit_report(0.8), 1M tenants, 200k counters / hand-written join, plan grants only (ms)" \
    report.sql report_baseline.sql 3.00
# flux_plan_impact: p2's 333,333 tenants (33,333 counters of calls this
# month) against a new limit of 500 / the same tenants by a hand join.
one_shot "flux_plan_impact, a plan of 333k tenants (33k counters) / hand-written join, plan grants only (ms)" \
    impact.sql impact_baseline.sql 10.00
fi

# Statistics on / off (issue 19): a second, preloaded cluster
# (benches/stats.sh).
if [ "${STATS:-1}" != 0 ] && [ "$TRAFFIC" != only ]; then
    BENCH_DIR=$DIR BENCH_PORT=$PORT FLUX_PGBIN=$BIN benches/stats.sh
fi

# Traffic (issue 16), in a database of its own (benches/traffic_setup.sql):
# 200 features x 10 plans (2,000 grants), TRAFFIC_TENANTS tenants, then
# TRAFFIC_BIG_TENANTS for the last row; checks of a random feature of a random
# tenant (benches/traffic_check.sql), default settings (flux.cache_tenants
# 10,000), pgbench -c 2.
if [ "$TRAFFIC" != 0 ]; then
TT=${TRAFFIC_TENANTS:-100000}
BIG=${TRAFFIC_BIG_TENANTS:-1000000}
HOT=1000 # the churn rows check c1..c1000; the webhooks change the others
if [ "$TT" -le "$HOT" ] || [ "$BIG" -le "$TT" ]; then
    echo "TRAFFIC_TENANTS must be > $HOT and TRAFFIC_BIG_TENANTS > TRAFFIC_TENANTS" >&2
    exit 2
fi
work=$(mktemp -d)
webhooks_pid=
cleanup() {
    if [ -n "$webhooks_pid" ]; then kill "$webhooks_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
"${PSQL[@]}" -d postgres -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS flux_traffic" -c "CREATE DATABASE flux_traffic"
"${PSQL[@]}" -d flux_traffic -v tenants="$TT" -f benches/traffic_setup.sql >"$work/setup.log" 2>&1 ||
    { cat "$work/setup.log" >&2; exit 1; }

pgb() { # script clients tenants [pgbench options]: sets TPS
    local script=$1 clients=$2 n=$3 out
    shift 3
    if ! out=$("$BIN/pgbench" -n -h "$DIR" -p "$PORT" -U postgres -c "$clients" -j "$clients" -T "$T" \
        -D n="$n" "$@" -f "benches/$script" flux_traffic 2>&1); then
        printf 'pgbench %s failed:\n%s\n' "$script" "$out" >&2
        return 1
    fi
    TPS=$(awk '/^tps/ {print $3; exit}' <<<"$out")
}
# Each measurement sets TPS; the churn ones also append the webhook rate
# they achieved to achieved.
quiet() { pgb traffic_check.sql 2 "$HOT" -M prepared; }
churn() { # changes a second
    # The webhooks run from 0.5 s before the checks start to 0.5 s after they
    # end (T + 1 seconds, on a fixed schedule); the server ends the session
    # by itself if this script dies (client_connection_check_interval).
    "${PSQL[@]}" -d flux_traffic -At -c "SET client_connection_check_interval = '200ms'" \
        -c "CALL bench_webhooks($1, $((T + 1)), $((HOT + 1)), $TT)" >"$work/webhooks" 2>&1 &
    webhooks_pid=$!
    sleep 0.5
    pgb traffic_check.sql 2 "$HOT" -M prepared
    if ! wait "$webhooks_pid"; then
        webhooks_pid=
        printf 'bench_webhooks failed:\n%s\n' "$(cat "$work/webhooks")" >&2
        return 1
    fi
    webhooks_pid=
    local n secs lag
    IFS='|' read -r n secs lag <"$work/webhooks"
    achieved+=("$(echo "$n / $secs" | bc -l)")
    lags+=("$lag")
}
churn10() { churn 10; }
churn100() { churn 100; }
cold() { pgb traffic_check.sql 2 "$TT" -C; }
cold_baseline() { pgb select1.sql 2 "$TT" -C; }
random_tt() { pgb traffic_check.sql 2 "$TT" -M prepared; }
join_tt() { pgb traffic_join.sql 2 "$TT" -M prepared; }
random_big() { pgb traffic_check.sql 2 "$BIG" -M prepared; }
measure() { # flux-measurement baseline-measurement direction: fills fl, bl, ratios
    ratios=(); fl=(); bl=()
    for _ in $(seq "$ROUNDS"); do
        "$1"; fl+=("$TPS")
        "$2"; bl+=("$TPS")
        ratios+=("$(ratio "${fl[-1]}" "${bl[-1]}" "$3")")
    done
}
churn_row() { # changes a second, goal
    achieved=(); lags=()
    measure "churn$1" quiet ge
    local low lag
    low=$(printf '%s\n' "${achieved[@]}" | sort -g | head -1)
    lag=$(printf '%s\n' "${lags[@]}" | sort -g | tail -1)
    report "$(printf 'check of 1,000 tenants (-c 2) while %s others/s change (achieved %.1f/s) / no changes' "$1" "$low")" "$2" ge
    if [ "$(echo "$low < 0.95 * $1 || $lag > 0.25" | bc -l)" = 1 ]; then
        printf '  warning: the webhooks reached %.1f of %s changes a second, up to %.3f s behind schedule\n' \
            "$low" "$1" "$lag" >&2
    fi
}
churn_row 10 0.90
churn_row 100 0.80
measure cold cold_baseline ge
# What flux adds to a connection: 2 clients, so 2 / TPS seconds a connection.
extra_ms=$(echo "2000 / $(printf '%s\n' "${fl[@]}" | median) - 2000 / $(printf '%s\n' "${bl[@]}" | median)" | bc -l)
report "$(printf 'flux_check, a new connection per call (-C -c 2, +%.1f ms a connection) / SELECT 1 the same way' "$extra_ms")" 0.80 ge
measure random_tt join_tt ge
report "flux_check, $(commas "$TT") tenants at random (-c 2) / SQL join of flux.tenants and flux.grants" 1.00 ge
"${PSQL[@]}" -d flux_traffic -v prefix=c -v from=$((TT + 1)) -v to="$BIG" -v plan_expr="'p' || (i % 10 + 1)" \
    -f benches/bulk_tenants.sql >"$work/setup.log" 2>&1 || { cat "$work/setup.log" >&2; exit 1; }
measure random_big quiet le
report "check, $(commas "$BIG") tenants at random / 1,000 of them (-c 2, default cache_tenants): slowdown" 1.30 le
# What the cache costs one backend: reloads, a miss, a new connection, memory.
echo
COSTS_TENANTS=$TT python3 benches/cache_costs.py "$DIR" "$PORT"
fi
echo "(flux / baseline in transactions per second, median of $ROUNDS interleaved runs of ${T}s;"
echo " per-row and RLS: the ratio is cost, baseline TPS / flux TPS$([ "$TRAFFIC" = 0 ] || echo "; the last traffic row: slowdown, the same")."
echo " Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), PostgreSQL $("$BIN/postgres" --version | awk '{print $3}'))"
