"""The artefact of `make package PG=NN` installs into a server that has never
seen Rust or this repository, and CREATE EXTENSION works there.

- PostgreSQL 16 and 18 (relocatable builds): the server tree is copied to a
  clean directory, the tarball's install.sh is pointed at the copy's
  pg_config, and a cluster of the copy runs the extension.
- PostgreSQL 15 (Debian's): the .deb is installed with dpkg -i.

FLUX_PG_CONFIG names the target server's pg_config (the Makefile sets it)."""
import glob
import os
import re
import shutil
import subprocess
import tarfile
import tempfile

import psycopg

PG_CONFIG = os.environ.get("FLUX_PG_CONFIG", "/usr/lib/postgresql/15/bin/pg_config")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = os.path.join(REPO, "target/package")
PORT = 5479


def run(*cmd, **kw):
    r = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd[0]} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def as_postgres(*cmd):
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return run(*prefix, *cmd)


def major(pg_config):
    return re.match(r"PostgreSQL (\d+)", run(pg_config, "--version")).group(1)


def version():
    with open(os.path.join(REPO, "Cargo.toml")) as f:
        return re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)


def check_extension_runs(bindir, work):
    data = os.path.join(work, "data")
    as_postgres(f"{bindir}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
    with open(os.path.join(data, "postgresql.conf"), "a") as f:
        f.write(f"port = {PORT}\nunix_socket_directories = '{work}'\nlisten_addresses = ''\n")
    as_postgres(f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(work, "server.log"), "-w", "start")
    try:
        with psycopg.connect(f"host={work} port={PORT} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute("CREATE EXTENSION flux_entitlements")
            c.execute("SELECT flux_define_feature('export'); SELECT flux_define_plan('pro');"
                      "SELECT flux_grant('pro', 'export'); SELECT flux_subscribe('acme', 'pro')")
            assert c.execute("SELECT flux_check('acme', 'export'), flux_check('acme', 'nothing')").fetchone() == (True, False)
            assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'flux_entitlements'").fetchone()[0] == version()
            return c.execute("SELECT setting FROM pg_settings WHERE name = 'dynamic_library_path'").fetchone()[0]
    finally:
        as_postgres(f"{bindir}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop")


def test_the_package_installs_into_a_clean_server_and_runs():
    n = major(PG_CONFIG)
    work = tempfile.mkdtemp(prefix="flux-package-")
    os.chmod(work, 0o755)
    if os.geteuid() == 0:
        shutil.chown(work, "postgres")
    try:
        if n == "15":
            debs = glob.glob(os.path.join(PACKAGES, f"postgresql-15-flux-entitlements_{version()}_*.deb"))
            assert debs, f"no .deb in {PACKAGES}: run make package"
            run("dpkg", "-i", debs[0])
            assert "postgresql-15-flux-entitlements" in run("dpkg", "-S", "/usr/lib/postgresql/15/lib/flux_entitlements.so")
            bindir = run(PG_CONFIG, "--bindir").strip()
        else:
            tarball = os.path.join(PACKAGES, f"flux_entitlements-{version()}-pg{n}.tar.gz")
            assert os.path.exists(tarball), f"{tarball} is missing: run make package PG={n}"
            # A server tree that never had the extension: a copy of the
            # relocatable build, without our files.
            # The wheel's shared libraries (libpq, ...) sit beside the tree
            # (<package>.libs), found by relative rpath: copy the whole
            # install (bin -> pginstall -> package -> its directory).
            bindir = run(PG_CONFIG, "--bindir").strip()
            install_root = os.path.dirname(os.path.dirname(os.path.dirname(bindir)))
            copy = os.path.join(work, "install")
            shutil.copytree(install_root, copy, symlinks=True)
            server = os.path.join(copy, os.path.relpath(os.path.dirname(bindir), install_root))
            for f in glob.glob(os.path.join(server, "lib", "**", "flux_entitlements*"), recursive=True) + \
                    glob.glob(os.path.join(server, "share", "**", "flux_entitlements*"), recursive=True):
                os.remove(f)
            pg_config = os.path.join(server, "bin", "pg_config")
            assert run(pg_config, "--pkglibdir").startswith(server), "the copied server is not relocatable"
            with tarfile.open(tarball) as t:
                t.extractall(work)
            out = run(os.path.join(work, f"flux_entitlements-{version()}-pg{n}", "install.sh"), pg_config)
            assert server in out
            subprocess.run(["chmod", "-R", "o+rX", work], check=True)
            bindir = os.path.join(server, "bin")
        check_extension_runs(bindir, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
