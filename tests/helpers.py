"""Helpers for process tests: ``websockets`` clients of a daemon subprocess, and its
status and metrics read from the admin listener."""

from __future__ import annotations

import inspect
import json
import re
import socket
import struct
import time
from collections import defaultdict
from typing import Any

from websockets.sync.client import ClientConnection, connect

from conftest import STEP_TIMEOUT, DaemonProcess

QUICK = {"EBBCAST_BROADCAST_PERIODIC_INTERVAL": "0", "EBBCAST_ADMIN_TOKEN": "secret-token",
         "EBBCAST_LIMITS_MESSAGES_PER_SECOND": "0"}


#: websockets 17.1+ warns when connect() is not a context manager unless told this.
_DIRECT = {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}


def dial(url: str, **kwargs: Any) -> ClientConnection:
    """A client that the test closes itself (not in a ``with`` block)."""
    return connect(url, **_DIRECT, **kwargs)


def start_workers(spawn: Any, workers: int = 2, *args: str, **env: str) -> DaemonProcess:
    return spawn("--port", "0", "--admin-port", "0", "--workers", str(workers), *args,
                 env={**QUICK, **env})


def recv_frame(ws: ClientConnection, frame_type: str = "message") -> dict[str, Any]:
    """The next frame of ``frame_type``, skipping others (periodic frames)."""
    while True:
        frame = json.loads(ws.recv(timeout=STEP_TIMEOUT))
        if frame["type"] == frame_type:
            return frame


def clients_on_every_worker(d: DaemonProcess, workers: int, each: int = 1,
                            opened: list[ClientConnection] | None = None
                            ) -> dict[int, list[ClientConnection]]:
    """Connect until each of ``workers`` pids has ``each`` clients (the kernel spreads
    connections over the workers' sockets by a hash, so it takes a few tries);
    extra connections are closed. Keyed by worker pid, from the welcome frame."""
    by_pid: dict[int, list[ClientConnection]] = defaultdict(list)
    for _ in range(200):
        if len(by_pid) == workers and all(len(c) >= each for c in by_pid.values()):
            return dict(by_pid)
        ws = dial(d.ws_url)
        pid = int(recv_frame(ws, "welcome")["server"].rsplit(":", 1)[1])
        if len(by_pid[pid]) < each:
            by_pid[pid].append(ws)
            if opened is not None:
                opened.append(ws)
        else:
            ws.close()
    raise AssertionError(f"connections did not reach all {workers} workers: "
                         f"{ {p: len(c) for p, c in by_pid.items()} }")


def status(d: DaemonProcess) -> dict[str, Any]:
    code, body = d.admin_json("/status")
    assert code == 200
    return body


def metric(d: DaemonProcess, name: str) -> float:
    text = d.metrics_text()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in the exposition:\n{text}"
    return float(match.group(1))


def wait_for(predicate: Any, timeout: float = STEP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def close_all(conns: list[ClientConnection]) -> None:
    for ws in conns:
        ws.close()


def notifications(sock: socket.socket, wanted: str) -> list[tuple[int, dict[str, str]]]:
    """(sender pid, assignments) of each datagram up to the first containing ``wanted``."""
    got = []
    while True:
        data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = next(struct.unpack("3i", cmsg[2])[0] for cmsg in ancillary
                   if cmsg[1] == socket.SCM_CREDENTIALS)
        lines = data.decode().splitlines()
        got.append((pid, dict(line.split("=", 1) for line in lines)))
        if wanted in lines:
            return got
