"""What the main loop of a process acts on, as small typed events, and the loop.

Signal handlers, the admin API, timers and child processes only put an event in
the queue; one coroutine takes them in order and acts (gunicorn's arbiter does the
same), so no action ever runs inside a signal handler or interleaves with another.
A serving process and the main process over workers share this loop shape; each
has its own ``act``, and its own events beside the common ones here (a serving
process's in ``ebbcast.serving.process``, the main process's in
``ebbcast.process.workers`` and ``ebbcast.process.generations``).
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar, Union

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
class Tick:
    """A timer the loop asked for (``wake_at``) has come."""


#: What every process's loop acts on; each process adds events of its own (``E``).
Common = Union[SignalReceived, DrainRequested, Tick]
E = TypeVar("E")


def who_asked(event: SignalReceived | DrainRequested) -> str:
    """Who asked for a stop, for the log."""
    return event.name if isinstance(event, SignalReceived) else event.source


class EventQueue(Generic[E]):
    """The queue every producer puts into, and the loop that empties it: the
    common events and a process's own ``E``."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[E | Common] = asyncio.Queue()

    def put(self, event: E | Common) -> None:
        """Safe from signal handlers, callbacks and coroutines on the loop."""
        self._queue.put_nowait(event)

    def record_signal(self, signum: int) -> None:
        self.put(SignalReceived(signum))

    def empty(self) -> bool:
        return self._queue.empty()

    async def get(self) -> E | Common:
        return await self._queue.get()

    async def run(self, act: Callable[[E | Common, float], None], wake_at: Callable[[], float],
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
