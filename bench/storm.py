"""The connect storm: how fast each server takes a reconnect storm of handshakes.

Usage (from the repository root, after `make test` has built .venv):

    .venv/bin/python bench/storm.py --out bench/results   # about 2 minutes
    .venv/bin/python bench/storm.py --quick               # a smoke run: seconds

What a drain or an upgrade causes: every client opening a new connection at once.
For each server variant (ebbcast as the fan-out benchmark runs it, plain Tornado,
Node ws), a fresh server per round; the C load generator opens CONNECTIONS
WebSocket connections as fast as it can, with up to 200 handshakes outstanding
(TCP connect, the upgrade request, the 101 response; for ebbcast the welcome
frame is written in the same step), and reads the server's CPU time over that
connect phase. Columns:

- **handshakes/CPU-s**: connections opened per second of server CPU during the
  storm: the headline, what one core buys.
- **handshakes/s**: per second of wall time (the server is the bottleneck when its
  CPU share is near 1.0).
- **p50/p99/max ms**: from the client's connect() to the 101 response, over every
  connection (queueing behind the others included).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Server, build_loadgen, machine, run_loadgen, save_results
from run import VARIANTS, ensure_node_ws

STORM_VARIANTS = VARIANTS


def storm(variant: str, connections: int) -> dict[str, Any]:
    server = Server(variant).start()
    try:
        result = run_loadgen(server.port, "--idle", "--subscribers", str(connections),
                             "--publishers", "0", "--duration", "0.2",
                             "--server-pid", str(server.pid), "--quiet")
    finally:
        server.stop()
    cpu = result.get("connect_server_cpu_s") or 0.0
    seconds = result["connect_seconds"]
    return {"variant": variant, "connections": connections,
            "connected": result["connected"], "errors": result["errors"],
            "connect_seconds": seconds, "server_cpu_s": cpu,
            "handshakes_per_cpu_s": result["connected"] / cpu if cpu else 0.0,
            "handshakes_per_s": result["connected"] / seconds if seconds else 0.0,
            "server_cpu_share": cpu / seconds if seconds else 0.0,
            "p50_ms": result["handshake_us"]["p50"] / 1000,
            "p99_ms": result["handshake_us"]["p99"] / 1000,
            "max_ms": result["handshake_us"]["max"] / 1000}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | connections | round | handshakes/CPU-s | handshakes/s | server CPU "
             "| p50 ms | p99 ms | max ms | errors |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['connections']:,} | {r['round']} "
                     f"| {r['handshakes_per_cpu_s']:,.0f} | {r['handshakes_per_s']:,.0f} "
                     f"| {r['server_cpu_share']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
                     f"| {r['max_ms']:.1f} | {r['errors']} |")
    return "\n".join(lines)


def medians(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | handshakes/CPU-s (median) | p99 ms (median) | vs Node ws |",
             "|---|---|---|---|"]
    by_variant = {v: [r for r in rows if r["variant"] == v] for v in STORM_VARIANTS}
    mid = {v: statistics.median(r["handshakes_per_cpu_s"] for r in rs)
           for v, rs in by_variant.items() if rs}
    for variant, rs in by_variant.items():
        if rs:
            ratio = mid[variant] / mid["node-ws"] if mid.get("node-ws") else 0.0
            lines.append(f"| {variant} | {mid[variant]:,.0f} "
                         f"| {statistics.median(r['p99_ms'] for r in rs):.1f} | {ratio:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(STORM_VARIANTS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.connections, args.rounds = 50, 1
    build_loadgen()
    variants = args.variants.split(",")
    if "node-ws" in variants:
        ensure_node_ws()
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    for round_ in range(1, args.rounds + 1):  # interleaved, so drift hits every variant
        for variant in variants:
            rows.append({**storm(variant, args.connections), "round": round_})
            r = rows[-1]
            print(f"  {variant:14} round {round_}: {r['handshakes_per_cpu_s']:>9,.0f}/cpu-s "
                  f"{r['handshakes_per_s']:>9,.0f}/s p99 {r['p99_ms']:.1f} ms "
                  f"errors {r['errors']}", file=sys.stderr, flush=True)
    facts = machine()
    text = (f"# Connect storm, {started:%Y-%m-%d %H:%M} UTC\n\n"
            f"Machine: {facts['cores']} cores, {facts['cpu']}, Linux {facts['kernel']}, "
            f"Python {facts['python']}.\n"
            f"Command: `bench/storm.py --connections {args.connections} --rounds "
            f"{args.rounds}`. Up to 200 handshakes outstanding; server CPU over the "
            f"connect phase.\n\n" + medians(rows) + "\n\n" + table(rows) + "\n")
    print(text)
    if args.out:
        save_results(args.out, "storm", started, text, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
