"""Where the channels of a set of serving processes are decided (SPEC 14 without
Redis): the main process for its workers, or a serving process on its own.

A ``ChannelCentre`` is told every subscription and unsubscription, by which
*member* (a worker, or the process itself) and for which client id. From that it
knows which members are interested in a channel (a channel's messages go only to
them), how many subscribers a channel has and which clients they are (presence,
``GET /channels``), and whom to tell of a join or a leave. It gives a channel's
messages their offsets (``ChannelSequencers``) and answers a subscription with the
channel's position, and a resume with what was missed. It does no I/O and reads
no clock (``now`` is an argument); its caller carries its answers to the members.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from ebbcast.backplane.base import ChannelFeed
from ebbcast.backplane.channels import Answer, Ask, ChannelSequencers, PresenceChange, Sequenced
from ebbcast.config import Config

M = TypeVar("M", bound=Hashable)
M_contra = TypeVar("M_contra", bound=Hashable, contravariant=True)


@dataclass
class Told(Generic[M]):
    """A presence change and the members interested in its channel (to be told)."""

    change: PresenceChange
    members: list[M] = field(default_factory=list)


class Interest(Generic[M]):
    """Subscriptions of every member, by channel: who is interested in a channel,
    and its presence on this instance."""

    def __init__(self) -> None:
        #: channel -> member -> client id -> subscriptions (a client may hold several)
        self._table: dict[str, dict[M, Counter[str]]] = {}

    def add(self, member: M, channel: str, client_id: str) -> Told[M]:
        """Record one subscription: the join, and every member interested."""
        members = self._table.setdefault(channel, {})
        members.setdefault(member, Counter())[client_id] += 1
        return Told(PresenceChange(channel, client_id, True), list(members))

    def unsubscribe(self, member: M, channel: str, client_id: str) -> Told[M] | None:
        """Forget one subscription of ``client_id`` by ``member``; the leave and
        whom to tell (``member`` still, if it has other subscribers), or None if
        there was no such subscription."""
        members = self._table.get(channel)
        clients = members.get(member) if members is not None else None
        if members is None or clients is None or clients[client_id] <= 0:
            return None
        clients[client_id] -= 1
        if clients[client_id] == 0:
            del clients[client_id]
        if not clients:
            del members[member]
        if not members:
            del self._table[channel]
        return Told(PresenceChange(channel, client_id, False), list(members))

    def forget(self, member: M) -> list[Told[M]]:
        """``member`` is gone (a worker exited): each of its subscriptions ends."""
        told: list[Told[M]] = []
        for channel in [c for c, members in self._table.items() if member in members]:
            for client_id, times in list(self._table[channel][member].items()):
                for _ in range(times):
                    leave = self.unsubscribe(member, channel, client_id)
                    if leave is not None:
                        told.append(leave)
        return told

    def interested(self, channel: str) -> list[M]:
        return list(self._table.get(channel, ()))

    def subscribers(self, channel: str) -> int:
        return sum(sum(clients.values()) for clients in self._table.get(channel, {}).values())

    def counts(self, channel: str) -> Counter[str]:
        """Each client id subscribed to ``channel`` here, and how many times."""
        total: Counter[str] = Counter()
        for clients in self._table.get(channel, {}).values():
            total.update(clients)
        return total

    def clients(self, channel: str) -> list[str]:
        """The distinct client ids subscribed to ``channel``, sorted."""
        return sorted(self.counts(channel))

    def listing(self, limit: int) -> list[tuple[str, int]]:
        """Channels with subscribers and how many, largest first (then by name)."""
        return largest([(channel, self.subscribers(channel)) for channel in self._table],
                       limit)

    def names(self) -> list[str]:
        return list(self._table)

    @property
    def channels(self) -> int:
        return len(self._table)


def largest(counted: list[tuple[str, int]], limit: int) -> list[tuple[str, int]]:
    """Channels by subscribers, largest first (then by name), the first ``limit``."""
    counted.sort(key=lambda item: (-item[1], item[0]))
    return counted[:limit]


class ChannelCentre(Interest[M]):
    """Subscriptions of every member, by channel, and each channel's sequence."""

    def __init__(self, sequencers: ChannelSequencers) -> None:
        super().__init__()
        self.sequencers = sequencers

    def subscribe(self, member: M, ask: Ask, now: float) -> tuple[Answer, Told[M]]:
        """Record the subscription; the answer for ``member``, and the join for
        every member interested (``member`` included, after its answer)."""
        epoch, offset = self.sequencers.open(ask.channel, now)
        answer = Answer(ask.request, ask.channel, epoch, offset)
        if ask.resume is not None:
            replay = self.sequencers.replay(ask.channel, ask.resume, now)
            answer = Answer(ask.request, ask.channel, epoch, offset, replay.recovered,
                            replay.frames)
        return answer, self.add(member, ask.channel, ask.client_id)

    def publish(self, channel: str, frame: str, now: float) -> tuple[Sequenced, list[M]]:
        """Give ``frame`` the channel's next offset; and the members to send it to."""
        sequenced = self.sequencers.sequence(channel, frame, now)
        return sequenced, self.interested(channel)


class ChannelSink(Protocol[M]):
    """Where the channels of an instance send what reaches its members: the main
    process for its workers (``ebbcast.process.channeldesk``), a process on its own
    for itself (``LocalRoute``)."""

    def answer(self, member: M, answer: Answer) -> None: ...

    def message(self, members: list[M], channel: str, frame: str) -> None:
        """A channel message (its offset in its text), for the members interested."""

    def tell(self, change: PresenceChange, members: list[M]) -> None: ...

    def direct(self, client_id: str, frame: str) -> None:
        """A direct message another instance was asked to send: for every member."""

    def available(self, up: bool) -> None:
        """Whether publishes can go out now (Redis reached); said when it changes."""


class Channels(Protocol[M_contra]):
    """An instance's channels: ``MemoryChannels`` on its own, ``RedisChannels``
    (``ebbcast.backplane.redischannels``) with other instances on Redis. Answers,
    messages and presence go to the ``ChannelSink`` it was made with."""

    def start(self) -> None: ...
    async def stop(self) -> None: ...
    def subscribe(self, member: M_contra, ask: Ask) -> None: ...
    def unsubscribe(self, member: M_contra, channel: str, client_id: str) -> None: ...
    def forget(self, member: M_contra) -> None:
        """``member`` is gone: each of its subscriptions ends."""
    def publish(self, channel: str, frame: str) -> bool:
        """Have ``frame`` sequenced in ``channel``; False: it cannot be now."""
    @property
    def up(self) -> bool:
        """Whether a publish can go out now (always, in one instance)."""
    def direct(self, client_id: str, frame: str) -> None:
        """Tell the other instances (none in memory) to send a direct message."""
    def configured(self, config: Config) -> None:
        """history.* from now on (an upgrade's)."""
    def subscribers(self, channel: str) -> int:
        """Subscriptions to ``channel`` on this instance."""
    @property
    def channels(self) -> int:
        """Channels with a subscriber on this instance."""
    async def listing(self, limit: int) -> tuple[list[tuple[str, int]], int]:
        """The ``limit`` largest channels of every instance, and how many there are."""
    async def presence(self, channel: str) -> tuple[int, list[str]]:
        """``channel``'s subscribers on every instance, and its distinct client ids."""


class MemoryChannels(Generic[M]):
    """The channels of an instance on its own: a ``ChannelCentre``, answering by calls."""

    def __init__(self, config: Config, sink: ChannelSink[M],
                 clock: Callable[[], float]) -> None:
        history = config.history
        self.centre: ChannelCentre[M] = ChannelCentre(
            ChannelSequencers(history.size, history.ttl, history.max_channels))
        self._sink = sink
        self._clock = clock

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def subscribe(self, member: M, ask: Ask) -> None:
        answer, told = self.centre.subscribe(member, ask, self._clock())
        self._sink.answer(member, answer)
        self._sink.tell(told.change, told.members)

    def unsubscribe(self, member: M, channel: str, client_id: str) -> None:
        told = self.centre.unsubscribe(member, channel, client_id)
        if told is not None:
            self._sink.tell(told.change, told.members)

    def forget(self, member: M) -> None:
        for told in self.centre.forget(member):
            self._sink.tell(told.change, told.members)

    def publish(self, channel: str, frame: str) -> bool:
        sequenced, members = self.centre.publish(channel, frame, self._clock())
        if members:
            self._sink.message(members, channel, sequenced.frame)
        return True

    @property
    def up(self) -> bool:
        return True

    def direct(self, client_id: str, frame: str) -> None:
        pass  # no other instance

    def configured(self, config: Config) -> None:
        history = config.history
        self.centre.sequencers.keep(history.size, history.ttl, history.max_channels)

    def subscribers(self, channel: str) -> int:
        return self.centre.subscribers(channel)

    @property
    def channels(self) -> int:
        return self.centre.channels

    async def listing(self, limit: int) -> tuple[list[tuple[str, int]], int]:
        return self.centre.listing(limit), self.centre.channels

    async def presence(self, channel: str) -> tuple[int, list[str]]:
        return self.centre.subscribers(channel), self.centre.clients(channel)


class LocalRoute:
    """The ``ChannelRoute`` of a serving process on its own, and its ``ChannelSink``:
    the process is its channels' one member."""

    HERE = "here"

    def __init__(self, feed: ChannelFeed) -> None:
        self._feed = feed
        self.channels: Channels[str] | None = None  # set once made with this sink

    def _made(self) -> Channels[str]:
        assert self.channels is not None
        return self.channels

    # -- ChannelRoute ---------------------------------------------------------------

    def start(self) -> None:
        self._made().start()

    async def stop(self) -> None:
        await self._made().stop()

    def ask(self, ask: Ask) -> bool:
        self._made().subscribe(self.HERE, ask)
        return True

    def leave(self, channel: str, client_id: str) -> None:
        self._made().unsubscribe(self.HERE, channel, client_id)

    def publish(self, channel: str, frame: str) -> bool:
        return self._made().publish(channel, frame)

    # -- ChannelSink --------------------------------------------------------------------

    def answer(self, member: str, answer: Answer) -> None:
        self._feed.answered(answer)

    def message(self, members: list[str], channel: str, frame: str) -> None:
        self._feed.deliver_channel(channel, frame)

    def tell(self, change: PresenceChange, members: list[str]) -> None:
        if members:
            self._feed.presence(change)

    def direct(self, client_id: str, frame: str) -> None:
        self._feed.direct(client_id, frame)

    def available(self, up: bool) -> None:
        pass  # a publish refused here is refused to its client at once
