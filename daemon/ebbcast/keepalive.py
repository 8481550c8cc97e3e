"""WebSocket keepalive: one timer pings every connection (RFC 6455 section 5.5.2).

Tornado's own keepalive runs an asyncio task per connection, which costs about a
kilobyte of memory per idle client and one send() per ping. Here one timer sends
the same two-byte ping frame to every connection through the fan-out's shared
batch (so under load a ping rides along with data, at no extra send()), and
``ping_timeout`` later checks that each pinged connection has answered with a pong
since; one that has not is closed and counted as ``ping_timeout``.

Settings are read at every round, so a SIGHUP reload applies from the next one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from ebbcast.config import Config
from ebbcast.fanout import Fanout, Recipient
from ebbcast.registry import ConnectionRegistry

log = logging.getLogger(__name__)

#: An unmasked ping frame with an empty payload (RFC 6455 sections 5.2 and 5.5.2).
PING_FRAME = b"\x89\x00"


class Pingable(Recipient, Protocol):
    opened_at: float
    last_pong: float

    def end(self, reason: str, code: int, text: str | None = None) -> None: ...


P = TypeVar("P", bound=Pingable)


def overdue(conns: tuple[P, ...], pinged_at: float) -> list[P]:
    """The connections that were open at ``pinged_at`` and have not ponged since."""
    return [c for c in conns if c.opened_at <= pinged_at and c.last_pong < pinged_at]


class Keepalive(Generic[P]):
    def __init__(self, registry: ConnectionRegistry[P], fanout: Fanout,
                 config: Callable[[], Config],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._fanout = fanout
        self._config = config
        self._clock = clock
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.stop()
        self._schedule(self._config().keepalive.ping_interval, self._ping_round)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, delay: float, callback: Callable[..., None], *args: float) -> None:
        """Run ``callback`` after ``delay``; a delay of 0 means pings are disabled."""
        self._handle = None
        if delay > 0:
            self._handle = asyncio.get_running_loop().call_later(delay, callback, *args)

    def _ping_round(self) -> None:
        settings = self._config().keepalive
        pinged_at = self._clock()
        if len(self._registry):
            self._fanout.send_control(PING_FRAME)
        timeout = min(settings.ping_timeout, settings.ping_interval) or settings.ping_interval
        self._schedule(timeout, self._check_round, pinged_at)

    def _check_round(self, pinged_at: float) -> None:
        for conn in overdue(self._registry.snapshot(), pinged_at):
            log.debug("closing a connection that did not answer a ping")
            conn.end("ping_timeout", 1000, "ping timed out")
        interval = self._config().keepalive.ping_interval
        if interval:
            self._schedule(max(0.001, pinged_at + interval - self._clock()), self._ping_round)
        else:
            self._handle = None
