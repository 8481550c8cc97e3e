"""The Redis clients one part of the backplane makes, and its Lua scripts.

The global stream (``ebbcast.backplane.redis``) and the channels
(``ebbcast.backplane.redischannels``) each hold one of these over their target: every
client they make is listed, so that stopping closes each one (no connection outlives
the backplane), and their scripts are registered once, with the first client
(redis-py runs a script by its SHA and loads it where the server lacks it, as after a
failover).
"""

from __future__ import annotations

import logging
from typing import Any

from ebbcast.backplane.sentinel import RedisTarget

log = logging.getLogger(__name__)


class RedisClients:
    def __init__(self, target: RedisTarget, scripts: dict[str, str], what: str) -> None:
        self._target = target
        self._sources = scripts
        self._what = what  # for the logs: whose clients these are
        self._open: list[Any] = []
        #: Each script by name, callable as ``await scripts[name](keys=..., args=...,
        #: client=...)`` once the first client is made.
        self.scripts: dict[str, Any] = {}

    def new(self) -> Any:
        """A new client of the target (it connects when first used), listed."""
        client = self._target.client()
        self._open.append(client)
        if not self.scripts:
            self.scripts = {name: client.register_script(source)
                            for name, source in self._sources.items()}
        return client

    async def close(self, client: Any) -> None:
        """Close ``client``'s connections, then forget it. A close that fails, or is
        cut short (a stop cancels a task as it closes the client of a lost
        subscription), leaves it listed: ``close_all()`` closes it again."""
        try:
            await client.aclose()
        except Exception as exc:  # Redis gone mid-close: still listed
            log.debug("%s: closing a Redis client failed: %s", self._what, exc)
            return
        self._open.remove(client)

    async def close_all(self) -> None:
        """Close every client still listed, then the target's own connections."""
        for client in list(self._open):
            await self.close(client)
        await self._target.close()
