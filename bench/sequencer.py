"""What offsets cost: the sequencer's latency and CPU, before and after, in one run.

Usage (from the repository root, after `make test` has built .venv):

    git worktree add /tmp/ebbcast-before <commit without offsets>
    .venv/bin/python bench/sequencer.py --before /tmp/ebbcast-before --out bench/results

For each mode (one process; --workers 2; one process on Redis) and each code
(``before``: the package under ``--before``, run through PYTHONPATH; ``after``:
this checkout), ebbcast runs with the default JSON envelope, periodic frames off,
no inbound rate limit, and the C load generator measures two cells:

- latency: 50 subscribers, one publisher with one message in flight at a time
  (window 1), 100-byte messages; p50 and p99 from the send to each delivery.
  Before, a client's frame was delivered locally at once; after, it first gets
  its offset (from the main process over the relay link, or from Redis) and comes
  back: the difference is the sequencer's added latency.
- throughput: 10,000 subscribers, window 16; deliveries per server CPU-second,
  summed over the main process and its workers.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (Server, before_after_parser, build_loadgen, free_port, machine,
                     publisher_cell, save_results, wait_until)

MODES = {"one process": [], "2 workers": ["--workers", "2"], "redis": []}
CELLS = {"latency": (50, 1), "throughput": (10_000, 16)}


class Redis:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL)
        if not wait_until(self._up, 10):
            raise RuntimeError("redis-server did not start")

    def _up(self) -> bool:
        return subprocess.run(["redis-cli", "-p", str(self.port), "ping"],
                              capture_output=True).returncode == 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def measure(code: str, pythonpath: str | None, mode: str, redis: Redis | None,
            duration: float, cells: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    env = {"EBBCAST_BROADCAST_ENVELOPE": "json"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    if redis is not None:
        env["EBBCAST_BACKPLANE_URL"] = f"redis://127.0.0.1:{redis.port}/0"
    rows = []
    for cell, (subscribers, window) in cells.items():
        server = Server("ebbcast-json", env=env, args=MODES[mode]).start()
        try:
            time.sleep(0.5 if duration < 1 else 1.0)  # workers and the backplane settle
            measured = publisher_cell(server.port, server.pids(), subscribers, window,
                                      duration)
        finally:
            server.stop()
        rows.append({"code": code, "mode": mode, "cell": cell, "subscribers": subscribers,
                     "window": window, **measured})
        print(f"  {code:6} {mode:12} {cell:10} {rows[-1]['deliveries_per_cpu_s']:>12,.0f}"
              f"/cpu-s p50 {rows[-1]['p50_ms']:.2f} p99 {rows[-1]['p99_ms']:.2f} ms",
              file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| mode | cell | code | deliveries/CPU-s | p50 ms | p99 ms | errors |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['cell']} ({r['subscribers']:,} x window "
                     f"{r['window']}) | {r['code']} | {r['deliveries_per_cpu_s']:,.0f} "
                     f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |")
    return "\n".join(lines)


def main() -> int:
    parser = before_after_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=2, help="before/after alternations")
    args = parser.parse_args()
    cells = {"latency": (5, 1), "throughput": (20, 2)} if args.quick else CELLS
    if args.quick:
        args.rounds, args.duration = 1, 0.5
    build_loadgen()
    started = datetime.datetime.now(datetime.timezone.utc)
    before = str((args.before / "daemon").resolve())
    rows: list[dict[str, Any]] = []
    for mode in MODES:
        redis = Redis() if mode == "redis" else None
        try:
            for _ in range(args.rounds):  # alternate, so drift hits both alike
                rows += measure("before", before, mode, redis, args.duration, cells)
                rows += measure("after", None, mode, redis, args.duration, cells)
        finally:
            if redis is not None:
                redis.stop()
    head = git_head(args.before)
    text = (f"# Sequencer cost, {started:%Y-%m-%d %H:%M} UTC\n\n"
            f"Machine: {describe(machine())}.\n"
            f"Command: `bench/sequencer.py --before <{head}> --rounds {args.rounds}`. "
            f"JSON envelope; before = {head} (no offsets), after = {git_head(Path('.'))}.\n\n"
            + table(rows) + "\n")
    print(text)
    if args.out:
        save_results(args.out, "sequencer", started, text, {"rows": rows})
    return 0


def describe(facts: dict[str, Any]) -> str:
    return (f"{facts['cores']} cores, {facts['cpu']}, Linux {facts['kernel']}, "
            f"Python {facts['python']}")


def git_head(path: Path) -> str:
    return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or "?"


if __name__ == "__main__":
    os.environ.pop("PYTHONPATH", None)
    sys.exit(main())
