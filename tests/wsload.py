"""A raw asyncio WebSocket load for upgrade tests and ``bench/upgrade.py``.

Two kinds of client, both minimal RFC 6455 over asyncio streams (so a thousand of
them fit in one test process):

- held clients stay connected and *move* on a shutdown frame, as the page and
  ``ebbcast client --reconnect`` do: after reconnect_after_ms they complete a new
  handshake, then close the old connection (make before break);
- a hammer opens connections continuously at a set rate: handshake, read the
  welcome, close. Every attempt that does not end with a welcome is a failure,
  kept with its reason (refused, reset, an HTTP status, a timeout).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ebbcast.core.waits import cancel_for_good, within

HANDSHAKE_TIMEOUT = 10.0


class HandshakeFailed(Exception):
    pass


@dataclass
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    welcome: dict[str, Any]

    @property
    def server_pid(self) -> int:
        return int(self.welcome["server"].rsplit(":", 1)[1])

    async def close(self) -> None:
        """Send a close frame and wait (bounded) for the server to end the connection."""
        try:
            self.writer.write(_masked(0x8, (1000).to_bytes(2, "big")))
            await within(self.reader.read(), HANDSHAKE_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            self.writer.close()


def _masked(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + body


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(2)
    length = head[1] & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    return head[0] & 0x0F, await reader.readexactly(length)


async def handshake(url: str) -> Connection:
    """Connect, upgrade, read the welcome; HandshakeFailed (or OSError) otherwise."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write((f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                      "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise HandshakeFailed(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        opcode, payload = await read_frame(reader)
        welcome = json.loads(payload) if opcode == 0x1 else {}
        if welcome.get("type") != "welcome":
            raise HandshakeFailed(f"first frame was not a welcome: {payload[:80]!r}")
    except BaseException:
        writer.close()
        raise
    return Connection(reader, writer, welcome)


@dataclass
class Hammer:
    """Handshakes at ``rate`` a second until stopped."""

    url: str
    rate: float
    attempts: int = 0
    failures: list[str] = field(default_factory=list)
    completed_at: list[tuple[float, int]] = field(default_factory=list)  # (time, server pid)
    seconds: float = 0.0  # how long it ran
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, lanes: int = 4) -> None:
        started = time.monotonic()
        await asyncio.gather(*(self._lane(lanes) for _ in range(lanes)))
        self.seconds = time.monotonic() - started

    @property
    def achieved_rate(self) -> float:
        return self.attempts / self.seconds if self.seconds else 0.0

    def stop(self) -> None:
        self._stop.set()

    async def _lane(self, lanes: int) -> None:
        interval = lanes / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.attempts += 1
            try:
                conn = await within(handshake(self.url), HANDSHAKE_TIMEOUT)
            except Exception as exc:  # what failed is the point: keep it
                self.failures.append(f"{type(exc).__name__}: {exc}")
            else:
                self.completed_at.append((time.monotonic(), conn.server_pid))
                await conn.close()
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


@dataclass
class HeldClients:
    """``count`` clients that stay connected and move on shutdown frames."""

    url: str
    count: int
    connections: list[Connection] = field(default_factory=list)
    moves: list[tuple[float, int]] = field(default_factory=list)  # (time, new server pid)
    failures: list[str] = field(default_factory=list)
    unexpected_closes: int = 0
    close_reasons: list[str] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def connect(self, batch: int = 50) -> None:
        for start in range(0, self.count, batch):
            self.connections += await asyncio.gather(
                *(handshake(self.url) for _ in range(start, min(start + batch, self.count))))
        self._tasks = [asyncio.ensure_future(self._follow(i)) for i in range(self.count)]

    def pids(self) -> set[int]:
        return {conn.server_pid for conn in self.connections}

    def pid_counts(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for conn in self.connections:
            counts[conn.server_pid] = counts.get(conn.server_pid, 0) + 1
        return counts

    def following(self) -> int:
        """Clients whose task still reads (a dead one would never move)."""
        return sum(1 for task in self._tasks if not task.done())

    async def _follow(self, index: int) -> None:
        while True:
            conn = self.connections[index]
            try:
                opcode, payload = await read_frame(conn.reader)
            except (asyncio.IncompleteReadError, OSError) as exc:
                self._closed(f"{type(exc).__name__}: {exc}")
                return
            if opcode == 0x8:
                self._closed(f"close frame {int.from_bytes(payload[:2], 'big')} "
                             f"{payload[2:].decode(errors='replace')}")
                return
            if opcode == 0x9:  # a ping: answer it, as every client must
                conn.writer.write(_masked(0xA, payload))
                continue
            frame = json.loads(payload) if opcode == 0x1 else {}
            if frame.get("type") == "shutdown":
                await asyncio.sleep(frame["reconnect_after_ms"] / 1000)
                await self._move(index)

    def _closed(self, reason: str) -> None:
        self.unexpected_closes += 1
        self.close_reasons.append(reason)

    async def _move(self, index: int) -> None:
        old = self.connections[index]
        while True:
            try:
                new = await within(handshake(self.url), HANDSHAKE_TIMEOUT)
                break
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.1)
        self.connections[index] = new
        self.moves.append((time.monotonic(), new.server_pid))
        await old.close()

    async def close(self) -> None:
        # a client moving may be inside a handshake's wait: cancelled for good
        await cancel_for_good(self._tasks)
        await asyncio.gather(*(conn.close() for conn in self.connections))


@dataclass
class UpgradeRound:
    """One upgrade under load, timed on the monotonic clock."""

    generation: int
    ready_seconds: float  # SIGUSR2 -> the main process logs "generation N serving"
    moved_seconds: float  # from then until the last held client has moved
    handshakes: int       # hammer handshakes completed meanwhile


async def upgrades_under_load(daemon: Any, clients: int, upgrades: int, rate: float,
                              move_timeout: float) -> tuple[list[UpgradeRound], Hammer,
                                                              HeldClients]:
    """Connect ``clients`` held clients, start the hammer, then run ``upgrades``
    upgrades (SIGUSR2) one after the other, each once every held client has moved
    to the previous one. ``daemon`` is a ``helpers.DaemonProcess``."""
    held = HeldClients(daemon.ws_url, clients)
    await held.connect()
    hammer = Hammer(daemon.ws_url, rate)
    hammering = asyncio.ensure_future(hammer.run())
    rounds = []
    try:
        for generation in range(2, upgrades + 2):
            mark, moved_before = len(daemon.lines), len(held.moves)
            signalled = time.monotonic()
            daemon.signal(signal.SIGUSR2)
            await asyncio.to_thread(daemon.wait_for_log, rf"generation {generation} serving",
                                    start=mark)
            serving = time.monotonic()
            while len(held.moves) - moved_before < clients:
                assert time.monotonic() < serving + move_timeout, (
                    f"{len(held.moves) - moved_before} of {clients} clients moved in time; "
                    f"on pids {held.pid_counts()}, {held.unexpected_closes} closed, "
                    f"failures {held.failures[:5]}, following {held.following()}\n"
                    + "\n".join(daemon.lines[-60:]))
                await asyncio.sleep(0.02)
            moved = time.monotonic()
            done = sum(1 for at, _ in hammer.completed_at if signalled <= at <= moved)
            rounds.append(UpgradeRound(generation, serving - signalled, moved - serving, done))
    finally:
        hammer.stop()
        await hammering
        await held.close()
    return rounds, hammer, held
