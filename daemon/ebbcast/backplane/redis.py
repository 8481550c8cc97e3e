"""``redis://``: how broadcasts reach the clients of other ebbcast instances.

``redis://`` (or ``redis+sentinel://``, the master Sentinel names:
``ebbcast.backplane.sentinel``) joins
instances through Redis pub/sub (docs/scaling.md "Several instances"): client frames and admin
broadcasts are delivered locally at once, then published; every instance
subscribed to the channel fans out what the *others* published, so no client sees
a frame twice. Periodic frames stay local.

Redis going away never stops local delivery. The outage is logged once,
``ebbcast_backplane_up`` drops to 0, and the connection is retried with capped
exponential backoff and jitter; the recovery is logged. No loss is silent, on
either side of it: frames an instance could not publish are counted in its
``ebbcast_backplane_dropped_total``; frames it missed because its subscription
was down while others published are found as gaps in each publisher's sequence
numbers and counted in its ``ebbcast_backplane_missed_total``. (Redis pub/sub is
at most once: a subscriber that is away gets nothing from that time.)

What an instance could not publish while Redis was away is kept in its outbox
(``ebbcast.backplane.outbox``, ``backplane.outage_buffer`` bytes), in order, and
published once Redis, or the new master, is back: a raw frame with the sequence
number it was given when it was sent, a broadcast to be sequenced in the epoch
Redis has then. Its own clients had it at once (without an offset); when it comes
back it is recorded, not delivered again. A batch whose publish failed is tried
again; receivers drop a frame whose number they have seen from that publisher,
so a batch that had half crossed is not seen twice. Only what does not fit in the
outbox is lost, counted dropped.

Offsets (docs/scaling.md "Nothing lost on reconnect"). With the JSON envelope a
broadcast is *submitted* instead: one Lua script gives it the next offset (INCR),
appends it to a capped stream (XADD, history.size entries, id ``0-<offset>``) and
publishes it, in one
atomic step, so every instance agrees on the order; the epoch is a key beside
them, made anew (with the offset counter and the stream cleared) whenever it is
missing, as after a Redis restart without persistence, or was made on a master of
another replication id, as after a Sentinel failover (the promoted replica may
lack offsets its old master handed out: they must not be given again). A manual
failover leaves the old master writable for a moment: a broadcast an instance
sequences there just before it moves reaches only its own clients, uncounted. Every instance, the
sender's included, delivers sequenced broadcasts as they arrive, in offset
order. After (re)subscribing, and on a gap in the offsets, it reads what it
missed from the stream before it delivers anything newer; a changed epoch is
told to the clients (``HistoryFeed.new_epoch``). A broadcast submitted while
Redis is down is delivered locally at once without an offset (never a made-up
one), and kept for Redis, as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ebbcast.backplane.base import Deliver, Envelope, HistoryFeed, backoff_delays
from ebbcast.backplane.history import Kept, new_epoch
from ebbcast.backplane.names import RedisNames
from ebbcast.backplane.nodes import NodeDirectory
from ebbcast.backplane.outbox import Outbox, Outgoing
from ebbcast.backplane.redisclients import RedisClients
from ebbcast.backplane.seen import Seen
from ebbcast.backplane.sentinel import redis_target
from ebbcast.config import BackplaneConfig
from ebbcast.core.waits import cancel_for_good, within

log = logging.getLogger(__name__)

#: Key and channel names: ``ebbcast.backplane.names``; the scripts' KEYS are
#: RedisNames.keys.
#: The epoch, made anew (offsets and history cleared) when it is missing (Redis lost
#: its data), or when it was made on a master of another replication id: a replica
#: promoted by a failover, or a master restarted from a snapshot, may lack offsets
#: the master before it handed out, so offsets restart in a new epoch rather than
#: be given twice. Sets ``epoch``.
ENSURE_EPOCH = """
local replication = redis.call('INFO', 'replication')
local replid = string.match(replication, 'master_replid:(%w+)') or ''
local epoch = redis.call('GET', KEYS[1])
if not epoch or redis.call('GET', KEYS[4]) ~= replid then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
  redis.call('SET', KEYS[4], replid)
  redis.call('DEL', KEYS[2], KEYS[3])
end
"""
#: KEYS: RedisNames.keys; ARGV: new epoch, history size, channel, header, frame.
SEQUENCE_SCRIPT = ENSURE_EPOCH + r"""
local offset = redis.call('INCR', KEYS[2])
local frame = string.sub(ARGV[5], 1, -2) .. ',"offset":' .. offset .. '}'
local size = tonumber(ARGV[2])
if size > 0 then
  local now = redis.call('TIME')
  redis.call('XADD', KEYS[3], 'MAXLEN', size, '0-' .. offset, 'f', frame, 'h', ARGV[4],
             't', now[1] .. '.' .. string.format('%06d', tonumber(now[2])))
end
redis.call('PUBLISH', ARGV[3], epoch .. '\n' .. offset .. '\n' .. ARGV[4] .. frame)
return offset
"""
#: KEYS: RedisNames.keys; ARGV: new epoch. Returns {epoch, latest offset}.
POSITION_SCRIPT = ENSURE_EPOCH + """
return {epoch, tonumber(redis.call('GET', KEYS[2]) or '0')}
"""
#: How often the sentinels are asked which master to use (redis+sentinel:// only), at
#: the latest: a sentinel's +switch-master announcement has them asked at once.
MASTER_CHECK_SECONDS = 0.5
#: Frames published to Redis in one pipeline, at most.
BATCH = 256

class RedisBackplane:
    """Redis pub/sub through redis-py's asyncio client (hiredis parser)."""

    def __init__(self, url: str, node: str, deliver: Deliver,
                 on_state: Callable[[bool], None], on_dropped: Callable[[int], None],
                 on_missed: Callable[[int], None] | None = None,
                 rng: random.Random | None = None, history: HistoryFeed | None = None,
                 history_size: int = 0, on_failover: Callable[[], None] = lambda: None,
                 names: RedisNames = RedisNames(), instance: str = "",
                 outage_buffer: int = BackplaneConfig.outage_buffer,
                 on_buffered: Callable[[int], None] = lambda size: None) -> None:
        self._target = redis_target(url)
        self._names = names
        self._on_failover = on_failover
        #: host:port of the master the subscription last reached (Sentinel only)
        self._master: str | None = None
        self._pubsub: Any = None  # the subscription, while there is one
        #: Set when the sentinels name another master: a reconnection waits no more.
        self._master_moved = asyncio.Event()
        # unique per instance even when two share a process (tests) or a pid (containers)
        self._node = f"{node}/{secrets.token_hex(4)}"
        # the node keys; an instance's serving processes share its id
        self._clients = RedisClients(self._target, {"sequence": SEQUENCE_SCRIPT,
                                                    "position": POSITION_SCRIPT}, "backplane")
        self._nodes = NodeDirectory(names, instance or self._node, self._node,
                                    self._clients.new)
        self._deliver = deliver
        self._on_state = on_state
        self._on_dropped = on_dropped
        self._on_missed = on_missed or (lambda count: None)
        self._rng = rng or random.Random()
        self._history = history  # None: nothing is sequenced
        self._history_size = history_size
        self._outbox = Outbox(outage_buffer)
        self._on_buffered = on_buffered  # the outbox's bytes, as they change
        self._seq = 0  # of the last raw frame accepted for Redis
        self._seen = Seen()  # every publisher's numbers, as received here
        self._wakeup = asyncio.Event()
        self._up = False
        self._tried = False
        self._tasks: list[asyncio.Task[None]] = []
        self._publisher: Any = None  # the client that publishes

    @property
    def up(self) -> bool:
        return self._up

    def start(self) -> None:
        self._on_state(False)
        self._tasks = [asyncio.ensure_future(self._subscribe_forever()),
                       asyncio.ensure_future(self._publish_forever()),
                       asyncio.ensure_future(self._nodes.beat_forever()),
                       asyncio.ensure_future(self._watch_master_forever())]

    def advertise(self, url: str | None) -> None:
        """Offer ``url`` to other instances' draining clients (``NodeDirectory``)."""
        self._nodes.advertise(url)

    def peers(self) -> list[str]:
        return self._nodes.peers()

    async def stop(self) -> None:
        await cancel_for_good(self._tasks)
        unpublished = len(self._outbox.clear())
        if unpublished:
            log.warning("backplane: stopping with %d frames never published (Redis away)",
                        unpublished)
            self._on_dropped(unpublished)
            self._on_buffered(0)
        await self._clients.close_all()

    def publish(self, payload: str | bytes, source: str) -> None:
        """Publish a frame for the other instances (delivered locally by the caller):
        now, or once Redis is back. A frame that does not fit takes no number, so
        the receivers count no gap for what this instance counts dropped."""
        if self._keep(Outgoing(payload, source, self._seq + 1, False)):
            self._seq += 1

    def submit(self, frame: str, source: str, token: int) -> bool:
        """Have ``frame`` sequenced by Redis (``ebbcast.backplane.base.Sequencing``).
        True: it is delivered here when it comes back. False (Redis is away): the
        caller delivers it here now; kept for Redis, it is sequenced once Redis is
        back and comes back as one already delivered (``Broadcasts.deliver``)."""
        return self._keep(Outgoing(frame, source, token, True)) and self._up

    def _keep(self, frame: Outgoing) -> bool:
        """Into the outbox, if it fits; else counted dropped."""
        outbox = self._outbox
        if not outbox.fits(frame.cost, self._up):  # away too long, or far slower
            self._on_dropped(1)
            return False
        outbox.put(frame)
        if self._up:
            self._wakeup.set()
        else:
            self._on_buffered(outbox.bytes)
        return True

    def _set_up(self, up: bool) -> None:
        """Record a change of state; log each change once (and a first failure)."""
        first_failure = not up and not self._tried
        self._tried = True
        if up == self._up and not first_failure:
            return
        self._up = up
        self._on_state(up)
        where = self._target.where
        if up:
            self._wakeup.set()  # what the outbox kept goes first
            log.info("backplane connected: %s%s", where,
                     f" at {self._master}" if self._master else "")
        else:
            log.warning("backplane %s: %s; local delivery goes on, retrying",
                        "unreachable" if first_failure else "lost", where)

    async def _subscribe_forever(self) -> None:
        delays = backoff_delays(self._rng, self._target.backoff_max)
        while True:
            client = self._clients.new()
            try:
                async with client.pubsub() as pubsub:
                    self._pubsub = pubsub
                    await pubsub.subscribe(self._names.channel,
                                           self._names.sequenced_channel)
                    self._note_master(self._target.server_of(pubsub.connection))
                    if self._publisher is not None:  # its connections may predate an outage
                        await self._publisher.connection_pool.disconnect()
                    if self._history is not None:
                        await self._catch_up(client)
                    # up in the same step as a new epoch is told: a client's next frame
                    # is sequenced in it
                    self._set_up(True)
                    delays = backoff_delays(self._rng, self._target.backoff_max)
                    await self._receive(pubsub, client)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any Redis or network failure: retry
                log.debug("backplane subscription failed: %s", exc)
            finally:
                self._pubsub = None
                await self._clients.close(client)
            self._set_up(False)
            if self._history is not None:
                self._history.sequencing_lost()
            self._master_moved.clear()
            try:  # the backoff's pause, cut short when the sentinels name a new master
                await within(self._master_moved.wait(), next(delays))
            except asyncio.TimeoutError:
                pass

    def _note_master(self, master: str | None) -> None:
        """Which master the subscription reached; another than before is a failover."""
        if master is None:
            return
        if self._master is not None and master != self._master:
            log.warning("backplane: Redis failover: the master is now %s (was %s)",
                        master, self._master)
            self._on_failover()
        self._master = master

    async def _watch_master_forever(self) -> None:
        """With Sentinel: when the sentinels name another master than the one the
        subscription reached, drop the subscription, so that it (and the
        publisher) reconnect to the new one now: not when the old one is demoted
        (a manual failover leaves it writable for seconds), nor after a backoff.
        The sentinels are asked on each +switch-master, and every 0.5 s."""
        events: Any = None
        while True:
            try:
                if events is None:
                    events = await self._target.switch_events()
                if events is not None:
                    await events.get_message(ignore_subscribe_messages=True,
                                             timeout=MASTER_CHECK_SECONDS)
                else:
                    await asyncio.sleep(MASTER_CHECK_SECONDS)
                named = await self._target.master_now()
            except asyncio.CancelledError:
                if events is not None:
                    await events.aclose()
                raise
            except Exception as exc:  # sentinels unreachable: the subscription says so
                log.debug("backplane: asking the sentinels failed: %s", exc)
                if events is not None:
                    await events.aclose()
                    events = None
                await asyncio.sleep(MASTER_CHECK_SECONDS)
                continue
            if named is None:
                return  # a plain Redis: nothing to watch
            if self._master is not None and named != self._master:
                self._master_moved.set()
                pubsub = self._pubsub
                if pubsub is not None:
                    log.info("backplane: the sentinels name %s as master: leaving %s",
                             named, self._master)
                    await pubsub.aclose()

    async def _receive(self, pubsub: Any, client: Any) -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is None or message.get("type") != "message":
                continue
            if message["channel"] == self._names.sequenced_channel.encode():
                await self._on_sequenced(message["data"], client)
                continue
            envelope = Envelope.decode(message["data"])
            if envelope.node != self._node and self._first_time(envelope.node, envelope.seq):
                self._deliver(envelope.payload, envelope.source)

    async def _on_sequenced(self, data: bytes, client: Any) -> None:
        """One sequenced broadcast; what came before it and was missed first."""
        history = self._history
        if history is None:
            return
        epoch_bytes, offset_bytes, rest = data.split(b"\n", 2)
        epoch, offset = epoch_bytes.decode(), int(offset_bytes)
        envelope = Envelope.decode(rest)
        known_epoch, latest = history.position()
        if epoch != known_epoch or offset > latest + 1:
            await self._catch_up(client)
        self._deliver_sequenced(epoch, offset, envelope.text, envelope)

    async def _catch_up(self, client: Any) -> None:
        """Bring this process's history up to Redis's: at start, load it; after a
        gap, deliver what was missed from the stream; on a new epoch, say so and
        deliver the new epoch's broadcasts so far."""
        history = self._history
        assert history is not None
        epoch_bytes, latest = await self._clients.scripts["position"](
            keys=self._names.keys, args=[new_epoch()], client=client)
        epoch, latest = epoch_bytes.decode(), int(latest)
        known_epoch, known = history.position()
        if not known_epoch:
            kept = _entries(reversed(await client.xrevrange(
                self._names.stream, count=max(self._history_size, 1))))
            history.preload(epoch, kept[0].entry.offset - 1 if kept else latest,
                            [stored.entry for stored in kept])
            return
        if epoch == known_epoch and latest <= known:
            return
        first = known + 1 if epoch == known_epoch else 1
        missed = _entries(await client.xrange(self._names.stream, min=f"0-{first}"))
        if epoch != known_epoch:
            history.new_epoch(epoch, missed[0].entry.offset - 1 if missed else latest)
        lost = (missed[0].entry.offset if missed else latest + 1) - first
        if epoch == known_epoch and lost > 0:
            log.warning("backplane: %d broadcasts were missed and are no longer in the "
                        "history; clients resuming across them will not recover", lost)
            self._on_missed(lost)
        for stored in missed:
            self._deliver_sequenced(epoch, stored.entry.offset, stored.entry.frame,
                                    stored.sender)

    def _deliver_sequenced(self, epoch: str, offset: int, frame: str,
                           sender: Envelope) -> None:
        """To the history feed, a publisher's retry of a token already seen marked
        a repeat (an offset taken, nothing delivered)."""
        assert self._history is not None
        repeat = self._seen.repeated(sender.node, sender.seq)
        self._history.deliver_sequenced(epoch, offset, frame, sender.source, sender.seq,
                                        sender.node == self._node, repeat)

    def _first_time(self, node: str, seq: int) -> bool:
        """Whether raw frame ``seq`` of ``node`` is new (not a retry of one that
        crossed already); the frames of ``node`` that never arrived (a gap before
        ``seq``) are counted missed."""
        missed = self._seen.raw(node, seq)
        if missed:
            log.info("backplane: %d frames from %s were missed while this instance's "
                     "subscription was down", missed, node)
            self._on_missed(missed)
        return missed is not None

    async def _publish_forever(self) -> None:
        """Publish the outbox, a batch at a time, while Redis is up; a batch that
        failed is tried again after a backoff pause, or when Redis is back."""
        client = self._publisher = self._clients.new()
        delays = backoff_delays(self._rng, self._target.backoff_max)
        outbox = self._outbox
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while outbox and self._up:
                batch = outbox.take(BATCH)
                try:
                    async with client.pipeline(transaction=False) as pipe:
                        for frame in batch:
                            await self._queue_publish(pipe, frame)
                        await pipe.execute()
                except asyncio.CancelledError:
                    outbox.put_back(batch)  # counted at the stop
                    raise
                except Exception as exc:
                    self._failed(batch, exc)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await within(self._wakeup.wait(), next(delays))
                    self._wakeup.clear()
                    continue
                delays = backoff_delays(self._rng, self._target.backoff_max)
                self._on_buffered(outbox.bytes)

    def _failed(self, batch: list[Outgoing], exc: Exception) -> None:
        """A publish failed: Redis went away under it (kept, to be tried again) or
        refused it (dropped, counted). Either way what was submitted here is
        delivered here now (``HistoryFeed.sequencing_lost``)."""
        sequenced = sum(1 for frame in batch if frame.sequenced)
        if _worth_retrying(exc):
            log.debug("backplane: publishing %d frames failed, kept for later: %s",
                      len(batch), exc)
            self._outbox.put_back(batch)
        else:
            log.warning("backplane: Redis refused %d frames (%d to be sequenced): %s",
                        len(batch), sequenced, exc)
            self._on_dropped(len(batch))
        if sequenced and self._history is not None:
            self._history.sequencing_lost()

    async def _queue_publish(self, pipe: Any, frame: Outgoing) -> None:
        if not frame.sequenced:
            envelope = Envelope(self._node, frame.source, frame.number, frame.payload)
            pipe.publish(self._names.channel, envelope.encode())
            return
        await self._clients.scripts["sequence"](
            keys=self._names.keys,
            args=[new_epoch(), self._history_size, self._names.sequenced_channel,
                  Envelope(self._node, frame.source, frame.number, "").encode(),
                  frame.payload], client=pipe)


def _worth_retrying(exc: Exception) -> bool:
    """A failure of the connection (or a master demoted under it) is worth another
    try, once Redis is back; an answer of Redis's refusing the commands is not."""
    from redis.exceptions import ReadOnlyError, ResponseError

    return isinstance(exc, ReadOnlyError) or not isinstance(exc, ResponseError)


@dataclass(frozen=True)
class Stored:
    """One entry of the history stream (id ``0-<offset>``): the broadcast, and
    the envelope of who sent it (its payload empty)."""

    entry: Kept
    header: bytes

    @property
    def sender(self) -> Envelope:
        return Envelope.decode(self.header)


def _entries(stream: Any) -> list[Stored]:
    now = time.time()
    return [Stored(Kept(int(entry_id.split(b"-")[1]), fields[b"f"].decode(),
                        max(0.0, now - float(fields[b"t"]))), fields[b"h"])
            for entry_id, fields in stream]
