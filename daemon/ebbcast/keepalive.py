"""WebSocket keepalive: one timer pings every connection (RFC 6455 section 5.5.2).

Tornado's own keepalive runs an asyncio task per connection, which costs about a
kilobyte of memory per idle client and one send() per ping. Here one timer sends
the same two-byte ping frame to every connection through the fan-out's shared
batch (so under load a ping rides along with data, at no extra send()), and
``ping_timeout`` later checks that each pinged connection has answered with a pong
since; one that has not is closed and counted as ``ping_timeout``. A ping_timeout
of 0 never closes anyone; a ping_interval of 0 sends no pings.

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
        self._next_round: asyncio.TimerHandle | None = None
        self._checks: set[asyncio.TimerHandle] = set()

    def start(self) -> None:
        """(Re)start the rounds with the current ping_interval; 0 disables pings."""
        self.stop()
        interval = self._config().keepalive.ping_interval
        if interval > 0:
            self._next_round = asyncio.get_running_loop().call_later(interval,
                                                                     self._ping_round)

    def stop(self) -> None:
        for handle in (self._next_round, *self._checks):
            if handle is not None:
                handle.cancel()
        self._next_round = None
        self._checks.clear()

    def _ping_round(self) -> None:
        settings = self._config().keepalive
        loop = asyncio.get_running_loop()
        pinged_at = self._clock()
        if len(self._registry):
            self._fanout.send_control(PING_FRAME)
            if settings.ping_timeout > 0:
                check = loop.call_later(settings.ping_timeout, self._check_round, pinged_at)
                self._checks.add(check)
        self._next_round = None
        if settings.ping_interval > 0:
            self._next_round = loop.call_later(settings.ping_interval, self._ping_round)

    def _check_round(self, pinged_at: float) -> None:
        """Close the connections that have not ponged since the ping at pinged_at.

        Rounds may overlap (ping_timeout longer than ping_interval): a pong answers
        every ping sent before it.
        """
        self._checks = {h for h in self._checks if not h.cancelled() and h.when() >
                        asyncio.get_running_loop().time()}
        for conn in overdue(self._registry.snapshot(), pinged_at):
            log.debug("closing a connection that did not answer a ping")
            conn.end("ping_timeout", 1000, "ping timed out")
