"""sd_notify over a real AF_UNIX datagram socket set as NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time

from websockets.sync.client import connect

from helpers import STEP_TIMEOUT, http_json, notifications, package_copy, patch_module, wait_for
from ebbcast.process.notify import SystemdNotifier


def messages_until(sock: socket.socket, wanted: str) -> list[dict[str, str]]:
    """Datagrams (as dicts of assignments) up to the first that contains ``wanted``."""
    return [fields for _, fields in notifications(sock, wanted)]


def test_daemon_notifies_ready_stopping_status_extend_and_watchdog(spawn, notify_socket):
    env = {"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "200000",
           "EBBCAST_SHUTDOWN_PROGRESS_INTERVAL": "200ms",
           "EBBCAST_BROADCAST_PERIODIC_INTERVAL": "0"}
    d = spawn("--port", "0", "--admin-port", "0", "--drain-timeout", "60s", env=env)
    ready = messages_until(notify_socket, "READY=1")[-1]
    assert ready["STATUS"].startswith("serving") and ready["MAINPID"] == str(d.proc.pid)
    messages_until(notify_socket, "WATCHDOG=1")  # every WATCHDOG_USEC/2 = 100 ms
    messages_until(notify_socket, "WATCHDOG=1")
    with connect(d.ws_url) as ws:
        ws.recv(timeout=STEP_TIMEOUT)
        # the welcome leaves with the 101, a moment before the main process has
        # counted the client: the status below is computed from that count
        wait_for(lambda: http_json(d.admin_url + "/status")[1]["connections"] == 1)
        d.signal(signal.SIGTERM)
        stopping = messages_until(notify_socket, "STOPPING=1")[-1]
        # computed with the drain's own start time: exactly the timeout
        assert stopping["STATUS"] == "draining: 1 connections remain, 60s left"
        progress = [m for m in messages_until(notify_socket, "EXTEND_TIMEOUT_USEC=5600000")
                    if "EXTEND_TIMEOUT_USEC" in m]
        assert progress[-1]["STATUS"].startswith("draining: 1 connections remain")
        # at every tick, a fresh extension beyond the next tick (3 x 200 ms + 3 s grace
        # + 2 s for the main process to reap its workers)
        assert int(progress[-1]["EXTEND_TIMEOUT_USEC"]) == 5_600_000
        tick = messages_until(notify_socket, "EXTEND_TIMEOUT_USEC=5600000")[-1]
        assert tick["STATUS"].startswith("draining: 1 connections remain")
    assert d.wait_exit() == 0


def test_notifier_is_silent_without_notify_socket():
    notifier = SystemdNotifier(env={})
    assert not notifier.enabled and not notifier.ready("x") and notifier.watchdog_interval is None


def test_notifier_supports_abstract_sockets_and_watchdog_pid():
    name = f"ebbcast-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(STEP_TIMEOUT)
        notifier = SystemdNotifier(env={"NOTIFY_SOCKET": "@" + name,
                                        "WATCHDOG_USEC": "30000000",
                                        "WATCHDOG_PID": str(os.getpid())})
        assert notifier.watchdog_interval == 15.0
        assert notifier.stopping("bye")
        assert sock.recv(100) == b"STOPPING=1\nSTATUS=bye"
        notifier.close()
    other = SystemdNotifier(env={"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # the watchdog is meant for another process


def test_notifier_survives_a_vanished_socket(tmp_path):
    notifier = SystemdNotifier(env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled and not notifier.ready("x") and not notifier.watchdog()
    notifier.close()


def test_the_watchdog_stops_while_the_event_loop_is_stuck(spawn, notify_socket, tmp_path):
    """WATCHDOG=1 comes from the event loop itself, so a stuck loop (here a handler
    put there on purpose that blocks it for 1.5 s) is what systemd sees."""
    root = package_copy(tmp_path)
    patch_module(root, "process/admin.py",
                 "class HealthzHandler(AdminHandler):\n    def get(self) -> None:\n",
                 '        __import__("time").sleep(1.5)  # the loop is stuck\n')
    d = spawn("--port", "0", "--admin-port", "0", cwd=tmp_path,
              env={"PYTHONPATH": str(root), "NOTIFY_SOCKET": notify_socket.getsockname(),
                   "WATCHDOG_USEC": "200000"})
    messages_until(notify_socket, "WATCHDOG=1")  # every 100 ms
    notify_socket.setblocking(False)  # forget those sent before now: read them as they come
    with contextlib.suppress(BlockingIOError):
        while True:
            notify_socket.recv(4096)
    notify_socket.settimeout(STEP_TIMEOUT)
    stuck = threading.Thread(target=http_json, args=(d.admin_url + "/healthz",))
    stuck.start()
    arrivals = [time.monotonic()]
    while stuck.is_alive():  # the loop is stuck for 1.5 s of these
        messages_until(notify_socket, "WATCHDOG=1")
        arrivals.append(time.monotonic())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    # none while the loop was stuck (a busy machine only widens the gap)...
    assert max(gaps) >= 1.2, gaps
    for _ in range(5):  # ...and they come again once it runs
        messages_until(notify_socket, "WATCHDOG=1")
