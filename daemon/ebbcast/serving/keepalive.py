"""WebSocket keepalive: one timer pings every connection (RFC 6455 section 5.5.2).

Tornado's own keepalive runs an asyncio task per connection, which costs about a
kilobyte of memory per idle client. Here one timer walks the connections: a round
begins every ``ping_interval`` with the connections open at that moment, and every
``PING_STEP_SECONDS`` (0.1 s) the next share of them gets a two-byte ping, so that
the round is done within the interval and the pongs come back spread over it.
(Pinging every connection at once made 10,000 pongs arrive together; read in one
loop pass, they held up timers and broadcasts by 100 ms and more under load.)

Each connection remembers when its oldest unanswered ping was written
(``ping_sent_at``) and when its last pong arrived (``last_pong``). A check every
quarter of ``ping_timeout`` closes, as ``ping_timeout``, the connections whose
oldest unanswered ping is older than ``ping_timeout``, unless bytes from the client
wait unread: then this process is late, not the client silent (its pong may be among
them), and the next check decides. A ping_timeout of 0 never
closes anyone; a ping_interval of 0 sends no pings. Settings are read at every
step, so a SIGHUP reload applies from the next one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from ebbcast.config import Config
from ebbcast.serving.fanout import Recipient
from ebbcast.serving.registry import ConnectionRegistry

log = logging.getLogger(__name__)

#: An unmasked ping frame with an empty payload (RFC 6455 sections 5.2 and 5.5.2).
PING_FRAME = b"\x89\x00"
#: How often a share of the round's connections is pinged.
PING_STEP_SECONDS = 0.1
#: Checks run this often relative to ping_timeout (never more often than MIN_CHECK).
CHECKS_PER_TIMEOUT = 4
MIN_CHECK_SECONDS = 0.01


class Pingable(Recipient, Protocol):
    ping_sent_at: float
    last_pong: float

    def end(self, reason: str, code: int, text: str | None = None) -> None: ...

    def input_unread(self) -> bool:
        """Whether bytes from the client wait that this process has not handled."""


P = TypeVar("P", bound=Pingable)


def awaiting_pong(conn: Pingable) -> bool:
    return conn.ping_sent_at > conn.last_pong


def overdue(conns: tuple[P, ...], now: float, timeout: float) -> list[P]:
    """The connections whose oldest unanswered ping was written ``timeout`` ago."""
    return [c for c in conns if c.ping_sent_at > c.last_pong and
            now - c.ping_sent_at >= timeout]


def round_share(remaining: int, seconds_left: float) -> int:
    """How many of a round's connections this step pings: the ``remaining`` ones
    evenly over the steps left before the round is due to end (all of them once it
    is late: a busy loop fires the steps late, and a round must still end)."""
    steps = max(1, int(seconds_left / PING_STEP_SECONDS))
    return -(-remaining // steps)


class Keepalive(Generic[P]):
    def __init__(self, registry: ConnectionRegistry[P], config: Callable[[], Config],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._config = config
        self._clock = clock
        self._ping_timer: asyncio.TimerHandle | None = None
        self._check_timer: asyncio.TimerHandle | None = None
        self._round: tuple[P, ...] = ()
        self._index = 0
        self._next_round_at = 0.0

    def start(self) -> None:
        """(Re)start pinging and checking with the current settings."""
        self.stop()
        settings = self._config().keepalive
        loop = asyncio.get_running_loop()
        if settings.ping_interval > 0:
            self._next_round_at = 0.0  # the first step begins a round
            self._ping_timer = loop.call_later(settings.ping_interval, self._on_ping_timer)
        if settings.ping_timeout > 0:
            self._check_timer = loop.call_later(self._check_every(), self._check_round)

    def stop(self) -> None:
        for timer in (self._ping_timer, self._check_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._check_timer = None
        self._round = ()

    def _check_every(self) -> float:
        timeout = self._config().keepalive.ping_timeout
        return max(MIN_CHECK_SECONDS, timeout / CHECKS_PER_TIMEOUT)

    def _on_ping_timer(self) -> None:
        self._ping_timer = None
        delay = self.ping_step(self._clock())
        if delay is not None:
            self._ping_timer = asyncio.get_running_loop().call_later(delay,
                                                                     self._on_ping_timer)

    def ping_step(self, now: float) -> float | None:
        """Ping the round's next share (beginning a round when one is due); the
        seconds until the next step, or None when pinging is off."""
        interval = self._config().keepalive.ping_interval
        if interval <= 0:
            self._round = ()
            return None
        if not self._round and now >= self._next_round_at:
            self._round, self._index = self._registry.snapshot(), 0
            self._next_round_at = now + interval
        count = round_share(len(self._round) - self._index, self._next_round_at - now)
        share = self._round[self._index:self._index + count]
        self._index += len(share)
        for conn in share:
            if conn.send_frame(PING_FRAME):
                self._stamp(conn, now)
        if self._index >= len(self._round):
            self._round = ()  # the round is done: do not keep closed connections alive
            delay = max(0.0, self._next_round_at - now)
        else:
            delay = PING_STEP_SECONDS
        return delay

    @staticmethod
    def _stamp(conn: Pingable, now: float) -> None:
        """The ping was written to ``conn`` now; keep the oldest unanswered one."""
        if not awaiting_pong(conn):
            conn.ping_sent_at = now

    def _check_round(self) -> None:
        self._check_timer = None
        timeout = self._config().keepalive.ping_timeout
        if timeout <= 0:
            return
        for conn in overdue(self._registry.snapshot(), self._clock(), timeout):
            if conn.input_unread():  # its pong may be there: this process is behind
                continue
            log.debug("closing a connection that did not answer a ping")
            conn.end("ping_timeout", 1000, "ping timed out")
        self._check_timer = asyncio.get_running_loop().call_later(self._check_every(),
                                                                  self._check_round)
