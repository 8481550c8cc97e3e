"""ebbcast-only measurements: timers under a flood, a slow reader's memory, the drain.

Usage (from the repository root):

    .venv/bin/python bench/extras.py [--subscribers 10000] [--quick] [--out DIR]

1. Lateness under a saturating flood: the periodic broadcaster (every 100 ms) and
   keepalive pings (every 3 s, so that each window sees the pong bursts of several
   rounds), read by a monitor client while one publisher keeps
   64 messages in flight to all subscribers; plus the time a new client waits for
   its handshake and welcome frame meanwhile.
2. Memory of one never-reading client over time while a publisher floods: the
   daemon's RSS, sampled every 250 ms, against limits.client_queue_bytes.
3. The drain with many clients: from SIGTERM until every client has the shutdown
   frame, and from the deadline until every client has its close frame.
4. A connect storm, then a mass disconnect: every client but a monitor connects as
   fast as it can, then leaves at once; the periodic timer's lateness while they
   connect, before they leave and after, and how long until the daemon sees them gone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (LOADGEN, Server, build_loadgen, cpu_seconds, machine, raise_nofile,
                     rss_bytes, save_results, wait_until)

HANDSHAKE = ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
             "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             "Sec-WebSocket-Version: 13\r\n\r\n").encode()
MASKED_EMPTY_PONG = b"\x8a\x80\x00\x00\x00\x00"


def open_ws(port: int, rcvbuf: int | None = None) -> socket.socket:
    """A raw client socket past the handshake (frames after it are left unread)."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    sock.sendall(HANDSHAKE)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head.decode(errors="replace"))
    return sock


class FrameReader:
    """Reads server frames from a raw socket; records (arrival, opcode, payload)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def next(self) -> tuple[int, bytes]:
        head, length = self._take(2)
        if length == 126:
            length = int.from_bytes(self._take(2), "big")
        elif length == 127:
            length = int.from_bytes(self._take(8), "big")
        return head & 0x0F, self._take(length)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"n": len(values), "p50": pick(0.5), "p99": pick(0.99), "max": ordered[-1]}


def wait_connections(server: Server, count: int, timeout: float = 120) -> None:
    if not wait_until(lambda: json.loads(server.admin_get("/status"))["connections"] >= count,
                      timeout, 0.2):
        raise RuntimeError(f"fewer than {count} connections after {timeout}s")


def tick_lateness(stamps: list[float], interval: float) -> list[float]:
    """How late each periodic frame was fired, from the daemon's timestamps.

    The daemon fires tick k at origin + k * interval, and after a tick that ran
    more than an interval late it skips to the next whole tick (ebbcast.serving.periodic),
    so ``seq`` alone would make every later frame look an interval late. Tick
    numbers are rebuilt with the daemon's own rule, the origin taken as the one
    that makes the least late frame on time (refined once).
    """
    def ticks(origin: float) -> list[int]:
        numbers = [round((stamps[0] - origin) / interval)]
        for previous in stamps[:-1]:
            numbers.append(max(numbers[-1] + 1, int((previous - origin) // interval) + 1))
        return numbers

    origin = stamps[0]
    for _ in range(2):
        origin = min(ts - k * interval for k, ts in zip(ticks(origin), stamps))
    return [ts - origin - k * interval for k, ts in zip(ticks(origin), stamps)]


def flood_lateness(subscribers: int, seconds: float) -> dict[str, Any]:
    interval, ping_interval = 0.1, 3.0
    server = Server("ebbcast", env={"EBBCAST_BROADCAST_ENVELOPE": "json",
                                    "EBBCAST_BROADCAST_PERIODIC_INTERVAL": "100ms",
                                    "EBBCAST_KEEPALIVE_PING_INTERVAL": "3s",
                                    "EBBCAST_KEEPALIVE_PING_TIMEOUT": "3s"}).start()
    flood = subprocess.Popen(
        [str(LOADGEN), "--port", str(server.port), "--subscribers", str(subscribers),
         "--publishers", "1", "--window", "64", "--warmup", "0", "--duration",
         str(seconds + 30), "--poll-us", "1000", "--quiet", "--json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=raise_nofile)
    try:
        wait_connections(server, subscribers + 1)
        time.sleep(1.0)  # the flood is under way
        cpu_before = server_cpu(server)
        periodic: list[tuple[int, float, float]] = []   # seq, ts, arrival (unix)
        pings: list[float] = []                        # arrival (monotonic)
        handshakes: list[float] = []
        monitor = open_ws(server.port)
        reader = FrameReader(monitor)
        stop = time.monotonic() + seconds

        def handshake_probe() -> None:
            while time.monotonic() < stop:
                started = time.monotonic()
                probe = open_ws(server.port)
                probe_reader = FrameReader(probe)
                while b'"welcome"' not in probe_reader.next()[1]:
                    pass
                handshakes.append(time.monotonic() - started)
                probe.close()
                time.sleep(0.25)

        prober = threading.Thread(target=handshake_probe, daemon=True)
        prober.start()
        while time.monotonic() < stop:
            opcode, payload = reader.next()
            if opcode == 0x9:
                pings.append(time.monotonic())
                monitor.sendall(MASKED_EMPTY_PONG)
            elif opcode == 0x1 and payload.startswith(b'{"type":"periodic"'):
                frame = json.loads(payload)
                periodic.append((frame["seq"], frame["ts"], time.time()))
        prober.join(30)
        cpu_share = (server_cpu(server) - cpu_before) / seconds
        monitor.close()
    finally:
        flood.terminate()
        flood.wait(30)
        server.stop()
    timer_late = [late * 1000 for late in tick_lateness([ts for _, ts, _ in periodic],
                                                        interval)]
    delivery = [(arrival - ts) * 1000 for _, ts, arrival in periodic]
    ping_late: list[float] = []
    if pings:
        ping_origin = min(t - k * ping_interval for k, t in enumerate(pings))
        ping_late = [(t - k * ping_interval - ping_origin) * 1000 for k, t in enumerate(pings)]
    return {"subscribers": subscribers, "seconds": seconds, "server_cpu_share": cpu_share,
            "periodic_timer_lateness_ms": percentiles(timer_late),
            "periodic_delivery_ms": percentiles(delivery),
            "ping_lateness_ms": percentiles(ping_late),
            "handshake_ms": percentiles([h * 1000 for h in handshakes])}


def mass_disconnect(subscribers: int, after: float = 3.0) -> dict[str, Any]:
    """A connect storm, then a mass disconnect. A monitor client connects first and
    reads the periodic frames (every 100 ms); then every other client connects as
    fast as the load generator can (up to 200 handshakes outstanding), and later
    leaves at once (the load generator is killed: the kernel closes its sockets
    together). The periodic timer's lateness while they connect, once connected,
    and after they left, and how long until the daemon counts them all gone."""
    interval = 0.1
    server = Server("ebbcast", env={"EBBCAST_BROADCAST_ENVELOPE": "json",
                                    "EBBCAST_BROADCAST_PERIODIC_INTERVAL": "100ms"}).start()
    stamps: list[float] = []  # the periodic frames' ts (when the daemon fired them)
    crowd = None
    try:
        monitor = open_ws(server.port)
        reader = FrameReader(monitor)
        done = threading.Event()

        def read() -> None:
            while not done.is_set():
                opcode, payload = reader.next()
                if opcode == 0x1 and payload.startswith(b'{"type":"periodic"'):
                    stamps.append(json.loads(payload)["ts"])

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        time.sleep(1.0)  # the timer's lateness with one client
        storm = time.time()
        crowd = subprocess.Popen(
            [str(LOADGEN), "--port", str(server.port), "--subscribers", str(subscribers),
             "--publishers", "0", "--idle", "--duration", "600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            preexec_fn=raise_nofile)
        assert crowd.stderr is not None
        for line in crowd.stderr:
            if line.startswith("wsbench: ready"):
                break
        connected = time.time()
        time.sleep(2.0)  # the timer's lateness with every client connected
        left = time.time()
        crowd.kill()
        crowd.wait(30)
        if not wait_until(lambda: json.loads(server.admin_get("/status"))["connections"] <= 1,
                          60, 0.05):
            raise RuntimeError("the daemon did not see the clients go")
        gone = time.time() - left
        time.sleep(after)
        done.set()
        thread.join(5)
        monitor.close()
    finally:
        if crowd is not None and crowd.poll() is None:
            crowd.kill()
        server.stop()
    late = list(zip((lateness * 1000 for lateness in tick_lateness(stamps, interval)),
                    stamps))
    return {"subscribers": subscribers, "connect_s": connected - storm, "all_gone_s": gone,
            "lateness_connecting_ms": percentiles(
                [ms for ms, ts in late if storm <= ts < connected + interval]),
            "lateness_before_ms": percentiles(
                [ms for ms, ts in late if connected + interval <= ts < left]),
            "lateness_after_ms": percentiles([ms for ms, ts in late if ts >= left])}


def server_cpu(server: Server) -> float:
    return cpu_seconds(server.pid)


def slow_reader_memory(seconds: float) -> dict[str, Any]:
    cap = 1048576
    server = Server("ebbcast", env={"EBBCAST_LIMITS_CLIENT_QUEUE_BYTES": str(cap)}).start()
    samples: list[tuple[float, int]] = []
    flood = None
    try:
        sleeper = open_ws(server.port, rcvbuf=4096)
        baseline = rss_bytes(server.pid)
        flood = subprocess.Popen(
            [str(LOADGEN), "--port", str(server.port), "--subscribers", "100",
             "--publishers", "1", "--window", "32", "--size", "1000", "--warmup", "0",
             "--duration", str(seconds), "--poll-us", "1000", "--quiet", "--json"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=raise_nofile)
        started = time.monotonic()
        while flood.poll() is None:
            samples.append((time.monotonic() - started, rss_bytes(server.pid) - baseline))
            time.sleep(0.25)
        metrics = server.admin_get("/metrics")
        sleeper.close()
    finally:
        if flood is not None and flood.poll() is None:
            flood.kill()
        server.stop()
    aborted = next((float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith('ebbcast_disconnections_total{reason="slow_consumer"}')),
                   0.0)
    growth = [delta for _, delta in samples]
    return {"seconds": seconds, "client_queue_bytes": cap,
            "rss_growth_max_mb": max(growth) / 2**20,
            "rss_growth_end_mb": growth[-1] / 2**20,
            "rss_growth_median_mb": statistics.median(growth) / 2**20,
            "slow_consumers_aborted": aborted,
            "samples_mb": [(round(t, 2), round(d / 2**20, 2)) for t, d in samples]}


def drain_timing(subscribers: int, drain_timeout: float) -> dict[str, Any]:
    server = Server("ebbcast", env={"EBBCAST_BROADCAST_ENVELOPE": "json",
                                    "EBBCAST_SHUTDOWN_DRAIN_TIMEOUT": f"{drain_timeout}s",
                                    "EBBCAST_SHUTDOWN_PROGRESS_INTERVAL": "1s"}).start()
    clients = subprocess.Popen(
        [str(LOADGEN), "--port", str(server.port), "--subscribers", str(subscribers),
         "--expect-close", "--duration", str(drain_timeout + 120), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=raise_nofile)
    try:
        assert clients.stderr is not None
        for line in clients.stderr:
            if line.startswith("wsbench: ready"):
                break
        sigterm_ns = time.monotonic_ns()
        server.signal(signal.SIGTERM)
        exit_code = server.wait(drain_timeout + 60)
        exited_ns = time.monotonic_ns()
        out, _ = clients.communicate(timeout=60)
    finally:
        if clients.poll() is None:
            clients.kill()
        server.stop()
    result = json.loads(out)
    deadline_ns = sigterm_ns + int(drain_timeout * 1e9)
    return {
        "subscribers": subscribers, "drain_timeout_s": drain_timeout,
        "shutdown_frames": result["shutdown_frames"], "closes": result["closes"],
        "close_codes": result.get("close_codes"), "server_exit_code": exit_code,
        "sigterm_to_first_notified_ms": (result["shutdown"]["min_mono_ns"] - sigterm_ns) / 1e6,
        "sigterm_to_all_notified_ms": (result["shutdown"]["max_mono_ns"] - sigterm_ns) / 1e6,
        "deadline_to_all_closed_ms": (result["close"]["max_mono_ns"] - deadline_ns) / 1e6,
        "deadline_to_exit_ms": (exited_ns - deadline_ns) / 1e6,
    }


def report(results: dict[str, Any]) -> str:
    fl, mem, dr = results["flood"], results["slow_reader"], results["drain"]
    rows = [
        ("periodic timer lateness under flood (ms)", fl["periodic_timer_lateness_ms"]),
        ("periodic frame delivery under flood (ms)", fl["periodic_delivery_ms"]),
        ("ping lateness under flood (ms)", fl["ping_lateness_ms"]),
        ("new client handshake + welcome under flood (ms)", fl["handshake_ms"]),
    ]
    lines = [f"Flood: {fl['subscribers']:,} subscribers, 1 publisher with window 64, "
             f"{fl['seconds']:g} s; server CPU {fl['server_cpu_share']:.2f} of a core.",
             "", "| measure | n | p50 | p99 | max |", "|---|---|---|---|---|"]
    for name, stats in rows:
        if stats["n"]:
            lines.append(f"| {name} | {stats['n']} | {stats['p50']:.1f} | {stats['p99']:.1f} "
                         f"| {stats['max']:.1f} |")
        else:
            lines.append(f"| {name} | 0 | - | - | - |")
    lines += ["", f"Never-reading client, {mem['seconds']:g} s of flood (100 subscribers, "
              f"1 kB messages), client_queue_bytes = 1 MiB: daemon RSS grew at most "
              f"{mem['rss_growth_max_mb']:.1f} MB (median {mem['rss_growth_median_mb']:.1f}, "
              f"end {mem['rss_growth_end_mb']:.1f}); slow consumers aborted: "
              f"{mem['slow_consumers_aborted']:.0f}.",
              "", f"Drain with {dr['subscribers']:,} clients (drain_timeout "
              f"{dr['drain_timeout_s']:g} s): {dr['shutdown_frames']:,} shutdown frames, "
              f"first {dr['sigterm_to_first_notified_ms']:.0f} ms and all "
              f"{dr['sigterm_to_all_notified_ms']:.0f} ms after SIGTERM; at the deadline "
              f"all {dr['closes']:,} closed within {dr['deadline_to_all_closed_ms']:.0f} ms "
              f"(codes {dr['close_codes']}); exit {dr['server_exit_code']} "
              f"{dr['deadline_to_exit_ms']:.0f} ms after the deadline."]
    gone = results["disconnect"]
    before, after = gone["lateness_before_ms"], gone["lateness_after_ms"]
    storm = gone["lateness_connecting_ms"]
    lines += ["", f"Connect storm: {gone['subscribers']:,} clients connect as fast as the "
              f"load generator can, in {gone['connect_s']:.1f} s. Periodic timer (100 ms) "
              f"lateness meanwhile: max {storm.get('max', 0):.1f} ms, p99 "
              f"{storm.get('p99', 0):.1f} ms ({storm['n']} ticks)."]
    lines += ["", f"Mass disconnect: {gone['subscribers']:,} clients leave at once (their "
              f"load generator killed); the daemon counted them gone within "
              f"{gone['all_gone_s'] * 1000:.0f} ms. Periodic timer (100 ms) lateness, "
              f"max: {before.get('max', 0):.1f} ms before, {after.get('max', 0):.1f} ms "
              f"from the moment they left (p99 {after.get('p99', 0):.1f}, "
              f"{after['n']} ticks)."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=10000)
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    n, seconds = (50, 2.0) if args.quick else (args.subscribers, 10.0)
    build_loadgen()
    started = datetime.datetime.now(datetime.timezone.utc)
    results = {"flood": flood_lateness(n, seconds),
               "slow_reader": slow_reader_memory(3.0 if args.quick else 15.0),
               "drain": drain_timing(n, 1.0 if args.quick else 5.0),
               "disconnect": mass_disconnect(n, 1.0 if args.quick else 3.0)}
    info = machine()
    text = (f"# ebbcast timers, slow reader and drain, {started:%Y-%m-%d %H:%M} UTC\n\n"
            f"Machine: {info['cores']} cores, {info['cpu']}, Linux {info['kernel']}, "
            f"Python {info['python']}. Command: `bench/extras.py {' '.join(sys.argv[1:])}`"
            "\n\n" + report(results) + "\n")
    print(text)
    if args.out:
        save_results(args.out, "extras", started, text, {"results": results})
    drained = results["drain"]
    ok = drained["shutdown_frames"] == drained["subscribers"] == drained["closes"]
    return 0 if ok and drained["server_exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
