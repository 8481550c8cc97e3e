"""Where an idle connection's memory goes: RSS, Python objects and allocation sites.

Usage (from the repository root, after `make test` has built .venv):

    .venv/bin/python bench/memory.py --out bench/results   # 10,000 idle clients, ~30 s
    .venv/bin/python bench/memory.py --quick               # a smoke run

The daemon runs in this process (one serving process on its own, the JSON
envelope, periodic frames off), so tracemalloc and the garbage collector can be
asked directly; the C load generator opens CONNECTIONS idle WebSocket clients
from a subprocess and holds them. Three views, each divided by the number of
connections:

- RSS: VmRSS with the clients connected minus before (tracemalloc's own overhead
  is kept out: it is started only after the RSS is read).
- Python objects: how many objects of each type the collector tracks, and their
  ``sys.getsizeof``, with the clients connected minus before (containers and
  instances only: the collector does not track str, bytes or int).
- Allocation sites: tracemalloc's bytes by file and line (the innermost frame),
  for the memory allocated while the clients connected and still held.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import gc
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))

from harness import LOADGEN, build_loadgen, machine, rss_bytes, save_results

from ebbcast.config import load_config
from ebbcast.process.notify import SystemdNotifier
from ebbcast.process.roles import Standalone
from ebbcast.serving.process import Daemon

SETTINGS = {"server.port": "0", "admin.port": "0", "broadcast.periodic_interval": "0",
            "keepalive.ping_interval": "0"}


def type_census() -> collections.Counter[str]:
    gc.unfreeze()  # the daemon freezes long-lived objects (gcpolicy.py): count them too
    counts: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        counts[type(obj).__qualname__] += 1
    return counts


def type_sizes() -> collections.Counter[str]:
    gc.unfreeze()
    sizes: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        sizes[type(obj).__qualname__] += sys.getsizeof(obj)
    return sizes


async def measure(connections: int) -> dict[str, Any]:
    config = load_config(None, env={}, overrides=SETTINGS)
    daemon = Daemon(config, lambda: config, Standalone(SystemdNotifier(), config),
                    handle_signals=False)
    task = asyncio.ensure_future(daemon.run())
    await asyncio.wait_for(daemon.serving.wait(), 10)
    port = daemon.urls["ws"].rsplit(":", 1)[1].split("/")[0]
    gc.collect()
    counts_before, sizes_before = type_census(), type_sizes()
    rss_before = rss_bytes(os.getpid())
    loadgen = await asyncio.create_subprocess_exec(
        str(LOADGEN), "--host", "127.0.0.1", "--port", port, "--path", "/ws", "--idle",
        "--subscribers", str(connections), "--publishers", "0", "--duration", "600",
        "--quiet", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    registry = daemon.ctx.registry
    while len(registry) < connections:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # welcome frames written, buffers settled
    gc.collect()
    rss_after = rss_bytes(os.getpid())
    counts_after, sizes_after = type_census(), type_sizes()
    # allocation sites: a second wave of the same size, traced from the start
    loadgen.terminate()
    await loadgen.wait()
    while len(registry):
        await asyncio.sleep(0.1)
    gc.collect()
    tracemalloc.start(1)
    traced_before = tracemalloc.take_snapshot()
    loadgen = await asyncio.create_subprocess_exec(
        str(LOADGEN), "--host", "127.0.0.1", "--port", port, "--path", "/ws", "--idle",
        "--subscribers", str(connections), "--publishers", "0", "--duration", "600",
        "--quiet", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    while len(registry) < connections:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    gc.collect()
    traced_after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    loadgen.terminate()
    await loadgen.wait()
    daemon.record_signal(signal.SIGTERM)
    daemon.record_signal(signal.SIGTERM)  # the second closes whatever is left at once
    await asyncio.wait_for(task, 20)
    sites = [(str(stat.traceback[0]), stat.size_diff / connections, stat.count_diff / connections)
             for stat in traced_after.compare_to(traced_before, "lineno")[:25]]
    types = sorted(((name, (counts_after[name] - counts_before[name]) / connections,
                     (sizes_after[name] - sizes_before[name]) / connections)
                    for name in counts_after), key=lambda row: -row[2])[:25]
    return {"connections": connections, "rss_per_conn_bytes": (rss_after - rss_before) /
            connections, "types": types, "sites": sites,
            "traced_per_conn_bytes": sum(s.size_diff for s in traced_after.compare_to(
                traced_before, "filename")) / connections}


def report(result: dict[str, Any], started: Any) -> str:
    facts = machine()
    n = result["connections"]
    lines = [f"# Memory per idle connection, {started:%Y-%m-%d %H:%M} UTC", "",
             f"Machine: {facts['cores']} cores, {facts['cpu']}, Linux {facts['kernel']}, "
             f"Python {facts['python']}.",
             f"Command: `bench/memory.py --connections {n}`. One serving process, the "
             "JSON envelope, pings and periodic frames off.", "",
             f"- RSS per connection: **{result['rss_per_conn_bytes'] / 1024:.1f} KB**",
             f"- traced by tracemalloc per connection (Python's allocations): "
             f"{result['traced_per_conn_bytes'] / 1024:.1f} KB", "",
             "## Objects the collector tracks, per connection (by getsizeof)", "",
             "| type | objects | bytes |", "|---|---|---|"]
    lines += [f"| `{name}` | {count:.2f} | {size:,.0f} |"
              for name, count, size in result["types"] if size > 0 or count > 0]
    lines += ["", "## Allocation sites, per connection (tracemalloc, innermost frame)", "",
              "| site | bytes | blocks |", "|---|---|---|"]
    lines += [f"| `{site.replace(str(Path(sys.prefix)), '')}` | {size:,.0f} | {count:.2f} |"
              for site, size, count in result["sites"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.connections = 50
    build_loadgen()
    started = datetime.datetime.now(datetime.timezone.utc)
    result = asyncio.run(measure(args.connections))
    text = report(result, started)
    print(text)
    if args.out:
        save_results(args.out, "memory", started, text, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
