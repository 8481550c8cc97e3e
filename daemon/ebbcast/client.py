"""``ebbcast client``: connect, send, print every received frame as one JSON line.

With ``--reconnect`` the session outlives its connections: a shutdown frame (a
drain, or an upgrade handing over to a new generation) makes it *move*: after the
frame's reconnect_after_ms it opens a new connection and closes the old one only
once the new one is welcomed (make before break), to one of the frame's ``nodes``
when a draining instance names others (keeping the URL's path and query, e.g. a
client id); a connection that drops is
replaced with jittered exponential backoff (0.1 s doubling up to 10 s). Every
welcome is printed, so the output shows each move.

It resumes, too: each new connection asks for the broadcasts after the last
offset it printed (``?since=N&epoch=E``), and a broadcast is printed once, even
when the old and the new connection of a move both deliver it. When the daemon
cannot replay what was missed (``"recovered": false``), a line
``{"resume":"not_recovered","since":N,"epoch":"E"}`` says so.

``--token`` (or ``$EBBCAST_TOKEN``) sends a client token as ``Authorization:
Bearer``; a handshake refused with 401 ends the session (exit 1), since trying
again with the same token cannot help.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import sys
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from ebbcast.backplane.base import backoff_delays
from ebbcast.config import parse_duration
from ebbcast.core.waits import within
from ebbcast.exits import ExitCode

CONNECT_TIMEOUT = 10.0


def frame_as_json_line(frame: str | bytes) -> str:
    """A received frame as one JSON line.

    A text frame holding a JSON object is printed as that object (compact); other
    text as ``{"text": …}``; binary frames as ``{"binary_base64": …}``.
    """
    if isinstance(frame, bytes):
        return json.dumps({"binary_base64": base64.b64encode(frame).decode()})
    try:
        parsed = json.loads(frame)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        return json.dumps(parsed, separators=(",", ":"), ensure_ascii=False)
    return json.dumps({"text": frame}, ensure_ascii=False)


def handshake_request(url: str, token: str | None) -> HTTPRequest:
    """The handshake for ``url``, with the client token, if any, as a bearer token."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return HTTPRequest(url, headers=headers)


def unauthorized(exc: BaseException) -> bool:
    """Whether a failed connect was the server refusing the token (HTTP 401)."""
    return isinstance(exc, HTTPClientError) and exc.code == 401


async def _session(url: str, token: str | None, sends: list[str], listen: float | None,
                   count: int | None, quiet: bool) -> int:
    try:
        conn: WebSocketClientConnection = await within(
            websocket_connect(handshake_request(url, token)), CONNECT_TIMEOUT)
    except Exception as exc:  # any failure to connect is reported the same way
        print(f"ebbcast client: cannot connect to {url}: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    for text in sends:
        await conn.write_message(text)
    deadline = None if listen is None else time.monotonic() + listen
    received = 0
    while count is None or received < count:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            frame = await within(conn.read_message(), timeout)
        except asyncio.TimeoutError:
            break
        if frame is None:
            code = conn.close_code
            if not quiet:
                print(json.dumps({"closed": code, "reason": conn.close_reason}), flush=True)
            return ExitCode.OK
        received += 1
        if not quiet:
            print(frame_as_json_line(frame), flush=True)
    conn.close(1000)
    return ExitCode.OK


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


class ReconnectingSession:
    """One logical session over successive connections (``--reconnect``)."""

    def __init__(self, url: str, quiet: bool, deadline: float | None,
                 token: str | None = None) -> None:
        self.url = url
        self.token = token
        self.quiet = quiet
        self.deadline = deadline
        self.rng = random.Random()
        self.current: WebSocketClientConnection | None = None
        self.moving: asyncio.Task[None] | None = None
        #: What the connections read (None: the connection ended); a None connection:
        #: the token was refused, the session is over.
        self.frames: asyncio.Queue[
            tuple[WebSocketClientConnection | None, str | bytes | None]] = asyncio.Queue()
        self.epoch: str | None = None  # of the last offset printed
        self.offset = 0
        #: Connections opened and not welcomed yet, with the offset each resumes from.
        self.opening: dict[WebSocketClientConnection, int | None] = {}

    def resume_url(self) -> str:
        """The URL with ``since`` and ``epoch`` once there is something to resume."""
        if self.epoch is None:
            return self.url
        parts = urlsplit(self.url)
        query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("since", "epoch")]
        query += [("since", str(self.offset)), ("epoch", self.epoch)]
        return urlunsplit(parts._replace(query=urlencode(query)))

    def _left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    async def connect(self) -> WebSocketClientConnection | None:
        """A new connection, retried with backoff; None once the deadline passes."""
        delays = backoff_delays(self.rng)
        while True:
            left = self._left()
            since = self.offset
            try:
                conn = await within(
                    websocket_connect(handshake_request(self.resume_url(), self.token)),
                    min(CONNECT_TIMEOUT, left or CONNECT_TIMEOUT))
            except Exception as exc:  # any failure to connect: try again
                if unauthorized(exc):
                    print(f"ebbcast client: {self.url}: the token was refused (HTTP 401)",
                          file=sys.stderr)
                    self.frames.put_nowait((None, None))
                    return None
                if not self.quiet:
                    print(f"ebbcast client: cannot connect to {self.url}: {exc}; retrying",
                          file=sys.stderr)
            else:
                self.opening[conn] = since if self.epoch is not None else None
                asyncio.ensure_future(self._pump(conn))
                return conn
            pause = next(delays)
            left = self._left()
            if left is not None and left <= pause:
                return None
            await asyncio.sleep(pause)

    async def _pump(self, conn: WebSocketClientConnection) -> None:
        while True:
            frame = await conn.read_message()
            await self.frames.put((conn, frame))
            if frame is None:
                return

    def move(self, delay: float) -> None:
        """Open a new connection after ``delay`` seconds (once at a time)."""
        if self.moving is None or self.moving.done():
            self.moving = asyncio.ensure_future(self._move(delay))

    async def _move(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self.connect()  # it becomes current when its welcome arrives

    def on_frame(self, conn: WebSocketClientConnection, frame: str | bytes) -> bool:
        """Act on a frame; whether it is new (a broadcast seen already is not, nor is
        anything more from a connection this session has moved away from)."""
        if conn is not self.current and conn not in self.opening:
            return False
        try:
            parsed: Any = json.loads(frame) if isinstance(frame, str) else None
        except ValueError:
            parsed = None
        kind = parsed.get("type") if isinstance(parsed, dict) else None
        if kind == "welcome":
            self._welcomed(conn, parsed)
        elif kind == "shutdown" and conn is self.current:
            self.url = follow_nodes(self.url, parsed, self.rng)
            self.move(max(0.0, float(parsed.get("reconnect_after_ms", 0))) / 1000)
        elif kind == "epoch":
            self.epoch, self.offset = str(parsed.get("epoch")), int(parsed.get("offset", 0))
        elif kind == "message" and isinstance(parsed.get("offset"), int):
            if parsed["offset"] <= self.offset:
                return False  # printed already, from the connection before a move
            self.offset = parsed["offset"]
        return True

    def _welcomed(self, conn: WebSocketClientConnection, welcome: dict[str, Any]) -> None:
        if conn is not self.current:  # a move is made: break
            old, self.current = self.current, conn
            if old is not None:
                old.close(1000)
        since = self.opening.pop(conn, None)
        if "epoch" not in welcome:
            return
        recovered = since is not None and welcome.get("recovered") is True
        if since is not None and not recovered and not self.quiet:
            print(json.dumps({"resume": "not_recovered", "since": since,
                              "epoch": self.epoch}), flush=True)
        if not recovered:  # in the same epoch, never go back (the server may lag)
            same = welcome["epoch"] == self.epoch
            offset = int(welcome.get("offset", 0))
            self.epoch, self.offset = str(welcome["epoch"]), \
                max(self.offset, offset) if same else offset

    def on_closed(self, conn: WebSocketClientConnection) -> None:
        self.opening.pop(conn, None)
        if conn is not self.current:
            return  # one this session closed after moving, or a move that failed
        if not self.quiet:
            print(json.dumps({"closed": conn.close_code, "reason": conn.close_reason}),
                  flush=True)
        self.move(self.rng.uniform(0.05, 0.1))

    def close(self) -> None:
        if self.moving is not None:
            self.moving.cancel()
        if self.current is not None:
            self.current.close(1000)


async def _reconnecting(url: str, token: str | None, sends: list[str], listen: float | None,
                        count: int | None, quiet: bool) -> int:
    session = ReconnectingSession(url, quiet,
                                  None if listen is None else time.monotonic() + listen, token)
    session.current = await session.connect()
    if session.current is None:
        return ExitCode.FAILURE
    for text in sends:
        await session.current.write_message(text)
    received = 0
    while count is None or received < count:
        try:
            conn, frame = await within(session.frames.get(), session._left())
        except asyncio.TimeoutError:
            break
        if conn is None:
            session.close()
            return ExitCode.FAILURE
        if frame is None:
            session.on_closed(conn)
            continue
        if not session.on_frame(conn, frame):
            continue
        received += 1
        if not quiet:
            print(frame_as_json_line(frame), flush=True)
    session.close()
    return ExitCode.OK


def run_client(args: argparse.Namespace) -> int:
    try:
        listen = None if args.listen is None else parse_duration(args.listen)
    except ValueError as exc:
        print(f"ebbcast client: --listen: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        run = _reconnecting if args.reconnect else _session
        token = args.token or os.environ.get("EBBCAST_TOKEN") or None
        return asyncio.run(run(args.url, token, args.send, listen, args.count, args.quiet))
    except KeyboardInterrupt:
        return ExitCode.OK
