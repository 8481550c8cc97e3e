"""The drain and upgrade demos (run by examples/drain-demo.sh and upgrade-demo.sh).

Everything happens through the commands and endpoints an operator has: ``ebbcast
serve`` on free ports, ``ebbcast client --reconnect`` sessions whose JSON lines are
kept, ``POST /broadcast`` as the publisher, SIGTERM or SIGUSR2, ``/status`` and
``/metrics``. Each command is printed before it runs, then the daemon's progress
lines and what every client saw. The exit status is 0 only if no connection was
refused and every client received every published message once, in order.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

TOKEN = "demo-token"
SERVING = re.compile(r"serving ws=(\S+) admin=(\S+)")
STEP = 20.0  # longest wait for any one thing to happen


def say(text: str) -> None:
    print(text, flush=True)


def wait_for(what: str, predicate: Any, timeout: float = STEP) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: gave up waiting for {what}")
        time.sleep(0.05)


def default_sigint() -> None:
    """In a child: Ctrl+C (SIGINT) does what it does in a terminal, however the demo
    was started. A shell starts a background job (`demo.sh &`) with SIGINT ignored,
    the children inherit that, and the clients the demo stops with SIGINT would
    never stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def redis_pid(port: int) -> int | None:
    """The process_id of the Redis answering on ``port``, if one does."""
    import redis

    try:
        with redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1) as conn:
            return int(conn.info("server")["process_id"])
    except (redis.RedisError, OSError):
        return None


class Demo:
    def __init__(self, ebbcast: list[str], workdir: Path) -> None:
        self.ebbcast = ebbcast
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def run(self, name: str, args: list[str], env: dict[str, str] | None = None,
            stdout: Path | None = None) -> subprocess.Popen[bytes]:
        shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        say(f"$ {shown + ' ' if shown else ''}{shlex.join(['ebbcast', *args])}")
        with open(self.workdir / f"{name}.log", "wb") as log, \
                open(stdout or os.devnull, "wb") as out:  # the child keeps its copies
            proc = subprocess.Popen([*self.ebbcast, *args], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=log, env={**os.environ, **(env or {})},
                                    preexec_fn=default_sigint)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def serve(self, name: str,
              env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, str]:
        proc = self.run(name, ["serve", "--port", "0", "--admin-port", "0"], env={
            "EBBCAST_ADMIN_TOKEN": TOKEN, "EBBCAST_BROADCAST_PERIODIC_INTERVAL": "0",
            "EBBCAST_SHUTDOWN_PROGRESS_INTERVAL": "1s", **env})

        def serving() -> re.Match[str] | None:
            if proc.poll() is not None:
                raise SystemExit(f"demo: {name} exited:\n{self.log(name)}")
            return SERVING.search(self.log(name))

        match = wait_for(f"{name} to serve", serving)
        say(f"  {name}: {match.group(0)}")
        return proc, match.group(1).replace("http", "ws", 1), match.group(2)

    def start_redis(self) -> str:
        """redis-server on a port under the ephemeral range (redis cannot report a port
        the OS picked); another port if that one is taken."""
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise SystemExit("demo: the drain demo needs redis-server "
                             "(apt-get install redis-server)")
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        workdir = self.workdir / "redis"  # no dump file read or written anywhere else
        workdir.mkdir()
        for _ in range(10):
            port = random.randrange(max(1024, low - 10_000), low)
            say(f"$ redis-server --port {port} --save '' --appendonly no --dir {workdir}")
            proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                                     "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                                    cwd=workdir, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            self.procs.append(proc)
            deadline = time.monotonic() + STEP
            while proc.poll() is None and time.monotonic() < deadline:
                if redis_pid(port) == proc.pid:  # ours, not another's on that port
                    return f"redis://127.0.0.1:{port}/0"
                time.sleep(0.05)
        raise SystemExit("demo: redis-server found no free port")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def post(admin: str, path: str, body: bytes = b"") -> Any:
    request = urllib.request.Request(admin + path, data=body, method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=STEP) as response:
        return json.loads(response.read())


def get_json(admin: str, path: str) -> Any:
    with urllib.request.urlopen(admin + path, timeout=STEP) as response:
        return json.loads(response.read())


def rejected(admin: str) -> float:
    with urllib.request.urlopen(admin + "/metrics", timeout=STEP) as response:
        text = response.read().decode()
    return sum(float(v) for v in re.findall(
        r"^ebbcast_connections_rejected_total\{[^}]*\} (\S+)$", text, re.M))


class Publisher(threading.Thread):
    """``POST /broadcast`` of "1", "2", ... every ``interval`` until stopped."""

    def __init__(self, admin: str, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.admin, self.interval = admin, interval
        self.sent = 0
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                post(self.admin, "/broadcast", str(self.sent + 1).encode())
                self.sent += 1
            except OSError as exc:
                self.failures.append(str(exc))

    def stop(self) -> int:
        self.stopping.set()
        self.join()
        return self.sent


def frames(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


Clients = list[tuple[subprocess.Popen[bytes], Path]]


def start_clients(demo: Demo, url: str, count: int) -> Clients:
    clients = []
    for i in range(1, count + 1):
        out = demo.workdir / f"client-{i}.jsonl"
        clients.append((demo.run(f"client-{i}", ["client", url, "--reconnect"], stdout=out),
                        out))
    for proc, out in clients:
        wait_for("a client's welcome", lambda: out.exists() and frames(out))
    return clients


def finish_clients(clients: Clients, last: int) -> None:
    """Wait until every client has printed message ``last``, then stop them."""
    for proc, out in clients:
        wait_for(f"message {last} at every client", lambda: any(
            f.get("type") == "message" and f.get("text") == str(last) for f in frames(out)))
        proc.send_signal(signal.SIGINT)
        proc.wait(STEP)


def describe_move(seen: list[dict[str, Any]], shutdown: dict[str, Any]) -> str:
    """'told to move (reason) after message N, welcomed by S (resumed ...)'."""
    at = seen.index(shutdown)
    before = [int(f["text"]) for f in seen[:at] if f.get("type") == "message"
              and f["text"].isdigit()]
    after = [f for f in seen[at:] if f.get("type") == "welcome"]
    text = f"told to move ({shutdown['reason']}) after message {max(before, default=0)}"
    if not after:
        return text + ", never welcomed again"
    welcome = after[0]
    resumed = ""
    if "recovered" in welcome:
        resumed = (f" (resumed: recovered {str(welcome['recovered']).lower()}, "
                   f"missed {welcome.get('missed', 0)})")
    return text + f", welcomed by {welcome['server']}{resumed}"


def report(demo: Demo, clients: Clients, sent: int) -> list[str]:
    """Print what each client saw; the problems found."""
    problems = []
    for index, (proc, out) in enumerate(clients, 1):
        seen = frames(out)
        texts = [f["text"] for f in seen if f.get("type") == "message"]
        numbers = [int(t) for t in texts if t.isdigit()]
        welcomes = [f for f in seen if f.get("type") == "welcome"]
        shutdowns = [f for f in seen if f.get("type") == "shutdown"]
        first = numbers[0] if numbers else 0
        ok = numbers == list(range(first, sent + 1))
        say(f"  client {index}: welcomed by {welcomes[0]['server']}; "
            + "; ".join(describe_move(seen, s) for s in shutdowns)
            + f"; messages {first}..{numbers[-1] if numbers else 0}: "
            + ("each once, in order" if ok else "NOT each once in order"))
        errors = [line for line in demo.log(f"client-{index}").splitlines() if line.strip()]
        if not ok:
            problems.append(f"client {index} did not see messages {first}..{sent} once each")
        if not shutdowns or len(welcomes) < 2:
            problems.append(f"client {index} never moved")
        if errors:
            problems.append(f"client {index}: {errors[0]}")
    return problems


def wrap_up(demo: Demo, publisher: Publisher, clients: Clients, daemon: str,
            words: tuple[str, ...], admin: str) -> list[str]:
    """Publish a second more, stop, show the daemon's lines with ``words`` and what
    each client saw; the problems found (``admin``: the instance still serving)."""
    time.sleep(1)
    sent = publisher.stop()
    finish_clients(clients, sent)
    say(f"The log of {daemon}:")
    for line in demo.log(daemon).splitlines():
        if any(word in line for word in words):
            say("  " + line)
    say(f"What the clients saw ({sent} messages published):")
    problems = report(demo, clients, sent)
    refused = rejected(admin)
    say(f"Handshakes refused: {refused:.0f}; publisher failures: {len(publisher.failures)}")
    if refused or publisher.failures:
        problems.append("a handshake or a publish was refused")
    return problems


def drain_demo(demo: Demo, seconds: float, count: int) -> list[str]:
    redis_url = demo.start_redis()
    plane = {"EBBCAST_BACKPLANE_URL": redis_url}
    old, old_ws, old_admin = demo.serve("instance-a", plane)
    _, new_ws, new_admin = demo.serve("instance-b", plane)
    say(f"Both instances share {redis_url}; {count} clients connect to instance A.")
    clients = start_clients(demo, old_ws, count)
    publisher = Publisher(new_admin)
    say("A publisher broadcasts 1, 2, 3, ... through instance B's POST /broadcast.")
    publisher.start()
    time.sleep(max(3.5, seconds / 3))  # A learns of B at its next heartbeat (every 3 s)
    say(f"$ kill -TERM {old.pid}   # instance A drains")
    old.send_signal(signal.SIGTERM)
    code = old.wait(seconds * 3 + STEP)
    say(f"  instance A exited with status {code} once its last client had moved.")
    problems = wrap_up(demo, publisher, clients, "instance-a", ("drain", "exit"), new_admin)
    if code != 0:
        problems.append(f"instance A exited with {code}")
    return problems


def upgrade_demo(demo: Demo, seconds: float, count: int) -> list[str]:
    spread = max(1.0, seconds / 3)
    proc, ws, admin = demo.serve("daemon", {"EBBCAST_SHUTDOWN_UPGRADE_SPREAD": f"{spread}s"})
    clients = start_clients(demo, ws, count)
    publisher = Publisher(admin)
    say("A publisher broadcasts 1, 2, 3, ... through POST /broadcast.")
    publisher.start()
    time.sleep(1)
    say(f"$ kill -USR2 {proc.pid}   # upgrade: a new generation takes the sockets over")
    proc.send_signal(signal.SIGUSR2)
    wait_for("generation 2", lambda: get_json(admin, "/status").get("generation") == 2)
    wait_for("the old generation to finish", lambda: not get_json(admin, "/status")["previous"],
             timeout=spread + STEP)
    status = get_json(admin, "/status")
    say(f"  /status: generation {status['generation']}, upgrade {status['upgrade']}, "
        f"previous {status['previous']}")
    problems = wrap_up(demo, publisher, clients, "daemon",
                       ("generation", "upgrade", "drain"), admin)
    if status["upgrade"].get("last_result") not in ("ok", "succeeded"):
        problems.append(f"the upgrade did not succeed: {status['upgrade']}")
    proc.send_signal(signal.SIGTERM)
    proc.wait(STEP)
    return problems




def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("which", choices=["drain", "upgrade"])
    parser.add_argument("--seconds", type=float,
                        default=float(os.environ.get("DEMO_SECONDS", 10)))
    parser.add_argument("--clients", type=int, default=int(os.environ.get("DEMO_CLIENTS", 3)))
    args = parser.parse_args()
    ebbcast = shlex.split(os.environ.get("EBBCAST", "")) or [sys.executable, "-m", "ebbcast"]
    with tempfile.TemporaryDirectory(prefix=f"ebbcast-{args.which}-demo-") as tmp:
        demo = Demo(ebbcast, Path(tmp))
        try:
            run = drain_demo if args.which == "drain" else upgrade_demo
            problems = run(demo, args.seconds, args.clients)
        finally:
            demo.stop_all()
    for problem in problems:
        say(f"PROBLEM: {problem}")
    say("OK: nothing refused, nothing lost." if not problems else "FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
