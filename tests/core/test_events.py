"""The loop's events and queue (ebbcast.core.events)."""

from __future__ import annotations

import asyncio
import math
import signal
import time
from dataclasses import dataclass

from ebbcast.core.events import Common, DrainRequested, EventQueue, SignalReceived, Tick, who_asked


@dataclass(frozen=True)
class Own:
    """An event of the process's own, beside the common ones."""

    what: str


async def test_events_are_acted_on_in_order_and_a_tick_comes_when_asked(io_loop):
    queue: EventQueue[Own] = EventQueue()
    seen: list[Own | Common] = []
    wake = [math.inf]

    def act(event: Own | Common, now: float) -> None:
        seen.append(event)
        wake[0] = now + 0.01 if len(seen) == 3 else math.inf

    queue.record_signal(signal.SIGUSR2)
    queue.put(DrainRequested("the admin API"))
    queue.put(Own("hand over"))
    started = time.monotonic()
    await asyncio.wait_for(queue.run(act, lambda: wake[0], lambda: len(seen) == 4), 5)
    assert time.monotonic() - started >= 0.01
    assert seen == [SignalReceived(signal.SIGUSR2), DrainRequested("the admin API"),
                    Own("hand over"), Tick()]
    assert [who_asked(e) for e in (seen[0], seen[1])] == ["SIGUSR2", "the admin API"]
