"""The fan-out benchmark: server variants x subscribers x publish window.

Usage (from the repository root, after `make test` has built .venv):

    .venv/bin/python bench/run.py                 # the full matrix, about 10 minutes
    .venv/bin/python bench/run.py --quick         # a smoke run: tiny sizes, seconds

Every cell starts a fresh server, connects the subscribers with the C load generator
(bench/loadgen/wsbench), and has one publisher keep WINDOW messages in flight (it
sends a new one each time one of its own comes back). The generator reads the
server's CPU time and RSS from /proc over the measured window. Ratios between the
variants come from the same run; absolute numbers are noisy on a shared VM.
Prints a markdown table; with --out, writes it, the raw JSON and a PNG plot there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (NODE_SERVER, Server, build_loadgen, machine, pyplot, rss_bytes,
                     run_loadgen, save_results)

VARIANTS = ("ebbcast", "ebbcast-json", "tornado-naive", "node-ws", "fastapi")


def ensure_node_ws() -> None:
    if not (NODE_SERVER.parent / "node_modules" / "ws").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"],  # the lock
                       cwd=NODE_SERVER.parent, check=True)


def run_cell(variant: str, subscribers: int, windows: list[int], duration: float,
             size: int) -> list[dict[str, Any]]:
    """One server, every window at this subscriber count."""
    server = Server(variant).start()
    rows = []
    try:
        baseline = rss_bytes(server.pid)
        idle = run_loadgen(server.port, "--idle", "--subscribers", str(subscribers),
                           "--duration", "0.5", "--server-pid", str(server.pid), "--quiet")
        rss_per_conn_kb = (idle["server_rss_kib_ready"] * 1024 - baseline) / subscribers / 1024
        for window in windows:
            result = run_loadgen(
                server.port, "--subscribers", str(subscribers), "--publishers", "1",
                "--window", str(window), "--size", str(size), "--duration", str(duration),
                "--warmup", "1", "--poll-us", "1000", "--server-pid", str(server.pid),
                "--quiet")
            cpu = result["server_cpu_s"]
            rows.append({
                "variant": variant, "subscribers": subscribers, "window": window,
                "size": size, "delivered_per_s": result["delivered_per_s"],
                "deliveries_per_cpu_s": result["delivered"] / cpu if cpu else 0.0,
                "p50_ms": result["latency_us"]["p50"] / 1000,
                "p99_ms": result["latency_us"]["p99"] / 1000,
                "server_cpu_share": result["server_cpu_share"],
                "client_cpu_share": result["client_cpu_share"],
                "peak_rss_mb": rss_bytes(server.pid, "VmHWM") / 2**20,
                "rss_per_conn_kb": rss_per_conn_kb,
                "errors": result["errors"],
            })
            print(f"  {variant:14} N={subscribers:<6} W={window:<3} "
                  f"{rows[-1]['delivered_per_s']:>12,.0f}/s "
                  f"{rows[-1]['deliveries_per_cpu_s']:>12,.0f}/cpu-s "
                  f"p99 {rows[-1]['p99_ms']:.1f} ms", file=sys.stderr, flush=True)
    finally:
        server.stop()
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """ebbcast's deliveries per CPU-second over each other variant's, same cell."""
    by_cell = {(r["variant"], r["subscribers"], r["window"]): r for r in rows}
    for row in rows:
        mine = by_cell.get(("ebbcast", row["subscribers"], row["window"]))
        if mine and row["deliveries_per_cpu_s"]:
            row["ebbcast_x"] = mine["deliveries_per_cpu_s"] / row["deliveries_per_cpu_s"]


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| variant | subscribers | window | delivered/s | deliveries/CPU-s | ebbcast x "
            "| p50 ms | p99 ms | server CPU | loadgen CPU | peak RSS MB | RSS/conn KB |")
    lines = [head, "|" + "---|" * 12]
    for r in sorted(rows, key=lambda r: (r["subscribers"], r["window"], r["variant"])):
        lines.append(
            f"| {r['variant']} | {r['subscribers']:,} | {r['window']} "
            f"| {r['delivered_per_s']:,.0f} | {r['deliveries_per_cpu_s']:,.0f} "
            f"| {r.get('ebbcast_x', 0):.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {r['server_cpu_share']:.2f} | {r['client_cpu_share']:.2f} "
            f"| {r['peak_rss_mb']:.0f} | {r['rss_per_conn_kb']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.8))
    windows = sorted({r["window"] for r in rows}, reverse=True)
    colors = {"ebbcast": "tab:blue", "ebbcast-json": "tab:purple",
              "tornado-naive": "tab:orange", "node-ws": "tab:green", "fastapi": "tab:red"}
    for variant in VARIANTS:
        for window, style in zip(windows, ("-", "--", ":", "-.")):
            points = sorted((r["subscribers"], r["deliveries_per_cpu_s"]) for r in rows
                            if r["variant"] == variant and r["window"] == window)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o",
                        color=colors.get(variant), label=f"{variant}, window {window}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("subscribers")
    ax.set_ylabel("deliveries per server CPU-second")
    ax.set_title("Broadcast fan-out: 1 publisher, 100-byte messages")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--subscribers", default="1000,5000,10000")
    parser.add_argument("--windows", default="2,16")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--out", type=Path, help="folder for the .md, .json and .png")
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="only redraw the PNG of an earlier run's JSON, beside it")
    args = parser.parse_args()
    if args.replot:
        return 0 if plot(json.loads(args.replot.read_text())["rows"],
                         args.replot.with_suffix(".png")) else 1
    if args.quick:
        args.subscribers, args.windows, args.duration = "20,50", "2", 0.5
    variants = [v for v in args.variants.split(",") if v]
    subscribers = [int(n) for n in args.subscribers.split(",")]
    windows = [int(w) for w in args.windows.split(",")]
    build_loadgen()
    if "node-ws" in variants:
        ensure_node_ws()
    started = datetime.datetime.now(datetime.timezone.utc)
    rows: list[dict[str, Any]] = []
    for n in subscribers:
        for variant in variants:
            rows.extend(run_cell(variant, n, windows, args.duration, args.size))
    add_ratios(rows)
    info = machine()
    command = "bench/run.py " + " ".join(sys.argv[1:])
    report = (f"# Fan-out benchmark, {started:%Y-%m-%d %H:%M} UTC\n\n"
              f"Machine: {info['cores']} cores, {info['cpu']}, Linux {info['kernel']}, "
              f"Python {info['python']}.\nCommand: `{command}`. 1 publisher, "
              f"{args.size}-byte messages, {args.duration:g} s measured per cell.\n\n"
              + table(rows) + "\n")
    print(report)
    if args.out:
        stem = save_results(args.out, "fanout", started, report,
                            {"command": command, "rows": rows})
        if plot(rows, stem.with_suffix(".png")):
            print(f"plot: {stem.with_suffix('.png')}")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
