#!/usr/bin/env bash
# The upgrade, seen from outside: one ebbcast, a few `ebbcast client --reconnect` sessions and a publisher.
# SIGUSR2: a new generation takes the listening sockets over, the old one tells its
# clients to move (spread over shutdown.upgrade_spread), they move make before break,
# resuming from their last offset, and the old generation exits.
#
# Prints every command it runs, the daemon's progress lines and what each client saw;
# exits 0 only if no connection was refused and every client received every message
# once, in order. DEMO_SECONDS (default 10) and DEMO_CLIENTS (default 3) size it.
#
#   make demos               # both, in the project's venv; or, with ebbcast installed:
#   examples/upgrade-demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# the project's venv if there is one (make demos builds it), else ebbcast installed
python=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then python=.venv/bin/python; fi
exec "$python" examples/demo.py upgrade "$@"
