"""A smoke run of the benchmark harness (tiny sizes), so that it cannot rot.

It needs gcc and make (to build bench/loadgen) and node with npm (for the ws
reference server); it fails, never skips, when they are missing.
"""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO


def test_benchmark_quick_run_produces_a_table_for_every_variant(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=240, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| ebbcast | 20 | 2 |" in done.stdout
    (result,) = tmp_path.glob("fanout-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert {r["variant"] for r in rows} == {"ebbcast", "ebbcast-json", "tornado-naive",
                                            "node-ws"}
    for row in rows:
        assert row["errors"] == 0 and row["delivered_per_s"] > 0, row
        assert row["deliveries_per_cpu_s"] > 0 and row["rss_per_conn_kb"] > 0, row


def test_sequencer_benchmark_quick_run_compares_two_codes_in_every_mode(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "sequencer.py"), "--quick",
                           "--before", str(REPO), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = tmp_path.glob("sequencer-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert {(r["code"], r["mode"], r["cell"]) for r in rows} == {
        (code, mode, cell) for code in ("before", "after")
        for mode in ("one process", "2 workers", "redis") for cell in ("latency", "throughput")}
    for row in rows:
        assert row["errors"] == 0 and row["deliveries_per_cpu_s"] > 0, row


def test_connect_storm_quick_run_measures_every_server(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "storm.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=240, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = tmp_path.glob("storm-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert {r["variant"] for r in rows} == {"ebbcast", "tornado-naive", "node-ws"}
    for row in rows:
        assert row["errors"] == 0 and row["connected"] == row["connections"] == 50, row
        assert row["handshakes_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"], row
