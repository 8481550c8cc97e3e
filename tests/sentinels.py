"""A Redis master, a replica and a sentinel, as real processes (Debian's
redis-server, which runs as a sentinel with ``--sentinel``), and clients that
record what they receive through a failover: for tests/backplane/test_sentinel.py and
bench/failover.py.

Ports are chosen as RedisServer chooses them (below the ephemeral range, another
if taken). The sentinel judges a master down after DOWN_AFTER_MS and fails over
with a quorum of one.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from websockets.exceptions import ConnectionClosed

from helpers import (ACL_PASSWORD, ACL_USER, STEP_TIMEOUT, RedisServer, port_below_ephemeral_range, dial, wait_for,
                     wait_for_own_redis)

MASTER_NAME = "mymaster"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
#: The longest cross-instance delivery may pause when the master dies.
FAILOVER_BOUND = (DOWN_AFTER_MS + FAILOVER_TIMEOUT_MS) / 1000 + 2


class Sentinel:
    """``redis-server sentinel.conf --sentinel`` on a loopback port."""

    def __init__(self, workdir: Path, master_port: int, port: int = 0) -> None:
        self.workdir = workdir
        self.master_port = master_port
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for _ in range(10):
            port = self.port or port_below_ephemeral_range()
            if self._run(port):
                self.port = port
                return
            assert not self.port, f"the sentinel's port {self.port} is taken"
        raise AssertionError("redis sentinel found no free port in 10 tries")

    def _run(self, port: int) -> bool:
        conf = self.workdir / f"sentinel-{port}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {self.workdir}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n")
        self.proc = subprocess.Popen(
            ["redis-server", str(conf), "--sentinel", "--loglevel", "warning"],
            cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        if wait_for_own_redis(self.proc, lambda: redis.Redis(port=port, socket_timeout=1)):
            return True
        self.proc = None
        return False

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=STEP_TIMEOUT, decode_responses=True)

    def master(self) -> int:
        """The port of the master the sentinel names now."""
        with self.client() as sentinel:
            address = sentinel.sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(address[1])

    def replicas_in_sync(self) -> int:
        """Replicas the sentinel knows and could promote."""
        with self.client() as sentinel:
            replicas = sentinel.sentinel_slaves(MASTER_NAME)
        return sum(1 for r in replicas if r.get("master-link-status") == "ok"
                   and "s_down" not in r.get("flags", ""))

    def failover(self) -> None:
        """A manual failover (SENTINEL FAILOVER)."""
        with self.client() as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(STEP_TIMEOUT)
        self.proc = None


class Cluster:
    """A master, one replica of it, one sentinel watching them."""

    def __init__(self, workdir: Path, sentinel_port: int = 0) -> None:
        self.master = RedisServer(workdir / "master")
        self.master.start()
        self.replica = RedisServer(workdir / "replica",
                                   args=("--replicaof", "127.0.0.1", str(self.master.port)))
        self.replica.start()
        self.servers = {self.master.port: self.master, self.replica.port: self.replica}
        wait_for(lambda: _link_up(self.replica.port))
        self.sentinel = Sentinel(workdir, self.master.port, sentinel_port)
        self.sentinel.start()
        wait_for(lambda: self.sentinel.replicas_in_sync() == 1, timeout=STEP_TIMEOUT * 2)

    @property
    def url(self) -> str:
        """Redis is reached as the documented ACL user (``RedisServer``), sentinels
        as they are."""
        return (f"redis+sentinel://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{self.sentinel.port}"
                f"/{MASTER_NAME}")

    def current_master(self) -> RedisServer:
        return self.servers[self.sentinel.master()]

    def kill_master(self) -> RedisServer:
        """SIGKILL the master; the sentinel's choice of a new one is awaited by the
        caller. Returns the server killed."""
        killed = self.current_master()
        killed.kill()
        return killed

    def wait_promoted(self, old: RedisServer) -> RedisServer:
        wait_for(lambda: self.sentinel.master() != old.port,
                 timeout=(DOWN_AFTER_MS + FAILOVER_TIMEOUT_MS) / 1000 + STEP_TIMEOUT)
        return self.current_master()

    def stop(self) -> None:
        self.sentinel.stop()
        for server in self.servers.values():
            if server.proc is not None:
                server.stop()


def _link_up(port: int) -> bool:
    with redis.Redis(port=port, socket_timeout=STEP_TIMEOUT, decode_responses=True) as r:
        info: Any = r.info("replication")
    return info.get("master_link_status") == "up"


class Recorder(threading.Thread):
    """A client that keeps every frame it receives, with its arrival time."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.ws = dial(url)
        self.frames: list[tuple[float, dict[str, Any]]] = []
        self.start()

    def run(self) -> None:
        try:
            while True:
                self.frames.append((time.monotonic(), json.loads(self.ws.recv())))
        except ConnectionClosed:
            pass

    def numbers(self) -> list[int]:
        return [int(f["text"]) for _, f in list(self.frames)
                if f["type"] == "message" and f["text"].isdigit()]

    def first_after(self, number: int) -> float | None:
        """When the first message numbered above ``number`` arrived."""
        for at, f in list(self.frames):
            if f["type"] == "message" and f["text"].isdigit() and int(f["text"]) > number:
                return at
        return None

    def offsets(self) -> Iterator[tuple[tuple[str, int], str]]:
        """``((epoch, offset), text)`` of every message that has an offset."""
        epoch = ""
        for _, f in list(self.frames):
            if f["type"] in ("welcome", "epoch") and "epoch" in f:
                epoch = f["epoch"]
            elif f["type"] == "message" and "offset" in f:
                yield (epoch, f["offset"]), f["text"]

    def epochs(self) -> list[str]:
        return [f["epoch"] for _, f in list(self.frames)
                if f["type"] in ("welcome", "epoch") and "epoch" in f]

    def close(self) -> None:
        self.ws.close()
        self.join(STEP_TIMEOUT)


class Publisher(Recorder):
    """A client that sends 1, 2, 3, ... every 20 ms until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.sent = 0
        self.stopping = threading.Event()
        self.sender = threading.Thread(target=self._send, daemon=True)
        self.sender.start()

    def _send(self) -> None:
        while not self.stopping.wait(0.02):
            try:
                self.ws.send(str(self.sent + 1))
            except ConnectionClosed:
                return  # the test has failed already, or is tearing down
            self.sent += 1

    def stop(self) -> int:
        self.stopping.set()
        self.sender.join(STEP_TIMEOUT)
        return self.sent


def assert_honest(recorders: list[Recorder]) -> None:
    """No client sees a number twice or out of order; no (epoch, offset) names two
    different messages, across every client."""
    by_offset: dict[tuple[str, int], str] = {}
    for recorder in recorders:
        numbers = recorder.numbers()
        assert numbers == sorted(set(numbers)), "a number repeated or out of order"
        for key, text in recorder.offsets():
            assert by_offset.setdefault(key, text) == text, f"{key} names two messages"


def fail_over(cluster: Cluster, publisher: Publisher, far: Recorder,
              kill: bool = True) -> float:
    """Make the sentinel fail over (SIGKILL the master, or SENTINEL FAILOVER) while
    the publisher goes on, until a message published once the sentinel names the
    new master reaches the other instance. Returns the gap in cross-instance
    delivery: from the failover's start (or the last message that crossed before
    it, if later) to the first that crossed after it."""
    old = cluster.current_master()
    started = time.monotonic()
    if kill:
        cluster.kill_master()
    else:
        cluster.sentinel.failover()
    cluster.wait_promoted(old)
    published = publisher.sent
    wait_for(lambda: far.first_after(published) is not None, timeout=FAILOVER_BOUND + 5)
    arrivals = [at for at, f in list(far.frames) if f["type"] == "message"]
    before = max([started] + [at for at in arrivals if at <= started])
    return max(b - a for a, b in zip([before] + arrivals, arrivals) if b > started)
