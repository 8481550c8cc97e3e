"""Fan-out: hand one broadcast to every local connection.

A broadcast is encoded once (:func:`ebbcast.wire.encode_frame`) and the same bytes
are queued on every connection's stream without awaiting any of them, so a slow
client costs the others nothing: its stream buffers what it cannot take yet, up to
limits.client_queue_bytes, and is aborted as a slow consumer beyond that.
Connections that are closing are skipped.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from ebbcast.metrics import Metrics
from ebbcast.registry import ConnectionRegistry
from ebbcast.wire import encode_frame

log = logging.getLogger(__name__)


class Recipient(Protocol):
    def send_frame(self, frame: bytes) -> bool:
        """Queue an encoded frame; False if the connection is closing or was dropped."""


class Fanout:
    def __init__(self, registry: ConnectionRegistry[Recipient], metrics: Metrics) -> None:
        self._registry = registry
        self._metrics = metrics

    def broadcast(self, payload: str | bytes, source: str,
                  exclude: Recipient | None = None) -> int:
        """Send ``payload`` (text, or bytes for a binary frame) to every connection
        but ``exclude``; return how many connections it was queued for."""
        started = time.perf_counter()
        if isinstance(payload, bytes):
            frame = encode_frame(payload, binary=True)
        else:
            frame = encode_frame(payload.encode())
        delivered = 0
        for conn in self._registry.snapshot():
            if conn is not exclude and conn.send_frame(frame):
                delivered += 1
        self._metrics.sent.inc(delivered)
        self._metrics.broadcasts.labels(source).inc()
        self._metrics.broadcast_duration.observe(time.perf_counter() - started)
        return delivered
