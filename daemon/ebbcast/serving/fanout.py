"""Fan-out: hand every broadcast to every local connection, coalesced and sliced.

Coalescing. A broadcast is encoded once (:func:`ebbcast.serving.wire.encode_frame`) and
appended to the pending batch; nothing is written yet. A flush then writes, to
each connection, everything it is owed as one buffer: the batch joined once and
shared by every connection owed exactly the batch. N broadcasts to C connections
cost C writes (C send() calls), not N x C.

Slicing. One loop pass writes for at most ``slice_seconds`` (5 ms), then yields,
so timers (periodic frames, pings), handshakes and reads run between slices and a
fan-out to many thousands of clients never stalls the loop for long. Broadcasts
made while a flush is under way join the next batch, which is written once the
current one has reached every connection; so the busier the daemon, the more
frames each write carries, and every connection still sees frames in order.

Private frames. A connection owed something else (its welcome, an error frame, a
broadcast that excludes it, or frames from after it joined) has its own list for
that batch, kept in order with the broadcasts. Connections that are closing are
skipped, never written to. A slow client costs the others nothing: its stream
buffers what it cannot take yet, up to limits.client_queue_bytes, and it is
aborted as a slow consumer beyond that (see the handler's ``send_frame``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from ebbcast.core.metrics import Metrics
from ebbcast.serving.registry import ConnectionRegistry
from ebbcast.serving.wire import encode_frame

log = logging.getLogger(__name__)

#: Longest a flush writes before it yields to the loop, and how many connections
#: it writes between looks at the clock.
SLICE_SECONDS = 0.005
WRITES_PER_CLOCK_CHECK = 32


class Recipient(Protocol):
    def send_frame(self, frame: bytes) -> bool:
        """Write encoded frames now; False if the connection is closing or was dropped."""


class _Batch:
    """What is owed for one flush: shared frames, and per-connection exceptions."""

    __slots__ = ("frames", "queued_at", "owed")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.queued_at: list[float] = []
        self.owed: dict[Recipient, list[bytes]] = {}

    def __bool__(self) -> bool:
        return bool(self.frames or self.owed)


class _Flush:
    """A batch being written, slice by slice."""

    __slots__ = ("batch", "private", "shared", "targets", "index", "sent")

    def __init__(self, batch: _Batch, targets: tuple[Recipient, ...]) -> None:
        self.batch = batch
        self.private = list(batch.owed.items())
        self.shared = b"".join(batch.frames)
        self.targets = targets if self.shared else ()
        self.index = 0
        self.sent = 0


class Fanout:
    """``on_failing(n)`` is called after each batch that failed, with how many
    failed in a row (reset by one that does not): the guard keeps one bug from
    wedging every later broadcast, and the owner decides when failing has gone on
    long enough to stop (``ebbcast.serving.process``)."""

    def __init__(self, registry: ConnectionRegistry[Recipient], metrics: Metrics,
                 slice_seconds: float = SLICE_SECONDS,
                 writes_per_check: int = WRITES_PER_CLOCK_CHECK,
                 on_failing: Callable[[int], None] | None = None) -> None:
        self._registry = registry
        self._metrics = metrics
        self._on_failing = on_failing or (lambda failures: None)
        self._failures_in_a_row = 0
        self._slice_seconds = slice_seconds
        self._writes_per_check = writes_per_check
        self._pending = _Batch()
        self._flush: _Flush | None = None
        self._scheduled = False

    def broadcast(self, payload: str | bytes, source: str,
                  exclude: Recipient | None = None, relayed: bool = False) -> int:
        """Queue ``payload`` (text, or bytes for a binary frame) for every connection
        but ``exclude``; return how many connections it is queued for.

        ``ebbcast_broadcasts_total`` counts a broadcast once, where it began: a frame
        ``relayed`` from another worker or instance is delivered but not counted
        again, so the metric summed over processes (or instances) stays true.
        """
        if isinstance(payload, bytes):
            frame = encode_frame(payload, binary=True)
        else:
            frame = encode_frame(payload.encode())
        pending = self._pending
        if exclude is not None:
            self._owed_list(exclude)  # from now on it follows its own list
        pending.frames.append(frame)
        pending.queued_at.append(time.perf_counter())
        for conn, owed in pending.owed.items():
            if conn is not exclude:
                owed.append(frame)
        if not relayed:
            self._metrics.broadcasts.labels(source).inc()
        self._schedule()
        return len(self._registry) - (exclude is not None and exclude in self._registry)

    def send_private(self, conn: Recipient, frame: bytes) -> None:
        """Queue an encoded frame for one connection, in order with the broadcasts."""
        self._owed_list(conn).append(frame)
        self._schedule()

    def send_to(self, conns: Iterable[Recipient], frame: bytes) -> None:
        """Queue one encoded frame for each of ``conns`` (a channel's subscribers),
        in order with the broadcasts: the cost is in proportion to ``conns``, not
        to every connection."""
        queued = False
        for conn in conns:
            self._owed_list(conn).append(frame)
            queued = True
        if queued:
            self._schedule()

    def flush_one(self, conn: Recipient) -> None:
        """Write now what the pending batch owes ``conn``, which is being torn down.

        Skipped while a batch is being written: ``conn`` may be owed part of it,
        and its frames must not overtake each other.
        """
        if self._flush is not None:
            return
        pending = self._pending
        frames = pending.owed.get(conn, pending.frames)
        if frames and conn.send_frame(b"".join(frames)):
            self._metrics.sent.inc(len(frames))
        pending.owed[conn] = []  # owed nothing more from this batch

    def joined(self, conn: Recipient) -> None:
        """A connection joined: it is owed only what is queued from now on (with
        nothing queued, it needs no entry of its own: it takes the shared frames)."""
        if self._pending.frames:
            self._pending.owed.setdefault(conn, [])

    @property
    def idle(self) -> bool:
        """Nothing is queued or being written."""
        return self._flush is None and not self._pending

    def _owed_list(self, conn: Recipient) -> list[bytes]:
        owed = self._pending.owed.get(conn)
        if owed is None:
            owed = self._pending.owed[conn] = list(self._pending.frames)
        return owed

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        if self._flush is None:
            if not self._pending:
                return
            self._flush = _Flush(self._pending, self._registry.snapshot())
            self._pending = _Batch()
        try:
            done = self._write_slice(self._flush)
            self._failures_in_a_row = 0
        except Exception:  # a bug must not wedge every later broadcast
            log.exception("fan-out failed; the rest of this batch is dropped")
            done = True
            self._failures_in_a_row += 1
            self._on_failing(self._failures_in_a_row)
        if done:
            self._finish(self._flush)
            self._flush = None
            if not self._pending:
                return
        self._schedule()

    def _write_slice(self, flush: _Flush) -> bool:
        """Write for up to slice_seconds; True when the batch is done."""
        give_up = time.perf_counter() + self._slice_seconds
        while not self._write_some(flush, self._writes_per_check):
            if time.perf_counter() >= give_up:
                return False
        return True

    def _write_some(self, flush: _Flush, budget: int) -> bool:
        """Write to up to ``budget`` connections; True when the batch is done."""
        private, owed = flush.private, flush.batch.owed
        while budget and private:
            conn, frames = private.pop()
            budget -= 1
            if frames and conn.send_frame(b"".join(frames)):
                flush.sent += len(frames)
        targets, shared, frames_per_write = flush.targets, flush.shared, len(flush.batch.frames)
        index, end = flush.index, len(targets)
        while budget and index < end:
            conn = targets[index]
            index += 1
            if conn not in owed:
                budget -= 1
                if conn.send_frame(shared):
                    flush.sent += frames_per_write
        flush.index = index
        return not private and index >= end

    def _finish(self, flush: _Flush) -> None:
        finished = time.perf_counter()
        for started in flush.batch.queued_at:
            self._metrics.broadcast_duration.observe(finished - started)
        self._metrics.sent.inc(flush.sent)
