"""100,000 WebSocket clients on one host: connect, broadcast, drain, upgrade.

    .venv/bin/python bench/c100k.py --out bench/results     # about 12 minutes
    .venv/bin/python bench/c100k.py --quick                 # a smoke run: seconds

One ebbcast instance (``--workers``, JSON envelope) and ``--loadgens`` wsbench
processes, each binding its connections to its own loopback source addresses
(127.0.0.2, 127.0.0.3, ...), because one process may hold at most 20,000
descriptors here and one source address has some 28,000 ephemeral ports. Runs:

- **drain**: connect every client (time to connect all; RSS of the main process
  and its workers, in total and per connection), hold them for ``--hold`` seconds
  of periodic broadcasts, every ``--drain-interval`` seconds (default one a second:
  delivery latency to every client, and how late the timer fired, while the clients
  connect and once they all have), then SIGTERM: how long until every client has
  the shutdown frame.
- **disconnect**: connect every client, and ``MONITORS`` more in load generators of
  their own; then kill the load generators of all the others at once, so the daemon
  reads every close together: how late the periodic timer fired, as the monitors
  saw it, before and from the kill on.
- **upgrade**, once for each of ``--upgrade-intervals`` (the periodic broadcast's
  interval: by default the daemon's own 10 s, then every second): connect every
  client again, then SIGUSR2. Every client opens a new connection after the
  ``reconnect_after_ms`` its shutdown frame gives it and closes the old one once
  the new one is open (make before break, as ebbcast's own clients do). Measured:
  handshakes that failed and old connections the daemon closed rather than the
  client (the goal is 0 of each), the daemon's closes by reason over time, the
  time from SIGUSR2 until every client has moved, and the new generation's accept
  rate (moves completed per second, in 1-second buckets).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from extras import tick_lateness
from harness import (LOADGEN, build_loadgen, cpu_seconds, machine, pyplot, raise_nofile,
                     rss_bytes, save_results)

PERIODIC_INTERVAL = 1.0
#: Clients of the disconnect run that stay, each in a load generator of its own (so
#: that each process's first connection, whose periodic frames it stamps, is one).
MONITORS = 8
STARTED = time.monotonic()


def progress(what: str) -> None:
    print(f"c100k: {time.monotonic() - STARTED:7.1f} s  {what}", file=sys.stderr, flush=True)


class Daemon:
    """ebbcast with its workers, on a port it picked itself."""

    def __init__(self, workers: int, env: dict[str, str]) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("EBBCAST_")}
        full_env.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ebbcast", "serve", "--port", "0", "--admin-port", "0",
             "--workers", str(workers)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=full_env, preexec_fn=raise_nofile)
        self.lines: list[str] = []
        self.port, self.admin = 0, ""
        self._serving = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._serving.wait(60):
            self.stop()
            raise RuntimeError("ebbcast did not start:\n" + "\n".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())
            match = re.search(r"serving ws=\S+?:(\d+)/\S* admin=(\S+)", line)
            if match and not self.port:
                self.port, self.admin = int(match.group(1)), match.group(2)
                self._serving.set()

    def _metrics(self) -> str:
        with urllib.request.urlopen(f"{self.admin}/metrics", timeout=30) as response:
            return response.read().decode()  # type: ignore[no-any-return]

    def connections(self) -> int:
        """``ebbcast_connections``: clients connected now, over every process."""
        found = re.search(r"^ebbcast_connections (\S+)$", self._metrics(), re.M)
        return int(float(found.group(1))) if found else -1

    def disconnections(self) -> dict[str, int]:
        """``ebbcast_disconnections_total`` by reason, over every process so far."""
        text = self._metrics()
        return {m.group(1): int(float(m.group(2))) for m in re.finditer(
            r'^ebbcast_disconnections_total\{reason="([a-z_]+)"\} (\S+)$', text, re.M)}

    def pids(self) -> list[int]:
        """The main process and its children (every generation's workers)."""
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            text = ""
        return [self.proc.pid, *map(int, text.split())]

    def rss(self) -> int:
        total = 0
        for pid in self.pids():
            try:
                total += rss_bytes(pid)
            except (OSError, RuntimeError):
                pass  # a worker that has just exited
        return total

    def cpu(self) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                total += cpu_seconds(pid)
            except OSError:
                pass
        return total

    def wait_log(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(re.search(pattern, line) for line in self.lines):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no log line {pattern!r}:\n" + "\n".join(self.lines[-20:]))
            time.sleep(0.1)

    def save_log(self, path: Path) -> None:
        path.write_text("\n".join(self.lines) + "\n")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.send_signal(signal.SIGTERM)  # the second forces
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


class Loadgens:
    """``count`` wsbench processes in --expect-close mode sharing ``clients``."""

    def __init__(self, port: int, clients: int, count: int, follow_upgrade: bool,
                 hold: float) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.ready = 0
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.ready_at: list[float] = []
        for k in range(count):
            share = clients // count + (1 if k < clients % count else 0)
            sources = f"127.0.0.{2 + 2 * k},127.0.0.{3 + 2 * k}"
            cmd = [str(LOADGEN), "--host", "127.0.0.1", "--port", str(port), "--path", "/ws",
                   "--expect-close", "--subscribers", str(share), "--source", sources,
                   "--duration", str(hold), "--connect-timeout", "120", "--max-pending", "100",
                   "--close-timeout", "10", "--json"]
            if follow_upgrade:
                cmd.append("--follow-upgrade")
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, preexec_fn=raise_nofile)
            self.procs.append(proc)
            threading.Thread(target=self._watch, args=(proc,), daemon=True).start()

    def _watch(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if not line.startswith(("wsbench: ready", "  ", "wsbench: connected")):
                progress(f"load generator {proc.pid}: {line.rstrip()}")
            if "wsbench: ready" in line:
                with self._lock:
                    self.ready += 1
                    self.ready_at.append(time.monotonic())

    def wait_ready(self, timeout: float) -> float:
        """Seconds from the start until every process had all its clients."""
        deadline = time.monotonic() + timeout
        while self.ready < len(self.procs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"only {self.ready} of {len(self.procs)} load generators ready")
            time.sleep(0.05)
        return max(self.ready_at) - self.started

    def results(self, timeout: float) -> list[dict[str, Any]]:
        out = []
        for proc in self.procs:
            stdout = proc.stdout.read() if proc.stdout is not None else ""
            proc.wait(timeout)
            if not stdout.strip():
                raise RuntimeError(f"load generator {proc.pid} exited {proc.returncode} "
                                   "without a result")
            out.append(json.loads(stdout.strip().splitlines()[-1]))
        return out


class ClosesOverTime:
    """Samples ``ebbcast_disconnections_total`` by reason every ``every`` seconds
    from ``since`` (a wall-clock time), on a thread, until stopped."""

    def __init__(self, daemon: Daemon, since: float, every: float = 2.0) -> None:
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(daemon, since, every),
                                        daemon=True)
        self._thread.start()

    def _run(self, daemon: Daemon, since: float, every: float) -> None:
        while not self._stop.wait(every):
            try:
                closed = daemon.disconnections()
            except OSError:
                continue
            self.samples.append({"s": round(time.time() - since, 1),
                                 **{k: v for k, v in closed.items() if v}})

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def daemon_env(spread: float, drain: float, interval: float = PERIODIC_INTERVAL,
               ping_timeout: float | None = None) -> dict[str, str]:
    timeout = {} if ping_timeout is None else {
        "EBBCAST_KEEPALIVE_PING_TIMEOUT": f"{ping_timeout}s"}
    return {**timeout, "EBBCAST_BROADCAST_ENVELOPE": "json",
            "EBBCAST_BROADCAST_PERIODIC_INTERVAL": f"{interval:g}s",
            "EBBCAST_SHUTDOWN_DRAIN_TIMEOUT": f"{drain}s",
            "EBBCAST_SHUTDOWN_UPGRADE_SPREAD": f"{spread}s"}


def merged_percentiles(counts: list[dict[str, int]]) -> dict[str, float]:
    """p50/p90/p99/max of latencies given as {"ms": count} by several processes."""
    merged: dict[int, int] = {}
    for one in counts:
        for ms, n in one.items():
            merged[int(ms)] = merged.get(int(ms), 0) + n
    total = sum(merged.values())
    result: dict[str, float] = {"count": total}
    if not total:
        return result
    order = sorted(merged.items())
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        rank, seen = q * (total - 1), 0
        for ms, n in order:
            seen += n
            if seen > rank:
                result[name] = ms
                break
    result["max"] = order[-1][0]
    return result


def drain_run(args: argparse.Namespace) -> dict[str, Any]:
    interval = args.drain_interval
    daemon = Daemon(args.workers, daemon_env(args.spread, drain=args.drain, interval=interval))
    try:
        rss_before, cpu_before = daemon.rss(), daemon.cpu()
        gens = Loadgens(daemon.port, args.clients, args.loadgens, False, hold=3600)
        connect_s = gens.wait_ready(args.clients / 500 + 60)
        connected_at = time.time()
        progress(f"drain run: {args.clients} connected in {connect_s:.1f} s")
        connect_cpu = daemon.cpu() - cpu_before
        time.sleep(2)  # let the collector's pass after the storm run
        rss_connected = daemon.rss()
        time.sleep(args.hold)
        sigterm = time.time()
        daemon.proc.send_signal(signal.SIGTERM)
        progress("drain run: SIGTERM")
        results = gens.results(timeout=120)
        progress("drain run: load generators done")
        code = daemon.proc.wait(60)
        progress("drain run: ebbcast exited")
    finally:
        daemon.stop()
    shutdown_last = max(r["shutdown"]["max_realtime_ns"] for r in results
                        if r["shutdown"]["count"])
    shutdown_first = min(r["shutdown"]["min_realtime_ns"] for r in results
                         if r["shutdown"]["count"])
    connecting, holding = lateness_split(results, interval, connected_at)
    return {
        "periodic_interval_s": interval,
        "clients": args.clients, "connected": sum(r["connected"] for r in results),
        "connect_seconds": connect_s, "connect_server_cpu_s": connect_cpu,
        "rss_before_bytes": rss_before, "rss_connected_bytes": rss_connected,
        "rss_per_conn_bytes": (rss_connected - rss_before) / args.clients,
        "periodic_latency_ms": merged_percentiles([r["periodic_latency_ms_counts"]
                                                   for r in results]),
        "periodic_lateness_ms": summary(connecting + holding),
        "periodic_lateness_ms_connecting": summary(connecting),
        "periodic_lateness_ms_holding": summary(holding),
        "shutdown_frames": sum(r["shutdown_frames"] for r in results),
        "sigterm_to_first_shutdown_ms": (shutdown_first / 1e9 - sigterm) * 1000,
        "sigterm_to_all_shutdown_ms": (shutdown_last / 1e9 - sigterm) * 1000,
        "errors": sum(r["errors"] for r in results), "exit_code": code}


def disconnect_run(args: argparse.Namespace) -> dict[str, Any]:
    """Every client connected, then all their load generators killed at once (the
    kernel closes their sockets together: the daemon reads every close at once),
    while ``MONITORS`` clients of their own read the periodic broadcast: how late
    the timer fired before, during and after."""
    interval = args.drain_interval
    daemon = Daemon(args.workers, daemon_env(args.spread, drain=args.drain, interval=interval))
    try:
        gens = Loadgens(daemon.port, args.clients, args.loadgens, False, hold=3600)
        gens.wait_ready(args.clients / 500 + 60)
        monitors = Loadgens(daemon.port, MONITORS, MONITORS, False, hold=3600)
        monitors.wait_ready(60)
        time.sleep(3 * interval)  # a few ticks with everyone connected
        killed_at = time.time()
        for proc in gens.procs:
            proc.kill()
        progress(f"disconnect run: {args.clients} clients' load generators killed")
        deadline = time.monotonic() + 120
        while daemon.connections() > MONITORS and time.monotonic() < deadline:
            time.sleep(0.1)
        all_gone_s = time.time() - killed_at
        time.sleep(3 * interval)  # and a few ticks after
        daemon.proc.send_signal(signal.SIGTERM)
        results = monitors.results(timeout=120)
        daemon.proc.wait(60)
    finally:
        for proc in gens.procs:
            proc.kill()
        daemon.stop()
    before, after = lateness_split(results, interval, killed_at)
    return {"clients": args.clients, "periodic_interval_s": interval,
            "kill_until_all_gone_s": all_gone_s,
            "periodic_lateness_ms_before": summary(before),
            "periodic_lateness_ms_disconnecting": summary(after)}


def lateness_split(results: list[dict[str, Any]], interval: float,
                   at: float) -> tuple[list[float], list[float]]:
    """How late the periodic timer fired (ms), from each load generator's stamps:
    the ticks before wall-clock time ``at``, and those from ``at`` on."""
    before: list[float] = []
    after: list[float] = []
    for r in results:
        stamps = r["periodic_stamps"]
        if len(stamps) > 2:
            for ts, late in zip(stamps, tick_lateness(stamps, interval)):
                (before if ts < at else after).append(late * 1000)
    return before, after


def summary(values: list[float]) -> dict[str, float]:
    return {"count": len(values), "p50": statistics.median(values) if values else 0,
            "max": max(values, default=0)}


def upgrade_run(args: argparse.Namespace, interval: float) -> dict[str, Any]:
    """One upgrade with the periodic broadcast every ``interval`` seconds (0: none)."""
    daemon = Daemon(args.workers, daemon_env(args.spread, drain=args.spread + 60,
                                             interval=interval,
                                             ping_timeout=args.ping_timeout))
    try:
        gens = Loadgens(daemon.port, args.clients, args.loadgens, True, hold=3600)
        gens.wait_ready(args.clients / 500 + 60)
        progress("upgrade run: connected")
        time.sleep(2)
        sigusr2 = time.time()
        daemon.proc.send_signal(signal.SIGUSR2)
        timeline = ClosesOverTime(daemon, sigusr2)
        daemon.wait_log(r"generation \d+ has finished", args.spread + 120)
        progress("upgrade run: the old generation has finished")
        timeline.stop()
        closed = daemon.disconnections()  # every old connection, by who closed it and why
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.wait_log(r"drain started by SIGTERM", 30)
        daemon.proc.send_signal(signal.SIGTERM)  # the second forces: close everyone now
        results = gens.results(timeout=args.spread + 180)
        progress("upgrade run: load generators done")
        code = daemon.proc.wait(60)
        progress("upgrade run: ebbcast exited")
    finally:
        daemon.stop()
        daemon.save_log(Path("/tmp/c100k-upgrade-daemon.log"))
    opens = sorted(ms for r in results for ms in r["move_open_realtime_ms"])
    per_second: dict[int, int] = {}
    for ms in opens:
        second = int(ms / 1000 - sigusr2)
        per_second[second] = per_second.get(second, 0) + 1
    return {
        "clients": args.clients, "spread_s": args.spread,
        "moves_started": sum(r["moves"]["started"] for r in results),
        "moved": sum(r["moves"]["done"] for r in results),
        "handshakes_failed": sum(r["moves"]["failed"] for r in results),
        "moves_delayed_no_descriptor": sum(r["moves"]["no_descriptor"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "error_detail": {kind: sum(r["error_detail"][kind] for r in results)
                         for kind in results[0]["error_detail"]},
        "periodic_interval_s": interval,
        # "client": the load generator closed its old connection once its new one was
        # open (a move), or gave up on it; any other reason: the daemon closed it
        "disconnections_by_reason": {k: v for k, v in closed.items() if v},
        "closed_by_the_daemon": sum(v for k, v in closed.items() if k != "client"),
        "disconnections_over_time": timeline.samples,
        "sigusr2_to_all_moved_s": (opens[-1] / 1000 - sigusr2) if opens else None,
        "accepts_per_s_peak": max(per_second.values(), default=0),
        "accepts_per_s_by_second": [per_second.get(s, 0)
                                    for s in range(max(per_second, default=-1) + 1)],
        "exit_code": code}


def plot(drain: dict[str, Any], upgrades: list[dict[str, Any]], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for upgrade in upgrades:
        rates = upgrade["accepts_per_s_by_second"]
        cumulative = [sum(rates[:i + 1]) for i in range(len(rates))]
        left.plot(range(len(rates)), cumulative,
                  label=f"broadcast {interval_text(upgrade['periodic_interval_s'])}: "
                        f"{upgrade['moved']:,} moved")
    left.set_xlabel("seconds after SIGUSR2")
    left.set_ylabel("clients moved to the new generation")
    left.set_title(f"Upgrade with {upgrades[0]['clients']:,} clients")
    left.legend()
    latency = drain["periodic_latency_ms"]
    names = ["p50", "p90", "p99", "max"]
    right.bar(names, [latency.get(n, 0) for n in names], color="tab:green")
    right.set_ylabel("ms from the periodic timer firing to the client's read")
    right.set_title(f"A broadcast to {drain['clients']:,} clients, "
                    f"{interval_text(drain['periodic_interval_s'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def interval_text(seconds: float) -> str:
    return "off" if seconds == 0 else "every second" if seconds == 1 else \
        f"every {seconds:g} s"


def report(drain: dict[str, Any], disconnect: dict[str, Any], upgrades: list[dict[str, Any]],
           args: argparse.Namespace, started: datetime.datetime) -> str:
    m = machine()
    lat = drain["periodic_latency_ms"]
    return "\n".join([
        f"# 100,000 clients on one host, {started:%Y-%m-%d %H:%M} UTC", "",
        f"Machine: {m['cores']} cores, {m['cpu']}, Linux {m['kernel']}, Python {m['python']}; "
        "20,000 descriptors per process.",
        f"Command: `bench/c100k.py --clients {args.clients} --workers {args.workers} "
        f"--loadgens {args.loadgens} --hold {args.hold} --spread {args.spread} "
        f"--drain-interval {args.drain_interval:g} --upgrade-intervals {args.upgrade_intervals}"
        f"{'' if args.ping_timeout is None else f' --ping-timeout {args.ping_timeout:g}'}`. "
        f"One ebbcast with {args.workers} workers (JSON envelope), {args.loadgens} wsbench "
        "processes on two loopback source addresses each, all on the same 2 cores.", "",
        f"## Connect, broadcast {interval_text(drain['periodic_interval_s'])}, drain", "",
        "| measure | value |", "|---|---|",
        f"| clients connected | {drain['connected']:,} of {drain['clients']:,} "
        f"({drain['errors']} errors) |",
        f"| time to connect all | {drain['connect_seconds']:.1f} s "
        f"({drain['clients'] / drain['connect_seconds']:,.0f} handshakes/s; server CPU "
        f"{drain['connect_server_cpu_s']:.1f} s) |",
        f"| RSS, main process and workers | {drain['rss_before_bytes'] / 2**20:,.0f} MB idle, "
        f"{drain['rss_connected_bytes'] / 2**20:,.0f} MB connected: "
        f"{drain['rss_per_conn_bytes'] / 1024:.1f} KB per connection |",
        f"| periodic broadcast to all, delivery latency (n={lat['count']:,}) | p50 "
        f"{lat.get('p50', 0):.0f} ms, p90 {lat.get('p90', 0):.0f} ms, p99 "
        f"{lat.get('p99', 0):.0f} ms, max {lat.get('max', 0):.0f} ms |",
        *(f"| periodic timer lateness {when} (n={late['count']}) | p50 {late['p50']:.0f} ms, "
          f"max {late['max']:.0f} ms |" for when, late in (
              ("while connecting", drain["periodic_lateness_ms_connecting"]),
              ("once connected", drain["periodic_lateness_ms_holding"]))),
        f"| SIGTERM until every client has the shutdown frame | "
        f"{drain['sigterm_to_all_shutdown_ms']:,.0f} ms (first after "
        f"{drain['sigterm_to_first_shutdown_ms']:.0f} ms; {drain['shutdown_frames']:,} frames) |",
        "", f"## Every client gone at once ({MONITORS} stay and read the broadcast)", "",
        "| measure | value |", "|---|---|",
        f"| the load generators of all {disconnect['clients']:,} clients killed: until the "
        f"daemon counts only the {MONITORS} | {disconnect['kill_until_all_gone_s']:.1f} s |",
        *(f"| periodic timer lateness {when} (n={late['count']}) | p50 {late['p50']:.0f} ms, "
          f"max {late['max']:.0f} ms |" for when, late in (
              ("before", disconnect["periodic_lateness_ms_before"]),
              ("from the kill on", disconnect["periodic_lateness_ms_disconnecting"]))),
        "", "## Upgrade (SIGUSR2), with the periodic broadcast", "",
        *upgrade_table(upgrades),
        "", f"![upgrade and broadcast latency](c100k-{started:%Y%m%d-%H%M}.png)", ""])


def upgrade_table(upgrades: list[dict[str, Any]]) -> list[str]:
    """One column per upgrade run."""
    rows: dict[str, Callable[[dict[str, Any]], str]] = {
        "periodic broadcast": lambda u: interval_text(u["periodic_interval_s"]),
        "clients moved": lambda u: f"{u['moved']:,} of {u['clients']:,}",
        "handshakes failed": lambda u: f"{u['handshakes_failed']}",
        "load generator errors": lambda u: f"{u['errors']:,} "
        f"({', '.join(f'{k} {v:,}' for k, v in u['error_detail'].items() if v) or 'none'})",
        "old connections closed by the daemon, not the client": lambda u:
            f"{u['closed_by_the_daemon']:,}",
        "old connections closed, by reason": lambda u: ", ".join(
            f"{k} {v:,}" for k, v in u["disconnections_by_reason"].items()),
        "SIGUSR2 until every client moved": lambda u:
            f"{u['sigusr2_to_all_moved_s']:.1f} s (spread {u['spread_s']:.0f} s)",
        "new generation's accept rate": lambda u: f"peak {u['accepts_per_s_peak']:,}/s",
    }
    lines = ["| measure | " + " | ".join(f"run {i + 1}" for i in range(len(upgrades))) + " |",
             "|---|" + "---|" * len(upgrades)]
    for name, cell in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(u) for u in upgrades) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--loadgens", type=int, default=16)
    parser.add_argument("--hold", type=float, default=20.0,
                        help="seconds of periodic broadcasts before SIGTERM")
    parser.add_argument("--spread", type=float, default=30.0,
                        help="shutdown.upgrade_spread for the upgrade run")
    parser.add_argument("--drain", type=float, default=10.0,
                        help="shutdown.drain_timeout for the drain run")
    parser.add_argument("--drain-interval", type=float, default=PERIODIC_INTERVAL,
                        help="broadcast.periodic_interval in the drain run (seconds)")
    parser.add_argument("--upgrade-intervals", default="10,1",
                        help="one upgrade run per broadcast.periodic_interval, in seconds "
                             "(0: no periodic broadcast; default: the daemon's 10, then 1)")
    parser.add_argument("--ping-timeout", type=float, default=None,
                        help="keepalive.ping_timeout in the upgrade run (0: none; default: "
                             "the daemon's, 20 s)")
    parser.add_argument("--upgrade-only", action="store_true",
                        help="run only the upgrade part and print its figures (no report)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.clients, args.workers, args.loadgens, args.hold, args.spread = 200, 2, 2, 3, 2
        args.drain, args.upgrade_intervals = 1, "1"
    build_loadgen()
    started = datetime.datetime.now(datetime.timezone.utc)
    intervals = [float(x) for x in args.upgrade_intervals.split(",")]
    if args.upgrade_only:
        print(json.dumps([upgrade_run(args, interval) for interval in intervals], indent=1))
        return 0
    drain = drain_run(args)
    print(json.dumps(drain), file=sys.stderr)
    disconnect = disconnect_run(args)
    print(json.dumps(disconnect), file=sys.stderr)
    upgrades = []
    for interval in intervals:
        upgrades.append(upgrade_run(args, interval))
        print(json.dumps(upgrades[-1]), file=sys.stderr)
    text = report(drain, disconnect, upgrades, args, started)
    print(text)
    if args.out:
        stem = save_results(args.out, "c100k", started, text,
                            {"drain": drain, "disconnect": disconnect, "upgrades": upgrades,
                             "args": {k: str(v) for k, v in vars(args).items()}})
        plot(drain, upgrades, stem.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
