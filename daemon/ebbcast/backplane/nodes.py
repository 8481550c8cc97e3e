"""Where each instance on Redis tells the others which URL its clients should move
to, and learns theirs: the node keys.

Each serving process keeps a key (``RedisNames.node_key``) holding the URL its
instance advertises, with a TTL, refreshed every HEARTBEAT_SECONDS and withdrawn at
once when it starts draining. Other instances are told apart by the instance id in
the key, not by URL: behind one proxy every instance advertises the same URL, and a
draining one must still name it while another is live.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ebbcast.backplane.names import RedisNames
from ebbcast.core.waits import within

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS, NODE_TTL_SECONDS = 3.0, 10
#: Keys asked for per SCAN step: on a Redis shared by deployments a SCAN walks every
#: key of it, not only this deployment's.
SCAN_COUNT = 1000


class NodeDirectory:
    """One serving process's node key, and the other instances' URLs as of its last
    heartbeat. ``client()`` gives the Redis client the heartbeat uses."""

    def __init__(self, names: RedisNames, instance: str, member: str,
                 client: Callable[[], Any]) -> None:
        self._names = names
        self._key = names.node_key(instance, member)
        self._mine = names.instance_keys(instance)
        self._client = client
        self._url: str | None = None
        #: Set when the advertised URL changes: the heartbeat writes it at once.
        self._changed = asyncio.Event()
        self._peers: list[str] = []

    def advertise(self, url: str | None) -> None:
        """Offer ``url`` to other instances' draining clients; None withdraws it (as
        this instance starts its own drain, it stops being a place to go): the
        heartbeat writes the change at once, not at its next beat."""
        if url != self._url:
            self._url = url
            self._changed.set()

    def peers(self) -> list[str]:
        """Other live instances' URLs, each once: not this instance's serving
        processes', and this one's own URL when another instance advertises it too
        (behind one proxy)."""
        return self._peers

    async def beat_forever(self) -> None:
        client = self._client()
        while True:
            # cleared before the URL is read: a change from now on wakes the next wait
            self._changed.clear()
            try:
                await self._beat(client)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: the subscriber logs the outage
                log.debug("backplane heartbeat failed: %s", exc)
            try:
                await within(self._changed.wait(), HEARTBEAT_SECONDS if self._url else 0.5)
            except asyncio.TimeoutError:
                pass

    async def _beat(self, client: Any) -> None:
        if self._url:
            await client.set(self._key, self._url, ex=NODE_TTL_SECONDS)
        else:
            await client.delete(self._key)
        keys = [k.decode() async for k in client.scan_iter(
            match=self._names.node_keys + "*", count=SCAN_COUNT)]
        urls = await client.mget(keys) if keys else []
        peers = other_instances(self._names, self._mine, dict(zip(keys, urls)), self._url)
        if peers != self._peers:
            log.debug("backplane: other instances at: %s", ", ".join(peers) or "none")
        self._peers = peers


def other_instances(names: RedisNames, mine: str, urls: dict[str, bytes | None],
                    advertised: str | None) -> list[str]:
    """The URLs in the node keys of instances other than this one (whose keys begin
    with ``mine``), each once. A key of a release before instance ids
    (``<prefix>:node:<host:pid/token>``, one slash) names no instance: one that
    advertises this process's own URL is this instance's previous generation,
    handing over, and left out."""
    found = set()
    for key, url in urls.items():
        legacy = key[len(names.node_keys):].count("/") < 2
        if url is not None and not key.startswith(mine) and \
                not (legacy and url.decode() == advertised):
            found.add(url.decode())
    return sorted(found)
