"""Upgrades without downtime: generations that hand over the listening sockets.

Process tests: ``python -m ebbcast`` as a subprocess, SIGUSR2 and POST /upgrade,
``websockets`` clients on real sockets.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection

from helpers import (QUICK, REPO, STEP_TIMEOUT, DaemonProcess, _never_reading_client,
                     clients_on_every_worker,
                     close_all, closed_code, dial, install_package, metric, notifications,
                     package_copy, pid_of, promtool_accepts, recv_frame, server_frames, status,
                     wait_for)

UPGRADE_ENV = {**QUICK, "EBBCAST_SHUTDOWN_UPGRADE_SPREAD": "2s"}


def start(spawn: Any, workers: int = 1, *args: str, env: dict[str, str] | None = None,
          **kwargs: Any) -> DaemonProcess:
    return spawn("--port", "0", "--admin-port", "0", "--workers", str(workers), *args,
                 env={**UPGRADE_ENV, **(env or {})}, **kwargs)


def upgrade(d: DaemonProcess, generation: int) -> None:
    """SIGUSR2, then wait until ``generation`` serves and every process of the one
    before has stopped accepting (the main process logs the switch as it sends it;
    each old process acts on it a moment later)."""
    old_workers = len(status(d)["workers"])
    mark = len(d.lines)
    d.signal(signal.SIGUSR2)
    d.wait_for_log(rf"generation {generation} serving", start=mark)
    wait_handed_over(d, old_workers, mark)


def wait_handed_over(d: DaemonProcess, old_workers: int, mark: int) -> None:
    wait_for(lambda: sum("serves: handing over" in line
                         for line in d.lines[mark:]) >= old_workers)


def welcomed(d: DaemonProcess) -> tuple[ClientConnection, dict[str, Any]]:
    ws = dial(d.ws_url)
    return ws, recv_frame(ws, "welcome")


def texts(ws: ClientConnection, count: int) -> list[str]:
    return [recv_frame(ws)["text"] for _ in range(count)]


def broadcast(d: DaemonProcess, text: str) -> None:
    code, body = d.admin_json("/broadcast", "POST", text.encode(), token="secret-token")
    assert code == 202, body


# -- a successful upgrade --------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_upgrade_hands_over_and_both_generations_are_one_conversation(spawn, workers):
    d = start(spawn, workers, "--drain-timeout", "60s")
    first = {w["pid"] for w in status(d)["workers"]}
    assert first == ({d.proc.pid} if workers == 1 else set(d.children()))
    old, old_welcome = welcomed(d)
    upgrade(d, 2)
    before = time.time()
    moving = recv_frame(old, "shutdown")
    assert moving["reason"] == "upgrade"
    assert 0 <= moving["reconnect_after_ms"] <= 2000  # spread over upgrade_spread
    assert before < moving["deadline"] <= before + 61
    new, new_welcome = welcomed(d)
    assert pid_of(new_welcome) not in first | {d.proc.pid}  # a fresh interpreter
    report = status(d)
    assert report["state"] == "serving" and report["generation"] == 2
    assert report["upgrade"] == {"state": "idle", "last_result": "ok", "last_error": None}
    assert len(report["workers"]) == workers
    assert {w["pid"] for w in report["workers"]}.isdisjoint(first)
    assert [(p["generation"], p["connections"]) for p in report["previous"]] == [(1, 1)]
    # each worker reports its count over its link: the total follows the welcome
    wait_for(lambda: status(d)["connections"] == 2)
    # one conversation: each side's frame reaches both, once, in order
    old.send("from the old generation")
    assert texts(old, 1) == texts(new, 1) == ["from the old generation"]
    new.send("from the new generation")
    broadcast(d, "from the admin API")
    seen = texts(old, 2)  # two senders: either order, but one order for everyone
    assert seen == texts(new, 2)
    assert sorted(seen) == ["from the admin API", "from the new generation"]
    assert metric(d, "ebbcast_generation") == 2
    assert metric(d, 'ebbcast_upgrades_total{result="ok"}') == 1
    assert metric(d, 'ebbcast_upgrades_total{result="failed"}') == 0
    wait_for(lambda: metric(d, "ebbcast_connections") == 2)  # summed over generations
    promtool_accepts(d.metrics_text())
    mark = len(d.lines)
    old.close()
    d.wait_for_log("generation 1 has finished", start=mark)
    assert status(d)["previous"] == []
    promtool_accepts(d.metrics_text())
    assert d.proc.poll() is None and set(d.children()) == {w["pid"] for w in
                                                           status(d)["workers"]}
    d.signal(signal.SIGTERM)
    assert recv_frame(new, "shutdown")["reason"] == "draining"
    new.close()
    assert d.wait_exit() == 0


def test_post_upgrade_and_repeated_upgrades_keep_the_admin_listener_and_the_port(spawn):
    d = start(spawn)
    for generation in (2, 3, 4):
        mark = len(d.lines)
        code, body = d.admin_json("/upgrade", "POST", b"", token="secret-token")
        assert (code, body) == (202, {"upgrade": "starting"})
        d.wait_for_log(rf"generation {generation} serving", start=mark)
        wait_handed_over(d, 1, mark)
        ws, welcome = welcomed(d)
        assert pid_of(welcome) == status(d)["workers"][0]["pid"]
        ws.close()
    assert status(d)["generation"] == 4
    assert metric(d, 'ebbcast_upgrades_total{result="ok"}') == 3
    code, _ = d.admin_json("/upgrade", "POST", b"")
    assert code == 401  # the admin token guards it, as it does /drain
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_a_handshake_on_a_connection_the_old_generation_holds_completes_and_moves(spawn):
    d = start(spawn)
    host, port = d.ws_url.split("/")[2].split(":")
    with socket.create_connection((host, int(port)), timeout=STEP_TIMEOUT) as sock:
        stream = sock.makefile("rb")
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head = read_head(stream)  # the page, from generation 1: it holds this connection
        assert head[0].startswith(b"HTTP/1.1 200")
        stream.read(int(next(h for h in head if h.lower().startswith(b"content-length"))
                        .split(b":")[1]))
        upgrade(d, 2)  # generation 1 has stopped accepting; this connection is its own
        sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        answer = read_head(stream)
        assert answer[0].startswith(b"HTTP/1.1 101"), answer  # not refused: moved
        frames = server_frames(stream.read)
        (kind, first), (kind_after, second) = next(frames), next(frames)
        assert kind == kind_after == 0x1  # text frames
        welcome, moving = json.loads(first), json.loads(second)
        assert welcome["type"] == "welcome" and pid_of(welcome) == d.proc.pid
        assert moving["type"] == "shutdown" and moving["reason"] == "upgrade"


def read_head(stream: Any) -> list[bytes]:
    lines = []
    while (line := stream.readline().rstrip(b"\r\n")):
        lines.append(line)
    return lines


# -- upgrades that fail change nothing ------------------------------------------------


def test_an_invalid_config_fails_the_upgrade_and_nothing_changes(spawn, tmp_path):
    config = tmp_path / "ebbcast.toml"
    config.write_text("[broadcast]\nperiodic_interval = 0\n")
    d = start(spawn, 1, "--config", str(config))
    ws, welcome = welcomed(d)
    config.write_text("[broadcast]\nperiodic_interval = 0\nno_such_key = 1\n")
    mark = len(d.lines)
    d.signal(signal.SIGUSR2)
    d.wait_for_log(r"upgrade to generation 2 failed: invalid configuration: "
                   r"broadcast\.no_such_key", start=mark)
    broadcast(d, "still here")  # the next frame: no shutdown frame came before it
    assert json.loads(ws.recv(timeout=STEP_TIMEOUT))["text"] == "still here"
    report = status(d)
    assert report["generation"] == 1 and report["previous"] == []
    assert report["workers"] == [{"pid": d.proc.pid, "connections": 1}]
    assert report["upgrade"]["state"] == "idle" and report["upgrade"]["last_result"] == "failed"
    assert "broadcast.no_such_key" in report["upgrade"]["last_error"]
    assert metric(d, 'ebbcast_upgrades_total{result="failed"}') == 1
    config.write_text("[broadcast]\nperiodic_interval = 0\n")
    upgrade(d, 2)  # fixed: the next attempt goes through
    assert recv_frame(ws, "shutdown")["reason"] == "upgrade"
    ws.close()


def set_version(root: Path, version: str) -> None:
    init = root / "ebbcast" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"',
                           init.read_text()))


def slow_release(root: Path) -> None:
    """Make the copy a release whose workers take 3 s to start: an upgrade to it
    stays "starting" long enough to act on it meanwhile."""
    daemon_module = root / "ebbcast" / "serving" / "process.py"
    daemon_module.write_text(daemon_module.read_text() +
                             "import time\ntime.sleep(3)  # a release slow to start\n")


def build_versions(d: DaemonProcess) -> set[str]:
    return set(re.findall(r'^ebbcast_build_info\{version="([^"]+)"\} 1\.0$', d.metrics_text(),
                          re.M))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_crashing_release_fails_then_a_good_one_takes_over(spawn, tmp_path, workers):
    root = package_copy(tmp_path)
    set_version(root, "1.0.0")
    d = start(spawn, workers, env={"PYTHONPATH": str(root)}, cwd=tmp_path)
    assert build_versions(d) == {"1.0.0"}
    ws, _ = welcomed(d)
    daemon_module = root / "ebbcast" / "serving" / "process.py"
    good = daemon_module.read_text()
    daemon_module.write_text(good + 'raise RuntimeError("a broken release")\n')
    mark = len(d.lines)
    d.signal(signal.SIGUSR2)
    d.wait_for_log(r"upgrade to generation 2 failed: worker \d of generation 2 \(pid \d+\) "
                   r"exited with status 1 before serving", start=mark)
    # The crashed workers' own tracebacks. With two workers both crash at once, and
    # their writes to the shared stderr interleave within a line ("RuntimeErrorRuntime
    # Error: : a broken releasea broken release"): look for the pieces.
    wait_for(lambda: "RuntimeError" in d.log_text() and "a broken release" in d.log_text())
    broadcast(d, "still here")
    assert json.loads(ws.recv(timeout=STEP_TIMEOUT))["text"] == "still here"
    assert status(d)["generation"] == 1
    assert metric(d, 'ebbcast_upgrades_total{result="failed"}') == 1
    daemon_module.write_text(good)
    set_version(root, "2.0.0-new")
    upgrade(d, 2)
    assert recv_frame(ws, "shutdown")["reason"] == "upgrade"
    assert build_versions(d) == {"1.0.0", "2.0.0-new"}  # both serve while it moves
    mark = len(d.lines)
    ws.close()
    d.wait_for_log("generation 1 has finished", start=mark)
    assert build_versions(d) == {"2.0.0-new"}
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_a_failed_upgrades_stuck_worker_is_killed_and_nothing_else(spawn, tmp_path):
    root = package_copy(tmp_path)
    d = start(spawn, 2, env={"PYTHONPATH": str(root)}, cwd=tmp_path)
    old = [welcomed(d)[0] for _ in range(4)]
    old_pids = set(d.children())
    daemon_module = root / "ebbcast" / "serving" / "process.py"
    daemon_module.write_text(daemon_module.read_text() + (
        "import sys, time\n"
        "if sys.argv[sys.argv.index('--index') + 1] == '0':\n"
        "    raise RuntimeError('worker 0 cannot start')\n"
        "time.sleep(30)  # worker 1: stuck, with its stop signals still blocked\n"))
    mark = len(d.lines)
    d.signal(signal.SIGUSR2)
    d.wait_for_log(r"upgrade to generation 2 failed: worker 0 of generation 2", start=mark)
    d.wait_for_log(r"worker 1 of generation 2 \(pid \d+\) did not stop in time: SIGKILL",
                   start=mark)
    broadcast(d, "after the kill")
    for ws in old:  # the old generation noticed nothing
        assert json.loads(ws.recv(timeout=STEP_TIMEOUT))["text"] == "after the kill"
    wait_for(lambda: set(d.children()) == old_pids)  # the killed one reaped, no other
    assert status(d)["generation"] == 1
    close_all(old)


def test_a_generation_not_serving_in_time_fails_the_upgrade(spawn, tmp_path):
    root = package_copy(tmp_path)
    d = start(spawn, env={"PYTHONPATH": str(root), "EBBCAST_SHUTDOWN_UPGRADE_TIMEOUT": "1s"},
              cwd=tmp_path)
    ws, _ = welcomed(d)
    slow_release(root)  # 3 s to start
    mark = len(d.lines)
    d.signal(signal.SIGUSR2)
    d.wait_for_log("upgrade to generation 2 failed: the new generation was not serving "
                   "within 1s; generation 1 goes on serving", start=mark)
    broadcast(d, "still here")
    assert json.loads(ws.recv(timeout=STEP_TIMEOUT))["text"] == "still here"
    wait_for(lambda: d.children() == [])  # the late one was stopped, never served
    assert status(d)["generation"] == 1 and "generation 2 serving" not in d.log_text()
    ws.close()


def test_a_second_upgrade_request_during_one_is_refused_not_queued(spawn, tmp_path):
    root = package_copy(tmp_path)
    d = start(spawn, env={"PYTHONPATH": str(root)}, cwd=tmp_path)
    slow_release(root)
    mark = len(d.lines)
    d.signal(signal.SIGUSR2)
    d.wait_for_log("upgrade requested by SIGUSR2: starting generation 2", start=mark)
    assert status(d)["upgrade"]["state"] == "starting"
    d.signal(signal.SIGUSR2)
    d.wait_for_log("upgrade requested by SIGUSR2 refused: an upgrade is already under way",
                   start=mark)
    code, body = d.admin_json("/upgrade", "POST", b"", token="secret-token")
    assert code == 409 and body == {"error": "upgrade refused: an upgrade is already under way"}
    d.wait_for_log("generation 2 serving", start=mark)
    ws, _ = welcomed(d)  # a later event: had a request been queued, it would run by now
    ws.close()
    assert status(d)["generation"] == 2
    assert metric(d, 'ebbcast_upgrades_total{result="ok"}') == 1
    assert "generation 3" not in d.log_text()


# -- stopping during and after an upgrade --------------------------------------------


def test_sigterm_during_an_upgrade_drains_and_the_new_generation_never_serves(spawn,
                                                                            tmp_path):
    root = package_copy(tmp_path)
    d = start(spawn, 1, "--drain-timeout", "60s", env={"PYTHONPATH": str(root)}, cwd=tmp_path)
    ws, _ = welcomed(d)
    slow_release(root)
    mark = len(d.lines)
    d.signal(signal.SIGUSR2)
    d.wait_for_log("upgrade requested by SIGUSR2: starting generation 2", start=mark)
    d.signal(signal.SIGTERM)
    d.wait_for_log("upgrade to generation 2 failed: the drain started by SIGTERM", start=mark)
    assert recv_frame(ws, "shutdown")["reason"] == "draining"
    code, body = d.admin_json("/upgrade", "POST", b"", token="secret-token")
    assert code == 409 and "draining" in body["error"]
    ws.close()
    assert d.wait_exit() == 0
    assert "generation 2 serving" not in d.log_text()


@pytest.mark.parametrize("workers", [1, 2])
def test_stop_drains_every_generation_and_a_second_signal_forces_them_all(spawn, workers):
    d = start(spawn, workers, "--drain-timeout", "60s")
    old, _ = welcomed(d)
    upgrade(d, 2)
    recv_frame(old, "shutdown")
    new, _ = welcomed(d)
    mark = len(d.lines)
    d.signal(signal.SIGTERM)
    assert recv_frame(new, "shutdown")["reason"] == "draining"
    d.wait_for_log("SIGTERM while handing over: the drain goes on", start=mark)
    old.send("still chatting")  # both generations keep serving their clients
    assert texts(new, 1) == texts(old, 1) == ["still chatting"]
    d.signal(signal.SIGTERM)
    for ws in (old, new):
        assert closed_code(ws) == 1001
    assert d.wait_exit() == 0


def test_an_old_generation_worker_killed_while_it_drains_is_not_restarted(spawn):
    d = start(spawn, 2)
    olds = [welcomed(d)[0] for _ in range(6)]
    old_pids = set(d.children())
    upgrade(d, 2)
    for ws in olds:
        recv_frame(ws, "shutdown")
    victim = next(iter(old_pids))
    mark = len(d.lines)
    os.kill(victim, signal.SIGKILL)
    d.wait_for_log(rf"worker \d \(pid {victim}\) was killed by SIGKILL$", start=mark)
    new, _ = welcomed(d)
    new.send("after the kill")
    assert texts(new, 1) == ["after the kill"]
    assert "restarting" not in "\n".join(d.lines[mark:])
    assert victim not in d.children()
    assert status(d)["generation"] == 2
    close_all([*olds, new])
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_clients_the_old_generations_deadline_closes_are_counted_once_as_drain_deadline(
        spawn):
    """Its workers close and count their own clients, then exit 0: the main process
    does not count them again as lost with a dead worker (``error``), from a count
    the worker reported before it closed them. Clients that never read, so the
    close handshake times out and they are dropped just before the worker exits."""
    d = start(spawn, 2, "--drain-timeout", "1s")
    silent = [_never_reading_client(d.ws_url) for _ in range(4)]
    try:
        wait_for(lambda: status(d)["connections"] == 4)  # every worker has reported
        mark = len(d.lines)
        upgrade(d, 2)
        d.wait_for_log("generation 1 has finished", start=mark)
        assert metric(d, 'ebbcast_disconnections_total{reason="drain_deadline"}') == 4
        assert metric(d, 'ebbcast_disconnections_total{reason="error"}') == 0
    finally:
        for sock in silent:
            sock.close()
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


# -- systemd ------------------------------------------------------------------------


def test_systemd_hears_reloading_then_ready_from_the_same_main_pid(spawn, notify_socket):
    with notify_socket as sock:
        d = start(spawn, env={"NOTIFY_SOCKET": sock.getsockname()})
        sent = notifications(sock, "READY=1")
        assert sent[-1][1]["MAINPID"] == str(d.proc.pid)
        d.signal(signal.SIGUSR2)
        sent += notifications(sock, "RELOADING=1")
        assert int(sent[-1][1]["MONOTONIC_USEC"]) > 0
        sent += notifications(sock, "READY=1")
        assert sent[-1][1]["STATUS"].startswith("serving generation 2")
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
        assert {pid for pid, _ in sent} == {d.proc.pid}


# -- clients follow --------------------------------------------------------------------


class ClientProcess:
    """``ebbcast client --reconnect`` as a subprocess, its stdout read line by line."""

    def __init__(self, url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ebbcast", "client", url, "--reconnect", "--listen", "60s"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def next_frame(self) -> dict[str, Any]:
        line = self.lines.get(timeout=STEP_TIMEOUT)
        assert line, "the client exited"
        return json.loads(line)  # type: ignore[no-any-return]

    def until(self, frame_type: str) -> list[dict[str, Any]]:
        frames = [self.next_frame()]
        while frames[-1].get("type") != frame_type:
            frames.append(self.next_frame())
        return frames

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(STEP_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def test_client_reconnect_moves_make_before_break_and_survives_a_dropped_connection(spawn):
    d = start(spawn, 1, "--log-level", "debug")
    client = ClientProcess(d.ws_url)
    try:
        first = client.next_frame()
        assert first["type"] == "welcome" and pid_of(first) == d.proc.pid
        upgrade(d, 2)
        frames = client.until("welcome")
        assert [f["type"] for f in frames] == ["shutdown", "welcome"]
        assert frames[0]["reason"] == "upgrade"
        new_pid = pid_of(frames[1])
        assert new_pid == status(d)["workers"][0]["pid"] != d.proc.pid
        d.wait_for_log("generation 1 has finished")
        log = d.log_text()
        made = log.index(f"[{new_pid}]: client {frames[1]['client_id']} connected")
        broke = log.index(f"client {first['client_id']} disconnected: client (close code 1000)")
        assert made < broke  # the old connection closed only once the new one was welcomed
        broadcast(d, "after the move")
        broadcast(d, "marker")
        assert [client.next_frame()["text"] for _ in range(2)] == ["after the move", "marker"]
        os.kill(new_pid, signal.SIGKILL)  # a dropped connection: no shutdown frame
        closed = client.next_frame()
        assert "closed" in closed
        again = client.next_frame()
        assert again["type"] == "welcome" and pid_of(again) not in (new_pid, d.proc.pid)
    finally:
        client.stop()


def test_upgrade_with_the_redis_backplane_is_one_conversation(spawn, redis_server):
    d = start(spawn, 1, env={"EBBCAST_BACKPLANE_URL": redis_server.url})
    other = start(spawn, 1, env={"EBBCAST_BACKPLANE_URL": redis_server.url})  # an instance
    wait_for(lambda: metric(d, "ebbcast_backplane_up") == 1 and
             metric(other, "ebbcast_backplane_up") == 1)
    old, _ = welcomed(d)
    elsewhere, _ = welcomed(other)
    upgrade(d, 2)
    recv_frame(old, "shutdown")
    new, _ = welcomed(d)
    wait_for(lambda: metric(d, "ebbcast_backplane_up") == 1)  # the new generation's too
    for sender, text in ((old, "from the old generation"), (new, "from the new generation"),
                         (elsewhere, "from another instance")):
        sender.send(text)
        assert texts(old, 1) == texts(new, 1) == texts(elsewhere, 1) == [text]
    close_all([old, new, elsewhere])


def test_pip_upgrading_the_installed_package_then_sigusr2_serves_the_new_release(spawn,
                                                                                 tmp_path):
    """As an operator upgrades: pip installs the new release over the running one's
    files, then SIGUSR2 puts it into service."""
    site, source = tmp_path / "site", tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "node_modules", "__pycache__", "*.egg-info", "build", "bench",
        "conformance", "docs"))

    def pip_install() -> None:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                               "--no-build-isolation", "--upgrade", "--target", str(site),
                               str(source)], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr

    set_version(source / "daemon", "1.0.0")
    pip_install()
    d = start(spawn, env={"PYTHONPATH": str(site)}, cwd=tmp_path)
    assert build_versions(d) == {"1.0.0"}
    ws, _ = welcomed(d)
    set_version(source / "daemon", "1.1.0")
    pip_install()  # replaces the files the running daemon was started from
    upgrade(d, 2)
    assert recv_frame(ws, "shutdown")["reason"] == "upgrade"
    assert build_versions(d) == {"1.0.0", "1.1.0"}
    new, welcome = welcomed(d)
    assert pid_of(welcome) != d.proc.pid
    ws.close()
    wait_for(lambda: build_versions(d) == {"1.1.0"})
    new.close()


def test_an_upgrade_can_change_the_worker_count_both_ways_without_refusing(spawn, tmp_path):
    config = tmp_path / "ebbcast.toml"
    config.write_text("[server]\nworkers = 1\n")
    d = spawn("--port", "0", "--admin-port", "0", "--config", str(config), env=UPGRADE_ENV)
    config.write_text("[server]\nworkers = 2\n")
    upgrade(d, 2)  # a second socket set on the port, listening only from the switch
    two = {w["pid"] for w in status(d)["workers"]}
    assert len(two) == 2 and d.proc.pid not in two
    spread = clients_on_every_worker(d, 2)  # the kernel spreads over both sets
    assert set(spread) == two
    close_all([ws for group in spread.values() for ws in group])
    config.write_text("[server]\nworkers = 1\n")
    upgrade(d, 3)  # one worker now takes both sets: none is closed, none left unserved
    (one,) = [w["pid"] for w in status(d)["workers"]]
    landed = set()
    for _ in range(20):
        ws, welcome = welcomed(d)
        landed.add(pid_of(welcome))
        ws.close()
    assert landed == {one}


def test_sockets_bound_for_a_failed_upgrade_are_released_and_bound_again(spawn, tmp_path):
    root = package_copy(tmp_path)
    config = tmp_path / "ebbcast.toml"
    config.write_text("[server]\nworkers = 1\n")
    d = spawn("--port", "0", "--admin-port", "0", "--config", str(config), cwd=tmp_path,
              env={**UPGRADE_ENV, "PYTHONPATH": str(root)})
    daemon_module = root / "ebbcast" / "serving" / "process.py"
    good = daemon_module.read_text()
    daemon_module.write_text(good + 'raise RuntimeError("a broken release")\n')
    config.write_text("[server]\nworkers = 3\n")
    mark = len(d.lines)
    d.signal(signal.SIGUSR2)
    d.wait_for_log("upgrade to generation 2 failed", start=mark)
    # the two extra socket sets never listened: closed, every connection still lands
    # on generation 1 (an unserved set would leave a share of them hanging)
    for _ in range(12):
        ws, welcome = welcomed(d)
        assert pid_of(welcome) == d.proc.pid
        ws.close()
    daemon_module.write_text(good)
    upgrade(d, 2)
    assert len(status(d)["workers"]) == 3
    landed = set()
    for _ in range(60):
        ws, welcome = welcomed(d)
        landed.add(pid_of(welcome))
        ws.close()
    assert landed == {w["pid"] for w in status(d)["workers"]}  # all three sets serve


def test_an_upgrade_from_a_release_without_offsets_serves_without_them(spawn, tmp_path):
    """The main process gives out the offsets and keeps the code it started with: a
    release from before offsets upgraded to this one serves on, without offsets,
    until the next restart."""
    root = package_copy(tmp_path)
    supervisor = root / "ebbcast" / "process" / "supervisor.py"
    current = supervisor.read_text()
    line = ("        sequencer = Sequencer(config.history.size, config.history.ttl) \\\n"
            "            if config.backplane.url == \"memory://\" else None\n")
    assert current.count(line) == 1
    supervisor.write_text(current.replace(line, "        sequencer = None\n"))
    set_version(root, "0.9.0-old")
    d = start(spawn, 2, env={"PYTHONPATH": str(root)}, cwd=tmp_path)
    old, welcome = welcomed(d)
    assert "offset" not in welcome and "epoch" not in welcome
    supervisor.write_text(current)  # this release, on disk
    set_version(root, "1.0.0")
    upgrade(d, 2)
    assert build_versions(d) == {"0.9.0-old", "1.0.0"}
    recv_frame(old, "shutdown")
    new, welcome = welcomed(d)
    assert "offset" not in welcome and "epoch" not in welcome  # still none to give
    new.send("served without offsets")
    for ws in (old, new):
        frame = recv_frame(ws)
        assert frame["text"] == "served without offsets" and "offset" not in frame
    close_all([old, new])


def test_going_back_to_a_release_without_offsets_is_refused_not_lossy(spawn, tmp_path):
    """A worker that never says it takes offsets (a release from before them) would
    ignore the main process's sequenced broadcasts: such an upgrade fails, named."""
    root = package_copy(tmp_path)
    d = start(spawn, env={"PYTHONPATH": str(root)}, cwd=tmp_path)
    ws, welcome = welcomed(d)
    relay = root / "ebbcast" / "backplane" / "relay.py"
    line = "        self._send(records.Capabilities((records.OFFSETS, records.CHANNELS)))\n"
    assert relay.read_text().count(line) == 1
    relay.write_text(relay.read_text().replace(line, ""))
    set_version(root, "0.9.0-old")
    mark = len(d.lines)
    d.signal(signal.SIGUSR2)
    d.wait_for_log(r"upgrade to generation 2 failed: its release \(0\.9\.0-old\) does not "
                   r"take offsets from this main process", start=mark)
    broadcast(d, "still sequenced")
    frame = recv_frame(ws)
    assert (frame["text"], frame["offset"]) == ("still sequenced", welcome["offset"] + 1)
    assert metric(d, 'ebbcast_broadcasts_total{source="admin"}') == 1
    ws.close()


# -- from the release before (0.1.0, as shipped) ----------------------------------------

#: The package of release 0.1.0 (``git archive c2100c8 daemon/ebbcast``): the release
#: before the package was arranged in wings, whose main process must upgrade to this one.
RELEASE_0_1_0 = REPO / "tests" / "fixtures" / "ebbcast-0.1.0.tar.gz"


def release_0_1_0(tmp_path: Path) -> Path:
    """0.1.0 unpacked to run from (PYTHONPATH): the returned folder holds ``ebbcast``."""
    import tarfile

    unpacked = tmp_path / "release"
    with tarfile.open(RELEASE_0_1_0) as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(unpacked, filter="data")
        else:  # pragma: no cover - a Python without extraction filters
            archive.extractall(unpacked)
    return unpacked / "daemon"


def install_this_release(root: Path) -> None:
    install_package(root)
    set_version(root, "0.2.0-this")


@pytest.mark.parametrize("workers", [1, 2])
def test_an_upgrade_from_0_1_0_keeps_one_conversation_and_its_offsets(spawn, tmp_path,
                                                                       workers):
    """The 0.1.0 main process keeps its code and gives the offsets; this release's
    workers talk to it over the relay link (the records are the interface) and take
    them. A reload of a setting 0.1.0 checks with a module it loads late
    (server.trusted_proxies: ebbcast.forwarded) still finds it."""
    root = release_0_1_0(tmp_path)
    config = tmp_path / "ebbcast.toml"
    config.write_text("")
    d = start(spawn, workers, "--config", str(config), env={"PYTHONPATH": str(root)},
              cwd=tmp_path)
    assert build_versions(d) == {"0.1.0"}
    old, welcome = welcomed(d)
    install_this_release(root)
    config.write_text('[server]\ntrusted_proxies = ["10.0.0.0/8"]\n')
    upgrade(d, 2)
    assert build_versions(d) == {"0.1.0", "0.2.0-this"}
    assert recv_frame(old, "shutdown")["reason"] == "upgrade"
    new, new_welcome = welcomed(d)
    assert new_welcome["epoch"] == welcome["epoch"]  # the main process's, kept
    broadcast(d, "to both generations")
    for ws in (old, new):
        frame = recv_frame(ws)
        assert (frame["text"], frame["offset"]) == ("to both generations",
                                                    welcome["offset"] + 1)
    new.send("from the new generation")
    for ws in (old, new):
        frame = recv_frame(ws)
        assert (frame["text"], frame["offset"]) == ("from the new generation",
                                                    welcome["offset"] + 2)
    close_all([old, new])
    mark = len(d.lines)
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert not any("Traceback" in line for line in d.lines[mark:]), d.log_text()
