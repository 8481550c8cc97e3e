"""Channels against the global broadcast, on one ebbcast, in one run.

Usage (from the repository root):

    .venv/bin/python bench/channels.py [--subscribers 10000] [--quick] [--out DIR]

1. Fan-out: the same server (the JSON envelope) with SUBSCRIBERS clients, first as
   the global broadcast (one publisher, window W), then in channels: SUBSCRIBERS /
   10 channels of 10 subscribers, 10 publishers each subscribed to a tenth of the
   channels and publishing to them in turn (wsbench --channels), windows W. Each
   channel publish is delivered to 11 connections (its 10 subscribers and its
   publisher). Deliveries and publishes per server CPU-second.
2. Churn: one connection per channel command stream, subscribe and unsubscribe
   pipelined (a raw client, sending every command before reading the answers):
   operations per server CPU-second.
3. Memory per subscription: the server's RSS with clients connected, then with each
   subscribed to SUBSCRIPTIONS_PER_CLIENT channels, divided by the subscriptions. Twice,
   on fresh servers: the clients subscribing in waves of WAVE_CLIENTS (each wave's
   answers read before the next: what the subscriptions hold), and all at once (every
   answer queued in one burst: RSS keeps the burst's high-water mark too).
4. The kernel's floor: a C loop's CPU per send() of one channel frame over as many
   loopback connections (bench/loadgen/sendfloor). Each channel delivery is a send of
   its own (a subscriber of one channel in a thousand is rarely owed two frames in one
   loop pass), so the floor divided by 11 bounds any server's channel publishes per
   CPU-second on this machine; the global broadcast gathers several frames per send.

The load generator and the raw client run beside the server on the same machine;
the server's CPU is read from /proc (its worker processes included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (Server, build_loadgen, cpu_seconds, machine_line, publisher_cell,
                     raise_nofile, rss_bytes, run_loadgen, save_results, send_floor)

HANDSHAKE = ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
             "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             "Sec-WebSocket-Version: 13\r\n\r\n").encode()
SUBSCRIPTIONS_PER_CLIENT = 10
PUBLISHERS = 10
WAVE_CLIENTS = 500
#: A channel frame as the fan-out sends it: 100-byte text, a 36-character client id,
#: the offset; 4 bytes of WebSocket header.
CHANNEL_FRAME_BYTES = 4 + len(
    f'{{"type":"message","channel":"c999","from":"{"x" * 36}","text":"{"x" * 100}",'
    '"ts":1765000000.123,"offset":1234}')


def masked(text: str) -> bytes:
    """A client's text frame (mask 0: the payload as it is)."""
    payload = text.encode()
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else \
        bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + b"\0\0\0\0" + payload


def open_ws(port: int) -> socket.socket:
    """A raw client, past its handshake and its welcome (which come in one send)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(HANDSHAKE)
    head = b""
    while b'"welcome"' not in head:
        chunk = sock.recv(4096)
        if not chunk or (b"\r\n\r\n" in head + chunk
                         and not (head + chunk).startswith(b"HTTP/1.1 101")):
            raise RuntimeError((head + chunk)[:200].decode(errors="replace"))
        head += chunk
    return sock


def read_until(sock: socket.socket, marker: bytes, count: int) -> None:
    """Read until ``marker`` has been seen ``count`` times (answers to commands)."""
    seen, tail = 0, b""
    while seen < count:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise EOFError
        data = tail + chunk
        seen += data.count(marker)
        tail = data[-(len(marker) - 1):]


def server_cpu(server: Server) -> float:
    return sum(cpu_seconds(pid) for pid in server.pids())


def server_rss(server: Server) -> int:
    return sum(rss_bytes(pid) for pid in server.pids())


def fanout(server: Server, subscribers: int, windows: list[int],
           duration: float) -> list[dict[str, Any]]:
    rows = []
    pids = server.pids()
    for window in windows:
        glob = publisher_cell(server.port, pids, subscribers, window, duration)
        rows.append({"kind": "global", "window": window, **glob,
                     "publishes_per_cpu_s": glob["deliveries_per_cpu_s"] / (subscribers + 1)})
        result = run_loadgen(
            server.port, "--subscribers", str(subscribers), "--publishers", str(PUBLISHERS),
            "--channels", str(max(PUBLISHERS, subscribers // 10)), "--window", str(window),
            "--size", "100", "--duration", str(duration), "--warmup", str(min(1.0, duration)),
            "--poll-us", "1000", "--server-pid", ",".join(map(str, pids)), "--quiet")
        cpu = result["server_cpu_s"]
        rows.append({"kind": "channels", "window": window,
                     "delivered_per_s": result["delivered"] / duration,
                     "deliveries_per_cpu_s": result["delivered"] / cpu if cpu else 0.0,
                     "publishes_per_cpu_s": result["sent"] / cpu if cpu else 0.0,
                     "p50_ms": result["latency_us"]["p50"] / 1000,
                     "p99_ms": result["latency_us"]["p99"] / 1000,
                     "errors": result["errors"]})
    return rows


def churn(server: Server, connections: int, pairs: int) -> dict[str, Any]:
    """Each connection subscribes to and unsubscribes from ``pairs`` channels."""
    socks = [open_ws(server.port) for _ in range(connections)]
    batches = []
    for n, _ in enumerate(socks):
        frames = []
        for k in range(pairs):
            channel = f"churn{(n * pairs + k) % 5000}"
            frames.append(masked(json.dumps({"type": "subscribe", "channel": channel})))
            frames.append(masked(json.dumps({"type": "unsubscribe", "channel": channel})))
        batches.append(b"".join(frames))
    before = server_cpu(server)
    started = time.monotonic()
    for sock, batch in zip(socks, batches):
        sock.sendall(batch)
    for sock in socks:
        read_until(sock, b'"unsubscribed"', pairs)
    elapsed = time.monotonic() - started
    cpu = server_cpu(server) - before
    for sock in socks:
        sock.close()
    operations = 2 * pairs * connections
    return {"connections": connections, "operations": operations, "seconds": elapsed,
            "server_cpu_s": cpu, "operations_per_cpu_s": operations / cpu if cpu else 0.0}


def memory(server: Server, clients: int, wave: int) -> dict[str, Any]:
    """RSS per subscription, the clients subscribing ``wave`` at a time."""
    socks = [open_ws(server.port) for _ in range(clients)]
    time.sleep(1)  # let the collector settle; RSS is what it is after
    connected = server_rss(server)
    for start in range(0, clients, wave):
        group = socks[start:start + wave]
        for n, sock in enumerate(group, start):
            sock.sendall(b"".join(masked(json.dumps(
                {"type": "subscribe", "channel": f"mem{(n * 7 + k) % 1000}"}))
                for k in range(SUBSCRIPTIONS_PER_CLIENT)))
        for sock in group:
            read_until(sock, b'"subscribed"', SUBSCRIPTIONS_PER_CLIENT)
    time.sleep(1)
    subscribed = server_rss(server)
    for sock in socks:
        sock.close()
    count = clients * SUBSCRIPTIONS_PER_CLIENT
    return {"clients": clients, "wave": wave, "subscriptions": count, "rss_connected": connected,
            "rss_subscribed": subscribed, "bytes_per_subscription": (subscribed - connected) / count}


def fanout_table(started: Any, subscribers: int, rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"# Channels against the global broadcast ({started:%Y-%m-%d %H:%M})", "",
             machine_line(), "",
             f"{subscribers} subscribers; channels of 10 subscribers, "
             f"{PUBLISHERS} publishers; 100-byte messages, JSON envelope.", "",
             "| kind | window | deliveries/s | deliveries per CPU-s | publishes per CPU-s "
             "| p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['kind']} | {row['window']} | {row['delivered_per_s']:,.0f} | "
                     f"{row['deliveries_per_cpu_s']:,.0f} | {row['publishes_per_cpu_s']:,.0f} | "
                     f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['errors']} |")
    return lines


def report(started: Any, subscribers: int, rows: list[dict[str, Any]], churned: dict[str, Any],
           mems: list[dict[str, Any]], floor: dict[str, Any]) -> str:
    lines = fanout_table(started, subscribers, rows)
    sends = floor["sends_per_cpu_s"]
    best = max((row for row in rows if row["kind"] == "channels"),
               key=lambda row: row["publishes_per_cpu_s"])
    lines += ["", f"Kernel floor (sendfloor): one send() of a {floor['bytes']}-byte frame over "
              f"{floor['connections']:,} loopback connections costs {floor['us_per_send']:.1f} "
              f"µs of CPU: {sends:,.0f} sends per CPU-second, whatever the server. A channel "
              f"publish is 11 deliveries; while each is a send of its own (a subscriber rarely "
              f"owed two frames at once: many channels), no server exceeds {sends / 11:,.0f} "
              f"publishes per CPU-second on this machine. ebbcast's best here: "
              f"{best['publishes_per_cpu_s']:,.0f} "
              f"({100 * best['publishes_per_cpu_s'] * 11 / sends:.0f}% of that).", "",
              f"Churn: {churned['operations']:,} subscribe and unsubscribe operations on "
              f"{churned['connections']} connections: {churned['operations_per_cpu_s']:,.0f} "
              f"per server CPU-second ({churned['server_cpu_s']:.2f} s of CPU).", ""]
    for mem in mems:
        how = "all at once" if mem["wave"] >= mem["clients"] else \
            f"in waves of {mem['wave']} clients"
        lines.append(f"Memory, subscribing {how}: {mem['subscriptions']:,} subscriptions "
                     f"({mem['clients']} clients, {SUBSCRIPTIONS_PER_CLIENT} each, over 1,000 "
                     f"channels): {mem['bytes_per_subscription']:,.0f} bytes of server RSS per "
                     "subscription.")
    return "\n".join(lines) + "\n"


def without_memory(args: Any, started: Any, subscribers: int, rows: list[dict[str, Any]],
               churned: dict[str, Any]) -> int:
    """The fan-out and the churn alone (``--skip-memory``): results channels-parts-*."""
    text = "\n".join(fanout_table(started, subscribers, rows)) + (
        f"\n\nChurn: {churned['operations']:,} subscribe and unsubscribe operations on "
        f"{churned['connections']} connections: {churned['operations_per_cpu_s']:,.0f} "
        f"per server CPU-second ({churned['server_cpu_s']:.2f} s of CPU).\n")
    print(text)
    if args.out:
        save_results(args.out, "channels-parts", started, text, {
            "subscribers": subscribers, "fanout": rows, "churn": churned,
            "quick": args.quick})
    return 0 if all(row["errors"] == 0 for row in rows) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=10000)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--skip-memory", action="store_true",
                        help="the fan-out and the churn alone (no memory, no floor): for "
                             "before/after comparisons")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    raise_nofile()
    build_loadgen()
    subscribers = 200 if args.quick else args.subscribers
    duration = 1.0 if args.quick else args.duration
    started = datetime.datetime.now()
    env = {"EBBCAST_BROADCAST_ENVELOPE": "json"}
    server = Server("ebbcast-json", env=env).start()
    try:
        rows = fanout(server, subscribers, [2, 16], duration)
    finally:
        server.stop()
    server = Server("ebbcast-json", env=env).start()
    try:
        churned = churn(server, 10 if args.quick else 100, 50 if args.quick else 1000)
    finally:
        server.stop()
    if args.skip_memory:
        return without_memory(args, started, subscribers, rows, churned)
    clients = 100 if args.quick else 5000
    mems = []
    for wave in (10 if args.quick else WAVE_CLIENTS, clients):
        server = Server("ebbcast-json", env=env).start()
        try:
            mems.append(memory(server, clients, wave))
        finally:
            server.stop()
    floor = send_floor(min(subscribers, 9000), 20000 if args.quick else 1000000,
                       CHANNEL_FRAME_BYTES)
    text = report(started, subscribers, rows, churned, mems, floor)
    print(text)
    if args.out:
        save_results(args.out, "channels", started, text, {
            "subscribers": subscribers, "fanout": rows, "churn": churned, "memory": mems,
            "send_floor": floor, "quick": args.quick, "pid": os.getpid()})
    return 0 if all(row["errors"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
