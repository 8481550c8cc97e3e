"""The backplane: how broadcasts reach the clients of other ebbcast instances.

``memory://`` is a single instance: nothing leaves the process. ``redis://`` joins
instances through Redis pub/sub (SPEC section 8): client frames and admin
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
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

CHANNEL = "ebbcast:broadcast"
#: Each instance keeps a key NODE_PREFIX<id> = its WebSocket URL, with a TTL, so the
#: others can name it in their shutdown frames; refreshed every HEARTBEAT_SECONDS.
NODE_PREFIX = "ebbcast:node:"
HEARTBEAT_SECONDS, NODE_TTL_SECONDS = 3.0, 10
#: Frames waiting to be published; beyond this (Redis far slower than the
#: clients), the oldest are dropped and counted.
PUBLISH_QUEUE_LIMIT = 10_000
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 10.0

#: deliver(payload, source) fans a frame from another instance out locally.
Deliver = Callable[[str | bytes, str], None]


class Backplane(Protocol):
    def start(self) -> None: ...
    async def stop(self) -> None: ...
    def publish(self, payload: str | bytes, source: str) -> None: ...
    def advertise(self, url: str | None) -> None: ...
    def peers(self) -> list[str]: ...


class MemoryBackplane:
    """One instance: local delivery is all there is."""

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def publish(self, payload: str | bytes, source: str) -> None:
        pass

    def advertise(self, url: str | None) -> None:
        pass

    def peers(self) -> list[str]:
        return []


def encode(node: str, source: str, payload: str | bytes, seq: int = 0) -> bytes:
    """``<node>\\n<source>\\n<seq>\\n<t|b><payload>``: who sent it, for what, its
    number in that sender's sequence, text or binary."""
    body = payload if isinstance(payload, bytes) else payload.encode()
    kind = b"b" if isinstance(payload, bytes) else b"t"
    return b"\n".join((node.encode(), source.encode(), str(seq).encode(), kind + body))


def decode(message: bytes) -> tuple[str, str, int, str | bytes]:
    node, source, seq, rest = message.split(b"\n", 3)
    payload: str | bytes = rest[1:] if rest[:1] == b"b" else rest[1:].decode()
    return node.decode(), source.decode(), int(seq), payload


def backoff_delays(rng: random.Random) -> Any:
    """Capped exponential backoff with full jitter: 0.1 s, 0.2 s, ... up to 10 s."""
    delay = BACKOFF_FIRST
    while True:
        yield rng.uniform(delay / 2, delay)
        delay = min(delay * 2, BACKOFF_MAX)


class RedisBackplane:
    """Redis pub/sub through redis-py's asyncio client (hiredis parser)."""

    def __init__(self, url: str, node: str, deliver: Deliver,
                 on_state: Callable[[bool], None], on_dropped: Callable[[int], None],
                 on_missed: Callable[[int], None] | None = None,
                 rng: random.Random | None = None) -> None:
        self._url = url
        # unique per instance even when two share a process (tests) or a pid (containers)
        self._node = f"{node}/{secrets.token_hex(4)}"
        self._deliver = deliver
        self._on_state = on_state
        self._on_dropped = on_dropped
        self._on_missed = on_missed or (lambda count: None)
        self._rng = rng or random.Random()
        self._queue: deque[tuple[str, str | bytes]] = deque()
        self._seq = 0  # of the last frame handed to Redis
        self._last_seen: dict[str, int] = {}  # other publishers' last sequence numbers
        self._wakeup = asyncio.Event()
        self._up = False
        self._tried = False
        self._tasks: list[asyncio.Task[None]] = []
        self._clients: list[Any] = []
        self._url_advertised: str | None = None
        self._own_urls: set[str] = set()  # ever advertised: never a peer
        self._peers: list[str] = []

    @property
    def up(self) -> bool:
        return self._up

    def start(self) -> None:
        self._on_state(False)
        self._tasks = [asyncio.ensure_future(self._subscribe_forever()),
                       asyncio.ensure_future(self._publish_forever()),
                       asyncio.ensure_future(self._heartbeat_forever())]

    def advertise(self, url: str | None) -> None:
        """Offer ``url`` to other instances' draining clients; None withdraws it (as
        this instance starts its own drain, it stops being a place to go)."""
        self._url_advertised = url
        if url:
            self._own_urls.add(url)

    def peers(self) -> list[str]:
        """Other live instances' URLs, as of the last heartbeat: not this one's,
        even as advertised by its sibling workers, each URL once."""
        return sorted(set(self._peers) - self._own_urls)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in self._clients:
            await client.aclose()
        self._clients.clear()

    def publish(self, payload: str | bytes, source: str) -> None:
        """Queue a frame for the other instances (delivered locally by the caller)."""
        if not self._up:
            self._on_dropped(1)
            return
        if len(self._queue) >= PUBLISH_QUEUE_LIMIT:
            self._queue.popleft()
            self._on_dropped(1)
        self._queue.append((source, payload))
        self._wakeup.set()

    def _client(self) -> Any:
        import redis.asyncio as redis  # imported only when a redis:// URL is configured

        client = redis.Redis.from_url(self._url, socket_connect_timeout=2,
                                      health_check_interval=5)
        self._clients.append(client)
        return client

    def _set_up(self, up: bool) -> None:
        """Record a change of state; log each change once (and a first failure)."""
        first_failure = not up and not self._tried
        self._tried = True
        if up == self._up and not first_failure:
            return
        self._up = up
        self._on_state(up)
        where = urlsplit(self._url).netloc
        if up:
            log.info("backplane connected: %s", where)
        else:
            log.warning("backplane %s: %s; local delivery goes on, retrying",
                        "unreachable" if first_failure else "lost", where)

    async def _subscribe_forever(self) -> None:
        delays = backoff_delays(self._rng)
        while True:
            client = self._client()
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    self._set_up(True)
                    delays = backoff_delays(self._rng)
                    await self._receive(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any Redis or network failure: retry
                log.debug("backplane subscription failed: %s", exc)
            finally:
                self._clients.remove(client)
                await client.aclose()
            self._set_up(False)
            dropped = len(self._queue)
            if dropped:
                self._queue.clear()
                self._on_dropped(dropped)
            await asyncio.sleep(next(delays))

    async def _receive(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is None or message.get("type") != "message":
                continue
            node, source, seq, payload = decode(message["data"])
            if node != self._node:
                self._check_sequence(node, seq)
                self._deliver(payload, source)

    def _check_sequence(self, node: str, seq: int) -> None:
        """Count the frames of ``node`` that never arrived (a gap before ``seq``)."""
        last = self._last_seen.get(node)
        self._last_seen[node] = seq
        if last is not None and seq > last + 1:
            log.info("backplane: %d frames from %s were missed while this instance's "
                     "subscription was down", seq - last - 1, node)
            self._on_missed(seq - last - 1)

    async def _heartbeat_forever(self) -> None:
        client = self._client()
        key = NODE_PREFIX + self._node
        while True:
            try:
                if self._url_advertised:
                    await client.set(key, self._url_advertised, ex=NODE_TTL_SECONDS)
                else:
                    await client.delete(key)
                keys = [k async for k in client.scan_iter(match=NODE_PREFIX + "*")
                        if k.decode() != key]
                urls = await client.mget(keys) if keys else []
                self._peers = sorted(u.decode() for u in urls if u)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: the subscriber logs the outage
                log.debug("backplane heartbeat failed: %s", exc)
            await asyncio.sleep(HEARTBEAT_SECONDS if self._url_advertised else 0.5)

    async def _publish_forever(self) -> None:
        client = self._client()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue and self._up:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), 256))]
                try:
                    async with client.pipeline(transaction=False) as pipe:
                        for source, payload in batch:
                            self._seq += 1
                            pipe.publish(CHANNEL, encode(self._node, source, payload,
                                                         self._seq))
                        await pipe.execute()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # numbered, so the others count the gap
                    log.debug("backplane publish of %d frames failed: %s", len(batch), exc)
