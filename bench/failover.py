"""Redis Sentinel failovers, measured: what a failover costs cross-instance delivery.

Usage (from the repository root, after `make test` has built .venv; needs Debian's
redis-server):

    .venv/bin/python bench/failover.py                      # 6 failovers, ~1 minute
    .venv/bin/python bench/failover.py --out bench/results  # also write the .md and .json

A Redis master, its replica and one sentinel (down-after-milliseconds 1000, quorum
1; tests/sentinels.py), two ebbcast instances on ``redis+sentinel://`` (A with one
process, B with two workers), a publisher on A sending a numbered message every
20 ms, a subscriber on B. Each round SIGKILLs the master; the sentinel promotes the
replica; the killed server is started again as a replica of the new master, and
the next round kills the new master. Reported per round: the time from the
SIGKILL to the first message published after it that reached B, and the longest
pause in B's stream of messages; at the end, the messages B never received (what
A could not sequence while there was no master, counted in A's
``ebbcast_backplane_dropped_total``), and checks that no client saw a number
twice or out of order and that no (epoch, offset) named two messages.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO / "tests")]

from harness import machine_line, save_results  # noqa: E402
from helpers import QUICK, DaemonProcess, metric, wait_for  # noqa: E402
from sentinels import (DOWN_AFTER_MS, Cluster, Publisher, Recorder,  # noqa: E402
                       assert_honest, fail_over)


def serve(url: str, *args: str) -> DaemonProcess:
    return DaemonProcess(["serve", "--port", "0", "--admin-port", "0", *args],
                         env={**QUICK, "EBBCAST_BACKPLANE_URL": url}).wait_serving()


def run(rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ebbcast-failover-") as tmp:
        cluster = Cluster(Path(tmp))
        one, two = serve(cluster.url), serve(cluster.url, "--workers", "2")
        try:
            for d in (one, two):
                wait_for(lambda: metric(d, "ebbcast_backplane_up") == 1)
            publisher, far = Publisher(one.ws_url), Recorder(two.ws_url)
            wait_for(lambda: len(far.numbers()) >= 50)
            results = []
            for _ in range(rounds):
                at_kill = publisher.sent
                killed_at = time.monotonic()
                pause = fail_over(cluster, publisher, far)
                first = far.first_after(at_kill)
                assert first is not None
                results.append({"first_delivery_s": first - killed_at, "pause_s": pause})
                print(f"failover {len(results)}: first cross-instance delivery "
                      f"{first - killed_at:.2f} s after the SIGKILL, longest pause "
                      f"{pause:.2f} s", flush=True)
                killed = next(s for s in cluster.servers.values() if s.proc is None)
                killed.args = ["--replicaof", "127.0.0.1", str(cluster.current_master().port)]
                killed.start()
                wait_for(lambda: cluster.sentinel.replicas_in_sync() == 1, timeout=30)
            last = publisher.stop()
            wait_for(lambda: last in far.numbers() and last in publisher.numbers())
            assert_honest([publisher, far])
            missing = sorted(set(range(1, last + 1)) - set(far.numbers()))
            first_seen = far.numbers()[0]
            missing = [n for n in missing if n > first_seen]
            data = {
                "rounds": results, "published": last, "not_received_across": len(missing),
                "dropped_on_publisher": metric(one, "ebbcast_backplane_dropped_total"),
                "missed_on_subscriber": metric(two, "ebbcast_backplane_missed_total"),
                "failovers_counted": [metric(d, "ebbcast_backplane_failovers_total")
                                      for d in (one, two)],
                "epochs_seen": len(set(far.epochs())),
            }
            publisher.close()
            far.close()
            return data
        finally:
            for d in (one, two):
                d.kill()
            cluster.stop()


def report(data: dict[str, Any]) -> str:
    first = [r["first_delivery_s"] for r in data["rounds"]]
    pause = [r["pause_s"] for r in data["rounds"]]
    per_second = 50
    return "\n".join([
        "| measure | value |", "|---|---|",
        f"| failovers (SIGKILL of the master) | {len(first)} |",
        f"| SIGKILL to the first cross-instance delivery, median / max | "
        f"{statistics.median(first):.2f} s / {max(first):.2f} s |",
        f"| longest pause in the subscriber's stream, median / max | "
        f"{statistics.median(pause):.2f} s / {max(pause):.2f} s |",
        f"| messages published ({per_second} a second) | {data['published']:,} |",
        f"| not received on the other instance | {data['not_received_across']} |",
        f"| counted as not sequenced on the publisher's instance (dropped) | "
        f"{data['dropped_on_publisher']:.0f} |",
        f"| failovers counted by A, by B (two workers) | "
        f"{data['failovers_counted'][0]:.0f}, {data['failovers_counted'][1]:.0f} |",
        f"| epochs the subscriber was told of | {data['epochs_seen']} |",
        "| a number seen twice or out of order; an (epoch, offset) naming two messages | "
        "none |"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = datetime.datetime.now()
    data = run(args.rounds)
    table = report(data)
    print(table)
    if args.out:
        text = (f"# Sentinel failovers ({started:%Y-%m-%d %H:%M} UTC)\n\n{machine_line()}; "
                f"redis-server 7.0 (Debian), sentinel down-after-milliseconds "
                f"{DOWN_AFTER_MS}.\n"
                f"Command: `bench/failover.py --out bench/results`.\n\n{__doc__}\n{table}\n")
        stem = save_results(args.out, "failover", started, text, data)
        print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
