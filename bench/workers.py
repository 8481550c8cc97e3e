"""Broadcast throughput of ebbcast with --workers 1 against --workers 2 (or more).

Usage (from the repository root, after `make test` has built .venv):

    .venv/bin/python bench/workers.py                      # the full matrix, a few minutes
    .venv/bin/python bench/workers.py --quick              # a smoke run: tiny sizes, seconds
    .venv/bin/python bench/workers.py --out bench/results  # also write the .md and .json

Every (workers, subscribers) pair starts a fresh `ebbcast serve --workers N`, and for
each window the C load generator (bench/loadgen/wsbench) connects the subscribers and
--publishers publishers, each keeping WINDOW 100-byte messages in flight. With
workers, the kernel spreads the connections over the workers (SO_REUSEPORT), and a
frame a publisher sends to one worker reaches the others through the main process.

Server CPU is the sum over the main process and its worker children: wsbench reads
every pid (a comma list to --server-pid) at the start and end of its measured window.
The whole run (ramp-up and warm-up included) is also read here, per process, and the
CPU time the rest of the machine used meanwhile is kept as a noise indicator. The
per-worker connection split comes from the admin /status while the load runs, and
the workers holding the publishers from `ss` (the sockets that received the most).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (CLOCK_TICKS, Server, build_loadgen, cpu_seconds, machine, run_loadgen,
                     save_results, wait_until)

SIZE = 100
WARMUP = 1.0


# -- processes -------------------------------------------------------------------


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each process still running (a restarted worker is left out)."""
    seconds = {}
    for pid in pids:
        try:
            seconds[pid] = cpu_seconds(pid)
        except OSError:
            pass
    return seconds


class MachineCPU:
    """A reading of the whole machine's CPU accounting (/proc/stat), to subtract.

    The busy time of an interval is wall time x online CPUs minus the idle, iowait
    and steal time /proc/stat gained meanwhile. Summing its user + nice + system +
    irq + softirq fields instead (what this script did before) undercounts: on a
    tick-accounted kernel (CONFIG_TICK_CPU_ACCOUNTING, NO_HZ) those fields are
    sampled at the 250 Hz tick, and a CPU that wakes, works for less than a tick
    and goes idle again is often never sampled busy, whereas idle time is measured
    exactly when a CPU leaves idle and /proc/PID/stat is scaled to the scheduler's
    exact runtime. In this benchmark's rows the tick fields came out 0.1 to 0.3
    CPU-s (1 to 2.5%) under the exact figure, more than the real "other" at 1,000
    subscribers, which made "other CPU-s" negative.
    """

    def __init__(self) -> None:
        lines = Path("/proc/stat").read_text().splitlines()
        self.at = time.monotonic()
        fields = [int(v) for v in lines[0].split()[1:]]
        idle, iowait, steal = fields[3], fields[4], fields[7] if len(fields) > 7 else 0
        self.unused = (idle + iowait + steal) / CLOCK_TICKS
        self.cpus = sum(1 for line in lines if re.match(r"cpu\d+ ", line))

    def busy_since(self, earlier: MachineCPU) -> float:
        """CPU seconds every task, interrupt and kernel thread used in between."""
        return (self.at - earlier.at) * self.cpus - (self.unused - earlier.unused)


def wait_quiet(limit: float, threshold: float = 0.15) -> float:
    """Wait up to ``limit`` seconds for a second in which the machine uses under
    ``threshold`` cores (other jobs sharing it); return the last second's cores."""
    deadline = time.monotonic() + limit
    while True:
        start = MachineCPU()
        time.sleep(1)
        end = MachineCPU()
        cores = end.busy_since(start) / (end.at - start.at)
        if cores < threshold or time.monotonic() >= deadline:
            return cores


def own_seconds() -> float:
    """CPU time of this script and of the children it has waited for (wsbench, ss)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def is_ebbcast(pid: int) -> bool:
    try:
        return b"ebbcast" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop(server: Server, pids: list[int]) -> None:
    """Stop the daemon, then make sure none of its workers outlives it."""
    server.stop()
    leftovers = [pid for pid in pids[1:] if is_ebbcast(pid)]
    if leftovers and not wait_until(lambda: not any(map(is_ebbcast, leftovers)), 10):
        for pid in leftovers:
            if is_ebbcast(pid):
                print(f"  killing leftover worker {pid}", file=sys.stderr)
                os.kill(pid, signal.SIGKILL)


# -- admin endpoint and sockets --------------------------------------------------


def metric_total(server: Server, name: str) -> float:
    """The sum of every sample of one metric family in /metrics."""
    total = 0.0
    for line in server.admin_get("/metrics").splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def publisher_split(port: int, publishers: int) -> dict[int, int]:
    """pid -> publishers it serves: the ``publishers`` server sockets that have
    received the most bytes (subscribers send only their handshake)."""
    done = subprocess.run(["ss", "-tnpiH", "state", "established", f"( sport = :{port} )"],
                          capture_output=True, text=True, timeout=30)
    sockets = []
    for entry in re.split(r"\n(?=\S)", done.stdout):
        owner = re.search(r"pid=(\d+)", entry)
        received = re.search(r"bytes_received:(\d+)", entry)
        if owner:
            sockets.append((int(received.group(1)) if received else 0, int(owner.group(1))))
    split: dict[int, int] = {}
    for _, pid in sorted(sockets, reverse=True)[:publishers]:
        split[pid] = split.get(pid, 0) + 1
    return split


class Sampler(threading.Thread):
    """Polls /status while wsbench runs: keeps the fullest per-worker connection
    split; once every connection is up, finds where the publishers landed, then
    reads each process's CPU over (about) wsbench's measured window."""

    def __init__(self, server: Server, pids: list[int], expected: int, publishers: int,
                 duration: float) -> None:
        super().__init__(daemon=True)
        self.server, self.pids, self.expected = server, pids, expected
        self.publishers, self.duration = publishers, duration
        self.split: dict[int, int] = {}
        self.pub_split: dict[int, int] = {}
        self.cores: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            try:
                workers = json.loads(self.server.admin_get("/status"))["workers"]
            except (OSError, ValueError):
                continue
            split = {w["pid"]: w["connections"] for w in workers}
            if sum(split.values()) > sum(self.split.values()):
                self.split = split
            if sum(split.values()) >= self.expected:
                self._loaded(time.monotonic())
                return

    def _loaded(self, connected: float) -> None:
        """Every connection is up: wsbench warms up for 1 s, then measures."""
        if self.done.wait(0.3):  # let the publishers send a few frames first
            return
        self.pub_split = publisher_split(self.server.port, self.publishers)
        if self.done.wait(max(0.0, connected + WARMUP + 0.2 - time.monotonic())):
            return
        start, began = cpu_by_pid(self.pids), time.monotonic()
        if self.done.wait(max(0.1, self.duration - 0.4)):
            return
        elapsed = time.monotonic() - began
        end = cpu_by_pid(self.pids)
        self.cores = {pid: (end[pid] - start[pid]) / elapsed
                      for pid in self.pids if pid in start and pid in end}


# -- one measurement -------------------------------------------------------------


def measure(server: Server, workers: int, subscribers: int, window: int, publishers: int,
            duration: float, quiet_wait: float) -> dict[str, Any]:
    pids = server.pids()
    idle_cores = wait_quiet(quiet_wait) if quiet_wait > 0 else -1.0
    dropped = metric_total(server, "ebbcast_backplane_dropped_total")
    sampler = Sampler(server, pids, subscribers + publishers, publishers, duration)
    # The three readings are taken back to back (well under a millisecond apart), at
    # both ends, so all of "other" covers the same interval: the whole wsbench run.
    machine_before, before, own = MachineCPU(), cpu_by_pid(pids), own_seconds()
    sampler.start()
    try:
        result = run_loadgen(
            server.port, "--subscribers", str(subscribers), "--publishers", str(publishers),
            "--window", str(window), "--size", str(SIZE), "--duration", str(duration),
            "--warmup", str(WARMUP), "--poll-us", "1000",
            "--server-pid", ",".join(map(str, pids)), "--quiet")
    finally:
        sampler.done.set()
        sampler.join(30)
    machine_after, after, own = MachineCPU(), cpu_by_pid(pids), own_seconds() - own
    busy = machine_after.busy_since(machine_before)
    run_cpu = {pid: after[pid] - before[pid] for pid in pids if pid in before and pid in after}
    return row(workers, subscribers, window, publishers, result, pids, run_cpu,
               busy=busy, own=own, sampler=sampler,
               dropped=metric_total(server, "ebbcast_backplane_dropped_total") - dropped,
               restarted=server.pids() != pids) | {"busy_cores_before": idle_cores}


def row(workers: int, subscribers: int, window: int, publishers: int, result: dict[str, Any],
        pids: list[int], run_cpu: dict[int, float], busy: float, own: float,
        sampler: Sampler, dropped: float, restarted: bool) -> dict[str, Any]:
    """One table row from wsbench's JSON and the readings around it.

    Other CPU-s = the machine's busy time over the wsbench run minus the server's
    processes and this script with its children (wsbench, ss) over the same run.
    Each piece is rounded to a clock tick (10 ms) per process, so a few hundredths
    below zero is rounding: the table shows max(0, other); the JSON keeps the raw
    value and the pieces, and a value below -0.1 CPU-s is listed under Problems.
    """
    cpu = result.get("server_cpu_s", -1.0)  # absent if a pid vanished mid-run
    other = busy - own - sum(run_cpu.values())
    served = pids[1:] or pids
    return {
        "workers": workers, "subscribers": subscribers, "window": window,
        "publishers": publishers, "size": SIZE,
        "delivered_per_s": result["delivered_per_s"],
        "server_cpu_s": cpu, "server_cores": result.get("server_cpu_share", -1.0),
        "deliveries_per_cpu_s": result["delivered"] / cpu if cpu > 0 else 0.0,
        "p50_ms": result["latency_us"]["p50"] / 1000,
        "p99_ms": result["latency_us"]["p99"] / 1000,
        "loadgen_cores": result["client_cpu_share"],
        "connection_split": [sampler.split.get(pid, 0) for pid in served],
        "publisher_split": [sampler.pub_split.get(pid, 0) for pid in served],
        "cores_by_process": [round(sampler.cores.get(pid, -1.0), 2) for pid in pids],
        "pids": pids,
        "run_cpu_s_by_pid": {str(pid): round(s, 3) for pid, s in run_cpu.items()},
        "machine_busy_cpu_s": round(busy, 3), "script_and_loadgen_cpu_s": round(own, 3),
        "other_cpu_s": round(max(0.0, other), 3), "other_cpu_s_raw": round(other, 3),
        "backplane_dropped": dropped, "window_resets": result["window_resets"],
        "worker_restarted": restarted,
        "errors": result["errors"], "error_detail": result["error_detail"],
        "wsbench": result,
    }


def run_cell(workers: int, subscribers: int, windows: list[int], publishers: int,
             duration: float, quiet_wait: float) -> list[dict[str, Any]]:
    """One daemon, every window at this subscriber count."""
    server = Server("ebbcast", args=["--workers", str(workers)]).start()
    pids = server.pids()
    rows = []
    try:
        for window in windows:
            rows.append(measure(server, workers, subscribers, window, publishers, duration,
                                quiet_wait))
            r = rows[-1]
            print(f"  workers={workers} N={subscribers:<6} W={window:<3} "
                  f"{r['delivered_per_s']:>12,.0f}/s cpu {r['server_cores']:.2f} "
                  f"p99 {r['p99_ms']:.1f} ms split {r['connection_split']} "
                  f"pubs {r['publisher_split']} cores {r['cores_by_process']}",
                  file=sys.stderr, flush=True)
    finally:
        stop(server, pids)
    return rows


# -- report ----------------------------------------------------------------------


def split_text(values: list[int]) -> str:
    return "/".join(f"{v:,}" for v in values)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| workers | subscribers | window | delivered/s | server CPU (cores used) "
            "| deliveries per CPU-s | p50 ms | p99 ms | connection split "
            "| publishers per worker | cores main/workers | loadgen CPU (cores) "
            "| other CPU-s |")
    lines = [head, "|" + "---|" * 13]
    for r in sorted(rows, key=lambda r: (r["subscribers"], r["window"], r["workers"])):
        lines.append(
            f"| {r['workers']} | {r['subscribers']:,} | {r['window']} "
            f"| {r['delivered_per_s']:,.0f} | {r['server_cores']:.2f} "
            f"| {r['deliveries_per_cpu_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {split_text(r['connection_split'])} | {split_text(r['publisher_split'])} "
            f"| {'/'.join(f'{c:.2f}' for c in r['cores_by_process'])} "
            f"| {r['loadgen_cores']:.2f} | {r['other_cpu_s']:.1f} |")
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Per (subscribers, window): each worker count's delivered/s over the first one's."""
    cells = {(r["workers"], r["subscribers"], r["window"]): r for r in rows}
    base = min(r["workers"] for r in rows)
    lines = []
    for (workers, n, window), r in sorted(cells.items(), key=lambda kv: kv[0][1:] + kv[0][:1]):
        ref = cells.get((base, n, window))
        if workers == base or not ref or not ref["delivered_per_s"]:
            continue
        per_cpu = (r["deliveries_per_cpu_s"] / ref["deliveries_per_cpu_s"]
                   if ref["deliveries_per_cpu_s"] else 0.0)
        lines.append(f"- {n:,} subscribers, window {window}: delivered/s {workers} workers / "
                     f"{base} worker = {r['delivered_per_s'] / ref['delivered_per_s']:.2f} "
                     f"(deliveries per CPU-s: {per_cpu:.2f})")
    return lines


def problems(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        where = f"workers={r['workers']} N={r['subscribers']} W={r['window']}"
        if r["errors"]:
            out.append(f"- {where}: {r['errors']} wsbench errors {r['error_detail']}")
        if r["window_resets"] or r["backplane_dropped"]:
            out.append(f"- {where}: window_resets {r['window_resets']}, "
                       f"backplane_dropped {r['backplane_dropped']:.0f}")
        if r.get("other_cpu_s_raw", 0.0) < -0.1:
            out.append(f"- {where}: other CPU-s {r['other_cpu_s_raw']:.2f} (accounting "
                       "mismatch: the processes used more CPU than the machine was busy)")
        if r["worker_restarted"] or r["server_cpu_s"] < 0:
            out.append(f"- {where}: a server process changed during the run")
    return out


def report(args: argparse.Namespace, started: datetime.datetime,
           rows: list[dict[str, Any]]) -> str:
    info = machine()
    command = "bench/workers.py " + " ".join(sys.argv[1:])
    notes = problems(rows)
    return (
        f"# ebbcast --workers benchmark, {started:%Y-%m-%d %H:%M} UTC\n\n"
        f"Machine: {info['cores']} cores, {info['cpu']}, Linux {info['kernel']}, "
        f"Python {info['python']}.\nCommand: `{command}`. {args.publishers} publishers, "
        f"{SIZE}-byte messages, {args.duration:g} s measured per row, raw envelope.\n\n"
        f"**Limitation:** this machine has {info['cores']} cores, and the load generator "
        "(one process, itself about a core at high rates: see the loadgen CPU column) runs "
        "on the same cores as the daemon's main process and workers. With 2 workers the "
        "server and the client compete for the CPUs, so this measures scaling on a "
        "saturated 2-core box, not what 2 workers give with spare cores.\n\n"
        "Server CPU: main process + workers over wsbench's measured window (cores used "
        "= CPU-s / measured s); deliveries per CPU-s use the same window. With 1 worker "
        "there is no main/worker split: the single process serves (`--workers 1`). "
        "Connection split: connections per worker, from the admin /status while loaded. "
        "Publishers per worker: where the publishing connections landed (kernel "
        "SO_REUSEPORT hash, so it changes from run to run). Cores main/workers: each "
        "process's CPU over about the measured window (main first). Other CPU-s: CPU "
        "the rest of the machine used during the whole wsbench run (kernel threads "
        "such as ksoftirqd handling loopback traffic and connection teardown, and any "
        "other job): wall time x CPUs minus the idle, iowait and steal time of "
        "/proc/stat, minus the server's processes, wsbench and this script, all read "
        "at the same two instants; shown as 0.0 when rounding makes it slightly "
        "negative. Each row starts only after a second with the machine under 0.15 "
        "cores busy (`--quiet-wait`).\n\n"
        + table(rows) + "\n\nRatios (same run):\n\n" + "\n".join(ratios(rows)) + "\n"
        + ("\nProblems:\n\n" + "\n".join(notes) + "\n" if notes else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--subscribers", default="1000,5000,10000")
    parser.add_argument("--windows", default="2,16")
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--workers", default="1,2", help="worker counts to compare")
    parser.add_argument("--quiet-wait", type=float, default=60.0, metavar="S",
                        help="before each row, wait up to S s for other jobs on the "
                             "machine to go quiet (0: do not wait)")
    parser.add_argument("--out", type=Path, help="folder for the .md and .json")
    args = parser.parse_args()
    if args.quick:
        args.subscribers, args.windows, args.duration = "20,50", "2", 0.5
        args.quiet_wait = 0.0
    worker_counts = [int(w) for w in args.workers.split(",")]
    subscribers = [int(n) for n in args.subscribers.split(",")]
    windows = [int(w) for w in args.windows.split(",")]
    build_loadgen()
    started = datetime.datetime.now(datetime.timezone.utc)
    rows: list[dict[str, Any]] = []
    for n in subscribers:
        for workers in worker_counts:
            rows.extend(run_cell(workers, n, windows, args.publishers, args.duration,
                                 args.quiet_wait))
    text = report(args, started, rows)
    print(text)
    if args.out:
        command = "bench/workers.py " + " ".join(sys.argv[1:])
        stem = save_results(args.out, "workers", started, text,
                            {"command": command, "rows": rows})
        print(f"saved: {stem.with_suffix('.md')}")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
