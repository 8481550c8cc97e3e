"""The docs state what the code does: the metric reference against what daemons
expose (on their own, with workers, with Redis), every metric name the docs use,
the /status example against a live /status, and the paths and pointers the docs and
the systemd unit give."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ebbcast.metricsdoc import render
from helpers import QUICK, REPO, DaemonProcess, dial, recv_frame, wait_for

METRICS_MD = REPO / "docs" / "metrics.md"
PROSE = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
         REPO / "deploy" / "kubernetes" / "README.md"]


def documented() -> set[str]:
    """The metric names docs/metrics.md lists, as queried (counters with _total)."""
    return set(re.findall(r"^\| `([a-z_]+)` \|", METRICS_MD.read_text(), re.M))


def exposed(d: DaemonProcess) -> set[str]:
    """The metric names a daemon's /metrics has, as queried."""
    names = set()
    for family in text_string_to_metric_families(d.metrics_text()):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_the_metric_reference_is_what_make_docs_writes() -> None:
    assert METRICS_MD.read_text() == render(), "docs/metrics.md is stale: run make docs"


@pytest.mark.processes
def test_every_metric_a_daemon_exposes_is_documented_and_the_reverse(
        spawn: Any, redis_server: Any) -> None:
    alone = spawn("--port", "0", "--admin-port", "0")
    workers = spawn("--port", "0", "--admin-port", "0", "--workers", "2")
    redis = spawn("--port", "0", "--admin-port", "0", "--workers", "2",
                  env={"EBBCAST_BACKPLANE_URL": redis_server.url})
    wait_for(lambda: "ebbcast_worker_open_fds{" in workers.metrics_text())
    seen: set[str] = set()
    for d in (alone, workers, redis):
        names = exposed(d)
        assert names - documented() == set(), "exposed but not in docs/metrics.md"
        seen |= names
    assert documented() - seen == set(), "in docs/metrics.md but exposed by none"


def test_every_metric_the_docs_name_exists() -> None:
    """Names as an operator types them into a query: ``_total`` on counters, and a
    histogram by its name or its _bucket, _sum and _count series."""
    names = documented()
    series = names | {f"{name}{suffix}" for name in names
                      for suffix in ("_bucket", "_sum", "_count")}
    deploy = [*(REPO / "deploy").rglob("*.yml"), *(REPO / "deploy").rglob("*.json")]
    for path in [*PROSE, *deploy]:
        used = set(re.findall(r"(?<![\w:])(?:ebbcast|process)_[a-z_]*[a-z]\b",
                              path.read_text()))
        used = {name for name in used if not name.startswith(("ebbcast_dashboard",
                                                               "process_collector"))}
        unknown = {name for name in used if name not in series
                   and not _not_a_metric(name, path)}
        assert not unknown, f"{path.relative_to(REPO)} names {sorted(unknown)}"


def _not_a_metric(name: str, path: Path) -> bool:
    """Words of the prose that look like metric names and are not: recording rules
    (``ebbcast:...``, excluded by the pattern), package paths, file names."""
    return name in {"ebbcast_build_info_version"} or \
        re.search(rf"\b{name}\.(py|json|yml|md|toml|service)\b", path.read_text()) is not None


@pytest.mark.processes
def test_the_status_example_has_what_a_live_status_has(spawn: Any) -> None:
    """docs/protocol.md's /status: the same fields, nested, as a daemon with workers,
    after an upgrade, draining; and its upgrade result one the code gives."""
    text = (REPO / "docs" / "protocol.md").read_text()
    example = json.loads(re.search(r"`/status`:\n\n```json\n(.*?)```", text, re.S).group(1))
    d = spawn("--port", "0", "--admin-port", "0", "--workers", "2",
              env={**QUICK, "EBBCAST_ADMIN_TOKEN": "t", "EBBCAST_SHUTDOWN_DRAIN_TIMEOUT": "60s"})
    d.signal(signal.SIGUSR2)
    wait_for(lambda: d.admin_json("/status")[1]["upgrade"]["last_result"] == "ok")
    ws = dial(d.ws_url)
    recv_frame(ws, "welcome")
    assert d.admin_json("/drain", "POST", b"", token="t")[0] == 202
    live = d.admin_json("/status")[1]
    assert _shape(live) == _shape(example)
    assert example["upgrade"]["last_result"] == live["upgrade"]["last_result"] == "ok"
    ws.close()
    assert d.wait_exit() == 0


def _shape(value: Any) -> Any:
    """The keys of a JSON document, nested; a list by its first element."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return None


def test_the_environment_file_the_docs_name_is_the_units() -> None:
    unit = (REPO / "systemd" / "ebbcast.service").read_text()
    (read,) = re.findall(r"^EnvironmentFile=-?(\S+)$", unit, re.M)
    for path in PROSE:
        for named in set(re.findall(r"/etc/ebbcast/[\w.-]*env\b", path.read_text())):
            assert named == read, f"{path.name} names {named}; the unit reads {read}"


def test_the_units_pointer_to_its_install_steps_leads_somewhere() -> None:
    unit = (REPO / "systemd" / "ebbcast.service").read_text()
    heading, doc = re.search(r'^# Install: see "([^"]+)" in (\S+)\.$', unit, re.M).groups()
    assert f"## {heading}\n" in (REPO / doc).read_text()


def test_every_relative_link_of_the_docs_leads_to_a_file_of_the_repository() -> None:
    """The README's figures come with their committed results, and no page sends a
    reader to a file that moved."""
    for path in PROSE:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target:
                continue
            assert (path.parent / target).resolve().exists(), f"{path.name}: {target}"
