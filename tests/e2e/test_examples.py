"""The demos in examples/ run as a newcomer would run them (short durations), and
exit 0 only if nothing was refused or lost."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = pytest.mark.processes


def as_a_background_job() -> None:
    """What a shell does to `demo.sh &`: SIGINT ignored, inherited by every child (the
    demo stops its clients with SIGINT all the same)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("demo, moved", [
    ("drain-demo.sh", "told to move (draining)"),
    ("upgrade-demo.sh", "told to move (upgrade)"),
])
def test_the_demo_runs_and_finds_nothing_refused_or_lost(demo: str, moved: str) -> None:
    done = subprocess.run([str(REPO / "examples" / demo)], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                                            "DEMO_SECONDS": "4", "DEMO_CLIENTS": "3"},
                          preexec_fn=as_a_background_job)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(moved) == 3
    assert done.stdout.count("each once, in order") == 3
    assert done.stdout.rstrip().endswith("OK: nothing refused, nothing lost.")


def test_the_python_client_example_subscribes_publishes_and_reads_its_message(spawn) -> None:
    from helpers import QUICK, serve_on_a_port_of_its_own

    d = serve_on_a_port_of_its_own(spawn, "--admin-port", "0", env=QUICK)
    done = subprocess.run([sys.executable, str(REPO / "examples" / "channels.py"), d.ws_url],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == ["subscribed to scores at offset 0",
                                        "example joins scores",
                                        "example in scores: 1-0 (offset 1)"]
