"""Where the Redis backplane connects: one Redis, or the master that Sentinel names.

``redis://`` and ``rediss://`` URLs name one server. ``redis+sentinel://`` names
the sentinels and the master's name,
``redis+sentinel://[user:password@]HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]``,
and every connection asks them for the current master (redis-py's Sentinel
support): after a failover, a new connection reaches the promoted replica as soon
as the sentinels name it. The password in the URL is the master's; sentinels that
require one of their own get it from ``?sentinel_password=``.

Both kinds are a :class:`RedisTarget`: a factory of asyncio clients, a name for
the logs (never the password), how long the backplane waits at most between
reconnection attempts, which server a connection reached (to tell a failover),
and which master the sentinels name now (a manual failover leaves the old master
writable for seconds: the backplane asks, and moves as soon as they name another).
"""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import urlsplit

from ebbcast.values import SENTINEL_SCHEME, parse_sentinel_url

#: Longest pause between reconnection attempts: a plain Redis that is down may stay
#: down a while; with Sentinel a new master is named within seconds.
PLAIN_BACKOFF_MAX, SENTINEL_BACKOFF_MAX = 10.0, 1.0
_TIMEOUTS: dict[str, Any] = {"socket_connect_timeout": 2, "health_check_interval": 5}


class RedisTarget(Protocol):
    #: For the logs: host:port, or the sentinels and the master's name.
    where: str
    backoff_max: float

    def client(self) -> Any:
        """A new ``redis.asyncio.Redis`` (connections are made when first used)."""

    def server_of(self, connection: Any) -> str | None:
        """``host:port`` of the server ``connection`` reached, when it matters (a
        changed master is a failover); None for a plain Redis."""

    async def close(self) -> None:
        """Let go of what the target holds itself (the sentinels' connections)."""

    async def master_now(self) -> str | None:
        """``host:port`` of the master the sentinels name now; None for a plain
        Redis (nothing to ask). Raises what asking raised."""

    async def switch_events(self) -> Any | None:
        """A subscription to the sentinels' ``+switch-master`` announcements (from
        the first sentinel that answers); None for a plain Redis or when no
        sentinel answers."""


class PlainRedis:
    """One Redis server."""

    backoff_max = PLAIN_BACKOFF_MAX

    def __init__(self, url: str) -> None:
        self.url = url
        self.where = urlsplit(url).hostname or "?"
        port = urlsplit(url).port
        if port:
            self.where += f":{port}"

    def client(self) -> Any:
        import redis.asyncio as redis  # imported only when a Redis backplane is used

        return redis.Redis.from_url(self.url, **_TIMEOUTS)

    def server_of(self, connection: Any) -> str | None:
        return None

    async def close(self) -> None:
        pass

    async def master_now(self) -> str | None:
        return None

    async def switch_events(self) -> Any | None:
        return None


class SentinelRedis:
    """The master that the sentinels name, found again for every new connection."""

    backoff_max = SENTINEL_BACKOFF_MAX

    def __init__(self, url: str) -> None:
        self.parsed = parse_sentinel_url(url)
        hosts = ",".join(f"{h}:{p}" for h, p in self.parsed.sentinels)
        self.where = f"master {self.parsed.master!r} of sentinels {hosts}"
        self._sentinel: Any = None

    def _manager(self) -> Any:
        """redis-py's Sentinel: the sentinels' connections, shared by every client."""
        from redis.asyncio.sentinel import Sentinel

        if self._sentinel is None:
            sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": 1,
                                               "socket_timeout": 1}
            if self.parsed.sentinel_password:
                sentinel_kwargs["password"] = self.parsed.sentinel_password
            # Typed from redis-py 8.2 on, untyped before: called through Any so that
            # strict mypy passes on both (the lock pins one; CI's newest run the other).
            make_sentinel: Any = Sentinel
            self._sentinel = make_sentinel(list(self.parsed.sentinels),
                                           sentinel_kwargs=sentinel_kwargs)
        return self._sentinel

    def client(self) -> Any:
        p = self.parsed
        return self._manager().master_for(p.master, db=p.db, username=p.username,
                                          password=p.password, **_TIMEOUTS)

    def server_of(self, connection: Any) -> str | None:
        host, port = getattr(connection, "host", None), getattr(connection, "port", None)
        return f"{host}:{port}" if host else None

    async def master_now(self) -> str | None:
        host, port = await self._manager().discover_master(self.parsed.master)
        return f"{host}:{port}"

    async def switch_events(self) -> Any | None:
        for sentinel in self._manager().sentinels:
            pubsub = sentinel.pubsub()
            try:
                await pubsub.subscribe("+switch-master")
                return pubsub
            except Exception:  # this sentinel is down: the next one
                await pubsub.aclose()
        return None

    async def close(self) -> None:
        if self._sentinel is not None:
            await self._sentinel.aclose()
            self._sentinel = None


def redis_target(url: str) -> RedisTarget:
    """The target a ``backplane.url`` names (not ``memory://``)."""
    if urlsplit(url).scheme == SENTINEL_SCHEME:
        return SentinelRedis(url)
    return PlainRedis(url)
