"""The demos in examples/ run as a newcomer would run them (short durations), and
exit 0 only if nothing was refused or lost."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = pytest.mark.processes


@pytest.mark.parametrize("demo, moved", [
    ("drain-demo.sh", "told to move (draining)"),
    ("upgrade-demo.sh", "told to move (upgrade)"),
])
def test_the_demo_runs_and_finds_nothing_refused_or_lost(demo: str, moved: str) -> None:
    done = subprocess.run([str(REPO / "examples" / demo)], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                                            "DEMO_SECONDS": "4", "DEMO_CLIENTS": "3"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(moved) == 3
    assert done.stdout.count("each once, in order") == 3
    assert done.stdout.rstrip().endswith("OK: nothing refused, nothing lost.")
