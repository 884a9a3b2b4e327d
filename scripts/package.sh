#!/usr/bin/env bash
# An installable artefact of flux_entitlements for one PostgreSQL version,
# for servers without Rust: a tarball with install.sh for every version and,
# for Debian's PostgreSQL 15, a .deb.
#
#   scripts/package.sh PG_CONFIG [OUTDIR]     (make package PG=NN)
set -euo pipefail
cd "$(dirname "$0")/.."
pg_config=${1:?path to the pg_config of the target server}
out=$(mkdir -p "${2:-target/package}" && cd "${2:-target/package}" && pwd)
major=$("$pg_config" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

cargo pgrx package --pg-config "$pg_config" --out-dir "$stage/pgrx" >/dev/null
pkglibdir=$("$pg_config" --pkglibdir)
sharedir=$("$pg_config" --sharedir)

name=flux_entitlements-$version-pg$major
mkdir -p "$stage/$name/lib" "$stage/$name/extension"
cp "$stage/pgrx$pkglibdir/flux_entitlements.so" "$stage/$name/lib/"
cp "$stage/pgrx$sharedir/extension/"flux_entitlements* "$stage/$name/extension/"
cat >"$stage/$name/install.sh" <<INSTALL
#!/bin/sh
# Install flux_entitlements $version into an existing PostgreSQL $major server
# (no Rust needed): ./install.sh [path/to/pg_config]   (default: pg_config in PATH)
# Then, in each database: CREATE EXTENSION flux_entitlements;
set -eu
PG_CONFIG=\${1:-\${PG_CONFIG:-pg_config}}
here=\$(cd "\$(dirname "\$0")" && pwd)
major=\$("\$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\\1/')
if [ "\$major" != "$major" ]; then
    echo "this package is for PostgreSQL $major; \$PG_CONFIG is PostgreSQL \$major" >&2
    exit 1
fi
install -m 755 "\$here/lib/flux_entitlements.so" "\$("\$PG_CONFIG" --pkglibdir)/"
install -m 644 "\$here"/extension/* "\$("\$PG_CONFIG" --sharedir)/extension/"
echo "installed flux_entitlements $version into \$("\$PG_CONFIG" --pkglibdir); now: CREATE EXTENSION flux_entitlements;"
INSTALL
chmod 755 "$stage/$name/install.sh"
tar -C "$stage" -czf "$out/$name.tar.gz" "$name"
echo "$out/$name.tar.gz"

# Debian's own server: a .deb that puts the same files where Debian's
# postgresql-15 looks for them.
if [ "$pg_config" = /usr/lib/postgresql/15/bin/pg_config ] && command -v dpkg-deb >/dev/null; then
    arch=$(dpkg --print-architecture)
    deb="$stage/deb"
    mkdir -p "$deb/DEBIAN"
    cp -a "$stage/pgrx/." "$deb/"
    cat >"$deb/DEBIAN/control" <<CONTROL
Package: postgresql-$major-flux-entitlements
Version: $version
Architecture: $arch
Maintainer: flux_entitlements developers <flux@localhost>
Depends: postgresql-$major
Section: database
Priority: optional
Description: entitlements inside PostgreSQL $major
 Plans, tenants, addons, overrides, flags, metering and one decision,
 as the PostgreSQL extension flux_entitlements.
CONTROL
    dpkg-deb --build --root-owner-group "$deb" "$out/postgresql-$major-flux-entitlements_${version}_$arch.deb" >/dev/null
    echo "$out/postgresql-$major-flux-entitlements_${version}_$arch.deb"
fi
