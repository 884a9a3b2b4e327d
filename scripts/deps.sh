#!/usr/bin/env bash
# Install what building and testing flux_entitlements needs, skipping what is
# already there (see ../shared/TOOLCHAIN.md). Never downloads PostgreSQL:
# cargo-pgrx is pointed at Debian's pg_config.
set -euo pipefail
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

missing=""
for pkg in postgresql-15 postgresql-server-dev-15 postgresql-client-15 libclang-dev clang sudo bc; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    echo "== installing Debian packages:$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "0.18.1"; then
    echo "== installing cargo-pgrx 0.18.1 (about 8 minutes on 2 cores)"
    cargo install cargo-pgrx --version 0.18.1 --locked
fi

if ! grep -qs "pg15 *= *\"$PG_CONFIG\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    echo "== cargo pgrx init (Debian's PostgreSQL 15)"
    cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
fi

rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy >/dev/null 2>&1 || true

if ! python3 -c "import psycopg, pytest" 2>/dev/null; then
    echo "== installing psycopg and pytest (integration tests)"
    python3 -m pip install -q 'psycopg[binary]' pytest 2>&1 | grep -v "WARNING: Running pip as the 'root'" || true
fi
