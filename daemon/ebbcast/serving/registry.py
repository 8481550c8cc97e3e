"""The set of open WebSocket connections of this process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

Conn = TypeVar("Conn")


class ConnectionRegistry(Generic[Conn]):
    """Open connections, in the order they joined.

    ``snapshot()`` returns a tuple that stays valid while connections join and leave
    during a fan-out; it is rebuilt only after membership changes, so broadcasting
    to an unchanged set costs no copy. ``on_change`` is called with the new count
    after every add and remove (metrics, the drain's "last client left" check).

    With ``key`` (a connection's client id), ``keyed(k)`` finds the connections of one
    key without a scan: a direct message to one client among 100,000 costs the same
    as among ten. An id is usually one connection's, kept as itself; a list only when
    several share it.
    """

    def __init__(self, on_change: Callable[[int], None] | None = None,
                 key: Callable[[Conn], str] | None = None) -> None:
        self._members: dict[Conn, None] = {}
        self._snapshot: tuple[Conn, ...] | None = ()
        self._on_change = on_change
        self._key = key
        self._by_key: dict[str, Conn | list[Conn]] = {}
        self._empty = asyncio.Event()
        self._empty.set()

    def add(self, conn: Conn) -> None:
        if conn in self._members:
            return
        self._members[conn] = None
        if self._key is not None:
            self._index(self._key(conn), conn)
        self._changed()

    def discard(self, conn: Conn) -> bool:
        """Remove ``conn``; True if it was a member. Safe to call twice."""
        if conn not in self._members:
            return False
        del self._members[conn]
        if self._key is not None:
            self._unindex(self._key(conn), conn)
        self._changed()
        return True

    def keyed(self, key: str) -> tuple[Conn, ...]:
        """The members whose key is ``key``, in the order they joined."""
        found = self._by_key.get(key)
        if found is None:
            return ()
        return tuple(found) if isinstance(found, list) else (found,)

    def _index(self, key: str, conn: Conn) -> None:
        found = self._by_key.get(key)
        if found is None:
            self._by_key[key] = conn
        elif isinstance(found, list):
            found.append(conn)
        else:
            self._by_key[key] = [found, conn]

    def _unindex(self, key: str, conn: Conn) -> None:
        found = self._by_key[key]
        if not isinstance(found, list):
            del self._by_key[key]
            return
        found.remove(conn)
        if len(found) == 1:
            self._by_key[key] = found[0]

    def _changed(self) -> None:
        self._snapshot = None
        if self._members:
            self._empty.clear()
        else:
            self._empty.set()
        if self._on_change is not None:
            self._on_change(len(self._members))

    def snapshot(self) -> tuple[Conn, ...]:
        if self._snapshot is None:
            self._snapshot = tuple(self._members)
        return self._snapshot

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, conn: object) -> bool:
        return conn in self._members

    def __iter__(self) -> Iterator[Conn]:
        return iter(self.snapshot())

    async def wait_empty(self) -> None:
        """Return once no connection is left (at once if none is)."""
        await self._empty.wait()
