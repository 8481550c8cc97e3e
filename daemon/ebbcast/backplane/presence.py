"""Presence across instances on Redis: who is subscribed to which channel, for
``GET /channels`` and ``GET /channels/{c}``.

Each instance keeps one key per channel it has subscribers to,
``<prefix>:p:<channel>/<instance>``: a JSON object of its client ids and how many
subscriptions each holds. It is written as it changes and rewritten every few
seconds with a TTL (``PRESENCE_TTL_MS``), so that the keys of an instance that
died go with it. Reading the whole cluster's presence is a SCAN of those keys
(``COUNT 1000``, as a shared Redis may hold many others) and one MGET.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from ebbcast.backplane.centre import largest
from ebbcast.backplane.names import RedisNames

#: How long a presence key lives unless its instance rewrites it.
PRESENCE_TTL_MS = 30_000


class PresenceDirectory:
    """``client()`` makes a Redis client (``redis.asyncio.Redis``) for a reading."""

    def __init__(self, names: RedisNames, instance: str, client: Callable[[], Any]) -> None:
        self._names = names
        self._instance = instance
        self._client = client

    def write(self, pipe: Any, channel: str, counts: Counter[str], keep_ms: int) -> None:
        """Queue this instance's presence in ``channel`` on ``pipe`` (none: the key
        goes); while it has subscribers, the channel's keys are kept too."""
        key = self._names.presence_key(channel, self._instance)
        if not counts:
            pipe.delete(key)
            return
        pipe.set(key, json.dumps(counts), px=PRESENCE_TTL_MS)
        for name in self._names.channel_keys(channel)[:4]:
            pipe.pexpire(name, keep_ms)

    async def everywhere(self) -> dict[str, Counter[str]]:
        """Every instance's presence: channel -> client id -> subscriptions."""
        client = self._client()
        try:
            keys = [key async for key in client.scan_iter(
                match=f"{self._names.presence_keys}*", count=1000)]
            values = await client.mget(keys) if keys else []
        finally:
            await client.aclose()
        start = len(self._names.presence_keys)
        merged: dict[str, Counter[str]] = {}
        for key, value in zip(keys, values):
            if value is None:  # expired between the SCAN and the MGET
                continue
            channel = key.decode()[start:].rsplit("/", 1)[0]
            merged.setdefault(channel, Counter()).update(
                {str(client_id): int(count) for client_id, count in json.loads(value).items()})
        return merged

    async def listing(self, limit: int) -> tuple[list[tuple[str, int]], int]:
        merged = await self.everywhere()
        counted = [(channel, sum(clients.values())) for channel, clients in merged.items()]
        return largest(counted, limit), len(counted)

    async def presence(self, channel: str) -> tuple[int, list[str]]:
        clients = (await self.everywhere()).get(channel, Counter())
        return sum(clients.values()), sorted(clients)
