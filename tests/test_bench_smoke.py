"""Smoke runs of the benchmarks (tiny sizes), so that they cannot rot.

They need gcc and make (to build bench/loadgen), node with npm (for the ws
reference server) and redis-server; they fail, never skip, when these are missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import REPO

pytestmark = pytest.mark.processes


@pytest.fixture(autouse=True)
def loadgen_outside_the_checkout(wsbench: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmarks take the load generator the tests built (bench/harness.py)."""
    monkeypatch.setenv("EBBCAST_WSBENCH", str(wsbench))


def quick_run(script: str, out: Path, *args: str) -> tuple[str, Any]:
    """Run ``bench/<script> --quick --out OUT ARGS``; its stdout and saved JSON."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), "--quick",
                           "--out", str(out), *args], capture_output=True, text=True,
                          timeout=240, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = out.glob("*.json")
    return done.stdout, json.loads(result.read_text())


def test_benchmark_quick_run_produces_a_table_for_every_variant(tmp_path):
    stdout, data = quick_run("run.py", tmp_path)
    assert "| ebbcast | 20 | 2 |" in stdout
    rows = data["rows"]
    assert {r["variant"] for r in rows} == {"ebbcast", "ebbcast-json", "tornado-naive",
                                            "node-ws", "fastapi"}
    for row in rows:
        assert row["errors"] == 0 and row["delivered_per_s"] > 0, row
        assert row["deliveries_per_cpu_s"] > 0 and row["rss_per_conn_kb"] > 0, row


def test_sequencer_benchmark_quick_run_compares_two_codes_in_every_mode(tmp_path):
    _, data = quick_run("sequencer.py", tmp_path, "--before", str(REPO))
    rows = data["rows"]
    assert {(r["code"], r["mode"], r["cell"]) for r in rows} == {
        (code, mode, cell) for code in ("before", "after")
        for mode in ("one process", "2 workers", "redis") for cell in ("latency", "throughput")}
    for row in rows:
        assert row["errors"] == 0 and row["deliveries_per_cpu_s"] > 0, row


def test_waiters_benchmark_quick_run_measures_both_codes_before_and_after_resumes(tmp_path):
    _, data = quick_run("waiters.py", tmp_path, "--before", str(REPO))
    rows = data["rows"]
    assert [(r["code"], r["resumes_so_far"]) for r in rows] == [
        (code, done) for code in ("before", "after") for done in (0, 20, 40)]
    for row in rows:
        assert row["errors"] == 0 and row["deliveries_per_cpu_s"] > 0, row
        assert sum(row["statuses"].values()) == (20 if row["resumes_so_far"] else 0), row


def test_connect_storm_quick_run_measures_every_server(tmp_path):
    _, data = quick_run("storm.py", tmp_path)
    rows = data["rows"]
    assert {r["variant"] for r in rows} == {"ebbcast", "ebbcast-json", "tornado-naive",
                                            "node-ws", "fastapi"}
    for row in rows:
        assert row["errors"] == 0 and row["connected"] == row["connections"] == 50, row
        assert row["handshakes_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"], row


def test_memory_breakdown_quick_run_reports_every_view(tmp_path):
    _, data = quick_run("memory.py", tmp_path)
    assert data["connections"] == 50 and data["rss_per_conn_bytes"] > 0
    assert {name for name, count, _ in data["types"] if count >= 1} >= {"coroutine", "Connection"}
    assert data["sites"] and data["traced_per_conn_bytes"] > 0


def test_c100k_quick_run_connects_broadcasts_drains_and_upgrades(tmp_path):
    stdout, data = quick_run("c100k.py", tmp_path)
    drain, (upgrade,), gone = data["drain"], data["upgrades"], data["disconnect"]
    assert gone["periodic_lateness_ms_disconnecting"]["count"] > 0, gone
    assert drain["connected"] == drain["clients"] == 200 and drain["errors"] == 0, drain
    assert drain["shutdown_frames"] == 200 and drain["exit_code"] == 0, drain
    assert drain["periodic_latency_ms"]["count"] >= 200 and drain["rss_per_conn_bytes"] > 0
    assert drain["periodic_lateness_ms_holding"]["count"] > 0 and drain["periodic_interval_s"] == 1
    assert upgrade["moved"] == upgrade["moves_started"] == 200, upgrade
    assert upgrade["handshakes_failed"] == 0 and upgrade["errors"] == 0, upgrade
    assert upgrade["closed_by_the_daemon"] == 0, upgrade  # each old one closed by its client
    assert upgrade["disconnections_by_reason"] == {"client": 200}, upgrade
    assert "| handshakes failed | 0 |" in stdout


def test_before_after_quick_run_alternates_two_trees(tmp_path):
    """Both sides from this checkout: the driver runs each once and lines them up."""
    _, data = quick_run("alternate.py", tmp_path, "memory", "--before", str(REPO),
                             "--rounds", "1")
    (table,) = tmp_path.glob("memory-before-after-*.md")
    assert "| RSS KB/conn |" in table.read_text()
    assert [(run["side"], run["returncode"]) for run in data["runs"]] == [("before", 0),
                                                                        ("after", 0)]
    assert all(run["figures"]["RSS KB/conn"] > 0 for run in data["runs"])


def test_channel_benchmark_quick_run_compares_channels_with_the_global_broadcast(tmp_path):
    stdout, data = quick_run("channels.py", tmp_path)
    assert {(r["kind"], r["window"]) for r in data["fanout"]} == {
        (kind, window) for kind in ("global", "channels") for window in (2, 16)}
    for row in data["fanout"]:
        assert row["errors"] == 0 and row["deliveries_per_cpu_s"] > 0, row
    assert data["churn"]["operations"] == 10 * 50 * 2 and data["churn"]["server_cpu_s"] > 0
    assert [(m["wave"], m["subscriptions"]) for m in data["memory"]] == [(10, 1000), (100, 1000)]
    floor = data["send_floor"]
    assert floor["sends"] == 20000 and floor["sends_per_cpu_s"] > 0
    assert "| channels | 16 |" in stdout and "Kernel floor (sendfloor)" in stdout


def test_extras_quick_run_times_the_flood_the_drain_and_a_mass_disconnect(tmp_path):
    stdout, data = quick_run("extras.py", tmp_path)
    results = data["results"]
    assert results["drain"]["shutdown_frames"] == results["drain"]["subscribers"] == 50
    gone = results["disconnect"]
    assert gone["subscribers"] == 50 and gone["all_gone_s"] > 0 and gone["connect_s"] > 0
    assert gone["lateness_before_ms"]["n"] > 0 and gone["lateness_after_ms"]["n"] > 0
    assert "lateness_connecting_ms" in gone  # 50 clients connect within a tick or two
    assert "Connect storm: 50 clients connect" in stdout
    assert "Mass disconnect: 50 clients leave at once" in stdout


def test_fanoutcost_quick_run_splits_a_delivery_against_the_kernels_floor(tmp_path):
    stdout, data = quick_run("fanoutcost.py", tmp_path)
    kernel, python, ebbcast = data["kernel"], data["python"], data["ebbcast"]
    assert kernel["sends"] == python["sends"] == 20_000 and kernel["bytes"] == 102
    assert 0 < kernel["us_per_send"] and 0 < python["us_per_send"]
    assert ebbcast["errors"] == 0 and ebbcast["us_per_delivery"] > 0, ebbcast
    assert "| the kernel alone (sendfloor, C) |" in stdout and "**ebbcast, per delivery**" \
        in stdout
