"""WebSocket keepalive: one timer pings every connection (RFC 6455 section 5.5.2).

Tornado's own keepalive runs an asyncio task per connection, which costs about a
kilobyte of memory per idle client and one send() per ping. Here one timer sends
the same two-byte ping frame to every connection through the fan-out's shared
batch, so under load a ping rides along with data at no extra send().

Each connection remembers when its oldest unanswered ping was actually written
(``ping_sent_at``; a busy daemon may write it well after the round began) and
when its last pong arrived (``last_pong``). A check every quarter of
``ping_timeout`` closes, as ``ping_timeout``, the connections whose oldest
unanswered ping is older than ``ping_timeout``. A ping_timeout of 0 never closes
anyone; a ping_interval of 0 sends no pings. Settings are read at every round, so
a SIGHUP reload applies from the next one.
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
#: Checks run this often relative to ping_timeout (never more often than MIN_CHECK).
CHECKS_PER_TIMEOUT = 4
MIN_CHECK_SECONDS = 0.01


class Pingable(Recipient, Protocol):
    ping_sent_at: float
    last_pong: float

    def end(self, reason: str, code: int, text: str | None = None) -> None: ...


P = TypeVar("P", bound=Pingable)


def awaiting_pong(conn: Pingable) -> bool:
    return conn.ping_sent_at > conn.last_pong


def overdue(conns: tuple[P, ...], now: float, timeout: float) -> list[P]:
    """The connections whose oldest unanswered ping was written ``timeout`` ago."""
    return [c for c in conns if c.ping_sent_at > c.last_pong and
            now - c.ping_sent_at >= timeout]


class Keepalive(Generic[P]):
    def __init__(self, registry: ConnectionRegistry[P], fanout: Fanout,
                 config: Callable[[], Config],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._fanout = fanout
        self._config = config
        self._clock = clock
        self._ping_timer: asyncio.TimerHandle | None = None
        self._check_timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """(Re)start pinging and checking with the current settings."""
        self.stop()
        settings = self._config().keepalive
        loop = asyncio.get_running_loop()
        if settings.ping_interval > 0:
            self._ping_timer = loop.call_later(settings.ping_interval, self._ping_round)
        if settings.ping_timeout > 0:
            self._check_timer = loop.call_later(self._check_every(), self._check_round)

    def stop(self) -> None:
        for timer in (self._ping_timer, self._check_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._check_timer = None

    def _check_every(self) -> float:
        timeout = self._config().keepalive.ping_timeout
        return max(MIN_CHECK_SECONDS, timeout / CHECKS_PER_TIMEOUT)

    def _ping_round(self) -> None:
        self._ping_timer = None
        if len(self._registry):
            self._fanout.send_control(PING_FRAME, self._stamp)
        interval = self._config().keepalive.ping_interval
        if interval > 0:
            self._ping_timer = asyncio.get_running_loop().call_later(interval,
                                                                     self._ping_round)

    def _stamp(self, conn: Recipient) -> None:
        """The ping was written to ``conn`` now; keep the oldest unanswered one."""
        pingable: Pingable = conn  # type: ignore[assignment]  # only Pingables are registered
        if not awaiting_pong(pingable):
            pingable.ping_sent_at = self._clock()

    def _check_round(self) -> None:
        self._check_timer = None
        timeout = self._config().keepalive.ping_timeout
        if timeout <= 0:
            return
        for conn in overdue(self._registry.snapshot(), self._clock(), timeout):
            log.debug("closing a connection that did not answer a ping")
            conn.end("ping_timeout", 1000, "ping timed out")
        self._check_timer = asyncio.get_running_loop().call_later(self._check_every(),
                                                                  self._check_round)
