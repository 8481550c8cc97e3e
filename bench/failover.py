"""Redis Sentinel failovers and Redis restarts, measured: what they cost
cross-instance delivery, and what they lose.

Usage (from the repository root, after `make test` has built .venv; needs Debian's
redis-server):

    .venv/bin/python bench/failover.py                      # 6 + 3 rounds, ~2 minutes
    .venv/bin/python bench/failover.py --out bench/results  # also write the .md and .json

Failovers: a Redis master, its replica and one sentinel (down-after-milliseconds
1000, quorum 1; tests/sentinels.py), two ebbcast instances on ``redis+sentinel://``
(A with one process, B with two workers), a publisher on A sending a numbered
message every 20 ms, a subscriber on B. Each round SIGKILLs the master; the
sentinel promotes the replica; the killed server is started again as a replica
of the new master, and the next round kills the new master.

Restarts: one plain redis-server (no persistence), the same two instances on
``redis://``, the same publisher and subscriber. Each round stops Redis, keeps it
away for ``--outage`` seconds, and starts it again on its port.

Reported per round: the time from the SIGKILL to the first message published
after it that reached B (for a restart: from Redis's start to the first message
that reached B), and the longest pause in B's stream. At the
end of each part: every message the publisher sent that B (or the publisher's own
connection, on A) never received, or received twice or out of order, and the
counters of what was not published (``ebbcast_backplane_dropped_total``: only
what overflows ``backplane.outage_buffer``) or missed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO / "tests")]

from harness import machine_line, save_results  # noqa: E402
from helpers import QUICK, DaemonProcess, RedisServer, metric, wait_for  # noqa: E402
from sentinels import (DOWN_AFTER_MS, Cluster, Publisher, Recorder,  # noqa: E402
                       assert_honest, fail_over)

PER_SECOND = 50  # the publisher's rate
S = TypeVar("S")


def serve(url: str, *args: str) -> DaemonProcess:
    return DaemonProcess(["serve", "--port", "0", "--admin-port", "0", *args],
                         env={**QUICK, "EBBCAST_BACKPLANE_URL": url}).wait_serving()


@contextlib.contextmanager
def stopped_after(server: S) -> Iterator[S]:
    """``server`` (a Redis set-up with a ``stop()``), stopped on the way out."""
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def instances(url: str) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    """A (one process) and B (two workers) on ``url``, killed on the way out."""
    one, two = serve(url), serve(url, "--workers", "2")
    try:
        yield one, two
    finally:
        for d in (one, two):
            d.kill()


def failovers(rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ebbcast-failover-") as tmp, \
            stopped_after(Cluster(Path(tmp))) as cluster, \
            instances(cluster.url) as (one, two):
        publisher, far = connected(one, two)
        results = []
        for _ in range(rounds):
            at_kill = publisher.sent
            killed_at = time.monotonic()
            pause = fail_over(cluster, publisher, far)
            first = far.first_after(at_kill)
            assert first is not None
            results.append(timings(first - killed_at, pause, "the SIGKILL"))
            killed = next(s for s in cluster.servers.values() if s.proc is None)
            killed.args = ["--replicaof", "127.0.0.1", str(cluster.current_master().port)]
            killed.start()
            wait_for(lambda: cluster.sentinel.replicas_in_sync() == 1, timeout=30)
        return outcome(results, publisher, far, one, two)


def restarts(rounds: int, outage: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ebbcast-restart-") as tmp, \
            stopped_after(RedisServer(Path(tmp))) as redis:
        redis.start()
        with instances(redis.url) as (one, two):
            publisher, far = connected(one, two)
            results = []
            for _ in range(rounds):
                stopped_at = time.monotonic()
                redis.stop()
                time.sleep(outage)  # the outage itself: the publisher goes on meanwhile
                redis.start()
                started_at, at_start = time.monotonic(), publisher.sent
                wait_for(lambda: far.first_after(at_start) is not None, timeout=60)
                arrivals = [at for at, f in list(far.frames) if f["type"] == "message"]
                pause = max(b - a for a, b in zip(arrivals, arrivals[1:]) if b > stopped_at)
                first = min(at for at in arrivals if at > started_at)
                results.append(timings(first - started_at, pause, "Redis was back"))
                for d in (one, two):
                    wait_for(lambda: metric(d, "ebbcast_backplane_up") == 1, timeout=60)
            return outcome(results, publisher, far, one, two)


def connected(one: DaemonProcess, two: DaemonProcess) -> tuple[Publisher, Recorder]:
    for d in (one, two):
        wait_for(lambda: metric(d, "ebbcast_backplane_up") == 1)
    publisher, far = Publisher(one.ws_url), Recorder(two.ws_url)
    wait_for(lambda: len(far.numbers()) >= 50)
    return publisher, far


def timings(first_s: float, pause: float, since: str) -> dict[str, float]:
    print(f"first cross-instance delivery {first_s:.2f} s after {since}, longest pause "
          f"{pause:.2f} s", flush=True)
    return {"first_delivery_s": first_s, "pause_s": pause}


def outcome(results: list[dict[str, float]], publisher: Publisher, far: Recorder,
            one: DaemonProcess, two: DaemonProcess) -> dict[str, Any]:
    last = publisher.stop()
    wait_for(lambda: last in far.numbers() and last in publisher.numbers(), timeout=60)
    assert_honest([publisher, far])
    data = {
        "rounds": results, "published": last,
        "across": losses(far.numbers(), last), "on_a": losses(publisher.numbers(), last),
        "dropped_on_publisher": metric(one, "ebbcast_backplane_dropped_total"),
        "missed_on_subscriber": metric(two, "ebbcast_backplane_missed_total"),
        "failovers_counted": [metric(d, "ebbcast_backplane_failovers_total")
                              for d in (one, two)],
        "epochs_seen": len(set(far.epochs())),
    }
    publisher.close()
    far.close()
    return data


def losses(numbers: list[int], last: int) -> dict[str, int]:
    """What a client missed of 1..last (from its first), saw twice, or out of order."""
    expected = set(range(numbers[0], last + 1))
    return {"lost": len(expected - set(numbers)), "repeated": len(numbers) - len(set(numbers)),
            "out_of_order": sum(1 for a, b in zip(numbers, numbers[1:]) if b < a)}


def report(data: dict[str, Any], what: str) -> str:
    first = [r["first_delivery_s"] for r in data["rounds"]]
    pause = [r["pause_s"] for r in data["rounds"]]
    across, on_a = data["across"], data["on_a"]
    return "\n".join([
        "| measure | value |", "|---|---|",
        f"| rounds ({what}) | {len(first)} |",
        f"| to the first cross-instance delivery, median / max | "
        f"{statistics.median(first):.2f} s / {max(first):.2f} s |",
        f"| longest pause in the subscriber's stream, median / max | "
        f"{statistics.median(pause):.2f} s / {max(pause):.2f} s |",
        f"| messages published ({PER_SECOND} a second) | {data['published']:,} |",
        f"| on the other instance (B): lost / repeated / out of order | "
        f"{across['lost']} / {across['repeated']} / {across['out_of_order']} |",
        f"| on the publisher's own connection (A): lost / repeated / out of order | "
        f"{on_a['lost']} / {on_a['repeated']} / {on_a['out_of_order']} |",
        f"| dropped on A (beyond the outage buffer), missed on B | "
        f"{data['dropped_on_publisher']:.0f}, {data['missed_on_subscriber']:.0f} |",
        f"| failovers counted by A, by B (two workers) | "
        f"{data['failovers_counted'][0]:.0f}, {data['failovers_counted'][1]:.0f} |",
        f"| epochs the subscriber was told of | {data['epochs_seen']} |",
        "| an (epoch, offset) naming two messages | none |"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="Sentinel failovers")
    parser.add_argument("--restarts", type=int, default=3, help="Redis restarts")
    parser.add_argument("--outage", type=float, default=3.0,
                        help="seconds Redis stays away in each restart")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = datetime.datetime.now()
    data = {"failovers": failovers(args.rounds) if args.rounds else None,
            "restarts": restarts(args.restarts, args.outage) if args.restarts else None}
    tables = []
    if data["failovers"]:
        tables.append("Sentinel failovers (the first delivery: after the SIGKILL):\n\n"
                      + report(data["failovers"], "SIGKILL of the master"))
    if data["restarts"]:
        tables.append("Redis restarts (the first delivery: after Redis was back):\n\n"
                      + report(data["restarts"], f"Redis away {args.outage:g} s"))
    table = "\n\n".join(tables)
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
