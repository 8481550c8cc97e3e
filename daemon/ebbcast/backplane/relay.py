"""The local link between the main process and one worker (docs/scaling.md, "Every
core: worker processes").

With ``server.workers = N`` the main process creates one AF_UNIX stream
socketpair per worker at start-up and keeps one end; the worker inherits the
other. The link carries small typed records (``ebbcast.backplane.records``: what each
is, and how a side ignores kinds it does not know, as two releases talk during an
upgrade).

A stream is FIFO and the main process relays each worker's records in the order
it reads them, so every worker receives one sender's frames in the order they
were sent. The link closing means the other side is gone: a worker whose main
process died drains.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections.abc import Callable
from typing import Any, Protocol

from tornado.ioloop import PeriodicCallback
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError

from ebbcast.backplane import records
from ebbcast.backplane.base import ChannelFeed, Envelope, SequencedFeed
from ebbcast.backplane.channels import Ask
from ebbcast.backplane.memory import MemoryBackplane
from ebbcast.backplane.records import HEADER, Received, Record, pack, parse

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
#: What one side may leave unread on the link before the writer gives up on it
#: (a worker whose loop is stuck): beyond it, frames are dropped and counted.
MAX_BACKLOG_BYTES = 64 * 1024 * 1024
READ_CHUNK = 256 * 1024
#: Records handled before the reader lets the loop run (timers, clients): a chunk
#: can hold thousands (10,000 clients leaving at once), some 50 ms of work in one go.
RECORDS_PER_STEP = 256


class Unpacker:
    """Splits a byte stream back into ``(kind, body)`` records (``records.parse``
    makes each a record)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buffer += data
        records = []
        start, size = 0, len(self._buffer)
        while size - start >= HEADER.size:
            length, kind = HEADER.unpack_from(self._buffer, start)
            end = start + HEADER.size + length
            if end > size:
                break
            records.append((bytes((kind,)), bytes(self._buffer[start + HEADER.size:end])))
            start = end
        del self._buffer[:start]
        return records


class Link:
    """One end of a relay socketpair, on Tornado's loop.

    ``on_record(record)`` is called for each record read, in order (one this
    release cannot read comes as ``records.Unknown``);
    ``on_closed()`` once, when the other side has gone. ``send`` never blocks:
    records wait in the stream's buffer, up to MAX_BACKLOG_BYTES.
    """

    def __init__(self, sock: socket.socket, on_record: Callable[[Received], None],
                 on_closed: Callable[[], None]) -> None:
        sock.setblocking(False)
        self._stream = IOStream(sock, max_write_buffer_size=MAX_BACKLOG_BYTES)
        self._on_record = on_record
        self._on_closed = on_closed
        self._reader: asyncio.Task[None] | None = None
        self._outgoing: list[bytes] = []  # records of this pass of the loop
        self._backlog = 0  # bytes sent and not yet written to the socket
        self.dropped = 0

    def start(self) -> None:
        self._reader = asyncio.ensure_future(self._read_forever())

    def send(self, record: Record) -> bool:
        """Queue one record; False (and counted in ``dropped``) if it cannot be.
        An urgent one (``Accept``, ``HandOver``) goes out now, with what is queued
        before it."""
        queued = self.send_packed(pack(record))
        if queued and record.URGENT:
            self._flush()
        return queued

    def send_packed(self, record: bytes) -> bool:
        """``send`` for a record already packed (one frame relayed to many links is
        packed once). The records of one pass of the loop go out in one write."""
        if self._stream.closed():
            return False
        if self._backlog + len(record) > MAX_BACKLOG_BYTES:  # the other side has stopped
            self.dropped += 1
            log.debug("relay link backlogged: a record dropped")
            return False
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(record)
        self._backlog += len(record)
        return True

    def _flush(self) -> None:
        data = b"".join(self._outgoing)
        self._outgoing = []
        if not data or self._stream.closed():
            return
        try:
            future = self._stream.write(data)
        except (StreamClosedError, StreamBufferFullError):
            return
        future.add_done_callback(lambda done: self._written(len(data), done))

    def _written(self, size: int, future: Any) -> None:
        self._backlog -= size
        _ignore_closed(future)

    async def _read_forever(self) -> None:
        unpacker = Unpacker()
        try:
            while True:
                data = await self._stream.read_bytes(READ_CHUNK, partial=True)
                for count, (kind, body) in enumerate(unpacker.feed(data), 1):
                    self._dispatch(kind, body)
                    if count % RECORDS_PER_STEP == 0:
                        await asyncio.sleep(0)  # in order still: the rest come next
        except StreamClosedError:
            pass
        self._on_closed()

    def _dispatch(self, kind: bytes, body: bytes) -> None:
        """One record to ``on_record``; a failure (in reading it, or there) loses
        that record only."""
        try:
            record = parse(kind, body)
        except Exception:
            log.exception("relay record %r could not be handled", kind)
            record = records.Unknown(kind, body)  # unreadable, but its sender is alive
        try:
            self._on_record(record)
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


class LinkPeer(Protocol):
    """What a serving process does with the main process's records."""

    def deliver_remote(self, payload: str | bytes, source: str) -> None:
        """A frame another worker sent: fan it out to this one's clients only."""

    def inject(self, payload: str | bytes, source: str) -> None:
        """An admin broadcast: deliver it here and publish it on."""

    def set_elsewhere(self, count: int) -> None:
        """Connections on the daemon's other serving processes."""

    def start_accepting(self) -> None: ...

    def hand_over(self) -> None:
        """A new generation serves: drain as an upgrade."""

    def main_lost(self) -> None: ...


class WorkerLink:
    """The worker's end: frames in and out, readiness and counts to the main
    process, commands from it to ``peer``, sequenced broadcasts to ``feed``; and
    the ``Sequencing`` of a worker whose main process sequences."""

    def __init__(self, sock: socket.socket, node: str, peer: LinkPeer,
                 feed: SequencedFeed, channels: ChannelFeed) -> None:
        # unique even for a serving process restarted inside the main process (same
        # pid), whose tokens start again at 1
        self._node = f"{node}/{secrets.token_hex(4)}"
        self._peer = peer
        self._feed = feed
        self._channels = channels
        self._sock = sock
        self._link: Link | None = None  # made in start(), on the running loop
        self._heartbeat: PeriodicCallback | None = None
        self._epoch = ""  # the main process's, once it says it sequences
        self._channels_up = True  # until the main process says its channels cannot publish

    def start(self) -> None:
        self._link = Link(self._sock, self._on_record, self._peer.main_lost)
        self._link.start()
        self._heartbeat = PeriodicCallback(self._beat, HEARTBEAT_SECONDS * 1000)
        self._heartbeat.start()

    def _send(self, record: Record) -> bool:
        return self._link is not None and self._link.send(record)

    def ready(self, version: str) -> None:
        self._send(records.Capabilities((records.OFFSETS, records.CHANNELS)))
        self._send(records.Ready(version))

    def _beat(self) -> None:
        self._send(records.Heartbeat())

    def report_count(self, count: int) -> None:
        """Send the connection count (the registry reports only changes)."""
        self._send(records.Count(count))

    def publish(self, payload: str | bytes, source: str) -> bool:
        return self._send(records.Frame.of(Envelope(self._node, source, 0, payload)))

    def submit(self, frame: str, source: str, token: int) -> bool:
        """Have the main process sequence ``frame`` (``ebbcast.backplane.base.Sequencing``):
        it comes back ``Ordered``."""
        return self._send(records.Sequence(Envelope(self._node, source, token, frame)))

    # -- channels: the main process is this worker's ChannelRoute ----------------

    def ask(self, ask: Ask) -> bool:
        return self._send(records.Subscribe(ask))

    def leave(self, channel: str, client_id: str) -> None:
        self._send(records.Unsubscribe(channel, client_id))

    def publish_channel(self, channel: str, frame: str) -> bool:
        """False, for the client to be told, while the main process's channels
        cannot publish (``ChannelsUp``: Redis away) or the link is gone."""
        return self._channels_up and self._send(records.ChannelPublish(channel, frame))

    def _on_record(self, record: Received) -> None:
        peer = self._peer
        match record:
            case records.Ordered(offset, envelope):
                self._feed.deliver_sequenced(self._epoch, offset, envelope.text,
                                             envelope.source, envelope.seq,
                                             envelope.node == self._node)
            case records.Frame():
                envelope = record.envelope
                peer.deliver_remote(envelope.payload, envelope.source)
            case records.Inject(envelope):
                peer.inject(envelope.payload, envelope.source)
            case records.History(entry):
                self._feed.recorded(entry)
            case records.Sequencer(epoch, base):
                self._epoch = epoch
                self._feed.sequenced_by(epoch, base, self)
            case records.Others(connections):
                peer.set_elsewhere(connections)
            case records.Accept():
                peer.start_accepting()
            case records.HandOver():
                peer.hand_over()
            case records.Direct(request, client_id, frame):
                self._send(records.Delivered(request, self._channels.direct(client_id, frame)))
            case records.ChannelsUp(up):
                self._channels_told(up)
            case _:  # after the global stream's records, which are the many
                feed_channel_record(self._channels, record)

    def _channels_told(self, up: bool) -> None:
        if up != self._channels_up:
            self._channels_up = up
            if up:
                log.info("channels: publishes go out again (the main process reached "
                         "the backplane)")
            else:
                log.warning("channels: publishes are refused with 'unavailable' while "
                            "the main process cannot reach the backplane")

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self._link is not None:
            self._link.close()
        else:
            self._sock.close()


def feed_channel_record(feed: ChannelFeed, record: Received) -> bool:
    """A channel's message, answer or presence change to ``feed``; False for any
    other record."""
    match record:
        case records.ChannelMessage(channel, frame):
            feed.deliver_channel(channel, frame)
        case records.Subscribed(answer):
            feed.answered(answer)
        case records.Presence(change):
            feed.presence(change)
        case _:
            return False
    return True


class LinkRoute:
    """The ``ChannelRoute`` of a worker: the main process, over its link."""

    def __init__(self, link: WorkerLink) -> None:
        self._link = link

    def start(self) -> None:
        pass  # the main process's channels start with it

    async def stop(self) -> None:
        pass

    def ask(self, ask: Ask) -> bool:
        return self._link.ask(ask)

    def leave(self, channel: str, client_id: str) -> None:
        self._link.leave(channel, client_id)

    def publish(self, channel: str, frame: str) -> bool:
        return self._link.publish_channel(channel, frame)


class RelayBackplane(MemoryBackplane):
    """The ``memory://`` backplane of a worker: frames go to the main process,
    which relays them to the other workers."""

    def __init__(self, link: WorkerLink, on_dropped: Callable[[int], None]) -> None:
        self._link = link
        self._on_dropped = on_dropped

    def publish(self, payload: str | bytes, source: str) -> None:
        if not self._link.publish(payload, source):
            self._on_dropped(1)
