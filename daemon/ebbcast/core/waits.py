"""Waiting with a time limit, without losing a cancellation.

Before Python 3.12, ``asyncio.wait_for`` swallows its caller's cancellation when
what it waits for finishes at that same moment: the caller goes on as if it had
never been cancelled. ``asyncio.run`` turns Ctrl+C into exactly such a
cancellation, and a stop cancels the backplane's loops; a client reading a stream
of frames, or a loop woken by a steady flow of events, meets that moment often
(``ebbcast client --reconnect`` went on after Ctrl+C while a publisher kept it
busy). :func:`within` waits with ``asyncio.wait``, which never swallows one; and
:func:`cancel_for_good` stops tasks even when something inside one swallows it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], timeout: float | None) -> T:
    """``await awaitable``, for at most ``timeout`` seconds (None: no limit).

    Raises ``asyncio.TimeoutError`` when the time is up, and cancels the awaitable;
    a cancellation of the caller cancels it too, and always reaches the caller."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    finally:
        if not task.done():
            task.cancel()
    if not done:
        raise asyncio.TimeoutError()
    return task.result()


#: How long cancel_for_good() lets its tasks end (a cleanup in a ``finally`` may
#: await a connection's close) before it cancels them again.
RECANCEL_SECONDS = 1.0


async def cancel_for_good(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended. A cancellation that lands
    inside a redis-py command can be swallowed (the command returns as if nothing
    happened, and the loop around it goes on): a task still running after
    RECANCEL_SECONDS is cancelled again, so that stopping never hangs on it."""
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=RECANCEL_SECONDS)
    await asyncio.gather(*tasks, return_exceptions=True)
