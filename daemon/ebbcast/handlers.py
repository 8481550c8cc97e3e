"""Public listener: the test page at ``/`` and the WebSocket endpoint."""

from __future__ import annotations

import json
import logging
import secrets
import time
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from tornado.web import RequestHandler
from tornado.websocket import WebSocketHandler, WebSocketProtocol

from ebbcast import frames
from ebbcast.context import DaemonContext
from ebbcast.history import Resume
from ebbcast.lifecycle import State
from ebbcast.ratelimit import TokenBucket
from ebbcast.wire import (EbbcastProtocol, SlowConsumer, abort, configure_stream,
                          drop_http_state, encode_frame, forget_stream_error, wrap_protocol,
                          write_frame)

log = logging.getLogger(__name__)

#: Consecutive frames over the rate limit after which a client is closed with 1008.
RATE_LIMIT_STRIKES = 10
#: The placeholder in static/index.html that the page handler fills in.
WS_PATH_TOKEN = "__EBBCAST_WS_PATH__"
#: Longest a resuming client's handshake waits for this process to have delivered
#: the offset it has seen (another worker or instance was a little ahead).
CATCH_UP_SECONDS = 1.0
#: Ids a client may choose in /ws/{client_id}.
CLIENT_ID_PATTERN = r"[A-Za-z0-9_.~-]{1,64}"


def load_page(ws_path: str) -> bytes:
    """The test page with its WebSocket path filled in."""
    html = resources.files("ebbcast").joinpath("static/index.html").read_text("utf-8")
    return html.replace(WS_PATH_TOKEN, json.dumps(ws_path)).encode()


def load_script() -> bytes:
    """``/ebbcast.js``: the client module the page uses, for any application."""
    return resources.files("ebbcast").joinpath("static/ebbcast.js").read_bytes()


class InvalidClientId(RequestHandler):
    """``/ws/{client_id}`` with an id that is not 1 to 64 of ``A-Z a-z 0-9 _ . ~ -``:
    400 naming the rule, counted as ``rejected{reason="client_id"}``."""

    def initialize(self, ctx: DaemonContext) -> None:
        self.ctx = ctx

    def get(self, client_id: str) -> None:
        self.ctx.metrics.rejected.labels("client_id").inc()
        log.debug("refused WebSocket handshake from %s: invalid client id",
                  self.request.remote_ip)
        self.set_status(400)
        self.finish("invalid client id: use 1 to 64 of A-Z a-z 0-9 _ . ~ -\n")


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


class BroadcastSocket(WebSocketHandler):
    """One WebSocket client (RFC 6455): every frame it sends is broadcast."""

    def initialize(self, ctx: DaemonContext) -> None:
        self.ctx = ctx
        self.client_id = ""
        self._protocol: EbbcastProtocol | None = None
        self._bucket: TokenBucket | None = None
        self._strikes = 0
        self._disconnect_reason: str | None = None
        self._resume: Resume | None = None
        self.ping_sent_at = self.last_pong = 0.0  # see ebbcast.keepalive

    # -- handshake ---------------------------------------------------------------

    async def get(self, *args: Any, **kwargs: Any) -> None:
        ctx = self.ctx
        limit = ctx.config.server.max_connections
        if not ctx.lifecycle.accepting:
            self._refuse(503, "draining", "server is draining")
            return
        if limit and len(ctx.registry) >= limit:
            self._refuse(503, "max_connections", "too many connections")
            return
        since = self.get_query_argument("since", None)
        if since is not None:
            if not since.isascii() or not since.isdigit() or len(since) > 18:
                log.debug("refused WebSocket handshake from %s: invalid since",
                          self.request.remote_ip)
                self.set_status(400)
                self.finish("invalid since: an offset from a welcome or message frame\n")
                return
            self._resume = Resume(int(since), self.get_query_argument("epoch", ""))
            await ctx.broadcasts.caught_up(self._resume, CATCH_UP_SECONDS)
        await super().get(*args, **kwargs)
        if self.get_status() == 403:
            ctx.metrics.rejected.labels("origin").inc()

    def _refuse(self, status: int, reason: str, text: str) -> None:
        self.ctx.metrics.rejected.labels(reason).inc()
        log.debug("refused WebSocket handshake from %s: %s", self.request.remote_ip, reason)
        self.set_status(status)
        self.set_header("Retry-After", "1")
        self.finish(text)

    def check_origin(self, origin: str) -> bool:
        """Same origin, or one that server.allowed_origins names ("*": any).

        Tornado 6.6 asks only for handshakes that look cross-origin; 6.5 asks for
        every handshake with an Origin header, hence the same-origin test here.
        """
        allowed = self.ctx.config.server.allowed_origins
        if "*" in allowed or origin.lower().rstrip("/") in (a.lower() for a in allowed):
            return True
        host = self.request.headers.get("Host", "").lower()
        return bool(host) and urlsplit(origin).netloc.lower() == host

    def get_websocket_protocol(self) -> WebSocketProtocol | None:
        protocol = super().get_websocket_protocol()
        if protocol is None:
            return None
        return wrap_protocol(self, protocol)

    @property
    def ping_interval(self) -> float | None:
        """None: Tornado's per-connection pinging is off; ebbcast.keepalive pings."""
        return None

    @property
    def max_message_size(self) -> int:
        return self.ctx.config.server.max_message_bytes

    # -- connection --------------------------------------------------------------

    def open(self, client_id: str | None = None) -> None:
        ctx = self.ctx
        assert isinstance(self.ws_connection, EbbcastProtocol)
        self._protocol = self.ws_connection
        self.client_id = client_id or secrets.token_hex(8)
        configure_stream(self._protocol)
        self._bucket = TokenBucket(ctx.config.limits.burst, time.monotonic())
        drop_http_state(self)
        ctx.registry.add(self)
        ctx.fanout.joined(self)
        ctx.metrics.accepted.inc()
        log.debug("client %s connected from %s", self.client_id, self.request.remote_ip)
        if ctx.config.broadcast.envelope == "json":
            self._welcome()
            if ctx.lifecycle.state is State.DRAINING:
                self.send_shutdown()

    def _welcome(self) -> None:
        """The welcome and, for a resume, the broadcasts missed: queued in the step
        that joined this client to the fan-out, so live broadcasts follow seamlessly."""
        ctx = self.ctx
        broadcasts = ctx.broadcasts
        history = broadcasts.history
        epoch = history.epoch if broadcasts.sequenced else None
        if self._resume is None:
            self.send_text(frames.welcome(self.client_id, ctx.node_id, ctx.total_connections(),
                                          epoch, history.latest))
            return
        replay = broadcasts.replay(self._resume, time.monotonic())
        self.send_text(frames.welcome(self.client_id, ctx.node_id, ctx.total_connections(),
                                      epoch, history.latest, replay.recovered, replay.missed))
        for frame in replay.frames:
            self.send_text(frame)

    def flush_before_abort(self) -> None:
        """Called by EbbcastProtocol._abort: write what this client is owed, unless
        it is already being dropped (a slow consumer is owed nothing more)."""
        if self._protocol is not None and self._disconnect_reason is None:
            self.ctx.fanout.flush_one(self)

    def send_frame(self, frame: bytes) -> bool:
        """Write encoded frames now (the fan-out's flush calls this); False if not sent."""
        try:
            return write_frame(self._protocol, frame, self.ctx.config.limits.client_queue_bytes)
        except SlowConsumer:
            log.debug("client %s is a slow consumer: aborted", self.client_id)
            self._disconnect_reason = "slow_consumer"  # and it is owed nothing more
            abort(self)
            return False

    def send_text(self, text: str) -> None:
        """Queue a text frame for this client alone, in order with the broadcasts."""
        self.ctx.fanout.send_private(self, encode_frame(text.encode()))

    def send_shutdown(self) -> None:
        """The shutdown frame, with a per-client reconnect delay to spread reconnects."""
        self.send_text(self.ctx.shutdown_frame())

    def abort(self) -> None:
        """Drop the connection now, without a close handshake."""
        abort(self)

    def end(self, reason: str, code: int, text: str | None = None) -> None:
        """Close this connection with ``code``, counting it under ``reason``."""
        if self._disconnect_reason is None:
            self._disconnect_reason = reason
        self.close(code, text)

    def on_pong(self, data: bytes) -> None:
        self.last_pong = time.monotonic()

    def on_message(self, message: str | bytes) -> None:
        if self._protocol is None or self._protocol.is_closing():
            return  # closed by the server (limits, deadline): nothing more is relayed
        ctx = self.ctx
        ctx.metrics.received.inc()
        try:
            if not self._within_rate():
                return
            raw = ctx.config.broadcast.envelope == "raw"
            if isinstance(message, bytes) and not raw:
                self.send_text(frames.error("binary_not_supported"))
                return
            payload: str | bytes = message
            if not raw:
                assert isinstance(message, str)
                payload = frames.message(self.client_id, message, time.time())
            exclude = None if ctx.config.broadcast.echo_to_sender else self
            ctx.broadcasts.submit(payload, "client", exclude)
        except Exception:
            log.exception("error handling a frame from client %s", self.client_id)
            self.end("error", 1011, "internal error")

    def _within_rate(self) -> bool:
        limits = self.ctx.config.limits
        assert self._bucket is not None
        if self._bucket.allow(time.monotonic(), limits.messages_per_second, limits.burst):
            self._strikes = 0
            return True
        self._strikes += 1
        if self._strikes >= RATE_LIMIT_STRIKES:
            log.debug("client %s closed: rate limit exceeded", self.client_id)
            self.end("policy", 1008, "rate limit exceeded")
        elif self.ctx.config.broadcast.envelope == "json":
            self.send_text(frames.error("rate_limited"))
        return False

    def on_close(self) -> None:
        reason = self._disconnect_reason or self._reason_from_protocol()
        if self.ctx.registry.discard(self):
            self.ctx.metrics.disconnections.labels(reason).inc()
            log.debug("client %s disconnected: %s (close code %s)", self.client_id, reason,
                      self.close_code)
        self._break_reference_cycles()

    def _break_reference_cycles(self) -> None:
        """Let reference counting free this connection, without the cyclic GC.

        A stream closed by a socket error keeps the exception, whose traceback's
        frames point back at the stream; and this handler and its protocol point at
        each other. Left alone, every closed connection waits for a full garbage
        collection, which with many connections open stalls the loop (see
        gcpolicy.py).
        """
        protocol, self._protocol = self._protocol, None
        forget_stream_error(protocol)

    def _reason_from_protocol(self) -> str:
        protocol = self._protocol
        if protocol is not None and protocol.server_close_code == 1009:
            return "too_big"
        return "client"
