"""What the main loop of a process acts on, as small typed events, and the loop.

Signal handlers, the admin API, timers and child processes only put an event in
the queue; one coroutine takes them in order and acts (gunicorn's arbiter does the
same), so no action ever runs inside a signal handler or interleaves with another.
A serving process and the main process over workers share this loop shape; each
has its own ``act``.
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

from ebbcast.core.waits import within


@dataclass(frozen=True)
class SignalReceived:
    signum: int

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


@dataclass(frozen=True)
class DrainRequested:
    """A drain asked for other than by a signal; ``source`` names who, for the log
    ("the admin API", "the main process's exit")."""

    source: str


@dataclass(frozen=True)
class UpgradeRequested:
    """Start a new generation (SIGUSR2 arrives as a SignalReceived)."""

    source: str


@dataclass(frozen=True)
class HandOver:
    """The main process tells a serving process: a new generation serves, drain as
    an upgrade (``ebbcast.backplane.relay``'s HAND_OVER record)."""


@dataclass(frozen=True)
class WorkerReady:
    worker: Any  # a ebbcast.process.workers.Worker; Any keeps this module free of imports


@dataclass(frozen=True)
class WorkerExited:
    worker: Any
    description: str  # "worker 0 (pid 4242) was killed by SIGKILL"
    failed: bool


@dataclass(frozen=True)
class NoConnections:
    """The last client of a draining process has gone."""


@dataclass(frozen=True)
class FanoutBroken:
    """Broadcasts kept failing (``failures`` batches in a row): a bug, or a
    dependency that changed under us. The process gives up rather than serve
    broken."""

    failures: int


@dataclass(frozen=True)
class Tick:
    """A timer the loop asked for (``wake_at``) has come."""


Event = Union[SignalReceived, DrainRequested, UpgradeRequested, HandOver, WorkerReady,
              WorkerExited, NoConnections, FanoutBroken, Tick]


def who_asked(event: Event) -> str:
    """Who asked for a stop or an upgrade, for the log."""
    if isinstance(event, SignalReceived):
        return event.name
    if isinstance(event, (DrainRequested, UpgradeRequested)):
        return event.source
    return type(event).__name__


class EventQueue:
    """The queue every producer puts into, and the loop that empties it."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        """Safe from signal handlers, callbacks and coroutines on the loop."""
        self._queue.put_nowait(event)

    def record_signal(self, signum: int) -> None:
        self.put(SignalReceived(signum))

    def empty(self) -> bool:
        return self._queue.empty()

    async def get(self) -> Event:
        return await self._queue.get()

    async def run(self, act: Callable[[Event, float], None], wake_at: Callable[[], float],
                  finished: Callable[[], bool]) -> None:
        """Until ``finished()``: take the next event, or a Tick at the monotonic time
        ``wake_at()`` (``math.inf``: none), and ``act(event, now)`` on it."""
        while not finished():
            wake = wake_at()
            timeout = None if wake == math.inf else max(0.0, wake - time.monotonic())
            try:
                event = await within(self._queue.get(), timeout)
            except asyncio.TimeoutError:
                event = Tick()
            act(event, time.monotonic())
