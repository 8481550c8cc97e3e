"""Upgrades without downtime, measured: 10 upgrades in a row under load.

Usage (from the repository root, after `make test` has built .venv):

    .venv/bin/python bench/upgrade.py                      # 1,000 clients, ~1 minute
    .venv/bin/python bench/upgrade.py --out bench/results  # also write the .md and .json

For `--workers 1` and `--workers 2`, a fresh `ebbcast serve` gets 1,000 held clients
that move on every shutdown frame (make before break, as the page and `ebbcast
client --reconnect` do) and a hammer that opens, handshakes, reads the welcome and
closes connections at 250 a second (paced; the rate achieved is reported)
throughout. Then 10 upgrades (SIGUSR2), each once
the clients have all moved to the previous one. Reported: handshakes attempted and
failed (refused, reset, an HTTP error, a timeout), the time from SIGUSR2 until the
main process logs that the new generation serves, and the time from then until
the last of the 1,000 clients has moved (which `shutdown.upgrade_spread` bounds;
set to 5 s here). The same scenario, with a 1 s spread, is a test
(`tests/process/test_upgrade_load.py`) that asserts no handshake fails.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO / "tests")]

from harness import machine, save_results  # noqa: E402
from helpers import DaemonProcess, set_open_files_limit  # noqa: E402
from wsload import upgrades_under_load  # noqa: E402

ENV = {"EBBCAST_BROADCAST_PERIODIC_INTERVAL": "0", "EBBCAST_LIMITS_MESSAGES_PER_SECOND": "0",
       "EBBCAST_KEEPALIVE_PING_INTERVAL": "60s"}


def run(workers: int, clients: int, upgrades: int, rate: float, spread: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as rundir:
        daemon = DaemonProcess(["serve", "--port", "0", "--admin-port", "0", "--workers",
                                str(workers), "--drain-timeout", "5m"],
                               env={**ENV, "EBBCAST_SHUTDOWN_UPGRADE_SPREAD": spread,
                                    "RUNTIME_DIRECTORY": rundir}).wait_serving()
        try:
            rounds, hammer, held = asyncio.run(upgrades_under_load(
                daemon, clients, upgrades, rate, move_timeout=120.0))
        finally:
            daemon.kill()
    return {
        "workers": workers, "clients": clients, "upgrades": upgrades, "rate": rate,
        "spread": spread, "handshakes": hammer.attempts, "failed": len(hammer.failures),
        "hammer_seconds": round(hammer.seconds, 2),
        "achieved_rate": round(hammer.achieved_rate, 1),
        "failures": hammer.failures[:20], "moves": len(held.moves),
        "move_failures": len(held.failures), "unexpected_closes": held.unexpected_closes,
        "rounds": [vars(r) for r in rounds],
    }


def report(results: list[dict[str, Any]]) -> str:
    lines = ["| workers | handshakes (hammer) | per second | failed | client moves | "
             "failed moves | "
             "SIGUSR2 to serving, median / max | all clients moved, median / max |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ready = [x["ready_seconds"] for x in r["rounds"]]
        moved = [x["moved_seconds"] for x in r["rounds"]]
        lines.append(
            f"| {r['workers']} | {r['handshakes']:,} | {r['achieved_rate']:.0f} | {r['failed']} | "
            f"{r['moves']:,} | "
            f"{r['move_failures'] + r['unexpected_closes']} | "
            f"{statistics.median(ready):.2f} s / {max(ready):.2f} s | "
            f"{statistics.median(moved):.2f} s / {max(moved):.2f} s |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--upgrades", type=int, default=10)
    parser.add_argument("--rate", type=float, default=250.0)
    parser.add_argument("--spread", default="5s")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    set_open_files_limit()
    started = datetime.datetime.now()
    results = [run(workers, args.clients, args.upgrades, args.rate, args.spread)
               for workers in (1, 2)]
    table = report(results)
    print(table)
    if args.out:
        box = machine()
        text = (f"# Upgrades under load ({started:%Y-%m-%d %H:%M} UTC)\n\n"
                f"Machine: {box['cores']} cores, {box['cpu']}, Linux {box['kernel']}, "
                f"Python {box['python']}. The daemon, the 1,000 clients and the hammer share "
                f"the same cores.\nCommand: `bench/upgrade.py --out bench/results`.\n\n"
                f"{__doc__}\n{table}\n\n"
                "Per upgrade (generation: SIGUSR2 to serving + until every client moved, "
                "hammer handshakes completed meanwhile):\n\n" + "\n".join(
                    f"- workers {r['workers']}: " + ", ".join(
                        f"{x['generation']}: {x['ready_seconds']:.2f} + "
                        f"{x['moved_seconds']:.2f} s ({x['handshakes']})"
                        for x in r["rounds"]) for r in results) + "\n")
        stem = save_results(args.out, "upgrade", started, text, {"results": results})
        print(f"wrote {stem}.md and .json")
    return 0 if all(r["failed"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
