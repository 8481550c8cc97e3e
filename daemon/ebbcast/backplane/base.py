"""What every backplane shares: the protocols, the record codec, backoff.

A backplane is how broadcasts reach the clients of other serving processes and
other ebbcast instances: ``memory://`` is a single instance (``memory``), the
serving processes of one daemon are joined by the main process over relay links
(``relay``), instances by Redis (``redis``, ``sentinel``). Offsets and history
(``history``, ``sequencer``) are given by one sequencer per backplane.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ebbcast.backplane.channels import Answer, Ask, PresenceChange
from ebbcast.backplane.history import Kept

BACKOFF_FIRST, BACKOFF_MAX = 0.1, 10.0

#: deliver(payload, source) fans a frame from another instance out locally.
Deliver = Callable[[str | bytes, str], None]


class HistoryFeed(Protocol):
    """Where sequenced broadcasts go: a serving process's history and clients."""

    def position(self) -> tuple[str, int]:
        """The epoch and latest offset delivered ("" and 0 before the first)."""

    def preload(self, epoch: str, base: int, entries: list[Kept]) -> None:
        """At start: the history as it is."""

    def new_epoch(self, epoch: str, base: int) -> None: ...

    def sequencing_lost(self) -> None:
        """Broadcasts submitted here may never come back: deliver them here."""

    def deliver_sequenced(self, epoch: str, offset: int, frame: str, source: str,
                          token: int, own: bool, repeat: bool = False) -> None:
        """The broadcast with ``offset``, in order; ``own``: submitted here (by
        ``token``); ``repeat``: its publisher sent it again, after a publish that
        failed half-way (it takes its offset; its clients had it)."""


class SequencedFeed(HistoryFeed, Protocol):
    """Where a worker's sequenced broadcasts go when the main process sequences
    (over the relay link, or by calls inside it)."""

    def sequenced_by(self, epoch: str, base: int, sequencing: Sequencing) -> None:
        """``sequencing`` gives the offsets from now on; the history after ``base``
        follows (``recorded``)."""

    def recorded(self, entry: Kept) -> None:
        """One broadcast of the sequencer's history: record it, deliver it to nobody."""


class Backplane(Protocol):
    def start(self) -> None: ...
    async def stop(self) -> None: ...
    def publish(self, payload: str | bytes, source: str) -> None: ...
    def advertise(self, url: str | None) -> None: ...
    def peers(self) -> list[str]: ...


class Sequencing(Protocol):
    """Who gives the broadcasts a serving process submits their offsets: its own
    counter, the main process (over the relay link, or by calls), or Redis."""

    def submit(self, frame: str, source: str, token: int) -> bool:
        """Have ``frame`` sequenced; it is delivered (``Broadcasts.deliver``) with
        ``token`` when it comes back. False: it cannot be sequenced now, so the
        caller delivers it at once (if it is sequenced later after all, it comes
        back as one delivered already)."""


class ChannelRoute(Protocol):
    """Where a serving process's channel traffic goes (SPEC 14): a centre in the
    process itself, or the main process over the relay link. Each answer comes
    back to the process's ``ChannelFeed``."""

    def start(self) -> None: ...
    async def stop(self) -> None: ...

    def ask(self, ask: Ask) -> bool:
        """Subscribe; the ``Answer`` follows. False: it cannot be asked now."""

    def leave(self, channel: str, client_id: str) -> None:
        """One subscription of ``client_id`` ended."""

    def publish(self, channel: str, frame: str) -> bool:
        """Have ``frame`` sequenced in ``channel`` and sent to its subscribers."""


class ChannelFeed(Protocol):
    """What a serving process takes from its ``ChannelRoute``."""

    def answered(self, answer: Answer) -> None: ...

    def deliver_channel(self, channel: str, frame: str) -> None:
        """A channel message, its offset in its text, in the channel's order."""

    def presence(self, change: PresenceChange) -> None: ...

    def direct(self, client_id: str, frame: str) -> int:
        """A direct frame for every local connection of ``client_id``: how many."""


@dataclass(frozen=True)
class Envelope:
    """A broadcast between processes and instances: the node that sent it, for what
    (``source``: client, admin, ...), its number in that sender's sequence (or the
    token of a broadcast submitted to be sequenced), and the payload, text or binary."""

    node: str
    source: str
    seq: int
    payload: str | bytes

    def encode(self) -> bytes:
        """``<node>\\n<source>\\n<seq>\\n<t|b><payload>``."""
        payload = self.payload
        body = payload if isinstance(payload, bytes) else payload.encode()
        kind = b"b" if isinstance(payload, bytes) else b"t"
        return b"\n".join((self.node.encode(), self.source.encode(), str(self.seq).encode(),
                           kind + body))

    @classmethod
    def decode(cls, message: bytes) -> Envelope:
        node, source, seq, rest = message.split(b"\n", 3)
        payload: str | bytes = rest[1:] if rest[:1] == b"b" else rest[1:].decode()
        return cls(node.decode(), source.decode(), int(seq), payload)

    @property
    def text(self) -> str:
        """The payload of a sequenced broadcast: always text (a JSON frame)."""
        if not isinstance(self.payload, str):
            raise ValueError("a sequenced broadcast carries text")
        return self.payload


def backoff_delays(rng: random.Random, cap: float = BACKOFF_MAX) -> Any:
    """Capped exponential backoff with full jitter: 0.1 s, 0.2 s, ... up to ``cap``."""
    delay = BACKOFF_FIRST
    while True:
        yield rng.uniform(delay / 2, delay)
        delay = min(delay * 2, cap)
