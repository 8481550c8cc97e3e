"""One WebSocket client, from the moment its handshake is accepted.

A :class:`Connection` is what Tornado's RFC 6455 protocol object calls back
(``on_message``, ``on_pong``, ``on_ws_connection_close``) and what the rest of the
daemon holds: the registry, the fan-out (a ``Recipient``), keepalive and the drain.
It is not a RequestHandler: the handshake is answered by ``ebbcast.serving.handlers`` before
one exists, so a connection carries no HTTP state, and its fields are slots (an
idle client's memory is mostly its socket buffers and the protocol's reader).
"""

from __future__ import annotations

import logging
import secrets
import time
from types import TracebackType

from tornado.ioloop import IOLoop

from ebbcast.backplane.history import Resume
from ebbcast.core import frames
from ebbcast.core.lifecycle import State
from ebbcast.serving.auth import EXPIRED_CLOSE_CODE, EXPIRED_CLOSE_REASON, Grant
from ebbcast.serving.channels import ChannelRights, read_command
from ebbcast.serving.context import DaemonContext
from ebbcast.serving.ratelimit import TokenBucket
from ebbcast.serving.wire import (
    EbbcastProtocol,
    SlowConsumer,
    abort,
    configure_stream,
    encode_frame,
    forget_stream_error,
    input_unread,
    write_frame,
)

log = logging.getLogger(__name__)

#: Consecutive frames over the rate limit after which a client is closed with 1008.
RATE_LIMIT_STRIKES = 10


def seconds_until(when: float, now: float) -> float:
    """The delay of a timer for unix time ``when``."""
    return max(0.0, when - now)


class Connection:
    """One WebSocket client (RFC 6455): every frame it sends is broadcast, but a
    channel command (``ebbcast.serving.channels``), which is carried out."""

    __slots__ = ("ctx", "client_id", "_protocol", "_bucket", "_strikes",
                 "_disconnect_reason", "close_code", "ping_sent_at", "last_pong",
                 "grant", "_expiry")

    def __init__(self, ctx: DaemonContext, client_id: str | None,
                 grant: Grant | None = None) -> None:
        self.ctx = ctx
        self.client_id = client_id or secrets.token_hex(8)
        #: What the client's token allows; None without client tokens.
        self.grant = grant
        self._expiry: object | None = None  # the IOLoop timeout of the token's exp
        self._protocol: EbbcastProtocol | None = None
        self._bucket = TokenBucket(ctx.config.limits.burst, time.monotonic())
        self._strikes = 0
        self._disconnect_reason: str | None = None
        self.close_code: int | None = None
        self.ping_sent_at = self.last_pong = 0.0  # see ebbcast.serving.keepalive

    @property
    def protocol(self) -> EbbcastProtocol | None:
        """The RFC 6455 protocol object; None once the connection has closed."""
        return self._protocol

    @property
    def rights(self) -> ChannelRights:
        """What this client may do with channels: its token's, else the defaults."""
        if self.grant is not None:
            return self.grant.rights
        return self.ctx.channels.default_rights()

    def open(self, protocol: EbbcastProtocol, resume: Resume | None, response: bytes,
             channels: dict[str, tuple[str, int]] | None = None) -> None:
        """Write the 101 ``response`` with the welcome (and, for a resume, the
        broadcasts missed; with ``channels`` subscribed at the handshake, what they
        sent since) in one send, then join the fan-out, which owes this client only
        what is queued from now on: live broadcasts follow seamlessly."""
        ctx = self.ctx
        self._protocol = protocol
        configure_stream(protocol)
        first = [response]
        if ctx.config.broadcast.envelope == "json":
            greeting = self._greeting(resume, channels)
            greeting[1:1] = ctx.channels.opened(self)
            first.extend(encode_frame(text.encode()) for text in greeting)
        if not write_frame(protocol, b"".join(first), ctx.config.limits.client_queue_bytes):
            return  # gone already: the protocol's reader reports the close
        ctx.registry.add(self)
        ctx.fanout.joined(self)
        ctx.metrics.accepted.inc()
        if len(first) > 1:
            ctx.metrics.sent.inc(len(first) - 1)
        if self.grant is not None:
            loop = IOLoop.current()
            self._expiry = loop.call_later(seconds_until(self.grant.expires_at, time.time()),
                                           self._token_expired)

    def _token_expired(self) -> None:
        self._expiry = None
        log.debug("client %s: token expired", self.client_id)
        self.end("token_expired", EXPIRED_CLOSE_CODE, EXPIRED_CLOSE_REASON)

    def _greeting(self, resume: Resume | None,
                  channels: dict[str, tuple[str, int]] | None) -> list[str]:
        """The welcome, what a resuming client missed, and the shutdown notice if
        the daemon is already draining."""
        ctx = self.ctx
        broadcasts = ctx.broadcasts
        history = broadcasts.history
        epoch = history.epoch if broadcasts.sequenced else None
        count = ctx.total_connections() + 1
        if resume is None:
            texts = [frames.welcome(self.client_id, ctx.node_id, count, epoch, history.latest,
                                    channels=channels)]
        else:
            replay = broadcasts.replay(resume, time.monotonic())
            texts = [frames.welcome(self.client_id, ctx.node_id, count, epoch, history.latest,
                                    replay.recovered, replay.missed, channels),
                     *replay.frames]
        if ctx.lifecycle.state is State.DRAINING:
            texts.append(ctx.shutdown_frame())
        return texts

    # -- writing -----------------------------------------------------------------

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
            self.abort()
            return False

    def input_unread(self) -> bool:
        """Bytes from the client this process has not handled yet (see keepalive)."""
        return input_unread(self._protocol)

    def send_text(self, text: str) -> None:
        """Queue a text frame for this client alone, in order with the broadcasts."""
        self.ctx.fanout.send_private(self, encode_frame(text.encode()))

    def send_shutdown(self) -> None:
        """The shutdown frame, with a per-client reconnect delay to spread reconnects."""
        self.send_text(self.ctx.shutdown_frame())

    # -- closing -----------------------------------------------------------------

    def abort(self) -> None:
        """Drop the connection now, without a close handshake (on_close runs now)."""
        protocol = self._protocol
        if protocol is not None:
            abort(protocol)
        self.on_close()

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Start the close handshake (the client has 5 s to answer)."""
        if self._protocol is not None:
            self._protocol.close(code, reason)

    def end(self, reason: str, code: int, text: str | None = None) -> None:
        """Close this connection with ``code``, counting it under ``reason``."""
        if self._disconnect_reason is None:
            self._disconnect_reason = reason
        self.close(code, text)

    def on_ws_connection_close(self, close_code: int | None = None,
                               close_reason: str | None = None) -> None:
        """The protocol's reader has stopped: the connection is gone."""
        self.close_code = close_code
        self.on_close()

    def on_close(self) -> None:
        """Leave the registry and the channels, count why (once), and let go of
        the protocol."""
        self.ctx.channels.closed(self)
        if self._expiry is not None:
            IOLoop.current().remove_timeout(self._expiry)
            self._expiry = None
        if self.ctx.registry.discard(self):
            reason = self._disconnect_reason or self._reason_from_protocol()
            self.ctx.metrics.disconnections.labels(reason).inc()
            log.debug("client %s disconnected: %s (close code %s)", self.client_id, reason,
                      self.close_code)
        self._break_reference_cycles()

    def _break_reference_cycles(self) -> None:
        """Let reference counting free this connection, without the cyclic GC.

        A stream closed by a socket error keeps the exception, whose traceback's
        frames point back at the stream; and this connection and its protocol point
        at each other. Left alone, every closed connection waits for a full garbage
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

    # -- what the protocol reads -------------------------------------------------

    def on_pong(self, data: bytes) -> None:
        self.last_pong = time.monotonic()

    def on_ping(self, data: bytes) -> None:
        pass  # the protocol answers with a pong itself

    def log_exception(self, typ: type[BaseException] | None, value: BaseException | None,
                      tb: TracebackType | None) -> None:
        log.error("error handling client %s", self.client_id, exc_info=value)

    def on_message(self, message: str | bytes) -> None:
        if self._protocol is None or self._protocol.is_closing():
            return  # closed by the server (limits, deadline): nothing more is relayed
        ctx = self.ctx
        ctx.metrics.received.inc()
        try:
            if not self._within_rate():
                return
            raw = ctx.config.broadcast.envelope == "raw"
            if not raw and isinstance(message, str):
                command = read_command(message)
                if command is not None:
                    ctx.channels.command(self, command)
                    return
            if self.grant is not None and not self.grant.publish:
                if not raw:
                    self.send_text(frames.error("read_only"))
                return
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
