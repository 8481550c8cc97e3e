"""The local link between the main process and one worker (SPEC section 8).

With ``server.workers = N`` the main process creates one AF_UNIX stream
socketpair per worker at start-up and keeps one end; the worker inherits the
other. The link carries small records, each ``<length:4 bytes big-endian><kind:1
byte><body>``:

worker -> main
    ``F`` a frame to relay to every other worker (body: ``backplane.encode``);
    ``R`` the worker is serving; ``C`` its connection count (ASCII digits);
    ``H`` a heartbeat, every HEARTBEAT_SECONDS (a worker that goes silent is stuck).
main -> worker
    ``F`` a frame another worker relayed: deliver it to local clients only;
    ``I`` an admin broadcast to inject: deliver locally *and* publish it, as if a
    local client had sent it; ``T`` connections on the other workers (ASCII).

A stream is FIFO and the main process relays each worker's records in the order
it reads them, so every worker receives one sender's frames in the order they
were sent. The link closing means the other side is gone: a worker whose main
process died drains.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

from tornado.ioloop import PeriodicCallback
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError

from ebbcast.backplane import MemoryBackplane, decode, encode

log = logging.getLogger(__name__)

FRAME, READY, COUNT, HEARTBEAT, INJECT, OTHERS = b"F", b"R", b"C", b"H", b"I", b"T"
HEARTBEAT_SECONDS = 1.0
_HEADER = struct.Struct(">IB")
#: What one side may leave unread on the link before the writer gives up on it
#: (a worker whose loop is stuck): beyond it, frames are dropped and counted.
MAX_BACKLOG_BYTES = 64 * 1024 * 1024
READ_CHUNK = 256 * 1024


def pack(kind: bytes, body: bytes = b"") -> bytes:
    return _HEADER.pack(len(body), kind[0]) + body


class Unpacker:
    """Splits a byte stream back into ``(kind, body)`` records."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buffer += data
        records = []
        start, size = 0, len(self._buffer)
        while size - start >= _HEADER.size:
            length, kind = _HEADER.unpack_from(self._buffer, start)
            end = start + _HEADER.size + length
            if end > size:
                break
            records.append((bytes((kind,)), bytes(self._buffer[start + _HEADER.size:end])))
            start = end
        del self._buffer[:start]
        return records


class Link:
    """One end of a relay socketpair, on Tornado's loop.

    ``on_record(kind, body)`` is called for each record read, in order;
    ``on_closed()`` once, when the other side has gone. ``send`` never blocks:
    records wait in the stream's buffer, up to MAX_BACKLOG_BYTES.
    """

    def __init__(self, sock: socket.socket, on_record: Callable[[bytes, bytes], None],
                 on_closed: Callable[[], None]) -> None:
        sock.setblocking(False)
        self._stream = IOStream(sock, max_write_buffer_size=MAX_BACKLOG_BYTES)
        self._on_record = on_record
        self._on_closed = on_closed
        self._reader: asyncio.Task[None] | None = None
        self.dropped = 0

    def start(self) -> None:
        self._reader = asyncio.ensure_future(self._read_forever())

    def send(self, kind: bytes, body: bytes = b"") -> bool:
        """Queue one record; False (and counted in ``dropped``) if it cannot be."""
        return self.send_packed(pack(kind, body))

    def send_packed(self, record: bytes) -> bool:
        """``send`` for a record already packed (one frame relayed to many links is
        packed once)."""
        if self._stream.closed():
            return False
        try:
            future = self._stream.write(record)
        except StreamClosedError:
            return False
        except StreamBufferFullError:  # the other side has stopped reading
            self.dropped += 1
            log.debug("relay link backlogged: a record dropped")
            return False
        future.add_done_callback(_ignore_closed)
        return True

    async def _read_forever(self) -> None:
        unpacker = Unpacker()
        try:
            while True:
                data = await self._stream.read_bytes(READ_CHUNK, partial=True)
                for kind, body in unpacker.feed(data):
                    self._dispatch(kind, body)
        except StreamClosedError:
            pass
        self._on_closed()

    def _dispatch(self, kind: bytes, body: bytes) -> None:
        """One record to ``on_record``; a failure there loses that record only."""
        try:
            self._on_record(kind, body)
        except Exception:
            log.exception("relay record %r could not be handled", kind)

    def close(self) -> None:
        """Idempotent; does not call ``on_closed``."""
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self._stream.close()


def _ignore_closed(future: Any) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so a closed link is not logged as unhandled


class WorkerLink:
    """The worker's end: frames in and out, readiness and counts to the main process.

    ``deliver(payload, source)`` fans a frame out to this worker's clients;
    ``inject(payload, source)`` does that and publishes it on the backplane;
    ``on_others(n)`` records the connections on the other workers;
    ``on_lost()`` is called if the main process goes away.
    """

    def __init__(self, sock: socket.socket, node: str,
                 deliver: Callable[[str | bytes, str], None],
                 inject: Callable[[str | bytes, str], None],
                 on_others: Callable[[int], None], on_lost: Callable[[], None]) -> None:
        self._node = node
        self._deliver = deliver
        self._inject = inject
        self._on_others = on_others
        self._on_lost = on_lost
        self._sock = sock
        self._link: Link | None = None  # made in start(), on the running loop
        self._heartbeat: PeriodicCallback | None = None

    def start(self) -> None:
        self._link = Link(self._sock, self._on_record, self._on_lost)
        self._link.start()
        self._heartbeat = PeriodicCallback(self._beat, HEARTBEAT_SECONDS * 1000)
        self._heartbeat.start()

    def _send(self, kind: bytes, body: bytes = b"") -> bool:
        return self._link is not None and self._link.send(kind, body)

    def ready(self) -> None:
        self._send(READY)

    def _beat(self) -> None:
        self._send(HEARTBEAT)

    def report_count(self, count: int) -> None:
        """Send the connection count (the registry reports only changes)."""
        self._send(COUNT, str(count).encode())

    def publish(self, payload: str | bytes, source: str) -> bool:
        return self._send(FRAME, encode(self._node, source, payload))

    def _on_record(self, kind: bytes, body: bytes) -> None:
        if kind == FRAME or kind == INJECT:
            _, source, _, payload = decode(body)
            (self._deliver if kind == FRAME else self._inject)(payload, source)
        elif kind == OTHERS:
            self._on_others(int(body))

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self._link is not None:
            self._link.close()
        else:
            self._sock.close()


class RelayBackplane(MemoryBackplane):
    """The ``memory://`` backplane of a worker: frames go to the main process,
    which relays them to the other workers."""

    def __init__(self, link: WorkerLink, on_dropped: Callable[[int], None]) -> None:
        self._link = link
        self._on_dropped = on_dropped

    def publish(self, payload: str | bytes, source: str) -> None:
        if not self._link.publish(payload, source):
            self._on_dropped(1)
