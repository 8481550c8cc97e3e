"""Where each microsecond of a fan-out delivery goes, against the kernel's floor.

    .venv/bin/python bench/fanoutcost.py --out bench/results    # about 2 minutes
    .venv/bin/python bench/fanoutcost.py --quick                # a smoke run

Three measures of one thing, a frame sent to each of ``--clients`` loopback
connections, one ``send()`` per frame, drained by another process; each is CPU
(user + system) of the sending process per send:

- **kernel**: ``bench/loadgen/sendfloor`` (C): a loop of ``send()`` calls, nothing else;
- **python**: the same loop in Python (``socket.send`` over the same kind of
  connections): the kernel plus the interpreter's cost of one call;
- **ebbcast**: ebbcast (one process, raw envelope) with ``--clients`` subscribers and
  one publisher keeping one 100-byte message in flight (wsbench ``--window 1``): every
  broadcast's flush is one ``send()`` per client, so its server CPU per delivery is
  its cost per send, with everything the daemon does around it (the fan-out's loop,
  the publisher's frame read, the loop's passes).

The differences split a delivery into the kernel's share, the interpreter's call and
ebbcast's own code. py-spy (``--profile``, when installed) then splits ebbcast's run
by function.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (Server, build_loadgen, machine_line, publisher_cell, raise_nofile,
                     save_results, send_floor)

#: A raw-envelope broadcast of a 100-byte message: its frame's size.
FRAME_BYTES = 102


def python_floor(connections: int, sends: int, size: int) -> dict[str, Any]:
    """sendfloor's loop in Python: ``sends`` calls of ``socket.send`` of ``size`` bytes,
    in turn over ``connections`` loopback TCP connections (TCP_NODELAY) drained by a
    forked reader; the sender's CPU per call."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    out, into = [], []
    for _ in range(connections):
        into.append(socket.create_connection(listener.getsockname()))
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out.append(sock)
    listener.close()
    reader = os.fork()
    if reader == 0:  # pragma: no cover - the child drains, then exits
        for sock in out:
            sock.close()
        _drain(into)
        os._exit(0)
    for sock in into:
        sock.close()
    frame = b"x" * size
    sends_of = [sock.send for sock in out]
    before = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(sends):
        sends_of[i % connections](frame)
    after = resource.getrusage(resource.RUSAGE_SELF)
    for sock in out:
        sock.close()
    os.waitpid(reader, 0)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"connections": connections, "sends": sends, "bytes": size, "cpu_s": cpu,
            "us_per_send": cpu * 1e6 / sends}


def _drain(socks: list[socket.socket]) -> None:
    selector = selectors.EpollSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    remaining = len(socks)
    while remaining:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if not sock.recv(65536):
                selector.unregister(sock)
                sock.close()
                remaining -= 1


def ebbcast_cell(clients: int, duration: float, profile: bool) -> dict[str, Any]:
    """ebbcast's server CPU per delivery at window 1, and (``profile``) py-spy's split."""
    server = Server("ebbcast", env={"EBBCAST_BROADCAST_ENVELOPE": "raw"}).start()
    try:
        spy = start_profile(server.pid, duration) if profile else None
        cell = publisher_cell(server.port, server.pids(), clients, 1, duration)
        cell["us_per_delivery"] = 1e6 / cell["deliveries_per_cpu_s"]
        if spy is not None:
            cell["profile"] = finish_profile(*spy)
    finally:
        server.stop()
    return cell


def start_profile(pid: int, duration: float) -> tuple[subprocess.Popen[bytes], Path]:
    """py-spy on ``pid`` for the measured part (after wsbench's connects and warm-up)."""
    raw = Path(tempfile.mkstemp(suffix=".txt")[1])
    spy = Path(sys.executable).parent / "py-spy"
    command = f"sleep 8; exec {spy} record -p {pid} -d {max(1, int(duration) - 4)} " \
              f"-r 200 -f raw -o {raw}"
    proc = subprocess.Popen(["sh", "-c", command], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, raw


def send_line() -> str:
    """py-spy's name for the line of ``write_frame`` that calls ``send()``."""
    source = Path(__file__).resolve().parent.parent / "daemon/ebbcast/serving/wire.py"
    for number, line in enumerate(source.read_text().splitlines(), 1):
        if "sent = stream.socket.send(frame)" in line:
            return f"write_frame (ebbcast/serving/wire.py:{number})"
    raise RuntimeError("write_frame no longer calls stream.socket.send(frame)")


#: Where a sample goes: the first of these found on its stack, innermost first.
SHARES = (("send() (the kernel and the call)", send_line()),
          ("write_frame's checks", "write_frame ("),
          ("Connection.send_frame", "Connection.send_frame ("),
          ("the fan-out's loop", "Fanout._"),
          ("the publisher's frame (Tornado's reader)", "tornado/websocket.py"),
          ("the loop's passes (epoll, callbacks)", "asyncio/"))


def finish_profile(proc: subprocess.Popen[bytes], raw: Path) -> dict[str, float]:
    """Samples that were busy, by the first of ``SHARES`` on their stack (innermost
    first), as shares of the busy ones."""
    proc.wait(120)
    counts: Counter[str] = Counter()
    busy = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if not stack or frames[-1].startswith("epoll") or "select (selectors.py" in frames[-1]:
            continue  # idle: waiting in epoll
        busy += int(n)
        counts[_share(frames)] += int(n)
    raw.unlink()
    return {name: count / busy for name, count in counts.most_common()} if busy else {}


def _share(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, marker in SHARES:
            if marker in frame:
                return name
    return "other"


def report(kernel: dict[str, Any], python: dict[str, Any], ebbcast: dict[str, Any],
           args: argparse.Namespace, started: datetime.datetime) -> str:
    k, p, e = kernel["us_per_send"], python["us_per_send"], ebbcast["us_per_delivery"]
    lines = [f"# Fan-out cost per delivery, {started:%Y-%m-%d %H:%M} UTC", "",
             machine_line(), "",
             f"Command: `bench/fanoutcost.py --clients {args.clients}`. One frame of "
             f"{FRAME_BYTES} bytes per `send()`, {args.clients:,} loopback connections, "
             "CPU of the sending process (user + system).", "",
             "| measure | µs per send | of ebbcast's |", "|---|---|---|",
             f"| the kernel alone (sendfloor, C) | {k:.2f} | {100 * k / e:.0f}% |",
             f"| Python's call of `socket.send` on top | {p - k:.2f} | {100 * (p - k) / e:.0f}% |",
             f"| ebbcast's own code on top (fan-out, reading the publisher, the loop) | "
             f"{e - p:.2f} | {100 * (e - p) / e:.0f}% |",
             f"| **ebbcast, per delivery** (window 1: {ebbcast['deliveries_per_cpu_s']:,.0f} "
             f"deliveries per CPU-second) | **{e:.2f}** | 100% |"]
    if ebbcast.get("profile"):
        lines += ["", "py-spy over ebbcast's busy samples, by the innermost of these on the "
                  "stack:", "", "| where | share | µs per delivery |", "|---|---|---|"]
        lines += [f"| {name} | {100 * share:.0f}% | {share * e:.2f} |"
                  for name, share in ebbcast["profile"].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=9000,
                        help="connections (sendfloor holds 2 descriptors for each)")
    parser.add_argument("--sends", type=int, default=1_000_000)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.clients, args.sends, args.duration, args.no_profile = 100, 20_000, 2.0, True
    raise_nofile()
    build_loadgen()
    started = datetime.datetime.now(datetime.timezone.utc)
    kernel = send_floor(args.clients, args.sends, FRAME_BYTES)
    python = python_floor(args.clients, args.sends, FRAME_BYTES)
    profile = not args.no_profile and (Path(sys.executable).parent / "py-spy").exists()
    ebbcast = ebbcast_cell(args.clients, args.duration, profile)
    text = report(kernel, python, ebbcast, args, started)
    print(text)
    data = {"kernel": kernel, "python": python, "ebbcast": ebbcast,
            "args": {k: str(v) for k, v in vars(args).items()}}
    print(json.dumps(data), file=sys.stderr)
    if args.out:
        save_results(args.out, "fanoutcost", started, text, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
