"""Channels across instances on Redis (SPEC 14 with ``redis://``).

An instance subscribes to a channel's Redis pub/sub channel
(``<prefix>:c/<channel>``) only while one of its clients is subscribed, and drops
it with the last; after an outage or a Sentinel failover it subscribes to exactly
those again. A message is sequenced by one Lua script per publish, on the
channel's own keys: the epoch (made anew, history cleared, when missing or made
on a master of another replication id, as for the global stream), the offset
counter and a capped stream (``history.size`` entries), all expiring when the
channel has been idle (no publish, no subscriber anywhere) for a while, and a
sorted set of the channels by their last publish, of which only
``history.max_channels`` keep a history. The script publishes the message with
its offset; every interested instance, the publisher's included, delivers what
its subscription receives, in offset order.

A subscription is answered with the channel's position read after the instance's
Redis subscription is confirmed, so that nothing published after it is missed:
meanwhile the channel's messages are held, those up to the position go out
before the answer (the new subscriber does not get them; its resume, if any,
does), the rest after it. Positions and publishes go through one connection, in
order, so the positions answered only grow.

Presence: each instance keeps ``<prefix>:p:<channel>/<instance>``, its client ids
on that channel and their counts, written as they change and refreshed (with a
TTL, so a dead instance's disappear); joins and leaves are published on the
channel for the other instances' subscribers. Direct messages go to every
instance over ``<prefix>:direct``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, Union

from ebbcast.backplane.base import backoff_delays
from ebbcast.backplane.centre import Channels, ChannelSink, Interest, MemoryChannels
from ebbcast.backplane.channels import Ask, PresenceChange
from ebbcast.backplane.channelscripts import (
    POSITION_SCRIPT,
    SEQUENCE_SCRIPT,
    answer_from,
    channel_epoch,
    kept_run,
)
from ebbcast.backplane.channelstreams import Streams
from ebbcast.backplane.history import new_epoch
from ebbcast.backplane.names import RedisNames, new_instance_id
from ebbcast.backplane.presence import PresenceDirectory
from ebbcast.backplane.redisclients import RedisClients
from ebbcast.backplane.sentinel import redis_target
from ebbcast.config import Config
from ebbcast.core.waits import cancel_for_good, within

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Hashable)

#: How often an instance rewrites its presence keys (and keeps its channels' keys
#: from expiring).
PRESENCE_REFRESH_SECONDS = 10.0
#: A channel's keys expire this long after its last publish or its last subscriber
#: anywhere (history.ttl when longer; a day when history.ttl is 0, no age limit).
IDLE_CHANNEL_MS = 3_600_000
#: Jobs (positions, publishes) waiting for Redis; beyond this, publishes are refused.
JOB_LIMIT = 10_000
#: Longest a position waits for its Redis subscription to be confirmed.
CONFIRM_SECONDS = 5.0

@dataclass
class _Position(Generic[M]):
    """Answer ``ask`` for ``member`` (a subscription) with the channel's position."""

    member: M
    ask: Ask

    @property
    def channel(self) -> str:
        return self.ask.channel

    @property
    def since(self) -> int:
        return -1 if self.ask.resume is None else self.ask.resume.since


@dataclass
class _CatchUp:
    """After an outage, or a gap: what ``channel`` published after ``since`` of
    ``epoch``, for its subscribers here."""

    channel: str
    epoch: str
    since: int


@dataclass
class _Publish:
    channel: str
    frame: str


@dataclass
class _Announce:
    """Publish a join, a leave or a direct message (``payload``) on ``topic``."""

    topic: str
    payload: str


_Job = Union[_Position[Any], _CatchUp, _Publish, _Announce]


def channels_for(config: Config, sink: ChannelSink[M], instance: str = "") -> Channels[M]:
    """The channels of an instance: on its own (``memory://``), or on Redis."""
    if config.backplane.url == "memory://":
        return MemoryChannels(config, sink, time.monotonic)
    return RedisChannels(config, sink, instance or new_instance_id())


class RedisChannels(Generic[M]):
    """An instance's channels over Redis (see the module)."""

    def __init__(self, config: Config, sink: ChannelSink[M], instance: str,
                 rng: random.Random | None = None) -> None:
        self._target = redis_target(config.backplane.url)
        self._names = RedisNames(config.backplane.prefix)
        self._sink = sink
        self._instance = instance
        self._rng = rng or random.Random()
        self.interest: Interest[M] = Interest()
        self.configured(config)
        self._jobs: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        self._confirmed: dict[str, asyncio.Event] = {}
        self._dirty: set[str] = set()  # channels whose presence key is to be written
        self._streams = Streams(self._send_message)
        self._pubsub: Any = None
        self._up = False
        self._tasks: list[asyncio.Task[None]] = []
        self._clients = RedisClients(self._target, {"sequence": SEQUENCE_SCRIPT,
                                                    "position": POSITION_SCRIPT}, "channels")
        self._presence = PresenceDirectory(self._names, instance, self._target.client)

    def configured(self, config: Config) -> None:
        history = config.history
        self._size, self._ttl, self._max = history.size, history.ttl, history.max_channels
        self._keep_ms = max(IDLE_CHANNEL_MS, int(history.ttl * 1000)) if history.ttl > 0 \
            else 24 * IDLE_CHANNEL_MS

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._subscribe_forever()),
                       asyncio.ensure_future(self._work_forever()),
                       asyncio.ensure_future(self._refresh_forever())]

    async def stop(self) -> None:
        await cancel_for_good(self._tasks)
        await self._clients.close_all()

    # -- what the members ask (ebbcast.backplane.centre.Channels) ------------------------

    def subscribe(self, member: M, ask: Ask) -> None:
        channel = ask.channel
        if not self.interest.interested(channel):
            self._listen(channel, True)
        self.interest.add(member, channel, ask.client_id)
        self._streams.hold(channel)
        self._queue(_Position(member, ask))

    def unsubscribe(self, member: M, channel: str, client_id: str) -> None:
        told = self.interest.unsubscribe(member, channel, client_id)
        if told is not None:
            self._left(told.change, told.members)

    def forget(self, member: M) -> None:
        for told in self.interest.forget(member):
            self._left(told.change, told.members)

    def _left(self, change: PresenceChange, members: list[M]) -> None:
        self._sink.tell(change, members)
        self._announce(change)
        if not members:
            self._listen(change.channel, False)
            self._streams.last.pop(change.channel, None)

    @property
    def up(self) -> bool:
        """Whether the channels' Redis subscription is up (publishes go out)."""
        return self._up

    def publish(self, channel: str, frame: str) -> bool:
        if not self._up or len(self._jobs) >= JOB_LIMIT:
            return False
        self._queue(_Publish(channel, frame))
        return True

    def direct(self, client_id: str, frame: str) -> None:
        if self._up:
            self._queue(_Announce(self._names.direct_topic,
                                  f"{self._instance}\n{client_id}\n{frame}"))

    def subscribers(self, channel: str) -> int:
        return self.interest.subscribers(channel)

    @property
    def channels(self) -> int:
        return self.interest.channels

    def _queue(self, job: _Job) -> None:
        self._jobs.append(job)
        self._wakeup.set()

    def _announce(self, change: PresenceChange) -> None:
        self._dirty.add(change.channel)
        self._queue(_Announce(self._names.channel_topic(change.channel),
                              f"p\n{self._instance}\n{change.client_id}\n"
                              f"{1 if change.joined else 0}"))

    def _listen(self, channel: str, wanted: bool) -> None:
        """Subscribe to ``channel``'s Redis channel (or drop it), now if connected;
        a reconnection subscribes to every channel with interest."""
        topic = self._names.channel_topic(channel)
        if wanted:
            self._confirmed.setdefault(topic, asyncio.Event())
        else:
            self._confirmed.pop(topic, None)
            self._dirty.add(channel)
        pubsub = self._pubsub
        if pubsub is not None:
            change = pubsub.subscribe(topic) if wanted else pubsub.unsubscribe(topic)
            asyncio.ensure_future(change).add_done_callback(_retrieved)

    # -- the subscription ---------------------------------------------------------------

    async def _subscribe_forever(self) -> None:
        delays = backoff_delays(self._rng, self._target.backoff_max)
        while True:
            client = self._clients.new()
            try:
                async with client.pubsub() as pubsub:
                    for event in self._confirmed.values():
                        event.clear()
                    await self._subscribe_all(pubsub)
                    self._set_up(True)
                    delays = backoff_delays(self._rng, self._target.backoff_max)
                    await self._receive(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any Redis or network failure: retry
                log.debug("channels: the subscription failed: %s", exc)
            finally:
                self._pubsub = None
            self._set_up(False)
            await asyncio.sleep(next(delays))

    async def _subscribe_all(self, pubsub: Any) -> None:
        """Subscribe a new connection to the direct messages and to every channel
        with interest, those that came or went while it connected included."""
        topic = self._names.channel_topic
        first = {topic(channel) for channel in self.interest.names()}
        await pubsub.subscribe(self._names.direct_topic, *first)
        self._pubsub = pubsub  # from now on each change is made as it comes
        now = {topic(channel) for channel in self.interest.names()}
        if now - first:
            await pubsub.subscribe(*(now - first))
        if first - now:
            await pubsub.unsubscribe(*(first - now))

    def _set_up(self, up: bool) -> None:
        if up != self._up:
            self._up = up
            self._sink.available(up)
            if up:
                self._dirty.update(self.interest.names())
                for channel, (epoch, offset) in self._streams.last.items():
                    self._catch_up(channel, epoch, offset)
                self._wakeup.set()
                log.info("channels: connected to %s", self._target.where)
            else:
                log.warning("channels: lost %s; channel subscriptions wait for it",
                            self._target.where)

    async def _receive(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            kind, topic = message.get("type"), message.get("channel", b"").decode()
            if kind == "subscribe" and topic in self._confirmed:
                self._confirmed[topic].set()
            elif kind == "message" and topic == self._names.direct_topic:
                sender, client_id, frame = message["data"].decode().split("\n", 2)
                if sender != self._instance:
                    self._sink.direct(client_id, frame)
            elif kind == "message":
                self._on_channel(topic.split("/", 1)[1], message["data"].decode())

    def _on_channel(self, channel: str, data: str) -> None:
        kind, rest = data.split("\n", 1)
        if kind == "p":
            sender, client_id, joined = rest.split("\n")
            if sender != self._instance:
                self._sink.tell(PresenceChange(channel, client_id, joined == "1"),
                                self.interest.interested(channel))
            return
        if kind != "m":
            return
        epoch, offset, frame = rest.split("\n", 2)
        if not self._streams.arrived(channel, epoch, int(offset), frame):
            self._catch_up(channel, *self._streams.last[channel])  # it comes again after

    def _send_message(self, channel: str, frame: str) -> None:
        members = self.interest.interested(channel)
        if members:
            self._sink.message(members, channel, frame)

    def _catch_up(self, channel: str, epoch: str, since: int) -> None:
        self._streams.hold(channel)
        self._queue(_CatchUp(channel, epoch, since))

    # -- positions, publishes, announcements: one connection, in order --------------

    async def _work_forever(self) -> None:
        client = self._clients.new()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._up and (self._jobs or self._dirty):
                batch = [self._jobs.popleft() for _ in range(min(len(self._jobs), 256))]
                for job in batch:
                    if isinstance(job, (_Position, _CatchUp)):
                        await self._confirmation(job.channel)
                try:
                    async with client.pipeline(transaction=False) as pipe:
                        for job in batch:
                            await self._queue_job(pipe, job)
                        self._write_presence(pipe)
                        results = await pipe.execute()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # positions asked again once Redis is back
                    log.debug("channels: a batch of %d failed: %s", len(batch), exc)
                    if lost := sum(1 for job in batch if isinstance(job, _Publish)):
                        log.warning("channels: %d publishes may not have gone out (%s)",
                                    lost, exc)
                    self._jobs.extendleft(reversed([j for j in batch if isinstance(
                        j, (_Position, _CatchUp))]))
                    await asyncio.sleep(0.1)
                    continue
                for job, result in zip(batch, results):
                    self._done(job, result)

    def _done(self, job: _Job, result: Any) -> None:
        """A job's result acted on; a failure loses that job only."""
        try:
            if isinstance(job, _Position):
                self._answered(job, result)
            elif isinstance(job, _CatchUp):
                self._caught_up(job, result)
        except Exception:
            log.exception("channels: the answer to %r could not be used", job)

    async def _confirmation(self, channel: str) -> None:
        event = self._confirmed.get(self._names.channel_topic(channel))
        if event is not None and not event.is_set():
            try:
                await within(event.wait(), CONFIRM_SECONDS)
            except asyncio.TimeoutError:
                log.warning("channels: the subscription to %s was not confirmed", channel)

    async def _queue_job(self, pipe: Any, job: _Job) -> None:
        names = self._names
        if isinstance(job, _Announce):
            pipe.publish(job.topic, job.payload)
        elif isinstance(job, _Publish):
            await self._clients.scripts["sequence"](
                keys=names.channel_keys(job.channel),
                args=[new_epoch(), self._keep_ms, self._size, job.frame, self._max,
                      job.channel, names.channel_key_base, names.channel_topic(job.channel)],
                client=pipe)
        else:  # a position, with what was missed after ``since``
            since_epoch = job.epoch if isinstance(job, _CatchUp) else ""
            await self._clients.scripts["position"](
                keys=names.channel_keys(job.channel),
                args=[new_epoch(), self._keep_ms, job.since, since_epoch], client=pipe)

    def _answered(self, job: _Position[M], result: Any) -> None:
        """Deliver what was held up to the position, answer, then the rest."""
        epoch_bytes, latest, entries = result
        ask, epoch = job.ask, epoch_bytes.decode()
        channel = ask.channel
        self._streams.release(channel, epoch, int(latest), before=True)
        self._sink.answer(job.member, answer_from(ask, epoch, int(latest), entries,
                                                  self._size, self._ttl, time.time()))
        self._streams.release(channel, epoch, int(latest), before=False)
        members = self.interest.interested(channel)
        if job.member in members:
            change = PresenceChange(channel, ask.client_id, True)
            self._sink.tell(change, members)
            self._announce(change)

    def _caught_up(self, job: _CatchUp, result: Any) -> None:
        """What was missed, delivered in order; or, some of it lost (a new epoch,
        or too much missed), the subscribers told with an ``epoch`` frame at the
        first message still kept, then given those."""
        epoch_bytes, latest, entries = result
        epoch, latest = epoch_bytes.decode(), int(latest)
        channel = job.channel
        kept = kept_run(entries, latest, self._ttl, time.time()) if self._size > 0 else []
        start = kept[0][0] - 1 if kept else latest  # what follows ``since`` is kept
        if epoch != job.epoch or start != job.since or self._size <= 0:
            log.warning("channels: messages of %s were missed and are no longer kept: "
                        "its subscribers are told (epoch %s, from offset %d)",
                        channel, epoch, start)
            self._streams.last[channel] = (epoch, start)
            self._send_message(channel, channel_epoch(channel, epoch, start))
        for offset, frame in kept:
            self._streams.deliver(channel, epoch, offset, frame)
        self._streams.release(channel, epoch, latest, before=True)
        self._streams.release(channel, epoch, latest, before=False)

    # -- presence ---------------------------------------------------------------------

    def _write_presence(self, pipe: Any) -> None:
        for channel in self._dirty:
            self._presence.write(pipe, channel, self.interest.counts(channel), self._keep_ms)
        self._dirty.clear()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(PRESENCE_REFRESH_SECONDS)
            self._dirty.update(self.interest.names())
            self._wakeup.set()

    async def listing(self, limit: int) -> tuple[list[tuple[str, int]], int]:
        return await self._presence.listing(limit)

    async def presence(self, channel: str) -> tuple[int, list[str]]:
        return await self._presence.presence(channel)


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("channels: a subscription change failed: %s", future.exception())
