"""A Python client for ebbcast, on asyncio: ``ebbcast client`` is built on it.

A :class:`Session` is one logical client over one connection or, with
``reconnect=True``, over successive ones::

    session = Session("ws://127.0.0.1:8000/ws/alice", reconnect=True)
    await session.connect()
    await session.subscribe("scores")
    await session.publish("scores", "1-0")
    async for event in session:          # every frame, as a JSON object
        print(event.data)

With ``reconnect`` the session outlives its connections: a shutdown frame (a
drain, or an upgrade handing over to a new generation) makes it *move*: after the
frame's ``reconnect_after_ms`` it opens a new connection and closes the old one only
once the new one is welcomed (make before break), to one of the frame's ``nodes``
when a draining instance names others (keeping the URL's path and query); a
connection that drops is replaced with jittered exponential backoff (0.1 s
doubling up to 10 s).

It resumes, too, each stream on its own: the new connection asks for the global
broadcasts after the last offset seen (``?since=N&epoch=E``), and subscribes again
to each channel with that channel's last offset; a message is yielded once, even
when the old and the new connection of a move both deliver it. What the daemon
cannot replay is said by a note, ``{"resume":"not_recovered","since":N,"epoch":E}``
(with ``"channel"`` for a channel), and a connection that closes by
``{"closed":code,"reason":…}``.

A token (``token=``) is sent as ``Authorization: Bearer``; a handshake refused with
401 ends the session (:class:`Unauthorized`), since the same token cannot help.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from ebbcast.backplane.base import backoff_delays
from ebbcast.core.waits import within

CONNECT_TIMEOUT = 10.0


class CannotConnect(Exception):
    """The first connection could not be made (or, reconnecting, none before the
    deadline)."""


class Unauthorized(CannotConnect):
    """The daemon refused the token (HTTP 401)."""


@dataclass(frozen=True)
class Event:
    """What a session yields: a frame as a JSON object (``raw``: as received), or a
    note of the session's own (``raw`` None)."""

    data: dict[str, Any]
    raw: str | bytes | None = None

    def line(self) -> str:
        """One JSON line, as ``ebbcast client`` prints it."""
        return frame_as_json_line(self.raw) if self.raw is not None else json.dumps(self.data)


def frame_as_json_line(frame: str | bytes) -> str:
    """A received frame as one JSON line.

    A text frame holding a JSON object is printed as that object (compact); other
    text as ``{"text": …}``; binary frames as ``{"binary_base64": …}``.
    """
    parsed = _json_object(frame) if isinstance(frame, str) else None
    if isinstance(parsed, dict):
        return json.dumps(parsed, separators=(",", ":"), ensure_ascii=False)
    return json.dumps(parse_frame(frame), ensure_ascii=False)


def parse_frame(frame: str | bytes) -> dict[str, Any]:
    if isinstance(frame, bytes):
        return {"binary_base64": base64.b64encode(frame).decode()}
    parsed = _json_object(frame)
    return parsed if isinstance(parsed, dict) else {"text": frame}


def _json_object(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def handshake_request(url: str, token: str | None) -> HTTPRequest:
    """The handshake for ``url``, with the client token, if any, as a bearer token."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return HTTPRequest(url, headers=headers)


def follow_nodes(url: str, shutdown: dict[str, Any], rng: random.Random) -> str:
    """Where a session goes after ``shutdown``: ``url`` on one of the other
    instances the frame names when the daemon is draining, else ``url``."""
    named = shutdown.get("nodes")
    nodes = [n for n in named if isinstance(n, str)] if isinstance(named, list) else []
    if shutdown.get("reason") != "draining" or not nodes:
        return url
    target = urlsplit(rng.choice(nodes))
    if target.scheme not in ("ws", "wss") or not target.netloc:
        return url
    return urlunsplit(urlsplit(url)._replace(scheme=target.scheme, netloc=target.netloc))


@dataclass
class Position:
    """Where a stream (the global one, or a channel) was read up to."""

    epoch: str | None = None
    offset: int = 0
    #: The offset a resume asked from, until its answer (None: none asked).
    asked: int | None = None

    def take(self, epoch: str, offset: int, recovered: bool) -> None:
        """A welcome's or a subscription's position; a replay follows if recovered.
        In the same epoch, never go back (the server may lag)."""
        if not recovered:
            same = epoch == self.epoch
            self.epoch, self.offset = epoch, max(self.offset, offset) if same else offset
        self.asked = None

    def new(self, offset: object) -> bool:
        """Whether a message with ``offset`` is new here (and note it)."""
        if not isinstance(offset, int):
            return True
        if offset <= self.offset:
            return False  # yielded already, from the connection before a move
        self.offset = offset
        return True


@dataclass
class Subscription:
    position: Position
    presence: bool = False


class Session:
    """One logical client session (see the module)."""

    def __init__(self, url: str, *, token: str | None = None, reconnect: bool = False,
                 deadline: float | None = None, quiet: bool = True) -> None:
        self.url = url
        self.token = token
        self.reconnect = reconnect
        #: monotonic time the session ends at (None: never)
        self.deadline = deadline
        self.quiet = quiet  # no "retrying" on stderr
        self.rng = random.Random()
        self.current: WebSocketClientConnection | None = None
        self.moving: asyncio.Task[None] | None = None
        self.frames: asyncio.Queue[
            tuple[WebSocketClientConnection | None, str | bytes | None]] = asyncio.Queue()
        self.position = Position()  # the global stream's
        self.channels: dict[str, Subscription] = {}
        #: Connections opened and not welcomed yet, with the offset each resumes from.
        self.opening: dict[WebSocketClientConnection, int | None] = {}
        #: What is to be yielded next: notes come before the frame that made them.
        self._pending: deque[Event] = deque()
        self.ended = False
        #: A reconnection's token was refused (the session ended for it).
        self.refused = False
        #: Each connection's reader, until its connection has closed.
        self._pumps: set[asyncio.Task[None]] = set()

    # -- what a program does --------------------------------------------------------

    async def connect(self) -> None:
        """The first connection; raises CannotConnect (Unauthorized for a 401)."""
        self.current = await self._open()

    async def send(self, text: str) -> None:
        """A text frame: a message to everyone (the global stream)."""
        await self._write(text)

    async def subscribe(self, channel: str, presence: bool = False) -> None:
        """Subscribe now, and on every later connection from the last offset seen."""
        subscription = self.channels.setdefault(channel, Subscription(Position(), presence))
        subscription.presence = presence
        await self._write(self._subscribe_command(channel, subscription))

    async def unsubscribe(self, channel: str) -> None:
        self.channels.pop(channel, None)
        await self._write(json.dumps({"type": "unsubscribe", "channel": channel}))

    async def publish(self, channel: str, text: str) -> None:
        await self._write(json.dumps({"type": "publish", "channel": channel, "text": text}))

    def __aiter__(self) -> Session:
        return self

    async def __anext__(self) -> Event:
        event = await self.next_event()
        if event is None:
            raise StopAsyncIteration
        return event

    async def next_event(self) -> Event | None:
        """The next new frame or note; None when the session is over (the deadline,
        a refused token, or without ``reconnect`` the connection closed)."""
        while True:
            if self._pending:
                return self._pending.popleft()
            if self.ended:
                return None
            try:
                conn, frame = await within(self.frames.get(), self._left())
            except asyncio.TimeoutError:
                self.ended = True
                return None
            if conn is None:
                self.ended = True
                return None
            if frame is None:
                self._closed(conn)
                continue
            if self.on_frame(conn, frame):
                self._pending.append(Event(parse_frame(frame), frame))

    def close(self) -> None:
        """Close the connection (and one a move is opening); idempotent."""
        self.ended = True
        if self.moving is not None:
            self.moving.cancel()
        for conn in [self.current, *self.opening]:
            if conn is not None:
                conn.close(1000)
        self.opening.clear()

    async def aclose(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """``close()``, then wait (at most ``timeout``) for every connection's close
        handshake to end."""
        self.close()
        if self._pumps:
            await asyncio.wait(set(self._pumps), timeout=timeout)

    # -- connections -------------------------------------------------------------------

    async def _write(self, text: str) -> None:
        if self.current is not None:
            await self.current.write_message(text)

    def _subscribe_command(self, channel: str, subscription: Subscription) -> str:
        command: dict[str, Any] = {"type": "subscribe", "channel": channel}
        position = subscription.position
        if position.epoch is not None:
            command.update(since=position.offset, epoch=position.epoch)
            position.asked = position.offset
        if subscription.presence:
            command["presence"] = True
        return json.dumps(command)

    def resume_url(self) -> str:
        """The URL with ``since`` and ``epoch`` once there is something to resume."""
        if self.position.epoch is None:
            return self.url
        parts = urlsplit(self.url)
        query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("since", "epoch")]
        query += [("since", str(self.position.offset)), ("epoch", self.position.epoch)]
        return urlunsplit(parts._replace(query=urlencode(query)))

    def _left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    async def _open(self) -> WebSocketClientConnection:
        """A new connection (retried with backoff when reconnecting)."""
        delays = backoff_delays(self.rng)
        while True:
            since = self.position.offset if self.position.epoch is not None else None
            try:
                conn = await within(
                    websocket_connect(handshake_request(self.resume_url(), self.token)),
                    min(CONNECT_TIMEOUT, self._left() or CONNECT_TIMEOUT))
            except Exception as exc:  # any failure to connect
                if isinstance(exc, HTTPClientError) and exc.code == 401:
                    raise Unauthorized(f"{self.url}: the token was refused (HTTP 401)") \
                        from None
                if not self.reconnect:
                    raise CannotConnect(f"cannot connect to {self.url}: {exc}") from None
                if not self.quiet:
                    print(f"ebbcast client: cannot connect to {self.url}: {exc}; retrying",
                          file=sys.stderr)
            else:
                self.opening[conn] = since
                pump = asyncio.ensure_future(self._pump(conn))
                self._pumps.add(pump)
                pump.add_done_callback(self._pumps.discard)
                return conn
            pause = next(delays)
            left = self._left()
            if left is not None and left <= pause:
                raise CannotConnect(f"cannot connect to {self.url} in time")
            await asyncio.sleep(pause)

    async def _pump(self, conn: WebSocketClientConnection) -> None:
        while True:
            frame = await conn.read_message()
            await self.frames.put((conn, frame))
            if frame is None:
                return

    def _move(self, delay: float) -> None:
        """Open a new connection after ``delay`` seconds (once at a time)."""
        if self.reconnect and not self.ended and (self.moving is None or self.moving.done()):
            self.moving = asyncio.ensure_future(self._moved(delay))

    async def _moved(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self._open()  # it becomes current when its welcome arrives
        except Unauthorized as exc:
            print(f"ebbcast client: {exc}", file=sys.stderr)
            self.refused = True
            self.frames.put_nowait((None, None))
        except CannotConnect:
            pass  # the deadline: the session ends with it

    def _closed(self, conn: WebSocketClientConnection) -> None:
        conn.close()  # closed by the server: let go of it here too
        self.opening.pop(conn, None)
        if conn is not self.current:
            return  # one this session closed after moving, or a move that failed
        self._pending.append(Event({"closed": conn.close_code, "reason": conn.close_reason}))
        if self.reconnect:
            self._move(self.rng.uniform(0.05, 0.1))
        else:
            self.ended = True

    # -- frames ------------------------------------------------------------------------

    def on_frame(self, conn: WebSocketClientConnection, frame: str | bytes) -> bool:
        """Act on a frame; whether it is new (a message seen already is not, nor is
        anything more from a connection this session has moved away from)."""
        if conn is not self.current and conn not in self.opening:
            return False
        parsed = _json_object(frame) if isinstance(frame, str) else None
        if not isinstance(parsed, dict):
            return True
        kind, channel = parsed.get("type"), parsed.get("channel")
        stream = self.position
        if isinstance(channel, str):
            subscription = self.channels.get(channel)
            if subscription is None:
                return kind != "message"  # from a channel left: not any more
            stream = subscription.position
        if kind == "welcome":
            self._welcomed(conn, parsed)
        elif kind == "subscribed":
            self._resumed(stream, parsed, channel)
        elif kind == "shutdown" and conn is self.current:
            self.url = follow_nodes(self.url, parsed, self.rng)
            self._move(max(0.0, float(parsed.get("reconnect_after_ms", 0))) / 1000)
        elif kind == "epoch":
            stream.epoch, stream.offset = str(parsed.get("epoch")), int(parsed.get("offset", 0))
        elif kind == "message":
            return stream.new(parsed.get("offset"))
        return True

    def _welcomed(self, conn: WebSocketClientConnection, welcome: dict[str, Any]) -> None:
        if conn is not self.current:  # a move is made: break
            old, self.current = self.current, conn
            if old is not None:
                old.close(1000)
            for channel, subscription in self.channels.items():
                asyncio.ensure_future(conn.write_message(
                    self._subscribe_command(channel, subscription)))
        since = self.opening.pop(conn, None)
        if "epoch" not in welcome:
            return
        self.position.asked = since
        self._resumed(self.position, welcome, None)

    def _resumed(self, stream: Position, answer: dict[str, Any], channel: str | None) -> None:
        """A welcome's or a subscription's answer: a note if a resume asked for was
        not recovered."""
        recovered = stream.asked is not None and answer.get("recovered") is True
        if stream.asked is not None and not recovered:
            note: dict[str, Any] = {"resume": "not_recovered", "since": stream.asked,
                                    "epoch": stream.epoch}
            if channel is not None:
                note["channel"] = channel
            self._pending.append(Event(note))
        stream.take(str(answer["epoch"]), int(answer.get("offset", 0)), recovered)
