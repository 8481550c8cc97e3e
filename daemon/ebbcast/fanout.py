"""Fan-out: hand every broadcast to every local connection, coalesced per loop pass.

A broadcast is encoded once (:func:`ebbcast.wire.encode_frame`) and appended to a
shared batch; nothing is written yet. At the end of the event-loop iteration a
single flush writes, to each connection, everything it is owed as one buffer: the
batch joined once and shared by every connection that is owed exactly the batch,
so N broadcasts to C connections cost C writes (C send() calls), not N x C.

A connection owed something else this iteration (a private frame such as its
welcome or an error, a broadcast that excludes it, or a join mid-iteration) gets
its own list, kept in order with the broadcasts. Connections that are closing are
skipped at the flush, never written to. A slow client costs the others nothing:
its stream buffers what it cannot take yet, up to limits.client_queue_bytes, and
it is aborted as a slow consumer beyond that (see the handler's ``send_frame``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from ebbcast.metrics import Metrics
from ebbcast.registry import ConnectionRegistry
from ebbcast.wire import encode_frame

log = logging.getLogger(__name__)


class Recipient(Protocol):
    def send_frame(self, frame: bytes) -> bool:
        """Write encoded frames now; False if the connection is closing or was dropped."""


class Fanout:
    def __init__(self, registry: ConnectionRegistry[Recipient], metrics: Metrics) -> None:
        self._registry = registry
        self._metrics = metrics
        self._batch: list[bytes] = []
        self._queued_at: list[float] = []
        self._owed: dict[Recipient, list[bytes]] = {}
        self._flush_scheduled = False

    def broadcast(self, payload: str | bytes, source: str,
                  exclude: Recipient | None = None) -> int:
        """Queue ``payload`` (text, or bytes for a binary frame) for every connection
        but ``exclude``; return how many connections it is queued for."""
        if isinstance(payload, bytes):
            frame = encode_frame(payload, binary=True)
        else:
            frame = encode_frame(payload.encode())
        if exclude is not None:
            self._owed_list(exclude)  # from now on it follows its own list
        self._batch.append(frame)
        self._queued_at.append(time.perf_counter())
        for conn, owed in self._owed.items():
            if conn is not exclude:
                owed.append(frame)
        self._metrics.broadcasts.labels(source).inc()
        self._schedule_flush()
        return len(self._registry) - (exclude is not None and exclude in self._registry)

    def send_private(self, conn: Recipient, frame: bytes) -> None:
        """Queue an encoded frame for one connection, in order with the broadcasts."""
        self._owed_list(conn).append(frame)
        self._schedule_flush()

    def joined(self, conn: Recipient) -> None:
        """A connection joined: it is owed only what is broadcast from now on."""
        self._owed.setdefault(conn, [])

    def _owed_list(self, conn: Recipient) -> list[bytes]:
        owed = self._owed.get(conn)
        if owed is None:
            owed = self._owed[conn] = list(self._batch)
        return owed

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write what every connection is owed; one write per connection."""
        self._flush_scheduled = False
        batch, queued_at, owed = self._batch, self._queued_at, self._owed
        self._batch, self._queued_at, self._owed = [], [], {}
        sent = 0
        for conn, frames in owed.items():
            if frames and conn.send_frame(b"".join(frames)):
                sent += len(frames)
        if batch:
            shared = b"".join(batch)
            written = 0
            for conn in self._registry.snapshot():
                if conn not in owed and conn.send_frame(shared):
                    written += 1
            sent += written * len(batch)
            finished = time.perf_counter()
            for started in queued_at:
                self._metrics.broadcast_duration.observe(finished - started)
        self._metrics.sent.inc(sent)
