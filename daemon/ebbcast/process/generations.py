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

This module holds the bookkeeping and its rules, with no I/O; the main process
(``ebbcast.process.supervisor``) acts on them.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from ebbcast.process.workers import Worker


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
