# ebbcast: `make run` serves on the defaults; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Debian packages the test suite needs: systemd-analyze for the unit checks,
# promtool (package prometheus) to validate the metrics exposition, a C compiler
# for the benchmark's load generator, node and npm for its reference server (and the
# Node interop test), Chromium for the browser tests, redis-server for the backplane,
# nginx and haproxy for the reverse-proxy tests.
TEST_DEBS := python3-venv systemd prometheus gcc make libc6-dev chromium redis-server \
	nginx haproxy
# Other supported CPython versions (from pyenv) that CI runs the suite on.
OTHER_PYTHONS ?= 3.10 3.12 3.13

.PHONY: demos run test test-deps typecheck test-versions bench conformance conformance-quick \
	install-systemd verify-installed-unit clean docs dashboard

$(BIN)/ebbcast: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

run: $(BIN)/ebbcast
	$(BIN)/ebbcast serve

# examples/: a drain (two instances on Redis) and an upgrade, seen from outside.
demos: $(BIN)/ebbcast
	examples/drain-demo.sh
	examples/upgrade-demo.sh

typecheck: $(BIN)/ebbcast
	$(BIN)/mypy

# The benchmark's reference server (bench/servers/node_ws), for the harness smoke test.
NODE_WS := bench/servers/node_ws/node_modules/ws/package.json
$(NODE_WS): bench/servers/node_ws/package.json
	cd bench/servers/node_ws && npm install --no-audit --no-fund --silent

test: $(BIN)/ebbcast typecheck $(NODE_WS)
	$(BIN)/python -m pytest

# RFC 6455 conformance (Autobahn|Testsuite, Python 2.7 from pyenv): every case, ~2 min,
# or all but the 9.x performance cases, ~15 s (CI runs this one).
conformance: $(BIN)/ebbcast
	$(BIN)/python conformance/run.py
conformance-quick: $(BIN)/ebbcast
	$(BIN)/python conformance/run.py --quick

# docs/configuration.md, written from the schema (a test fails when they disagree).
docs: $(BIN)/ebbcast
	$(BIN)/python -m ebbcast.configdoc > docs/configuration.md

# deploy/grafana/ebbcast-dashboard.json, built with grafanalib (a test fails when stale).
dashboard: $(BIN)/ebbcast
	$(BIN)/python deploy/grafana/dashboard.py > deploy/grafana/ebbcast-dashboard.json

# The benchmark (not part of `make test`): matrix, timers/slow reader/drain, profile.
bench: $(BIN)/ebbcast $(NODE_WS)
	$(BIN)/pip install --quiet -r bench/requirements.txt py-spy
	$(BIN)/python bench/run.py --out bench/results
	$(BIN)/python bench/extras.py --out bench/results
	$(BIN)/python bench/storm.py --out bench/results
	bench/profile.sh

# Root only: the system packages the tests use (fails, never skips, without them).
test-deps:
	@missing=""; for p in $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The whole suite on every other supported CPython (3.11 is `make test`).
test-versions:
	@for v in $(OTHER_PYTHONS); do \
	  py=$$(ls -d $$HOME/.pyenv/versions/$$v.*/bin/python3 2>/dev/null | tail -n 1); \
	  if [ -z "$$py" ]; then echo "no Python $$v found under ~/.pyenv" >&2; exit 1; fi; \
	  echo "== tests on $$($$py --version)"; \
	  $$py -m venv .venv-$$v && .venv-$$v/bin/pip install --quiet -e ".[test]" && \
	  .venv-$$v/bin/python -m pytest -q || exit 1; \
	done

# Root only: install as README "Running under systemd" says (venv under /opt).
# Debian's own Python: the service user cannot reach an interpreter under /root.
install-systemd:
	/usr/bin/python3 -m venv /opt/ebbcast
	/opt/ebbcast/bin/pip install --quiet .
	install -d -m 0755 /etc/ebbcast
	[ -f /etc/ebbcast/ebbcast.toml ] || install -m 0644 config/ebbcast.toml /etc/ebbcast/ebbcast.toml
	install -m 0644 systemd/ebbcast.service /etc/systemd/system/ebbcast.service

verify-installed-unit:
	@out=$$(systemd-analyze verify /etc/systemd/system/ebbcast.service 2>&1); \
	if [ -n "$$out" ]; then echo "$$out"; echo "systemd-analyze verify printed the above" >&2; exit 1; fi
	systemd-analyze security --offline=true /etc/systemd/system/ebbcast.service | tail -n 1

clean:
	rm -rf $(VENV) .venv-3.* build dist daemon/*.egg-info
