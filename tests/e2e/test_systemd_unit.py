"""Checks on systemd/ebbcast.service against what docs/operations.md, "Running under
systemd", promises.

These tests run ``systemd-analyze``. When it is missing they fail, they are not
skipped: the unit's hardening score and cleanliness are part of the contract.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "ebbcast.service"
INSTALLED_BINARY = "/opt/ebbcast/bin/ebbcast"
#: What README and docs/operations.md say `systemd-analyze security` rates the unit
#: (systemd 252, Debian 12): the test holds them to it.
CLAIMED_EXPOSURE = "1.1"
DRAIN_DEADLINE_SECONDS = 30 * 60  # default shutdown.drain_timeout
TIMEOUT = 60  # seconds per systemd-analyze run


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not os.access(path, os.X_OK):
        pytest.fail(
            "systemd-analyze not found (looked on PATH and at /usr/bin/systemd-analyze); "
            "install systemd (e.g. apt-get install systemd) to check systemd/ebbcast.service"
        )
    return path


def _run_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    # Keep the output stable and free of pagers, colours and debug logs.
    for var in ("SYSTEMD_LOG_LEVEL", "SYSTEMD_LOG_TARGET", "SYSTEMD_UNIT_PATH"):
        env.pop(var, None)
    env.update(SYSTEMD_PAGER="cat", PAGER="cat", SYSTEMD_COLORS="0")
    try:
        return subprocess.run(
            [_systemd_analyze(), "--no-pager", *args],
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=env,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"systemd-analyze {' '.join(args)} did not finish within {TIMEOUT}s")


def _console_script() -> str:
    """The ``ebbcast`` console script in the environment running the tests."""
    candidates = [Path(sys.executable).parent / "ebbcast"]
    found = shutil.which("ebbcast")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate.absolute())
    pytest.fail(
        "the ebbcast console script was not found next to "
        f"{sys.executable} or on PATH; install the package into the test "
        "environment (pip install -e .) so systemd-analyze verify can check ExecStart"
    )


def _parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Minimal systemd unit parser: section -> key -> every value, in order.

    Unlike configparser it keeps repeated keys (systemd adds them up) and
    keeps the case of key names.
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        assert "=" in line, f"not a KEY=VALUE line: {line!r}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


_UNITS = {
    "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3,
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400, "w": 604800, "week": 604800, "weeks": 604800,
}


def _timespan_seconds(value: str) -> float:
    """Parse a systemd time span such as "35min", "1h 5min", "2100" (seconds)."""
    value = value.strip()
    if value == "infinity":
        return math.inf
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts and re.fullmatch(r"(\s*\d+(\.\d+)?\s*[a-z]*)+\s*", value), f"bad time span {value!r}"
    total = 0.0
    for number, unit in parts:
        assert unit in _UNITS or unit == "", f"unknown time unit {unit!r} in {value!r}"
        total += float(number) * _UNITS.get(unit, 1)
    return total


@pytest.fixture(scope="module")
def service() -> dict[str, str]:
    """The [Service] section; for a repeated key, the last value (what systemd keeps
    for single-valued settings)."""
    sections = _parse_unit(UNIT.read_text(encoding="utf-8"))
    assert "Service" in sections, "no [Service] section"
    return {key: values[-1] for key, values in sections["Service"].items()}


def test_the_docs_state_the_exposure_the_test_measures() -> None:
    for doc in ("README.md", "docs/operations.md"):
        text = (REPO / doc).read_text(encoding="utf-8")
        claims = re.findall(r"security` rates it (\d+\.\d+)", text)
        assert claims == [CLAIMED_EXPOSURE], doc


@pytest.mark.processes
def test_security_exposure_is_what_the_docs_claim() -> None:
    result = _run_analyze("security", "--offline=true", str(UNIT))
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for ebbcast\.service:\s*(\d+(?:\.\d+)?)", output)
    assert match, f"no overall exposure level in the output (exit {result.returncode}):\n{output}"
    assert match.group(1) == CLAIMED_EXPOSURE, (
        f"exposure {match.group(1)}, the docs say {CLAIMED_EXPOSURE}; see the ✗ lines:\n"
        + result.stdout)


@pytest.mark.processes
def test_verify_prints_nothing(tmp_path: Path) -> None:
    # systemd-analyze verify fails when ExecStart's binary does not exist, and
    # /opt/ebbcast/bin/ebbcast only exists after the README's installation (CI
    # does that, then runs verify on the real unit). Here, verify a copy whose
    # ExecStart points at the console script of the environment running the tests.
    # The copy keeps the name ebbcast.service, since verify derives the unit name
    # and type from the file name.
    text = UNIT.read_text(encoding="utf-8")
    assert INSTALLED_BINARY in text, f"ExecStart no longer uses {INSTALLED_BINARY}"
    script = _console_script()
    replacement = f'"{script}"' if re.search(r"\s", script) else script
    copy = tmp_path / "ebbcast.service"
    copy.write_text(text.replace(INSTALLED_BINARY, replacement), encoding="utf-8")

    result = _run_analyze("verify", str(copy))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), (
        f"systemd-analyze verify exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


def test_process_model(service: dict[str, str]) -> None:
    assert service.get("Type") == "notify"
    assert service.get("NotifyAccess") == "main"
    assert shlex.split(service["ExecStart"]) == [
        INSTALLED_BINARY, "serve", "--config", "/etc/ebbcast/ebbcast.toml",
    ]
    assert service.get("DynamicUser") == "yes"
    env_file = service.get("EnvironmentFile", "")
    assert env_file.startswith("-"), "the EnvironmentFile is optional and needs a '-' prefix"


def test_reload_sends_sighup(service: dict[str, str]) -> None:
    argv = shlex.split(service["ExecReload"])
    assert Path(argv[0]).name == "kill", argv
    assert argv[-1] == "$MAINPID", argv
    signal_args = argv[1:-1]
    assert signal_args in (["-HUP"], ["-SIGHUP"], ["-1"], ["-s", "HUP"], ["-s", "SIGHUP"]), argv


def test_stop_waits_for_the_drain(service: dict[str, str]) -> None:
    assert service.get("KillMode") == "mixed"
    assert service.get("KillSignal", "SIGTERM") in ("SIGTERM", "TERM", "15")
    timeout = _timespan_seconds(service["TimeoutStopSec"])
    assert DRAIN_DEADLINE_SECONDS < timeout < math.inf, (
        f"TimeoutStopSec={service['TimeoutStopSec']} must be finite and above the 30 min drain"
    )


def test_watchdog_and_restart(service: dict[str, str]) -> None:
    assert _timespan_seconds(service["WatchdogSec"]) > 0
    assert service.get("Restart") == "on-failure"
    assert {"2", "3"} <= set(service.get("RestartPreventExitStatus", "").split()), (
        "exit 2 (bad config) and 3 (bind failure) must not be restarted"
    )


def test_daemon_can_reach_the_network(service: dict[str, str]) -> None:
    families = set(service.get("RestrictAddressFamilies", "").split())
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= families, families
    assert service.get("PrivateNetwork", "no") == "no"
    assert service.get("RuntimeDirectory") == "ebbcast"
