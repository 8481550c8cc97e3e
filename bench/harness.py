"""Building blocks of the benchmark: servers under test, /proc readings, the load tool.

Everything here runs real processes on 127.0.0.1 and reads the kernel's accounting
(/proc/PID/stat for CPU time, /proc/PID/status for RSS), so the numbers are what
an operator would see with top.
"""

from __future__ import annotations

import argparse

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
#: The load generator, built by build_loadgen(); $EBBCAST_WSBENCH puts it elsewhere (the
#: tests' smoke runs build it outside the checkout).
LOADGEN = Path(os.environ.get("EBBCAST_WSBENCH") or BENCH / "loadgen" / "wsbench")
#: The kernel's floor for a send() (bench/loadgen/sendfloor.c), built beside the load generator.
SENDFLOOR = LOADGEN.parent / "sendfloor"
NODE_SERVER = BENCH / "servers" / "node_ws" / "server.js"
NAIVE_SERVER = BENCH / "servers" / "naive_tornado.py"
FASTAPI_SERVER = BENCH / "servers" / "fastapi_manager.py"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

#: ebbcast as the benchmark runs it: raw relay, no periodic frames, no inbound limit.
EBBCAST_BENCH_ENV = {
    "EBBCAST_BROADCAST_ENVELOPE": "raw",
    "EBBCAST_BROADCAST_PERIODIC_INTERVAL": "0",
    "EBBCAST_LIMITS_MESSAGES_PER_SECOND": "0",
    "EBBCAST_SERVER_MAX_MESSAGE_BYTES": "1048576",
}


def raise_nofile() -> None:
    """Let a process hold as many sockets as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int, key: str = "VmRSS") -> int:
    """Resident set size (VmRSS) or its peak (VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} for {pid}")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cores": os.cpu_count(), "cpu": cpu, "kernel": os.uname().release,
            "python": sys.version.split()[0]}


def machine_line() -> str:
    """"Machine: N cores, CPU, Linux K, Python V" for a report's header."""
    box = machine()
    return (f"Machine: {box['cores']} cores, {box['cpu']}, Linux {box['kernel']}, "
            f"Python {box['python']}")


@dataclass
class Server:
    """One server under test, started on a free port, killed on stop().

    ``args`` are extra command-line arguments, e.g. ``["--workers", "2"]`` for ebbcast.
    """

    variant: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[str] | None = None
    log: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        return self._base_command() + self.args

    def _base_command(self) -> list[str]:
        if self.variant.startswith("ebbcast"):
            return [sys.executable, "-m", "ebbcast", "serve", "--port", str(self.port),
                    "--admin-port", "0"]
        if self.variant == "tornado-naive":
            return [sys.executable, str(NAIVE_SERVER), str(self.port)]
        if self.variant == "node-ws":
            return ["node", str(NODE_SERVER), str(self.port)]
        if self.variant == "fastapi":
            return [sys.executable, str(FASTAPI_SERVER), str(self.port)]
        raise ValueError(self.variant)

    def start(self) -> Server:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("EBBCAST_")}
        env.update(EBBCAST_BENCH_ENV if self.variant.startswith("ebbcast") else {})
        if self.variant == "ebbcast-json":  # the JSON envelope: offsets, history
            env["EBBCAST_BROADCAST_ENVELOPE"] = "json"
        env.update(self.env)
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=env, preexec_fn=raise_nofile)
        ready = threading.Event()
        threading.Thread(target=self._read_log, args=(ready,), daemon=True).start()
        if not ready.wait(20):
            self.stop()
            raise RuntimeError(f"{self.variant} did not start:\n" + "\n".join(self.log))
        return self

    def _read_log(self, ready: threading.Event) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            if "serving ws=" in line:
                ready.set()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        """The server's process first, then its children (ebbcast's workers)."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            text = ""
        return [self.pid, *map(int, text.split())]

    def admin_get(self, path: str) -> str:
        """GET on ebbcast's admin listener (its first address)."""
        url = self.admin_url.split(",")[0] + path
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()  # type: ignore[no-any-return]

    @property
    def url_path(self) -> str:
        return "/ws"

    @property
    def admin_url(self) -> str:
        for line in self.log:
            match = re.search(r"admin=(\S+)", line)
            if match:
                return match.group(1)
        raise RuntimeError("no admin URL logged")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def save_results(out: Path, name: str, started: Any, text: str,
                 data: dict[str, Any]) -> Path:
    """Write NAME-<date>.md (the report) and .json (the data) under ``out``;
    return the path without suffix, for files that go beside them."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{started:%Y%m%d-%H%M}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(
        {"started": started.isoformat(), "machine": machine(), **data}, indent=1))
    return stem


def pyplot() -> Any:
    """matplotlib.pyplot drawing to files, or None (with a note) if not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (make bench installs it, from "
              "requirements/<python>/bench.txt)", file=sys.stderr)
        return None
    return plt


def before_after_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a benchmark comparing the code under --before with this one."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True,
                        help="a checkout of the code to compare with")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    return parser


def build_loadgen() -> Path:
    subprocess.run(["make", "-s", "-C", str(BENCH / "loadgen"), f"WSBENCH={LOADGEN}",
                    f"SENDFLOOR={SENDFLOOR}"], check=True)
    return LOADGEN


def send_floor(connections: int, sends: int, size: int) -> dict[str, Any]:
    """What the kernel alone charges per send() of ``size`` bytes over ``connections``
    loopback connections (bench/loadgen/sendfloor.c; built by build_loadgen())."""
    done = subprocess.run([str(SENDFLOOR), "--connections", str(connections), "--sends",
                           str(sends), "--bytes", str(size)], capture_output=True, text=True,
                          timeout=300, check=True, preexec_fn=raise_nofile)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def run_loadgen(port: int, *args: str, timeout: float = 300) -> dict[str, Any]:
    """Run wsbench to completion and return its JSON result."""
    cmd = [str(LOADGEN), "--host", "127.0.0.1", "--port", str(port), "--path", "/ws",
           "--json", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=raise_nofile)
    if done.returncode != 0:
        raise RuntimeError(f"wsbench failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def publisher_cell(port: int, pids: list[int], subscribers: int, window: int,
                   duration: float) -> dict[str, Any]:
    """``subscribers`` and one publisher keeping ``window`` 100-byte messages in
    flight for ``duration`` s (after up to 1 s of warm-up): deliveries per second
    and per server CPU-second (``pids`` summed), p50/p99 ms, errors."""
    result = run_loadgen(
        port, "--subscribers", str(subscribers), "--publishers", "1", "--window", str(window),
        "--size", "100", "--duration", str(duration), "--warmup", str(min(1.0, duration)),
        "--poll-us", "1000", "--server-pid", ",".join(map(str, pids)), "--quiet")
    cpu = result["server_cpu_s"]
    return {"delivered_per_s": result["delivered"] / duration,
            "deliveries_per_cpu_s": result["delivered"] / cpu if cpu else 0.0,
            "p50_ms": result["latency_us"]["p50"] / 1000,
            "p99_ms": result["latency_us"]["p99"] / 1000, "errors": result["errors"]}


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
