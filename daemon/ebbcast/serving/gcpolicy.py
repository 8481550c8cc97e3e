"""Keep Python's cyclic garbage collector from stalling the loop.

With 10,000 clients the daemon holds about half a million GC-tracked objects, and
a full collection walks all of them: 300-400 ms here, during which nothing is
sent, no timer fires and no handshake completes. Those objects are long-lived
and, since connections break their reference cycles on close
(``Connection._break_reference_cycles``), freed by reference counting when
their client leaves. So, twice a second, this moves everything tracked into the
permanent generation (``gc.freeze()``, which costs O(1)), and the collector's
passes stay small: they only ever see what was allocated since.

Safety valve: frozen objects that later become cyclic garbage are not collected.
When the number of connections has doubled since the last full collection (so
the frozen set has roughly doubled too), it is unfrozen, collected once and
frozen again; that pass is logged at DEBUG with its duration. (It is not
``gc.get_freeze_count()`` that decides: that walks the whole frozen list.) That
pass costs some 15 to 20 ms per 1,000 connections, so it waits for a moment that
can afford it: until connections stop growing (in a reconnect storm, a drain or
an upgrade elsewhere sending thousands of clients here, it would hold up every
handshake in flight) and no broadcast is being written (under a flood it would
hold up every delivery and timer).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

FREEZE_EVERY_SECONDS = 0.5


def collect_now(connections: int, previous: int, at_last_collection: int,
                quiet: bool = True) -> bool:
    """Whether to run the full collection now: connections have doubled since the
    last one (at least 2,000), are no longer growing (``previous``: at the last
    look, half a second ago), and no broadcast is being written (``quiet``)."""
    return connections > 2 * max(at_last_collection, 1000) and connections <= previous \
        and quiet


class CollectorPolicy:
    def __init__(self, connections: Callable[[], int],
                 every: float = FREEZE_EVERY_SECONDS,
                 quiet: Callable[[], bool] = lambda: True) -> None:
        """``connections()`` says how many clients are open now; ``quiet()``
        whether no broadcast is queued or being written."""
        self._connections = connections
        self._quiet = quiet
        self._every = every
        self._timer: asyncio.TimerHandle | None = None
        self._connections_at_collect = 0
        self._connections_before = 0

    def start(self) -> None:
        """Collect once and freeze what start-up left, then keep freezing newcomers."""
        self.stop()
        self._full_collection()
        self._schedule()

    def stop(self) -> None:
        """Stop freezing and hand every object back to the collector."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            gc.unfreeze()

    def _schedule(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self._every, self._tick)

    def _tick(self) -> None:
        connections = self._connections()
        if collect_now(connections, self._connections_before, self._connections_at_collect,
                       self._quiet()):
            self._full_collection()
        else:
            gc.freeze()
        self._connections_before = connections
        self._schedule()

    def _full_collection(self) -> None:
        started = time.perf_counter()
        gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        self._connections_at_collect = self._connections()
        log.debug("full garbage collection at %d connections: %d objects collected, %.0f ms",
                  self._connections_at_collect, collected,
                  (time.perf_counter() - started) * 1000)
