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
from typing import Generic, TypeVar

from ebbcast.backplane.base import ChannelFeed
from ebbcast.backplane.channels import Answer, Ask, ChannelSequencers, PresenceChange, Sequenced

M = TypeVar("M", bound=Hashable)


@dataclass
class Told(Generic[M]):
    """A presence change and the members interested in its channel (to be told)."""

    change: PresenceChange
    members: list[M] = field(default_factory=list)


class ChannelCentre(Generic[M]):
    """Subscriptions of every member, by channel, and each channel's sequence."""

    def __init__(self, sequencers: ChannelSequencers) -> None:
        self.sequencers = sequencers
        #: channel -> member -> client id -> subscriptions (a client may hold several)
        self._table: dict[str, dict[M, Counter[str]]] = {}

    def subscribe(self, member: M, ask: Ask, now: float) -> tuple[Answer, Told[M]]:
        """Record the subscription; the answer for ``member``, and the join for
        every member interested (``member`` included, after its answer)."""
        epoch, offset = self.sequencers.open(ask.channel, now)
        answer = Answer(ask.request, ask.channel, epoch, offset)
        if ask.resume is not None:
            replay = self.sequencers.replay(ask.channel, ask.resume, now)
            answer = Answer(ask.request, ask.channel, epoch, offset, replay.recovered,
                            replay.frames)
        members = self._table.setdefault(ask.channel, {})
        members.setdefault(member, Counter())[ask.client_id] += 1
        return answer, Told(PresenceChange(ask.channel, ask.client_id, True), list(members))

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

    def publish(self, channel: str, frame: str, now: float) -> tuple[Sequenced, list[M]]:
        """Give ``frame`` the channel's next offset; and the members to send it to."""
        sequenced = self.sequencers.sequence(channel, frame, now)
        return sequenced, list(self._table.get(channel, ()))

    def interested(self, channel: str) -> list[M]:
        return list(self._table.get(channel, ()))

    def subscribers(self, channel: str) -> int:
        return sum(sum(clients.values()) for clients in self._table.get(channel, {}).values())

    def clients(self, channel: str) -> list[str]:
        """The distinct client ids subscribed to ``channel``, sorted."""
        return sorted({client for clients in self._table.get(channel, {}).values()
                       for client in clients})

    def listing(self, limit: int) -> list[tuple[str, int]]:
        """Channels with subscribers and how many, largest first (then by name)."""
        counted = [(channel, self.subscribers(channel)) for channel in self._table]
        counted.sort(key=lambda item: (-item[1], item[0]))
        return counted[:limit]

    @property
    def channels(self) -> int:
        return len(self._table)


class LocalRoute:
    """The ``ChannelRoute`` of a serving process on its own: a centre of its own,
    answering by calls (the process is its one member)."""

    HERE = "here"

    def __init__(self, centre: ChannelCentre[str], feed: ChannelFeed,
                 clock: Callable[[], float]) -> None:
        self.centre = centre
        self._feed = feed
        self._clock = clock

    def ask(self, ask: Ask) -> bool:
        answer, told = self.centre.subscribe(self.HERE, ask, self._clock())
        self._feed.answered(answer)
        self._feed.presence(told.change)
        return True

    def leave(self, channel: str, client_id: str) -> None:
        told = self.centre.unsubscribe(self.HERE, channel, client_id)
        if told is not None and told.members:
            self._feed.presence(told.change)

    def publish(self, channel: str, frame: str) -> bool:
        sequenced, members = self.centre.publish(channel, frame, self._clock())
        if members:
            self._feed.deliver_channel(channel, sequenced.frame)
        return True
