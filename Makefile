# ebbcast: `make run` serves on the defaults; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The interpreter's minor version picks its locks: requirements/<3.x>/{run,test,bench}.txt.
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
LOCK_DIR := requirements/$(PYVER)
# Every supported CPython has its locks; `make lock` writes them all.
LOCK_PYTHONS := 3.10 3.11 3.12 3.13
# The tool that writes the locks (uv's pip compile), itself pinned.
UV_VERSION := 0.13.9
UV := .venv-lock/bin/uv
# Debian packages the test suite needs: systemd-analyze for the unit checks,
# promtool (package prometheus) to validate the metrics exposition, a C compiler
# for the benchmark's load generator, node and npm for its reference server (and the
# Node interop test), Chromium for the browser tests, redis-server for the backplane,
# nginx and haproxy for the reverse-proxy tests.
TEST_DEBS := python3-venv systemd prometheus gcc make libc6-dev chromium redis-server \
	nginx haproxy
# The other CPython versions (from pyenv) that CI runs the whole suite on (3.11 is
# `make test`); 3.12 runs in `make test-newest` instead.
OTHER_PYTHONS ?= 3.10 3.13
NEWEST_PYTHON ?= 3.12

.PHONY: demos run test test-deps typecheck test-versions test-newest fast-tests bench \
	conformance conformance-quick install-systemd verify-installed-unit verify-installed-daemon clean docs \
	dashboard lock

# A venv holding one lock, installed as it is written (hashes checked, nothing
# resolved), then ebbcast itself from this tree with the lock's build tools. The
# venv is made anew each time, so nothing a lock dropped stays behind. The locks nest
# (run in test in bench): a target needs the smallest one, or the one the venv holds
# if that is bigger (refreshed if its lock changed), so targets never swap locks.
$(VENV)/.lock-%: $(LOCK_DIR)/%.txt setup.py pyproject.toml
	rm -rf $(VENV) && $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $<
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

# No lock for this interpreter: say which ones have one.
requirements/%.txt:
	@echo "no lock $@ for $(PYTHON) (Python $(PYVER)); the locks are for $(LOCK_PYTHONS):" \
	  "run with PYTHON=python3.11, say, or add the version to LOCK_PYTHONS and make lock" >&2
	@exit 1

HELD_LOCK := $(firstword $(wildcard $(VENV)/.lock-bench $(VENV)/.lock-test))
RUN_LOCK := $(or $(HELD_LOCK),$(VENV)/.lock-run)
TEST_LOCK := $(or $(wildcard $(VENV)/.lock-bench),$(VENV)/.lock-test)

run: $(RUN_LOCK)
	$(BIN)/ebbcast serve

# examples/: a drain (two instances on Redis) and an upgrade, seen from outside.
demos: $(TEST_LOCK)
	examples/drain-demo.sh
	examples/upgrade-demo.sh

typecheck: $(TEST_LOCK)
	$(BIN)/mypy

# The benchmark's reference server (bench/servers/node_ws), at its package-lock.json.
NODE_WS := bench/servers/node_ws/node_modules/ws/package.json
$(NODE_WS): bench/servers/node_ws/package.json bench/servers/node_ws/package-lock.json
	cd bench/servers/node_ws && npm ci --no-audit --no-fund --silent

test: typecheck $(NODE_WS)
	$(BIN)/python -m pytest

# The tests that need no browser, Redis, proxy or daemon subprocess (seconds).
fast-tests: $(TEST_LOCK)
	$(BIN)/python -m pytest -m fast

# RFC 6455 conformance (Autobahn|Testsuite, Python 2.7 from pyenv): every case, ~2 min
# (CI runs this one), or all but the 9.x performance cases, ~15 s.
conformance: $(RUN_LOCK)
	$(BIN)/python conformance/run.py
conformance-quick: $(RUN_LOCK)
	$(BIN)/python conformance/run.py --quick

# docs/configuration.md and docs/metrics.md, written from the schema and the metrics
# (tests fail when they disagree with the code).
docs: $(RUN_LOCK)
	$(BIN)/python -m ebbcast.configdoc > docs/configuration.md
	$(BIN)/python -m ebbcast.metricsdoc > docs/metrics.md

# deploy/grafana/ebbcast-dashboard.json, built with grafanalib (a test fails when stale).
dashboard: $(TEST_LOCK)
	$(BIN)/python deploy/grafana/dashboard.py > deploy/grafana/ebbcast-dashboard.json

# The benchmark (not part of `make test`): matrix, timers/slow reader/drain, profile.
bench: $(VENV)/.lock-bench $(NODE_WS)
	$(BIN)/python bench/run.py --out bench/results
	$(BIN)/python bench/extras.py --out bench/results
	$(BIN)/python bench/storm.py --out bench/results
	$(BIN)/python bench/channels.py --out bench/results
	bench/profile.sh

# Root only: the system packages the tests use (fails, never skips, without them).
test-deps:
	@missing=""; for p in $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# pyenv's interpreter for a minor version, or a message naming what is missing.
pyenv_python = $$(ls -d $$HOME/.pyenv/versions/$(1).*/bin/python3 2>/dev/null | sort -V | tail -n 1)

# The whole suite on every other supported CPython, each in .venv-3.x from its own lock.
test-versions: $(NODE_WS)
	@for v in $(OTHER_PYTHONS); do \
	  py=$(call pyenv_python,$$v); \
	  if [ -z "$$py" ]; then echo "no Python $$v found under ~/.pyenv" >&2; exit 1; fi; \
	  echo "== the whole suite on $$($$py --version), requirements/$$v/test.txt"; \
	  $(MAKE) --no-print-directory test PYTHON=$$py VENV=.venv-$$v || exit 1; \
	done

# The type check and the fast tests against the newest releases setup.py's ranges
# allow (no lock): an upstream release that breaks ebbcast fails here first.
test-newest:
	@py=$(call pyenv_python,$(NEWEST_PYTHON)); \
	if [ -z "$$py" ]; then echo "no Python $(NEWEST_PYTHON) found under ~/.pyenv" >&2; exit 1; fi; \
	echo "== type check and fast tests on $$($$py --version), newest releases"; \
	rm -rf .venv-newest && $$py -m venv .venv-newest
	.venv-newest/bin/python -m pip install --quiet --upgrade pip setuptools wheel
	.venv-newest/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[test]"
	@.venv-newest/bin/python -m pip freeze --all --exclude-editable \
	  | .venv-newest/bin/python requirements/locktool.py diff requirements/$(NEWEST_PYTHON)/test.txt
	.venv-newest/bin/mypy
	.venv-newest/bin/python -m pytest -m "fast and not locked_env"

# Writes every lock anew from setup.py's ranges and requirements/*.in, at the newest
# releases (UPGRADE="redis mypy" moves only those, keeping every other pin). The test
# lock is held to the run lock's pins, the bench lock to the test lock's: they nest.
UPGRADE ?=
LOCK_FLAGS = --python-platform linux --generate-hashes --quiet --custom-compile-command "make lock" \
	$(if $(UPGRADE),$(foreach p,$(UPGRADE),--upgrade-package $(p)),--upgrade)
$(UV):
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet uv==$(UV_VERSION)
lock: $(UV)
	@for v in $(LOCK_PYTHONS); do \
	  echo "== requirements/$$v"; mkdir -p requirements/$$v; \
	  $(UV) pip compile $(LOCK_FLAGS) --python-version $$v -o requirements/$$v/run.txt \
	    setup.py requirements/build.in || exit 1; \
	  $(UV) pip compile $(LOCK_FLAGS) --python-version $$v -o requirements/$$v/test.txt \
	    -c requirements/$$v/run.txt --extra test setup.py requirements/build.in || exit 1; \
	  $(UV) pip compile $(LOCK_FLAGS) --python-version $$v -o requirements/$$v/bench.txt \
	    -c requirements/$$v/test.txt --extra test setup.py requirements/build.in \
	    requirements/bench.in || exit 1; \
	done
	.venv-lock/bin/python requirements/locktool.py build-system pyproject.toml requirements/*/*.txt

# Root only: install as docs/operations.md "Running under systemd" says (venv under
# /opt, from the lock for Debian's own Python: the service user cannot reach an
# interpreter under /root).
SYSTEM_PYTHON := /usr/bin/python3
install-systemd:
	$(SYSTEM_PYTHON) -m venv /opt/ebbcast
	/opt/ebbcast/bin/python -m pip install --quiet --require-hashes --no-deps \
	  -r requirements/$$($(SYSTEM_PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')/run.txt
	/opt/ebbcast/bin/python -m pip install --quiet --no-deps --no-build-isolation .
	install -d -m 0755 /etc/ebbcast
	[ -f /etc/ebbcast/ebbcast.toml ] || install -m 0644 config/ebbcast.toml /etc/ebbcast/ebbcast.toml
	install -m 0644 systemd/ebbcast.service /etc/systemd/system/ebbcast.service

verify-installed-unit:
	@out=$$(systemd-analyze verify /etc/systemd/system/ebbcast.service 2>&1); \
	if [ -n "$$out" ]; then echo "$$out"; echo "systemd-analyze verify printed the above" >&2; exit 1; fi
	systemd-analyze security --offline=true /etc/systemd/system/ebbcast.service | tail -n 1

# The installed daemon, on the run lock alone, serves with the installed config:
# /healthz answers, and SIGTERM ends it with exit 0.
verify-installed-daemon:
	@log=$$(mktemp); /opt/ebbcast/bin/ebbcast serve --config /etc/ebbcast/ebbcast.toml \
	  --port 0 --admin-port 0 2>$$log & pid=$$!; admin=""; \
	for i in $$(seq 200); do \
	  admin=$$(sed -n 's/.* serving ws=[^ ]* admin=\(http[^ ]*\).*/\1/p' $$log); \
	  [ -n "$$admin" ] || ! kill -0 $$pid 2>/dev/null && break; sleep 0.05; done; \
	health=$$(curl -s "$$admin/healthz"); kill -TERM $$pid; wait $$pid; rc=$$?; \
	cat $$log; rm -f $$log; echo "healthz: $$health, exit $$rc"; \
	[ "$$health" = '{"status": "ok"}' ] && [ $$rc -eq 0 ]

clean:
	rm -rf $(VENV) .venv-3.* .venv-newest .venv-lock build dist daemon/*.egg-info
