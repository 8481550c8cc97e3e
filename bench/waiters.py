"""What resumes from the future cost later broadcasts: before and after, in one run.

Usage (from the repository root, after `make test` has built .venv):

    git worktree add /tmp/ebbcast-before <a commit before the waiter fix>
    .venv/bin/python bench/waiters.py --before /tmp/ebbcast-before --out bench/results

A handshake ``/ws?since=<latest + 10^15>&epoch=<current>`` asks for an offset this
process has not reached: it waits up to a second for it, then is answered. Before
the fix, each wait that timed out left its waiter in a list that every delivered
broadcast walks, for good. For each code (``before``: the package under
``--before``, through PYTHONPATH; ``after``: this checkout), one ebbcast process
(JSON envelope, periodic frames off, no inbound rate limit) is measured three
times with the C load generator, 50 subscribers and one publisher with one message
in flight (p50/p99 from the send to each delivery, deliveries per server
CPU-second): fresh; after RESUMES such handshakes (sent BATCH at a time, each
answered before the next batch); and after as many again.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (Server, before_after_parser, build_loadgen, machine, publisher_cell,
                     save_results)
from sequencer import describe, git_head

RESUMES, BATCH = 5_000, 1_000
AHEAD = 10**15


async def resume_from_the_future(port: int, count: int, batch: int) -> Counter[str]:
    """``count`` handshakes asking for an offset far ahead; their status codes."""
    epoch, latest = await position(port)
    statuses: Counter[str] = Counter()

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /ws?since={latest + AHEAD}&epoch={epoch} HTTP/1.1\r\n"
                     f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 30)
        statuses[line.split(b" ")[1].decode() if line else "closed"] += 1
        writer.close()

    for start in range(0, count, batch):
        await asyncio.gather(*(one() for _ in range(min(batch, count - start))))
    return statuses


async def position(port: int) -> tuple[str, int]:
    """The epoch and latest offset a welcome names."""
    from websockets.asyncio.client import connect

    async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
        welcome = json.loads(await ws.recv())
    return welcome["epoch"], welcome["offset"]


def measure(code: str, pythonpath: str | None, resumes: int, batch: int, duration: float,
            subscribers: int) -> list[dict[str, Any]]:
    env = {"EBBCAST_BROADCAST_ENVELOPE": "json"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    server = Server("ebbcast-json", env=env).start()
    rows = []
    try:
        done = 0
        for stage in range(3):
            statuses: Counter[str] = Counter()
            if stage:
                statuses = asyncio.run(resume_from_the_future(server.port, resumes, batch))
                done += resumes
            rows.append({"code": code, "resumes_so_far": done, "statuses": dict(statuses),
                         **publisher_cell(server.port, [server.pid], subscribers, 1,
                                          duration)})
            r = rows[-1]
            print(f"  {code:6} after {done:>6,} resumes: {r['deliveries_per_cpu_s']:>9,.0f}"
                  f"/cpu-s p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms {dict(statuses)}",
                  file=sys.stderr, flush=True)
    finally:
        server.stop()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| code | timed-out resumes so far | their answers | deliveries/CPU-s "
             "| p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        answers = ", ".join(f"{n:,} x {s}" for s, n in sorted(r["statuses"].items())) or "-"
        lines.append(f"| {r['code']} | {r['resumes_so_far']:,} | {answers} "
                     f"| {r['deliveries_per_cpu_s']:,.0f} | {r['p50_ms']:.2f} "
                     f"| {r['p99_ms']:.2f} | {r['errors']} |")
    return "\n".join(lines)


def main() -> int:
    parser = before_after_parser(__doc__)
    args = parser.parse_args()
    resumes, batch, subscribers = (20, 10, 5) if args.quick else (RESUMES, BATCH, 50)
    if args.quick:
        args.duration = 0.5
    build_loadgen()
    started = datetime.datetime.now(datetime.timezone.utc)
    before = str((args.before / "daemon").resolve())
    rows = measure("before", before, resumes, batch, args.duration, subscribers)
    rows += measure("after", None, resumes, batch, args.duration, subscribers)
    head = git_head(args.before)
    text = (f"# Resumes from the future and the broadcasts after them, "
            f"{started:%Y-%m-%d %H:%M} UTC\n\n"
            f"Machine: {describe(machine())}.\n"
            f"Command: `bench/waiters.py --before <{head}>`. One process, JSON envelope, "
            f"{subscribers} subscribers x window 1, {args.duration:g} s a cell; "
            f"{resumes:,} handshakes `?since=<latest + 10^15>` between cells, "
            f"{batch:,} at a time; before = {head}, after = {git_head(Path('.'))}.\n\n"
            + table(rows) + "\n")
    print(text)
    if args.out:
        save_results(args.out, "waiters", started, text, {"rows": rows})
    return 0


if __name__ == "__main__":
    os.environ.pop("PYTHONPATH", None)
    sys.exit(main())
