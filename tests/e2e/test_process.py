"""Process tests: ``python -m ebbcast`` as a subprocess, real signals, real clients.

The WebSocket clients here are the independent ``websockets`` package (sync API).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import re
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect as ws_connect

from helpers import (FAST, REPO, STEP_TIMEOUT, closed_code, http_json, package_copy,
                     patch_module, recv_frame, set_open_files_limit)
QUICK_PROGRESS = {"EBBCAST_SHUTDOWN_PROGRESS_INTERVAL": "200ms",
                  "EBBCAST_BROADCAST_PERIODIC_INTERVAL": "0",
                  "EBBCAST_ADMIN_TOKEN": "tok"}


@pytest.fixture
def connect():
    """Open websockets-package clients; each is closed at the end of the test."""
    with contextlib.ExitStack() as stack:
        yield lambda url, **kw: stack.enter_context(ws_connect(url, **kw))


def test_sigterm_drain_story_end_to_end(connect, spawn):
    d = spawn(*FAST, "--drain-timeout", "60s", "--log-level", "debug", env=QUICK_PROGRESS)
    a = connect(d.ws_url + "/a")
    b = connect(d.ws_url + "/b")
    recv_frame(a, "welcome")
    recv_frame(b, "welcome")
    assert d.admin_json("/readyz")[0] == 200
    start = len(d.lines)
    d.signal(signal.SIGTERM)
    for ws in (a, b):
        shutdown = recv_frame(ws, "shutdown")
        assert shutdown["type"] == "shutdown" and shutdown["deadline"] > time.time() + 50
    assert d.admin_json("/readyz")[0] == 503
    with pytest.raises(ConnectionRefusedError):  # the public listener is closed: refused
        connect(d.ws_url, open_timeout=STEP_TIMEOUT)
    a.send("during the drain")
    assert recv_frame(b)["text"] == "during the drain"
    # the first progress line: its "Ns left" is the deadline seen from the line's
    # own time (so a late tick on a busy machine still adds up)
    started = log_time(d.wait_for_log(r".* drain started by SIGTERM", start=start).group(0))
    progress = d.wait_for_log(r".* draining: 2 connections remain, (\d+)s left", start=start)
    elapsed = log_time(progress.group(0)) - started
    assert int(progress.group(1)) in (math.ceil(60 - elapsed), math.ceil(60 - elapsed) + 1)
    a.close()
    mark = len(d.lines)
    # the main process's line (what /status reports), not the serving process's own
    # debug line, which can come first
    d.wait_for_log(r"ebbcast\.process\.supervisor\[\d+\]: draining: 1 connections remain, \d+s left",
                   start=mark)
    status = d.admin_json("/status")[1]
    assert status["state"] == "draining" and status["drain"]["remaining"] == 1
    b.close()  # returns once the daemon has answered the close handshake
    assert d.wait_exit() == 0
    d.wait_for_log(r".* client b disconnected")
    d.wait_for_log(r".* stopped \(drained\)$")
    assert "Traceback" not in d.log_text()


def test_the_last_client_leaving_ends_the_drain_at_once_not_at_a_tick(connect, spawn):
    """With the next progress tick a minute away and the deadline two, the daemon
    can only exit within STEP_TIMEOUT of the last client leaving if that departure
    itself ends the drain (the exit's latency itself is measured by the soak test)."""
    d = spawn(*FAST, "--drain-timeout", "120s",
              env={**QUICK_PROGRESS, "EBBCAST_SHUTDOWN_PROGRESS_INTERVAL": "60s"})
    ws = connect(d.ws_url)
    recv_frame(ws, "welcome")
    d.signal(signal.SIGTERM)
    recv_frame(ws, "shutdown")
    ws.close()
    assert d.wait_exit(STEP_TIMEOUT) == 0
    assert "drain complete: no connections remain" in d.log_text()
    assert not re.search(r"draining: \d+ connections remain", d.log_text())  # no tick came


def test_sigint_twice_closes_clients_now_with_1001(connect, spawn):
    d = spawn(*FAST, "--drain-timeout", "60s", env=QUICK_PROGRESS)
    ws = connect(d.ws_url)
    recv_frame(ws, "welcome")
    d.signal(signal.SIGINT)
    recv_frame(ws, "shutdown")
    d.signal(signal.SIGINT)
    assert closed_code(ws) == 1001
    assert d.wait_exit() == 0


def test_deadline_closes_remaining_clients_and_exits_0(connect, spawn):
    d = spawn(*FAST, "--drain-timeout", "1s", env=QUICK_PROGRESS)
    ws = connect(d.ws_url)
    recv_frame(ws, "welcome")
    d.signal(signal.SIGTERM)
    recv_frame(ws, "shutdown")
    assert closed_code(ws) == 1001
    assert d.wait_exit() == 0
    d.wait_for_log(r"drain deadline reached: closing 1 connections with code 1001")


def test_sigterm_with_no_clients_exits_at_once(spawn):
    d = spawn(*FAST)
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_sighup_applies_reloadable_keys_without_dropping_clients(connect, spawn, tmp_path):
    path = tmp_path / "ebbcast.toml"
    path.write_text('[broadcast]\nperiodic_interval = "100ms"\nperiodic_text = "before"\n')
    d = spawn("--config", str(path), *FAST)
    ws = connect(d.ws_url)
    recv_frame(ws, "welcome")
    assert recv_frame(ws, "periodic")["text"] == "before"
    path.write_text('[broadcast]\nperiodic_interval = "100ms"\nperiodic_text = "after"\n'
                    '[server]\nmax_connections = 5\n')
    mark = len(d.lines)
    d.signal(signal.SIGHUP)
    d.wait_for_log(r"server.max_connections changed; it needs a restart", start=mark)
    d.wait_for_log(r"config reloaded: broadcast.periodic_text", start=mark)
    while recv_frame(ws, "periodic")["text"] != "after":
        pass
    path.write_text('[broadcast]\nperiodic_text = 5\nperiod = "1s"\n')
    mark = len(d.lines)
    d.signal(signal.SIGHUP)
    d.wait_for_log(r"config reload: broadcast.periodic_text: expected a string", start=mark)
    d.wait_for_log(r"config reload: broadcast.period: unknown key", start=mark)
    d.wait_for_log(r"keeping the running configuration", start=mark)
    assert recv_frame(ws, "periodic")["text"] == "after"  # same client, still served
    ws.close()
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_invalid_config_exits_2_naming_each_key(spawn, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nprot = 1\n[shutdown]\ndrain_timeout = "soon"\n')
    d = spawn("--config", str(path), wait=False)
    assert d.wait_exit() == 2
    text = d.log_text()
    assert "server.prot" in text and "shutdown.drain_timeout" in text


def test_bad_flag_value_exits_2(spawn):
    d = spawn("--port", "eighty", wait=False)
    assert d.wait_exit() == 2
    assert "server.port" in d.log_text()


def test_port_in_use_exits_3_naming_the_address(spawn):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        d = spawn("--port", str(port), "--admin-port", "0", wait=False)
        assert d.wait_exit() == 3
    assert f"127.0.0.1:{port}" in d.log_text() and "in use" in d.log_text()


def log_time(line: str) -> float:
    """The time a text log line was written (its leading timestamp), in seconds."""
    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def wait_until_status(d: Any, predicate: Any) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT
    while not predicate(d.admin_json("/status")[1]):
        assert time.monotonic() < deadline, "status did not get there in time"
        time.sleep(0.02)


def run_cli(*args: str, timeout: float = STEP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ebbcast", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.processes
def test_check_config_accepts_the_shipped_file_and_prints_it():
    done = run_cli("check-config", str(REPO / "config" / "ebbcast.toml"))
    assert done.returncode == 0, done.stderr
    assert 'drain_timeout = "30m"' in done.stdout and "[backplane]" in done.stdout


@pytest.mark.processes
def test_check_config_rejects_one_line_per_problem(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nprot = 9000\n[broadcast]\nperiodic_interval = "10 sec"\n')
    done = run_cli("check-config", str(path))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2
    assert any("server.prot" in line for line in lines)
    assert any("broadcast.periodic_interval" in line for line in lines)


@pytest.mark.processes
def test_console_script_and_usage_errors():
    assert run_cli("--version").stdout.startswith("ebbcast ")
    assert run_cli("frobnicate").returncode == 2
    assert run_cli("serve", "--no-such-flag").returncode == 2


def test_client_command_sends_and_prints_json_lines(spawn):
    d = spawn(*FAST, env=QUICK_PROGRESS)
    done = run_cli("client", d.ws_url + "/cli", "--send", "hello", "--count", "2")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines[0]["type"] == "welcome" and lines[0]["client_id"] == "cli"
    assert (lines[1]["type"], lines[1]["text"]) == ("message", "hello")
    # --quiet prints nothing; --listen keeps the connection for its duration, during
    # which an admin broadcast reaches it, then closes it normally
    client = subprocess.Popen([sys.executable, "-m", "ebbcast", "client", d.ws_url,
                               "--listen", "1s", "--quiet"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    started = time.monotonic()
    wait_until_status(d, lambda status: status["connections"] == 1)
    assert d.admin_json("/broadcast", "POST", b"to the quiet one", token="tok") == \
        (202, {"recipients": 1})
    out, err = client.communicate(timeout=STEP_TIMEOUT)
    assert client.returncode == 0 and out == "" and err == ""
    assert time.monotonic() - started >= 1.0  # it listened for the whole second
    metrics = d.metrics_text()
    assert 'ebbcast_disconnections_total{reason="client"} 2.0' in metrics  # both runs


def test_json_log_format_is_one_object_per_line(spawn):
    d = spawn(*FAST, "--log-format", "json")
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    entries = [json.loads(line) for line in d.lines if line != "<EOF>"]
    assert any(e["msg"].startswith("serving ws=") and e["level"] == "info" for e in entries)


def test_admin_drain_endpoint_behaves_like_sigterm(connect, spawn):
    d = spawn(*FAST, env=QUICK_PROGRESS)
    ws = connect(d.ws_url)
    recv_frame(ws, "welcome")
    assert http_json(d.admin_url + "/drain", "POST", b"", token="wrong")[0] == 401
    assert http_json(d.admin_url + "/drain", "POST", b"", token="tok")[0] == 202
    recv_frame(ws, "shutdown")
    ws.close()
    assert d.wait_exit() == 0


def _block_handled_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_during_start_up_is_handled_not_fatal(spawn, signum):
    """A signal sent before the daemon is serving waits, then is acted on.

    ebbcast holds these signals from the top of ``serve`` until its handlers are in
    place. The child starts with them blocked too, so that the test need not race
    the interpreter's own start-up, which no program can cover.
    """
    d = spawn(*FAST, wait=False, preexec_fn=_block_handled_signals)
    d.signal(signum)  # at once: long before the listeners are bound
    if signum == signal.SIGHUP:  # a reload; the daemon keeps serving
        d.wait_serving()
        d.wait_for_log(r"config reloaded")
        d.signal(signal.SIGTERM)
    else:
        d.wait_for_log(r"drain started by the main process \(SIG(TERM|INT)\): 0 connections")
    assert d.wait_exit() == 0
    assert "Traceback" not in d.log_text()


def test_the_daemon_raises_its_open_files_limit_to_the_hard_limit(spawn):
    """A terminal's soft limit (often 1024) would stop it at about 1000 clients."""
    import resource

    d = spawn(*FAST, preexec_fn=partial(set_open_files_limit, 512))
    limits = Path(f"/proc/{d.proc.pid}/limits").read_text()
    (line,) = [row for row in limits.splitlines() if row.startswith("Max open files")]
    soft, hard = line.split()[3:5]
    assert soft == hard == str(resource.getrlimit(resource.RLIMIT_NOFILE)[1])


def test_a_serving_process_whose_fanout_keeps_failing_exits_1_and_is_replaced(spawn,
                                                                             tmp_path):
    """A bug in the fan-out (here one put there on purpose) must not leave a
    daemon that accepts clients and silently drops every broadcast."""
    root = package_copy(tmp_path)
    patch_module(root, "serving/fanout.py",
                 "    def _write_some(self, flush: _Flush, budget: int) -> bool:\n",
                 "        raise AttributeError(\"a changed internal\")\n")
    d = spawn(*FAST, env={"PYTHONPATH": str(root), "EBBCAST_BROADCAST_PERIODIC_INTERVAL": "0"},
              cwd=tmp_path)
    failed = "fan-out failed; the rest of this batch is dropped"
    with ws_connect(d.ws_url) as ws:
        assert json.loads(ws.recv())["type"] == "welcome"  # written with the 101
        for n in range(5):  # five batches, each failing (awaited one by one)
            mark = len(d.lines)
            ws.send(f"frame {n}")
            d.wait_for_log(failed, start=mark)
        assert closed_code(ws) == 1011
    d.wait_for_log("broadcasts failed 5 times in a row: closing every client and stopping")
    d.wait_for_log(rf"worker 0 \(pid {d.proc.pid}\) exited with status 1 while serving; "
                   "restarting it")
    d.wait_for_log(rf"worker 0 \(pid {d.proc.pid}\) restarted and serving")
