"""Generations: what an upgrade without downtime keeps track of.

A generation is the set of serving processes started together from one
configuration and one version of the code. Generation 1 starts with the daemon;
SIGUSR2 (or ``POST /upgrade``) starts the next one, in fresh interpreters, so the
code and configuration on disk at that moment take effect. Its workers are handed
the same listening sockets (never closed and re-bound) and start *held*: fully
initialised, but not accepting. Only when every one of them is ready does the
main process, in one step, tell them to accept and tell the old generation to
hand over: it stops accepting (what waits in the backlog stays there for the new
one), tells its clients to move (``"reason":"upgrade"``), and drains. If the new
generation cannot start, it is stopped and nothing else changes.

``Generations`` holds them and runs the upgrades between them; the main process
(``ebbcast.process.supervisor``) starts, reaps and signals the workers.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ebbcast.backplane import records
from ebbcast.config import Config, ConfigError, changed_keys, render_toml
from ebbcast.core.lifecycle import FORCED_CLOSE_GRACE, State
from ebbcast.core.metrics import Metrics
from ebbcast.core.sockets import tls_context
from ebbcast.process.listener import BindError, bind_idle_like
from ebbcast.process.workers import ChildWorker, Worker, worker_count

log = logging.getLogger(__name__)

#: Keys an upgrade cannot apply: the listening sockets are handed over as they are.
HANDED_OVER_KEYS = ("server.host", "server.port", "admin.host", "admin.port")


@dataclass(frozen=True)
class UpgradeRequested:
    """Start a new generation (asked by the admin API; SIGUSR2 arrives as a
    SignalReceived)."""

    source: str


@dataclass
class Generation:
    """``workers`` (``ebbcast.process.workers.Worker``) started together; ``deadline_unix``
    is set when it hands over (the end of its drain, for ``/status``)."""

    number: int
    workers: list[Worker]
    deadline_unix: float | None = None

    @property
    def alive(self) -> bool:
        return any(worker.alive for worker in self.workers)

    @property
    def ready(self) -> bool:
        return all(worker.ready for worker in self.workers)

    @property
    def connections(self) -> int:
        return sum(worker.connections for worker in self.workers if worker.alive)


def assign_sets(sets: list[list[socket.socket]], count: int) -> list[list[socket.socket]]:
    """The sockets of each of ``count`` workers when ``len(sets) >= count`` socket
    sets exist: set ``i`` goes to worker ``i % count``. Every set keeps a worker
    accepting from it, so a generation with fewer workers than sets closes none
    (closing one would reset the connections waiting in its backlog)."""
    assert len(sets) >= count > 0
    assigned: list[list[socket.socket]] = [[] for _ in range(count)]
    for index, sockets in enumerate(sets):
        assigned[index % count].extend(sockets)
    return assigned


@dataclass
class UpgradeStatus:
    """The ``upgrade`` object of ``/status``: whether one is under way, how the
    last one ended, and (monotonic) when the one under way must be serving by."""

    starting: bool = False
    last_result: str | None = None
    last_error: str | None = None
    ready_by: float = field(default=float("inf"))
    timeout: float = 0.0
    queued: bool = False  # asked for by the admin API, not begun yet

    @property
    def under_way(self) -> bool:
        """Asked for or starting: a further request is refused, not queued."""
        return self.starting or self.queued

    def queue(self) -> None:
        self.queued = True

    def dequeue(self) -> None:
        self.queued = False

    def begin(self, now_mono: float, timeout: float) -> None:
        self.starting = True
        self.ready_by = now_mono + timeout
        self.timeout = timeout

    def end(self, error: str | None) -> None:
        self.starting = False
        self.ready_by = float("inf")
        self.last_result = "failed" if error else "ok"
        self.last_error = error

    def overdue(self, now_mono: float) -> bool:
        return self.starting and now_mono >= self.ready_by

    def report(self) -> dict[str, Any]:
        return {"state": "starting" if self.under_way else "idle",
                "last_result": self.last_result, "last_error": self.last_error}


class EffectiveConfigs:
    """Each generation's effective configuration, as a file its workers load, in
    ``rundir`` (a fresh private directory for this start)."""

    def __init__(self, rundir: str) -> None:
        self._rundir = rundir

    def path(self, generation: int) -> str:
        return os.path.join(self._rundir, f"effective-{generation}.toml")

    def write(self, generation: int, config: Config) -> None:
        """Replaced atomically: a worker starting during a reload reads the old file
        or the new, never half."""
        path = self.path(generation)
        partial = path + ".new"
        with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write(render_toml(config, mask_secrets=False))
        os.replace(partial, path)


class Arbiter(Protocol):
    """What upgrades ask of the main process (``ebbcast.process.supervisor``)."""

    config: Config
    metrics: Metrics

    def start_worker(self, worker: Worker, hold: bool = False) -> None: ...
    def notify(self, *lines: str) -> None:
        """Tell systemd (sd_notify)."""
    def kill_by(self, when: float) -> None:
        """SIGKILL what a failed upgrade left running, if it is still there at ``when``."""
    def upgraded(self, config: Config, generation: int) -> None:
        """Generation ``generation`` serves, with ``config``."""


class Generations:
    """Every generation of serving processes and the socket sets they share, and
    the upgrades between them: begun, switched to, or failed (see the module's
    docstring). ``sequenced``: the main process gives offsets, so a new generation
    must take them."""

    def __init__(self, arbiter: Arbiter, load: Callable[[], Config],
                 effective: EffectiveConfigs, sequenced: bool) -> None:
        self._arbiter = arbiter
        self._load = load
        self.effective = effective
        self._sequenced = sequenced
        self.sets: list[list[socket.socket]] = []
        self.current = Generation(1, [])
        self.previous: list[Generation] = []
        self.next: Generation | None = None
        self.leaving: list[Worker] = []  # of a failed upgrade, stopping
        self._idle_sets: list[list[socket.socket]] = []  # bound for the new generation
        self._next_config: Config | None = None
        self.upgrade = UpgradeStatus()

    def workers(self) -> Iterator[Worker]:
        """Every worker of every generation, the current one first."""
        yield from self.current.workers
        for generation in self.previous:
            yield from generation.workers
        if self.next is not None:
            yield from self.next.workers
        yield from self.leaving

    def connections(self) -> int:
        return sum(w.connections for w in self.workers() if w.alive)

    def serving_processes(self) -> list[tuple[int, str, int]]:
        """``(generation, index, pid)`` of every worker alive (for the metrics)."""
        return [(w.generation, str(w.index), w.pid) for w in self.workers() if w.alive]

    def versions(self) -> list[str]:
        return [w.version for w in self.workers() if w.alive and w.ready and w.version]

    def close_sets(self) -> None:
        """Close this process's copies of every socket set (new connections are
        refused by the kernel once the workers' copies are closed too)."""
        for sockets in self.sets:
            for sock in sockets:
                sock.close()

    def report(self) -> dict[str, Any]:
        """What ``/status`` says of the generations."""
        return {"generation": self.current.number, "upgrade": self.upgrade.report(),
                "previous": [{"generation": g.number, "connections": g.connections,
                              "deadline": round(g.deadline_unix or 0.0, 3)}
                             for g in self.previous]}

    def refusal(self, state: State) -> str | None:
        """Why an upgrade cannot begin now (None: it can)."""
        if state is not State.SERVING:
            return f"the daemon is {state.value}"
        if self.upgrade.under_way:
            return "an upgrade is already under way"
        return None

    def begin(self, source: str, state: State, now: float) -> None:
        refusal = self.refusal(state)
        if refusal is not None:
            log.warning("upgrade requested by %s refused: %s", source, refusal)
            return
        number = self.current.number + 1
        log.info("upgrade requested by %s: starting generation %d", source, number)
        self.upgrade.begin(now, self._arbiter.config.shutdown.upgrade_timeout)
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._arbiter.notify("RELOADING=1", f"STATUS=upgrading to generation {number}",
                             f"MONOTONIC_USEC={monotonic_usec}")
        try:
            config = self._config_now()
            count = worker_count(config.server.workers)
            while len(self.sets) < count:  # bound now, listening once the new one accepts
                self._idle_sets.append(bind_idle_like(self.sets[0]))
                self.sets.append(self._idle_sets[-1])
        except ConfigError as exc:
            for key, reason in exc.problems:
                log.error("upgrade: config error: %s: %s", key, reason)
            self.fail("invalid configuration: " + "; ".join(
                f"{key}: {reason}" for key, reason in exc.problems), now)
            return
        except BindError as exc:
            self.fail(str(exc), now)
            return
        self._next_config = config
        self.effective.write(number, config)
        self.next = Generation(number, [ChildWorker(i, public, number) for i, public in
                                        enumerate(assign_sets(self.sets, count))])
        for worker in self.next.workers:
            self._arbiter.start_worker(worker, hold=True)

    def _config_now(self) -> Config:
        """The configuration as it is on disk now; ConfigError if it is not valid."""
        config = self._load()
        tls_context(config)
        for key in changed_keys(self._arbiter.config, config):
            if key in HANDED_OVER_KEYS:
                log.warning("upgrade: %s changed; the listening sockets are handed over as "
                            "they are, so it needs a restart to apply", key)
        return config

    def ready(self, worker: Worker, now: float, ws_url: str) -> bool:
        """A worker is ready: True if it is one of the new generation's (then the
        upgrade goes on: all of it ready switches; one without offsets fails)."""
        if self.next is None or worker not in self.next.workers:
            return False
        if self._sequenced and not worker.sequenced:
            self.fail(f"its release ({worker.version}) does not take offsets from this "
                      "main process: going back to a release without offsets takes a "
                      "restart", now)
        elif self.next.ready:
            self._switch(ws_url)
        return True

    def _switch(self, ws_url: str) -> None:
        """Every worker of the new generation is ready: it accepts, and the old one
        hands over, in one step."""
        new, old = self.next, self.current
        assert new is not None and self._next_config is not None
        for worker in new.workers:
            if worker.link is not None:
                worker.link.send(records.Accept())
        for worker in old.workers:
            if worker.restart is not None:
                worker.restart.cancel()
                worker.restart = None
            if worker.link is not None:
                worker.link.send(records.HandOver())
        old.deadline_unix = time.time() + self._arbiter.config.shutdown.drain_timeout
        if old.alive:
            self.previous.append(old)
        self.current, self.next = new, None
        self._idle_sets = []
        self.upgrade.end(None)
        self._arbiter.upgraded(self._next_config, new.number)
        log.info("generation %d serving (%s); generation %d hands over %d connections",
                 new.number, ", ".join(f"pid {w.pid}" for w in new.workers), old.number,
                 old.connections)
        self._arbiter.notify("READY=1",
                             f"STATUS=serving generation {new.number} on {ws_url}")

    def fail(self, error: str, now: float) -> None:
        """The new generation could not start: stop what started of it (it has no
        clients: it never accepted) and go on as before."""
        new, self.next = self.next, None
        if new is not None:
            for worker in new.workers:
                if worker.alive:
                    worker.signal(signal.SIGTERM)
                    self.leaving.append(worker)
            self._arbiter.kill_by(now + FORCED_CLOSE_GRACE)
        for idle in self._idle_sets:  # never listened on: closing them loses nothing
            self.sets.remove(idle)
            for sock in idle:
                sock.close()
        self._idle_sets = []
        self.upgrade.end(error)
        self._arbiter.metrics.upgrades.labels("failed").inc()
        log.error("upgrade to generation %d failed: %s; generation %d goes on serving",
                  self.current.number + 1, error, self.current.number)
        self._arbiter.notify("READY=1", f"STATUS=upgrade failed: {error}")

    def exited(self, worker: Worker, what: str, failed: bool, now: float) -> bool:
        """A worker is gone: True if it was not the current generation's (a new
        generation's failing fails the upgrade; an old generation's ends its share
        of the hand-over), which the main process then has nothing more to do about."""
        if self.next is not None and worker in self.next.workers:
            self.fail(f"{what} before serving", now)
            return True
        if worker in self.leaving:
            self.leaving.remove(worker)
            log.debug("%s", what)
            return True
        if worker in self.current.workers:
            return False
        log.log(logging.WARNING if failed else logging.INFO, "%s", what)
        for generation in [g for g in self.previous if not g.alive]:
            self.previous.remove(generation)
            log.info("generation %d has finished", generation.number)
        return True
