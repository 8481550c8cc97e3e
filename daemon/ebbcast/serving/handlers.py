"""The public listener: the WebSocket endpoint, the test page and ``/ebbcast.js``.

A handshake is one fixed request, and a reconnect storm is thousands of them a
second, so the endpoint does not go through a RequestHandler: Tornado's HTTP/1
connection reads the request line and headers, :class:`PublicRouter` looks at the
path, ``ebbcast.serving.handshake`` decides, and an accepted upgrade takes the stream
(``HTTP1Connection.detach()``), writes the 101 in one piece and hands the stream to
the RFC 6455 protocol for a :class:`~ebbcast.serving.connection.Connection`. Everything
else (the page, the script, a 404, a POST to the endpoint) goes to a Tornado
``Application`` as usual.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Coroutine
from http import HTTPStatus
from importlib import resources
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.httputil import (
    HTTPConnection,
    HTTPHeaders,
    HTTPMessageDelegate,
    HTTPServerConnectionDelegate,
    RequestStartLine,
    ResponseStartLine,
)
from tornado.iostream import IOStream, StreamClosedError
from tornado.web import Application, RequestHandler

from ebbcast.backplane.history import Resume
from ebbcast.core.waits import within
from ebbcast.serving.auth import TokenVerifier
from ebbcast.serving.connection import Connection
from ebbcast.serving.context import DaemonContext
from ebbcast.serving.forwarded import TrustedProxies
from ebbcast.serving.handshake import (
    Acceptance,
    Refusal,
    Request,
    Terms,
    answer,
    read_upgrade,
    request,
)
from ebbcast.serving.wire import consume, detach_stream, peek, peer_address, start_protocol

log = logging.getLogger(__name__)

#: A connection made at its handshake for its channels, and their positions.
Subscribed = tuple[Connection, dict[str, tuple[str, int]]]

#: The placeholder in static/index.html that the page handler fills in.
WS_PATH_TOKEN = "__EBBCAST_WS_PATH__"
#: Longest a resuming client's handshake waits for this process to have delivered
#: the offset it has seen (another worker or instance was a little ahead).
CATCH_UP_SECONDS = 1.0
#: How much of a new connection's first bytes the fast path looks at: a handshake
#: is some 200 to 600 bytes; a longer one takes Tornado's way.
PEEK_BYTES = 4096


def load_page(ws_path: str) -> bytes:
    """The test page with its WebSocket path filled in."""
    html = resources.files("ebbcast").joinpath("static/index.html").read_text("utf-8")
    return html.replace(WS_PATH_TOKEN, json.dumps(ws_path)).encode()


def load_script() -> bytes:
    """``/ebbcast.js``: the client module the page uses, for any application."""
    return resources.files("ebbcast").joinpath("static/ebbcast.js").read_bytes()


class StaticHandler(RequestHandler):
    """``GET /`` (the HTML test client) and ``GET /ebbcast.js`` (the client module
    it uses; ``shared``: importable from any origin's page)."""

    def initialize(self, body: bytes, content_type: str, shared: bool = False) -> None:
        self.body = body
        self.content_type = content_type
        self.shared = shared

    def get(self) -> None:
        self.set_header("Content-Type", self.content_type)
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Content-Type-Options", "nosniff")
        if self.shared:
            self.set_header("Access-Control-Allow-Origin", "*")
        self.write(self.body)


class WebSocketOnly(RequestHandler):
    """The endpoint's path for any method but GET (which :class:`PublicRouter`
    answers itself): 405."""

    SUPPORTED_METHODS = ("GET",)


def public_application(ctx: DaemonContext, log_function: object) -> Application:
    ws_path = ctx.config.server.ws_path
    path = re.escape(ws_path)
    return Application([
        (r"/", StaticHandler, {"body": load_page(ws_path),
                               "content_type": "text/html; charset=utf-8"}),
        (r"/ebbcast\.js", StaticHandler, {"body": load_script(), "shared": True,
                                         "content_type": "text/javascript; charset=utf-8"}),
        (rf"{path}(?:/.*)?", WebSocketOnly),
    ], log_function=log_function)


class PublicRouter(HTTPServerConnectionDelegate):
    """What the public HTTPServer serves: WebSocket handshakes here, the rest by
    ``application``."""

    def __init__(self, ctx: DaemonContext, application: Application,
                 tokens: TokenVerifier | None = None) -> None:
        self.ctx = ctx
        self.application = application
        self.tokens = tokens
        self.proxies = TrustedProxies(ctx.config.server.trusted_proxies)
        #: Handshakes waiting to catch up (resumes), until answered: a stop lets
        #: them be answered (a drain refuses them at once) before the process ends.
        self.waiting: set[asyncio.Future[None]] = set()

    def start_request(self, server_conn: object,
                      request_conn: HTTPConnection) -> HTTPMessageDelegate:
        return _PublicRequest(self, server_conn, request_conn)

    def answer(self, request: Request) -> Acceptance | Refusal | None:
        """``ebbcast.serving.handshake.answer`` for this daemon, now; both readers ask it."""
        ctx = self.ctx
        limit = ctx.config.server.max_connections
        return answer(request, ctx.config.server.ws_path, Terms(
            accepting=ctx.lifecycle.accepting, full=bool(limit) and len(ctx.registry) >= limit,
            allowed_origins=ctx.config.server.allowed_origins, tokens=self.tokens,
            now=time.time(), max_channels=ctx.config.channels.max_per_connection,
            rights=ctx.channels.default_rights()))

    def wait_then(self, answering: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        """Run a waiting handshake's answer, listed in ``waiting`` until it ends."""
        task = asyncio.ensure_future(answering)
        self.waiting.add(task)
        task.add_done_callback(self.waiting.discard)
        return task

    async def all_answered(self, timeout: float) -> None:
        """Until every waiting handshake is answered, for at most ``timeout``."""
        if self.waiting:
            await asyncio.wait(set(self.waiting), timeout=timeout)

    def accept(self, stream: IOStream, answer: Acceptance, remote: str,
               subscribed: Subscribed | None = None) -> None:
        """Write the 101 (with the welcome) and start reading frames; ``remote`` is
        the client's address (as a trusted proxy forwarded it); ``subscribed``: the
        connection, made for its channels, and their positions."""
        ctx = self.ctx
        if subscribed is None:
            connection, positions = Connection(ctx, answer.client_id, answer.grant), None
        else:
            connection, positions = subscribed
        # logged before the welcome leaves: whatever the client does next comes after
        log.debug("client %s connected from %s", connection.client_id, remote)
        protocol = start_protocol(connection, stream, ctx.config.server.max_message_bytes)
        connection.open(protocol, answer.resume, answer.response, positions)

    def upgrade_at_once(self, stream: IOStream, address: str) -> bool:
        """The fast path: a handshake already complete in the socket's receive
        queue, that will be accepted, is read and answered here and now, with no
        HTTP/1 connection object. False (nothing read) for anything else, which
        then takes the usual way through Tornado and :class:`_PublicRequest`."""
        try:
            data = peek(stream, PEEK_BYTES)
        except OSError:
            return False  # nothing yet, or an error Tornado's reader will meet too
        upgrade = read_upgrade(data)
        if upgrade is None:
            return False
        decided = self.answer(upgrade.request)
        if not isinstance(decided, Acceptance) or decided.channels or (
                decided.resume is not None
                and not self.ctx.broadcasts.is_caught_up(decided.resume)):
            return False  # refusals are HTTP answers; a resume may wait to catch up, and
            # channels wait for their positions
        try:
            consume(stream, upgrade.length)  # exactly the request: it is all there
        except OSError:
            return False
        self.accept(stream, decided,
                    self.proxies.client_address(address, upgrade.request.headers))
        return True


class PublicServer(HTTPServer):
    """The public listener's HTTPServer, with :meth:`PublicRouter.upgrade_at_once`
    tried on every new plain-TCP connection before Tornado's HTTP/1 reader."""

    def initialize(self, router: PublicRouter,  # type: ignore[override]
                   **kwargs: Any) -> None:
        self.router = router
        super().initialize(router, **kwargs)

    def handle_stream(self, stream: IOStream, address: tuple[str, int]) -> None:
        if type(stream) is IOStream and self.router.upgrade_at_once(stream, address[0]):
            return
        super().handle_stream(stream, address)


class _PublicRequest(HTTPMessageDelegate):
    """One request on the public listener."""

    def __init__(self, router: PublicRouter, server_conn: object,
                 request_conn: HTTPConnection) -> None:
        self.router = router
        self.server_conn = server_conn
        self.request_conn = request_conn
        self.passed_on: HTTPMessageDelegate | None = None
        self.headers: HTTPHeaders | None = None

    def headers_received(self, start_line: RequestStartLine | ResponseStartLine,
                         headers: HTTPHeaders) -> Awaitable[None] | None:
        assert isinstance(start_line, RequestStartLine)
        self.headers = headers
        read = request(start_line.method, start_line.path, start_line.version,
                       headers.get_all())
        decided = self.router.answer(read)
        if decided is None:
            self.passed_on = self.router.application.start_request(self.server_conn,
                                                                   self.request_conn)
            return self.passed_on.headers_received(start_line, headers)
        if isinstance(decided, Refusal):
            self._refuse(decided)
            return None
        if decided.resume is not None or decided.channels:
            return self.router.wait_then(self._accept_caught_up(decided.resume, read))
        self._accept(decided)
        return None

    async def _accept_caught_up(self, resume: Resume | None, read: Request) -> None:
        """Wait for this process to catch up with a resuming client, then decide
        again: the connection is admitted now, so the connection limit and a drain
        that began meanwhile hold for it too. Then its channels, if any."""
        if resume is not None:
            await self.router.ctx.broadcasts.caught_up(resume, CATCH_UP_SECONDS)
        decided = self.router.answer(read)
        assert decided is not None  # the same request: a handshake still
        if isinstance(decided, Refusal):
            self._refuse(decided)
        elif decided.channels:
            await self._accept_subscribed(decided, read)
        else:
            self._accept(decided)

    async def _accept_subscribed(self, decided: Acceptance, read: Request) -> None:
        """Subscribe the connection to its channels (``?channels=``), wait for
        their positions, decide once more, and accept it with them."""
        hub = self.router.ctx.channels
        connection = Connection(self.router.ctx, decided.client_id, decided.grant)
        opening = hub.subscribe_opening(connection, decided.channels)
        if isinstance(opening, tuple):
            refused, channel = opening
            self._refuse(Refusal(403 if refused.error == "forbidden" else 400,
                                 f"{refused.error}: {channel}\n"))
            return
        try:
            await within(opening.done, CATCH_UP_SECONDS)
        except asyncio.TimeoutError:
            hub.closed(connection)
            self._refuse(Refusal(503, "channels unavailable: try again\n",
                                 headers=(("Retry-After", "1"),)))
            return
        again = self.router.answer(read)
        if not isinstance(again, Acceptance):
            hub.closed(connection)
            assert again is not None
            self._refuse(again)
            return
        self._accept(decided, (connection, opening.positions))

    def _accept(self, answer: Acceptance, subscribed: Subscribed | None = None) -> None:
        stream = detach_stream(self.request_conn)
        self.router.accept(stream, answer, self._remote_ip(), subscribed)

    def _refuse(self, refusal: Refusal) -> None:
        ctx = self.router.ctx
        if refusal.counted_as is not None:
            ctx.metrics.rejected.labels(refusal.counted_as).inc()
        log.debug("refused WebSocket handshake from %s: %d %s", self._remote_ip(),
                  refusal.status, refusal.counted_as or refusal.text.strip())
        body = refusal.text.encode()
        headers = HTTPHeaders({"Content-Type": "text/plain; charset=utf-8",
                               "Content-Length": str(len(body))})
        for name, value in refusal.headers:
            headers.add(name, value)
        reason = HTTPStatus(refusal.status).phrase
        try:
            self.request_conn.write_headers(
                ResponseStartLine("HTTP/1.1", refusal.status, reason), headers, body)
            self.request_conn.finish()
        except StreamClosedError:
            pass

    def _remote_ip(self) -> str:
        """The client's address, as a trusted proxy forwarded it, else the peer's."""
        peer = peer_address(self.request_conn)
        return self.router.proxies.client_address(peer, self.headers or {})

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if self.passed_on is not None:
            return self.passed_on.data_received(chunk)
        return None

    def finish(self) -> None:
        if self.passed_on is not None:
            self.passed_on.finish()

    def on_connection_close(self) -> None:
        if self.passed_on is not None:
            self.passed_on.on_connection_close()
