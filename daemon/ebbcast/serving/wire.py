"""Where ebbcast goes under Tornado's public WebSocket API, kept in one place.

Why: a broadcast copies one message to many connections. Tornado's
``write_message`` frames (and possibly compresses) the message again for every
connection and wraps every write in an asyncio Task. ebbcast never negotiates
permessage-deflate, so a server frame (RFC 6455 section 5.2: unmasked) is the same
bytes for every client: it is built once by :func:`encode_frame` and written
straight to each connection's IOStream by :func:`write_frame`.

Every use of Tornado beyond its documented API is here, hence the pinned Tornado
range in setup.py:

- ``WebSocketProtocol13``: subclassed (:class:`EbbcastProtocol`), overriding the
  private ``_abort``, ``_read_bytes`` (adding to its ``_wire_bytes_in``),
  ``_receive_frame`` and ``_handle_message``; setting
  ``client_terminated`` (to fail a connection), clearing and reading ``_frame_mask``
  (set only when a frame carries a mask key), calling ``handler``'s
  ``on_ws_connection_close`` (for a reader that failed), and reading
  ``server_terminated``, ``close_reason``,
  ``close_code``, ``stream`` and ``is_closing()``; built with the private
  ``_WebSocketParams`` and started on a detached stream by running its private
  ``_receive_frame_loop()`` (:func:`start_protocol`), which is what Tornado's
  ``WebSocketHandler`` does after its RequestHandler has written the 101.
- ``IOStream``: the private ``_write_buffer`` (send directly only when nothing is
  queued), the private ``_read_buffer_size`` (bytes read but not yet handled:
  :func:`input_unread`), and, to take a frame's bytes already read
  (``EbbcastProtocol._read_bytes``), ``_read_future``, ``_user_read_buffer`` and
  ``_consume()``; ``socket``, ``write``, ``closed()`` and, in
  :func:`forget_stream_error`, the ``error`` attribute.
- ``HTTPServer._connections``, the HTTP connections not yet upgraded or closed
  (:func:`open_http_connections`), so that a generation handing over does not exit
  under a handshake it has accepted.
- ``HTTP1Connection.detach()`` (:func:`detach_stream`: the stream of a request
  answered as a handshake) and its ``context``, the private ``_HTTPRequestContext``
  whose ``remote_ip`` is the peer (:func:`peer_address`).
- The socket under an ``IOStream`` Tornado has not read from yet, peeked at and read
  directly (:func:`peek`, :func:`consume`): the handshake's fast path.

``INTERNALS`` lists every one of these, and :func:`check_tornado` checks each on the
installed Tornado at start-up, so that a Tornado that changed them stops ebbcast with a message naming
what changed, instead of serving broken.

The protocol subclass also closes conformance gaps in how Tornado reads a client's
close frame: it echoes whatever close code a client sends, where RFC 6455 section
7.4 requires a server to fail the connection with 1002 when the code is not one a
peer may send; it echoes an empty close for a one-byte payload (a protocol error:
1002); and a reason that is not UTF-8 (8.1: fail with 1007) raised out of its reader
and left the connection open and silent. :func:`close_frame_problem` decides all
three, and :func:`start_protocol` closes the connection of any reader that fails.
And it fails a client frame that comes unmasked (section 5.1: 1002), which Tornado
reads as if it were masked.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import select
import socket
import struct
from dataclasses import dataclass
from functools import partial
from typing import Any

import tornado
from tornado import websocket
from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPConnection
from tornado.iostream import IOStream, StreamClosedError
from tornado.websocket import WebSocketProtocol13

log = logging.getLogger(__name__)

OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2
OPCODE_CLOSE = 0x8
_FIN = 0x80

#: Kernel send buffer asked for per client socket. Linux doubles it; kept modest so
#: that what waits for a slow client is mostly in the daemon, where
#: limits.client_queue_bytes bounds it, rather than hidden in the kernel.
CLIENT_SNDBUF_BYTES = 32 * 1024


def encode_frame(payload: bytes, binary: bool = False) -> bytes:
    """One unfragmented, unmasked server-to-client data frame (RFC 6455 section 5.2)."""
    head = _FIN | (OPCODE_BINARY if binary else OPCODE_TEXT)
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", head, length)
    elif length <= 0xFFFF:
        header = struct.pack("!BBH", head, 126, length)
    else:
        header = struct.pack("!BBQ", head, 127, length)
    return header + payload


def valid_close_code(code: int) -> bool:
    """Whether a peer may send ``code`` in a close frame (RFC 6455 section 7.4)."""
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


def close_frame_problem(payload: bytes) -> tuple[int, str] | None:
    """What is wrong with a client's close frame payload (RFC 6455 5.5.1, 7.4, 8.1),
    as the close code and reason to fail the connection with; None if it is valid."""
    if len(payload) == 1:
        return 1002, "close frame payload of one byte"
    if len(payload) >= 2:
        (code,) = struct.unpack("!H", payload[:2])
        if not valid_close_code(code):
            return 1002, "invalid close code"
        try:
            payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            return 1007, "close reason is not UTF-8"
    return None


class SlowConsumer(Exception):
    """The client's unsent backlog would exceed limits.client_queue_bytes."""


class EbbcastProtocol(WebSocketProtocol13):
    """Tornado's RFC 6455 protocol, with close codes validated and recorded.

    ``server_close_code`` remembers what this side sent first, so the handler can
    tell an oversized frame (closed inside Tornado with 1009) from a client's own
    close.
    """

    server_close_code: int | None = None

    def _abort(self) -> None:
        """Before Tornado fails the connection (a protocol error from the client),
        the handler's ``flush_before_abort()`` has the fan-out write what this client
        is already owed, so that a valid frame's echo is not lost to a bad frame
        that follows it in one read.

        The hook is looked up on the handler, not stored here: one more attribute
        set on every protocol instance costs about 1.4 KB per idle connection (the
        instance dict stops sharing its keys with the class's other instances).
        """
        self._flush_what_is_owed()
        super()._abort()

    def _flush_what_is_owed(self) -> None:
        hook = getattr(self.handler, "flush_before_abort", None)
        if hook is not None and not self.server_terminated and self.stream is not None \
                and not self.stream.closed():
            hook()

    async def _read_bytes(self, n: int) -> bytes:
        """Tornado's read of ``n`` bytes of a frame, taken straight from the stream's
        buffer when they are all there (a client that sent several frames at once: a
        publisher keeping messages in flight). Tornado's own read makes a Future and
        goes through its read machinery for each of a frame's three or four reads,
        about a tenth of the CPU of a channel publish; this one, with the bytes at
        hand, costs a slice. Anything else (bytes still to come, a read pending, a
        buffer of the caller's) takes Tornado's path."""
        stream = self.stream
        if n and stream._read_buffer_size >= n and stream._read_future is None \
                and not stream._user_read_buffer:
            data: bytes = stream._consume(n)
            self._wire_bytes_in += n  # Tornado's count: its frame loop yields by it
            return data
        return await super()._read_bytes(n)

    async def _receive_frame(self) -> None:
        """Tornado reads a frame; a client frame that came unmasked (a fragment that
        does not end a message: :meth:`_handle_message` sees the others) fails the
        connection, as RFC 6455 section 5.1 requires. Tornado reads a frame's mask
        key into ``_frame_mask`` only when the frame has one: it is cleared first."""
        self._frame_mask = None
        await super()._receive_frame()
        if self._frame_mask is None and not self.client_terminated:
            self._fail(1002, "unmasked frame")

    def _handle_message(self, opcode: int, data: bytes) -> Any:
        """A frame that ends a message, or a control frame. Unmasked: the connection
        fails before anything is relayed. A client's close frame that Tornado would
        echo (a bad code, one byte) or raise on (a reason that is not UTF-8) fails the
        connection instead: our close frame with the code that says why, then the
        TCP connection closes."""
        if self.client_terminated:
            return super()._handle_message(opcode, data)
        if self._frame_mask is None:
            self._fail(1002, "unmasked frame")
            return None
        if opcode == OPCODE_CLOSE:
            problem = close_frame_problem(data)
            if problem is not None:
                self._fail(*problem)
                return None
        return super()._handle_message(opcode, data)

    def _fail(self, code: int, reason: str) -> None:
        """What the client is owed (as :meth:`_abort` does), our close frame with
        ``code``, then the TCP connection closes at once."""
        self._flush_what_is_owed()
        self.client_terminated = True  # so close() also closes the stream
        self.close(code, reason)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if not self.server_terminated and self.server_close_code is None:
            self.server_close_code = code
        super().close(code, reason)


def configure_stream(protocol: Any) -> None:
    """Send at once (TCP_NODELAY) and keep the kernel's share of what waits for
    this client modest (SO_SNDBUF).

    The fan-out already gathers everything a client is owed into one write per
    loop pass, so Nagle's algorithm could only hold a small frame back until the
    client's delayed ACK (some 40 ms on Linux) and add nothing. The daemon's share
    of the backlog is bounded by :func:`write_frame`, not by the stream's
    max_write_buffer_size, so that Tornado's own small writes (pongs, the close
    frame) never fail and one large frame is not mistaken for a slow client.
    """
    sock = protocol.stream.socket
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_SNDBUF_BYTES)
    except OSError as exc:  # not fatal: a socket being reset, or not TCP
        log.debug("could not set TCP_NODELAY or SO_SNDBUF: %s", exc)


def write_frame(protocol: Any, frame: bytes, queue_limit: int) -> bool:
    """Write encoded frames to the connection; False if it is closing or closed.

    When nothing is waiting in the stream's buffer, the bytes go straight to the
    kernel with one send(); only what the kernel does not take goes through
    ``IOStream.write`` (which buffers it and waits for the socket to drain). This
    skips the Future and bookkeeping IOStream.write makes per call, which is most of
    the Python cost of a fan-out. TLS streams always take the IOStream path. A send
    that fails (the client is gone) closes the stream here: IOStream.write would
    fail again and keep the error, whose traceback holds the stream and the write's
    Future in a cycle, freed only by a full garbage collection.

    Raises SlowConsumer when bytes are already waiting for this client and the new
    ones would take the backlog over ``queue_limit`` (limits.client_queue_bytes). A
    client with nothing waiting always takes the write, however large: large
    frames are buffered by reference, so a broadcast bigger than the limit costs
    no copy per client and does not cut everyone off.
    """
    if protocol is None or protocol.is_closing():
        return False
    stream = protocol.stream
    data: bytes | memoryview = frame
    backlog = len(stream._write_buffer)
    if backlog and backlog + len(frame) > queue_limit:
        raise SlowConsumer()
    if not backlog and type(stream) is IOStream:
        try:
            sent = stream.socket.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:  # a broken connection (the client is gone): closed here
            stream.close()
            return False
        if sent == len(frame):
            return True
        data = memoryview(frame)[sent:]
    try:
        stream.write(data)
    except StreamClosedError:
        return False
    return True


def input_unread(protocol: Any) -> bool:
    """Whether bytes from the client wait that this process has not handled yet: in
    the stream's read buffer, or still in the kernel's receive queue (an end of
    stream counts: it is the client's too). A loop that is behind (a saturated
    machine) has not read them; the client is not silent."""
    if protocol is None or protocol.stream is None or protocol.stream.closed():
        return False
    stream = protocol.stream
    if stream._read_buffer_size:
        return True
    poller = select.poll()  # not select(): descriptors go far beyond FD_SETSIZE here
    poller.register(stream.socket.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def open_http_connections(server: HTTPServer) -> int:
    """HTTP connections of ``server`` still open and not upgraded to WebSocket: a
    page load, a keep-alive connection, or a handshake not yet complete."""
    return len(server._connections)


def start_protocol(delegate: Any, stream: IOStream, max_message_size: int) -> EbbcastProtocol:
    """The RFC 6455 protocol over a stream whose 101 is being written, reading
    frames for ``delegate`` (``on_message``, ``on_pong``, ``on_ws_connection_close``
    ...) until the connection ends. Tornado's own handshake does the same after its
    RequestHandler has answered; ``ebbcast.serving.handlers`` answers without one."""
    protocol = EbbcastProtocol(delegate, False, websocket._WebSocketParams(
        max_message_size=max_message_size))
    protocol.stream = stream
    reader = asyncio.ensure_future(protocol._receive_frame_loop())
    reader.add_done_callback(partial(_reader_stopped, protocol))
    return protocol


def _reader_stopped(protocol: EbbcastProtocol, reader: asyncio.Future[None]) -> None:
    """A reader that raised is a bug: logged, its connection closed and its delegate
    told, so that no client is left connected to a socket nobody reads. (Tornado 6.6
    tells the delegate on the way out of a failed reader, 6.5 does not: the delegate's
    ``on_ws_connection_close`` must take being told twice.)"""
    if not reader.cancelled() and reader.exception() is not None:
        log.error("a WebSocket reader failed: closing its connection",
                  exc_info=reader.exception())
        if protocol.stream is not None:
            protocol.stream.close()
        protocol.handler.on_ws_connection_close(protocol.close_code, protocol.close_reason)


def forget_stream_error(protocol: Any) -> None:
    """A stream closed by a socket error keeps the exception, whose traceback's
    frames point back at the stream: forget it, so reference counting can free
    the connection without the cyclic GC."""
    if protocol is not None and protocol.stream is not None:
        protocol.stream.error = None


def abort(protocol: EbbcastProtocol) -> None:
    """Drop a connection now, with no close handshake (the private ``_abort()``)."""
    protocol._abort()


def detach_stream(request_conn: HTTPConnection) -> IOStream:
    """The stream under the HTTP/1 connection of a request answered as a handshake
    (``HTTP1Connection.detach()``, which the ``HTTPConnection`` interface lacks)."""
    stream: IOStream = request_conn.detach()  # type: ignore[attr-defined]
    return stream


def peer_address(request_conn: HTTPConnection) -> str:
    """The address a request came from (the private ``_HTTPRequestContext``'s
    ``remote_ip``, under ``HTTP1Connection.context``), "?" when there is none."""
    context = getattr(request_conn, "context", None)
    return str(getattr(context, "remote_ip", "?"))


def peek(stream: IOStream, size: int) -> bytes:
    """Up to ``size`` bytes waiting in the socket of a stream Tornado has not read
    from yet (its ``socket``), left there; OSError when there are none."""
    return stream.socket.recv(size, socket.MSG_PEEK)


def consume(stream: IOStream, size: int) -> None:
    """Take ``size`` bytes that ``peek`` saw from the stream's socket."""
    stream.socket.recv(size)


#: Tornado minor versions this code was written and tested against (setup.py pins them).
TESTED_TORNADO = ("6.5", "6.6")


@dataclass(frozen=True)
class Internal:
    """One thing of Tornado's that ebbcast uses beyond its documented API.

    ``kind``: ``method`` (callable on the class), ``attribute`` (set on every
    instance), ``sized`` (an instance attribute with ``len()``, empty when new),
    ``callable`` (a module-level name, called with ``max_message_size=1``).
    """

    owner: str  # "tornado.websocket.WebSocketProtocol13", or a module for ``callable``
    name: str
    kind: str

    @property
    def label(self) -> str:
        """How the start-up check names it."""
        short = self.owner.rsplit(".", 1)[1]
        if self.kind == "callable":
            return f"{self.owner}.{self.name}(max_message_size=...)"
        if self.kind == "method":
            return f"{short}.{self.name}()"
        if self.kind == "sized":
            return f"{short}.{self.name} (with len())"
        return f"{short}.{self.name}"


_PROTOCOL, _STREAM = "tornado.websocket.WebSocketProtocol13", "tornado.iostream.IOStream"
_HTTP1 = "tornado.http1connection.HTTP1Connection"
#: Every Tornado internal ebbcast uses; ``check_tornado()`` checks each one.
INTERNALS = (
    Internal("tornado.websocket", "_WebSocketParams", "callable"),
    *(Internal(_PROTOCOL, name, "attribute") for name in (
        "stream", "handler", "server_terminated", "client_terminated", "close_code",
        "close_reason", "params", "_frame_mask", "_wire_bytes_in")),
    *(Internal(_PROTOCOL, name, "method") for name in (
        "_abort", "_handle_message", "_receive_frame", "close", "is_closing",
        "_receive_frame_loop", "_read_bytes")),
    Internal(_STREAM, "_write_buffer", "sized"),
    *(Internal(_STREAM, name, "attribute") for name in ("error", "socket",
                                                        "max_write_buffer_size",
                                                        "_read_buffer_size",
                                                        "_read_future",
                                                        "_user_read_buffer")),
    *(Internal(_STREAM, name, "method") for name in ("write", "closed", "_consume")),
    Internal("tornado.httpserver.HTTPServer", "_connections", "sized"),
    Internal(_HTTP1, "detach", "method"),
    Internal(_HTTP1, "context", "attribute"),
    Internal("tornado.httpserver._HTTPRequestContext", "remote_ip", "attribute"),
)


def check_tornado() -> list[str]:
    """What ebbcast relies on beyond Tornado's documented API (``INTERNALS``) and
    cannot find in the installed Tornado: one line each, empty when all is there."""
    mine, theirs = socket.socketpair()
    try:
        probes = _Probes(mine)
        problems = [problem for internal in INTERNALS
                    if (problem := _problem(internal, probes)) is not None]
        probes.close()
        return problems
    finally:
        mine.close()
        theirs.close()


def _problem(internal: Internal, probes: _Probes) -> str | None:
    try:
        owner: Any = importlib.import_module(internal.owner) if internal.kind == "callable" \
            else _class(internal.owner)
        if internal.kind == "callable":
            found = getattr(owner, internal.name)(max_message_size=1) is not None
        elif internal.kind == "method":  # and not the abstract stub of a base class
            method = getattr(owner, internal.name, None)
            found = callable(method) and not getattr(method, "__isabstractmethod__", False)
        else:
            instance = probes.instance(internal.owner)
            found = hasattr(instance, internal.name) if internal.kind == "attribute" \
                else len(getattr(instance, internal.name)) == 0
    except Exception as exc:  # whatever the change, name it
        return f"{internal.label} ({type(exc).__name__}: {exc})"
    return None if found else internal.label


def _class(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


class _Probes:
    """One instance of each Tornado class whose instance attributes are checked,
    made on a socket that carries nothing."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._made: dict[str, Any] = {}

    def instance(self, owner: str) -> Any:
        if owner not in self._made:
            self._made[owner] = self._make(owner)
        return self._made[owner]

    def _make(self, owner: str) -> Any:
        from tornado.http1connection import HTTP1Connection
        from tornado.httpserver import _HTTPRequestContext
        if owner == _PROTOCOL:
            return WebSocketProtocol13(_FakeHandler(), False,  # type: ignore[arg-type]
                                       websocket._WebSocketParams())
        if owner == _STREAM:
            return IOStream(self._sock.dup())
        if owner == "tornado.httpserver.HTTPServer":
            return HTTPServer(lambda request: None)
        context = _HTTPRequestContext(self.instance(_STREAM), ("127.0.0.1", 1), None)
        if owner == "tornado.httpserver._HTTPRequestContext":
            return context
        return HTTP1Connection(self.instance(_STREAM), False, None, context)

    def close(self) -> None:
        stream = self._made.get(_STREAM)
        try:
            if stream is not None:
                stream.close()
        except Exception:  # a changed IOStream: its problems are named already
            pass


class _FakeHandler:
    """Stands in for a handler where a Tornado object only stores it."""

    def set_close_callback(self, callback: Any) -> None:
        pass


def tornado_problem_report(problems: list[str]) -> str:
    """The message ebbcast stops with when ``check_tornado()`` found problems."""
    return (f"Tornado {tornado.version} lacks what ebbcast relies on: {'; '.join(problems)}. "
            f"ebbcast is tested with Tornado {' and '.join(TESTED_TORNADO)}; install one of "
            "those (setup.py pins them)")
