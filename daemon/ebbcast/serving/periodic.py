"""The periodic broadcaster: a message every broadcast.periodic_interval."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ebbcast.core import frames
from ebbcast.serving.context import DaemonContext

log = logging.getLogger(__name__)

#: Lateness above which a periodic tick is logged (at DEBUG): the loop was busy.
LATE_WARNING_SECONDS = 0.05


class PeriodicBroadcaster:
    """Broadcasts ``{"type":"periodic",...}`` (or the raw text) on a fixed cadence.

    Ticks are scheduled on the monotonic clock at whole multiples of the interval
    from the start, so a busy loop delays one tick without shifting the rest.
    ``restart()`` applies a reloaded interval; an interval of 0 disables it.
    """

    def __init__(self, ctx: DaemonContext, clock: Callable[[], float] = time.monotonic):
        self._ctx = ctx
        self._clock = clock
        self._seq = 0
        self._handle: asyncio.TimerHandle | None = None
        self._interval = 0.0
        self._origin = 0.0
        self.last_lateness = 0.0

    def start(self) -> None:
        self.stop()
        self._interval = self._ctx.config.broadcast.periodic_interval
        if self._interval > 0:
            self._origin = self._clock()
            self._schedule(1)

    restart = start

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, tick: int) -> None:
        due = self._origin + tick * self._interval
        loop = asyncio.get_running_loop()
        delay = max(0.0, due - self._clock())
        self._handle = loop.call_later(delay, self._fire, tick, due)

    def _fire(self, tick: int, due: float) -> None:
        now = self._clock()
        self.last_lateness = max(0.0, now - due)
        if self.last_lateness > LATE_WARNING_SECONDS:
            log.debug("periodic tick %d ran %.0f ms late", tick, self.last_lateness * 1000)
        self.send_one()
        next_tick = max(tick + 1, int((now - self._origin) // self._interval) + 1)
        self._schedule(next_tick)

    def send_one(self) -> int:
        ctx = self._ctx
        self._seq += 1
        settings = ctx.config.broadcast
        payload = settings.periodic_text
        if settings.envelope == "json":
            payload = frames.periodic(self._seq, settings.periodic_text, time.time(),
                                      ctx.total_connections())
        return ctx.fanout.broadcast(payload, "periodic")
