#!/usr/bin/env bash
# The drain, seen from outside: two ebbcast instances share a Redis
# backplane; a few `ebbcast client --reconnect` sessions connect to the first and a
# publisher broadcasts through the second. SIGTERM to the first: its clients get the
# shutdown frame naming the second, move there (make before break, resuming from their
# last offset), and the first exits 0 as its last client leaves. Needs redis-server.
#
# Prints every command it runs, the daemon's progress lines and what each client saw;
# exits 0 only if no connection was refused and every client received every message
# once, in order. DEMO_SECONDS (default 10) and DEMO_CLIENTS (default 3) size it.
#
#   make demos               # both, in the project's venv; or, with ebbcast installed:
#   examples/drain-demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# the project's venv if there is one (make demos builds it), else ebbcast installed
python=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then python=.venv/bin/python; fi
exec "$python" examples/demo.py drain "$@"
