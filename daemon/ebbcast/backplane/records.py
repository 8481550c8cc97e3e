"""The records between the main process and a worker, as small typed classes.

On the link (``ebbcast.backplane.relay``) each record is ``<length:4 bytes
big-endian><kind:1 byte><body>``. The records are the interface between two
releases during an upgrade (the main process keeps the code it started with; a
new generation's workers run the code installed now), so a kind never gets a new
meaning or a new body, and ``parse`` reads a kind it does not know as ``Unknown``:
the side that reads it ignores it (but has heard from the other side).

worker -> main
    ``Frame`` to relay to every other worker; ``Ready`` (its version) and
    ``Capabilities`` (what it can do: ``offsets``); ``Count``, its connections;
    ``Heartbeat``, every second (a worker that goes silent is stuck);
    ``Sequence``, a broadcast to give an offset to; ``Subscribe``,
    ``Unsubscribe`` and ``ChannelPublish`` (channels); ``Delivered``, the answer
    to a ``Direct``.
main -> worker
    ``Frame``, from another worker: deliver it to local clients only; ``Inject``,
    an admin broadcast: deliver it *and* publish it, as if a local client had sent
    it; ``Others``, the connections on the other workers; ``Accept``, start
    accepting (a held worker of a new generation); ``HandOver``, a new generation
    serves: drain as an upgrade; ``Sequencer``, the main process gives the
    offsets (its epoch, and the offset its history goes on from); ``History``, one
    broadcast of that history; ``Ordered``, a sequenced broadcast;
    ``Subscribed`` (the answer to a ``Subscribe``), ``ChannelMessage`` and
    ``Presence`` (only for channels the worker has subscribers to); ``Direct``, a
    frame for one client id.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Union

from ebbcast.backplane.base import Envelope
from ebbcast.backplane.channels import Answer, Ask, PresenceChange
from ebbcast.backplane.history import Kept, Resume

HEADER = struct.Struct(">IB")
#: What a worker of this release tells the main process it can do.
OFFSETS = "offsets"
CHANNELS = "channels"


class _Record:
    """What every record has: its kind (one byte on the link), its body, and whether
    it goes out at once, with what is queued before it, rather than at the end of
    the loop's pass (a switch between generations must not wait)."""

    KIND: ClassVar[bytes]
    URGENT: ClassVar[bool] = False

    def body(self) -> bytes:
        return b""


@dataclass(frozen=True)
class Frame(_Record):
    """A frame relayed between workers; the envelope stays encoded on the way
    through the main process, which never reads it."""

    KIND: ClassVar[bytes] = b"F"
    encoded: bytes

    @classmethod
    def of(cls, envelope: Envelope) -> Frame:
        return cls(envelope.encode())

    def body(self) -> bytes:
        return self.encoded

    @property
    def envelope(self) -> Envelope:
        return Envelope.decode(self.encoded)


@dataclass(frozen=True)
class _Carrying(_Record):
    """A record whose body is one Envelope."""

    envelope: Envelope

    def body(self) -> bytes:
        return self.envelope.encode()


@dataclass(frozen=True)
class Inject(_Carrying):
    KIND: ClassVar[bytes] = b"I"


@dataclass(frozen=True)
class Sequence(_Carrying):
    """Give this broadcast an offset (``envelope.seq`` is the sender's token)."""

    KIND: ClassVar[bytes] = b"S"


@dataclass(frozen=True)
class Ready(_Record):
    KIND: ClassVar[bytes] = b"R"
    version: str

    def body(self) -> bytes:
        return self.version.encode()


@dataclass(frozen=True)
class Capabilities(_Record):
    KIND: ClassVar[bytes] = b"K"
    names: tuple[str, ...]

    def body(self) -> bytes:
        return ",".join(self.names).encode()


@dataclass(frozen=True)
class _Counting(_Record):
    """A record whose body is a number of connections, in ASCII digits."""

    connections: int

    def body(self) -> bytes:
        return str(self.connections).encode()


@dataclass(frozen=True)
class Count(_Counting):
    """This worker's connections (sent when the count changes)."""

    KIND: ClassVar[bytes] = b"C"


@dataclass(frozen=True)
class Others(_Counting):
    """The connections on the daemon's other workers."""

    KIND: ClassVar[bytes] = b"T"


@dataclass(frozen=True)
class Heartbeat(_Record):
    KIND: ClassVar[bytes] = b"H"


@dataclass(frozen=True)
class Accept(_Record):
    KIND: ClassVar[bytes] = b"A"
    URGENT: ClassVar[bool] = True


@dataclass(frozen=True)
class HandOver(_Record):
    KIND: ClassVar[bytes] = b"U"
    URGENT: ClassVar[bool] = True


@dataclass(frozen=True)
class Sequencer(_Record):
    """The main process sequences: its epoch, and the offset its history after
    which follows (as ``History`` records)."""

    KIND: ClassVar[bytes] = b"E"
    epoch: str
    base: int

    def body(self) -> bytes:
        return f"{self.epoch}\n{self.base}".encode()


@dataclass(frozen=True)
class History(_Record):
    """One broadcast of the main process's history: record it, deliver it to nobody."""

    KIND: ClassVar[bytes] = b"Y"
    entry: Kept

    def body(self) -> bytes:
        return b"%d\n%.3f\n%s" % (self.entry.offset, self.entry.age, self.entry.frame.encode())


@dataclass(frozen=True)
class Ordered(_Record):
    """A sequenced broadcast (``envelope.seq``: the token its sender gave it)."""

    KIND: ClassVar[bytes] = b"O"
    offset: int
    envelope: Envelope

    def body(self) -> bytes:
        return b"%d\n%s" % (self.offset, self.envelope.encode())


# -- channels (SPEC 14): the main process is the workers' ChannelCentre ----------------

def _lines(*fields: str) -> bytes:
    return "\n".join(fields).encode()


@dataclass(frozen=True)
class Subscribe(_Record):
    """worker -> main: one subscription (``ask.request``: the worker's number for
    the answer)."""

    KIND: ClassVar[bytes] = b"B"
    ask: Ask

    def body(self) -> bytes:
        resume = self.ask.resume
        return json.dumps([self.ask.request, self.ask.channel, self.ask.client_id,
                           None if resume is None else [resume.since, resume.epoch]]).encode()


@dataclass(frozen=True)
class Subscribed(_Record):
    """main -> worker: the answer to a ``Subscribe``."""

    KIND: ClassVar[bytes] = b"D"
    answer: Answer

    def body(self) -> bytes:
        a = self.answer
        return json.dumps([a.request, a.channel, a.epoch, a.offset, a.recovered,
                           list(a.frames)]).encode()


@dataclass(frozen=True)
class Unsubscribe(_Record):
    """worker -> main: one subscription of ``client_id`` ended."""

    KIND: ClassVar[bytes] = b"X"
    channel: str
    client_id: str

    def body(self) -> bytes:
        return _lines(self.channel, self.client_id)


@dataclass(frozen=True)
class _ChannelFrame(_Record):
    """A record whose body is a channel's name and a frame."""

    channel: str
    frame: str

    def body(self) -> bytes:
        return _lines(self.channel, self.frame)


@dataclass(frozen=True)
class ChannelPublish(_ChannelFrame):
    """worker -> main: a message for a channel, to sequence and send on."""

    KIND: ClassVar[bytes] = b"P"


@dataclass(frozen=True)
class ChannelMessage(_ChannelFrame):
    """main -> worker: a sequenced channel message, sent only to the workers with
    a subscriber to its channel."""

    KIND: ClassVar[bytes] = b"Q"


@dataclass(frozen=True)
class Presence(_Record):
    """main -> worker: a join or a leave in a channel the worker has subscribers to."""

    KIND: ClassVar[bytes] = b"J"
    change: PresenceChange

    def body(self) -> bytes:
        change = self.change
        return _lines(change.channel, change.client_id, "1" if change.joined else "0")


@dataclass(frozen=True)
class Direct(_Record):
    """main -> worker: a direct frame for every connection of ``client_id``;
    answered with ``Delivered`` and the same ``request``."""

    KIND: ClassVar[bytes] = b"M"
    request: int
    client_id: str
    frame: str

    def body(self) -> bytes:
        return _lines(str(self.request), self.client_id, self.frame)


@dataclass(frozen=True)
class Delivered(_Record):
    """worker -> main: how many connections a ``Direct`` reached."""

    KIND: ClassVar[bytes] = b"N"
    request: int
    connections: int

    def body(self) -> bytes:
        return _lines(str(self.request), str(self.connections))


@dataclass(frozen=True)
class ChannelsUp(_Record):
    """Whether the instance's channels can publish (Redis reached): sent to every
    worker when it changes, and to a new worker when they cannot."""

    KIND: ClassVar[bytes] = b"V"
    URGENT: ClassVar[bool] = True  # before any client's publish that follows
    up: bool

    def body(self) -> bytes:
        return b"1" if self.up else b"0"


Record = Union[Frame, Inject, Sequence, Ready, Capabilities, Count, Others, Heartbeat, Accept,
               HandOver, Sequencer, History, Ordered, Subscribe, Subscribed, Unsubscribe,
               ChannelPublish, ChannelMessage, Presence, Direct, Delivered, ChannelsUp]


@dataclass(frozen=True)
class Unknown:
    """A record of a kind this release does not know (a newer release's), or one whose
    body it could not read: nothing is done with it, but its sender was heard from."""

    kind: bytes
    body: bytes


#: What a side reads from the link.
Received = Union[Record, Unknown]


def pack(record: Record) -> bytes:
    body = record.body()
    return HEADER.pack(len(body), record.KIND[0]) + body


def parse(kind: bytes, body: bytes) -> Received:
    """The record of ``kind``; ``Unknown`` for a kind this release does not know.
    ValueError for a body that is not what its kind says."""
    if kind == Frame.KIND:
        return Frame(body)
    if kind == Ordered.KIND:
        offset, rest = body.split(b"\n", 1)
        return Ordered(int(offset), Envelope.decode(rest))
    make = _PARSERS.get(kind)
    return make(body) if make is not None else Unknown(kind, body)


def _history(body: bytes) -> History:
    offset, age, frame = body.split(b"\n", 2)
    return History(Kept(int(offset), frame.decode(), float(age)))


def _sequencer(body: bytes) -> Sequencer:
    epoch, base = body.decode().split("\n")
    return Sequencer(epoch, int(base))


def _subscribe(body: bytes) -> Subscribe:
    request, channel, client_id, resume = json.loads(body)
    return Subscribe(Ask(int(request), str(channel), str(client_id),
                         None if resume is None else Resume(int(resume[0]), str(resume[1]))))


def _subscribed(body: bytes) -> Subscribed:
    request, channel, epoch, offset, recovered, replayed = json.loads(body)
    return Subscribed(Answer(int(request), str(channel), str(epoch), int(offset),
                             None if recovered is None else bool(recovered),
                             tuple(str(frame) for frame in replayed)))


def _split(body: bytes, fields: int) -> list[str]:
    return body.decode().split("\n", fields - 1)


def _presence(body: bytes) -> Presence:
    channel, client_id, joined = body.decode().rsplit("\n", 2)
    return Presence(PresenceChange(channel, client_id, joined == "1"))


def _direct(body: bytes) -> Direct:
    request, client_id, frame = _split(body, 3)
    return Direct(int(request), client_id, frame)


_PARSERS: dict[bytes, Callable[[bytes], Record]] = {
    Subscribe.KIND: _subscribe,
    Subscribed.KIND: _subscribed,
    Unsubscribe.KIND: lambda body: Unsubscribe(*body.decode().split("\n", 1)),
    ChannelPublish.KIND: lambda body: ChannelPublish(*_split(body, 2)),
    ChannelMessage.KIND: lambda body: ChannelMessage(*_split(body, 2)),
    Presence.KIND: _presence,
    Direct.KIND: _direct,
    Delivered.KIND: lambda body: Delivered(*map(int, body.split(b"\n"))),
    ChannelsUp.KIND: lambda body: ChannelsUp(body == b"1"),
    Inject.KIND: lambda body: Inject(Envelope.decode(body)),
    Sequence.KIND: lambda body: Sequence(Envelope.decode(body)),
    Ready.KIND: lambda body: Ready(body.decode(errors="replace")),
    Capabilities.KIND: lambda body: Capabilities(
        tuple(body.decode(errors="replace").split(","))),
    Count.KIND: lambda body: Count(int(body)),
    Others.KIND: lambda body: Others(int(body)),
    Heartbeat.KIND: lambda body: Heartbeat(),
    Accept.KIND: lambda body: Accept(),
    HandOver.KIND: lambda body: HandOver(),
    Sequencer.KIND: _sequencer,
    History.KIND: _history,
}
