"""The daemon's event loop: asyncio's, taking at most so many I/O events per pass.

In each pass asyncio runs the callback of every descriptor the selector reports
ready, then the timers that fell due meanwhile. When 10,000 clients leave at once
(or connect at once), one pass handles all 10,000 and a timer due during it waits
for all of them: the periodic broadcast, keepalive pings and every deadline half a
second late. Here epoll is asked for at most ``EVENTS_PER_PASS`` events a pass.
Those not taken stay ready (epoll is level-triggered here) and epoll hands its
ready list out in turn, so they come first in the next pass, after the timers
that fell due. A pass of closes or handshakes then costs milliseconds, not the
whole storm.

``selectors.EpollSelector`` keeps its ``select.epoll`` in ``_selector`` and calls
its ``poll(timeout, maxevents)``; that is checked when the selector is made, and
a Python where it is not so fails at start-up with a message rather than serve
with storms that stall the loop.
"""

from __future__ import annotations

import asyncio
import select
import selectors
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: Events taken per loop pass. 10,000 clients leaving at once (bench/extras.py) held
#: the periodic timer 464 to 649 ms with no cap; capped at 64, 33 to 40 ms; at 16,
#: 24 to 26 ms. But a pass under a flood also writes a 5 ms slice of the fan-out, and
#: at 16 events a pass 10,000 clients' pongs were read too slowly: thousands were
#: closed for a ping timeout (3 s). At 64 all of them stayed.
EVENTS_PER_PASS = 64


class _CappedEpoll:
    """A ``select.epoll`` whose ``poll`` returns at most ``cap`` events."""

    def __init__(self, epoll: select.epoll, cap: int) -> None:
        self._epoll = epoll
        self._cap = cap

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        wanted = self._cap if maxevents <= 0 else min(maxevents, self._cap)
        return self._epoll.poll(timeout, wanted)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._epoll, name)  # register, modify, unregister, fileno, close


class CappedEpollSelector(selectors.EpollSelector):
    """``selectors.EpollSelector`` reporting at most ``cap`` ready descriptors a call."""

    def __init__(self, cap: int = EVENTS_PER_PASS) -> None:
        if cap < 1:
            raise ValueError("cap must be at least 1")
        super().__init__()
        inner = getattr(self, "_selector", None)
        if not isinstance(inner, select.epoll):
            self.close()
            raise RuntimeError(
                "this Python's selectors.EpollSelector keeps no select.epoll in _selector: "
                "ebbcast cannot cap the I/O events of a loop pass "
                "(ebbcast.core.eventloop); use a Python it was tested with (3.10 to 3.13)")
        self._selector: Any = _CappedEpoll(inner, cap)


def new_loop(cap: int = EVENTS_PER_PASS) -> asyncio.AbstractEventLoop:
    return asyncio.SelectorEventLoop(CappedEpollSelector(cap))


class _CappedPolicy(asyncio.DefaultEventLoopPolicy):
    """Python 3.10, which has no ``asyncio.Runner``: ``asyncio.run`` takes its loop
    from the policy."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self._cap = cap

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return new_loop(self._cap)


def run(main: Coroutine[Any, Any, T], cap: int = EVENTS_PER_PASS) -> T:
    """``asyncio.run(main)``, on a loop from :func:`new_loop`."""
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=lambda: new_loop(cap)) as runner:
            return runner.run(main)
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_CappedPolicy(cap))
    try:
        return asyncio.run(main)
    finally:
        asyncio.set_event_loop_policy(previous)
