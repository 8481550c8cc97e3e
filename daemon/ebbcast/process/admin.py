"""Admin listener: metrics, health, status, and the token-protected actions."""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST
from tornado.httpserver import HTTPServer
from tornado.httputil import (
    HTTPConnection,
    HTTPHeaders,
    HTTPMessageDelegate,
    HTTPServerConnectionDelegate,
    RequestStartLine,
    ResponseStartLine,
)
from tornado.web import Application, RequestHandler

from ebbcast.backplane.channels import valid_channel
from ebbcast.config import Config
from ebbcast.core import frames
from ebbcast.core.lifecycle import Lifecycle, State
from ebbcast.core.logs import log_request

log = logging.getLogger(__name__)

#: Largest request body the admin listener reads (POST /broadcast): 413 beyond.
ADMIN_MAX_BODY_BYTES = 1024 * 1024
#: Largest body read at all: a body over ADMIN_MAX_BODY_BYTES but not over this is
#: read and dropped (within admin.request_timeout), so that a client still sending
#: gets its 413 rather than a reset; a longer one announced gets the 413 and the
#: connection closed.
ADMIN_DISCARD_BYTES = 64 * 1024 * 1024
#: How many channels ``GET /channels`` lists without ``?limit=``, and at most.
DEFAULT_CHANNEL_LIMIT, MAX_CHANNEL_LIMIT = 100, 10000


class ChannelAdmin(Protocol):
    """Channels, as the admin API reaches them (SPEC 14): the main process's
    ``ChannelDesk``, or a process on its own's ``LocalChannelAdmin``."""

    def publish(self, channel: str, frame: str) -> int | None:
        """Publish ``frame`` to ``channel``: how many subscribers it has; None when
        it cannot be published now (Redis is away)."""
    def send_direct(self, client_id: str, frame: str) -> Awaitable[int]:
        """``frame`` to every connection of ``client_id`` (other instances too):
        how many it reached on this one."""
    def listing(self, limit: int) -> Awaitable[tuple[list[tuple[str, int]], int]]:
        """The ``limit`` largest channels with their subscribers, and how many
        channels have one (every instance)."""
    def presence(self, channel: str) -> Awaitable[tuple[int, list[str]]]:
        """A channel's subscribers, and its distinct client ids (every instance)."""


class AdminBackend(Protocol):
    """What the admin endpoints read and act on: the main process
    (``ebbcast.process.supervisor.Supervisor``) or a serving process on its own
    (``ebbcast.process.roles.ProcessAdmin``)."""

    @property
    def config(self) -> Config: ...
    @property
    def state(self) -> State: ...
    def status_report(self, now_mono: float) -> dict[str, Any]: ...
    def exposition(self) -> bytes: ...
    def broadcast(self, payload: str) -> int: ...
    def request_drain(self, source: str) -> None: ...
    def request_upgrade(self, source: str) -> str | None:
        """Queue an upgrade; or why it is refused now."""
    @property
    def channels(self) -> ChannelAdmin: ...


class AdminHandler(RequestHandler):
    def initialize(self, backend: AdminBackend) -> None:
        self.backend = backend

    def write_json(self, status: int, body: dict[str, Any]) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def text_body(self, what: str = "broadcast") -> str | None:
        """The body as text to ``what``; None when it cannot be (answered already)."""
        try:
            text = self.request.body.decode("utf-8")
        except UnicodeDecodeError:
            self.write_json(400, {"error": "body must be UTF-8 text"})
            return None
        if not text:
            self.write_json(400, {"error": f"empty body: nothing to {what}"})
            return None
        limit = self.backend.config.server.max_message_bytes
        if len(self.request.body) > limit:
            self.write_json(413, {"error": f"body over server.max_message_bytes ({limit})"})
            return None
        return text

    def channels_usable(self, channel: str | None) -> bool:
        """Whether channels work here (the JSON envelope) and ``channel`` is a
        channel's name; if not, the answer is written."""
        if self.backend.config.broadcast.envelope != "json":
            self.write_json(400, {"error": "channels and direct messages need "
                                           "broadcast.envelope = \"json\""})
            return False
        if channel is not None and not valid_channel(channel):
            self.write_json(400, {"error": "invalid channel: 1 to 128 of "
                                           "A-Z a-z 0-9 _ . : @ -"})
            return False
        return True

    def authorized(self) -> bool:
        """Check the bearer token; on failure the response is already written.

        404 when no token is configured (the actions are disabled), 401 when the
        token is missing or wrong. Compared in constant time; never logged.
        """
        token = self.backend.config.admin_token
        if not token:
            self.write_json(404, {"error": "disabled: admin.token (or admin.token_file) "
                                           "is not set"})
            return False
        scheme, _, given = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 token.encode()):
            self.set_header("WWW-Authenticate", 'Bearer realm="ebbcast"')
            self.write_json(401, {"error": "missing or wrong bearer token"})
            return False
        return True


class MetricsHandler(AdminHandler):
    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.backend.exposition())


class HealthzHandler(AdminHandler):
    def get(self) -> None:
        self.write_json(200, {"status": "ok"})


class ReadyzHandler(AdminHandler):
    def get(self) -> None:
        state = self.backend.state
        self.write_json(200 if state is State.SERVING else 503, {"status": state.value})


class StatusHandler(AdminHandler):
    def get(self) -> None:
        self.write_json(200, self.backend.status_report(time.monotonic()))


def build_status(lifecycle: Lifecycle, started_mono: float, now_mono: float,
                 workers: list[tuple[int, int]], connections: int | None = None
                 ) -> dict[str, Any]:
    """The ``/status`` document at monotonic time ``now_mono``, from the lifecycle
    and the ``(pid, connections)`` of every process serving new clients;
    ``connections`` is the total, when more processes (an older generation) hold
    clients too."""
    if connections is None:
        connections = sum(count for _, count in workers)
    report: dict[str, Any] = {
        "state": lifecycle.state.value,
        "connections": connections,
        "workers": [{"pid": pid, "connections": count} for pid, count in workers],
        "uptime_seconds": round(now_mono - started_mono, 3),
    }
    plan = lifecycle.drain
    if plan is not None:
        report["drain"] = {
            "started_at": round(plan.started_unix, 3),
            "deadline": round(plan.deadline_unix, 3),
            "remaining": connections,
            "seconds_left": round(plan.seconds_left(now_mono), 3),
        }
    return report


class BroadcastHandler(AdminHandler):
    """``POST /broadcast``: to every client; ``?channel=c``: to a channel's."""

    def post(self) -> None:
        if not self.authorized():
            return
        text = self.text_body()
        if text is None:
            return
        channel = self.get_query_argument("channel", None)
        if channel is not None:
            if self.channels_usable(channel):
                frame = frames.channel_message(channel, frames.ADMIN_SENDER, text, time.time())
                recipients = self.backend.channels.publish(channel, frame)
                if recipients is None:
                    self.write_json(503, {"error": "channels unavailable (the backplane "
                                                   "is away): not published, try again"})
                else:
                    self.write_json(202, {"recipients": recipients})
            return
        payload = text
        if self.backend.config.broadcast.envelope == "json":
            payload = frames.message(frames.ADMIN_SENDER, text, time.time())
        recipients = self.backend.broadcast(payload)
        self.write_json(202, {"recipients": recipients})


class DirectHandler(AdminHandler):
    """``POST /clients/{client_id}/send``: a ``direct`` frame to one client id."""

    async def post(self, client_id: str) -> None:
        if not self.authorized():
            return
        if not 0 < len(client_id) <= 128 or not client_id.isprintable():
            self.write_json(400, {"error": "invalid client id"})
            return
        text = self.text_body("send")
        if text is None or not self.channels_usable(None):
            return
        delivered = await self.backend.channels.send_direct(client_id,
                                                            frames.direct(text, time.time()))
        self.write_json(202, {"delivered": delivered})


class ChannelsHandler(AdminHandler):
    """``GET /channels`` (largest first, ``?limit=``), ``GET /channels/{c}``."""

    async def get(self, channel: str | None = None) -> None:
        if not self.authorized():
            return
        if channel is not None:
            if self.channels_usable(channel):
                subscribers, clients = await self.backend.channels.presence(channel)
                self.write_json(200, {"channel": channel, "subscribers": subscribers,
                                      "clients": clients})
            return
        limit_text = self.get_query_argument("limit", str(DEFAULT_CHANNEL_LIMIT))
        if not limit_text.isascii() or not limit_text.isdigit() or int(limit_text) < 1:
            self.write_json(400, {"error": "limit must be a positive whole number"})
            return
        listed, total = await self.backend.channels.listing(min(int(limit_text),
                                                                MAX_CHANNEL_LIMIT))
        self.write_json(200, {"channels": [{"channel": name, "subscribers": count}
                                           for name, count in listed], "total": total})


class DrainHandler(AdminHandler):
    def post(self) -> None:
        if not self.authorized():
            return
        log.info("drain requested through the admin API by %s", self.request.remote_ip)
        self.backend.request_drain("the admin API")
        # the loop acts on the request in a moment: answer the state it leads to
        leads_to = {State.SERVING: State.DRAINING, State.STARTING: State.STOPPING}
        state = self.backend.state
        self.write_json(202, {"state": leads_to.get(state, state).value})


class UpgradeHandler(AdminHandler):
    def post(self) -> None:
        if not self.authorized():
            return
        log.info("upgrade requested through the admin API by %s", self.request.remote_ip)
        refusal = self.backend.request_upgrade("the admin API")
        if refusal is not None:
            self.write_json(409, {"error": f"upgrade refused: {refusal}"})
            return
        self.write_json(202, {"upgrade": "starting"})


def admin_server(backend: AdminBackend) -> HTTPServer:
    """The admin listener's HTTP server, for the main process and a lone serving
    process alike: a request's headers, then its body, each within
    ``admin.request_timeout`` (a connection that stalls is closed), its body at most
    ADMIN_MAX_BODY_BYTES (413 beyond)."""
    timeout = backend.config.admin.request_timeout
    return HTTPServer(BodyCap(admin_application(backend), ADMIN_MAX_BODY_BYTES),
                      max_body_size=ADMIN_DISCARD_BYTES,
                      idle_connection_timeout=timeout, body_timeout=timeout)


class BodyCap(HTTPServerConnectionDelegate):
    """``application``, with bodies over ``limit`` bytes answered 413 (JSON)."""

    def __init__(self, application: Application, limit: int) -> None:
        self.application = application
        self.limit = limit

    def start_request(self, server_conn: object,
                      request_conn: HTTPConnection) -> HTTPMessageDelegate:
        return _CappedRequest(self.application.start_request(server_conn, request_conn),
                              request_conn, self.limit)


class _CappedRequest(HTTPMessageDelegate):
    """One request: passed on to the application until its body is over the
    limit (announced, or as it arrives); then answered 413 at once, the rest of the
    body read and dropped, and the response finished when the body has all come
    (at once if the client waits for ``100-continue``: it sends no body)."""

    def __init__(self, inner: HTTPMessageDelegate, request_conn: HTTPConnection,
                 limit: int) -> None:
        self.inner = inner
        self.request_conn = request_conn
        self.limit = limit
        self.received = 0
        self.refused = False
        self.answered = False  # the 413 finished

    def headers_received(self, start_line: RequestStartLine | ResponseStartLine,
                         headers: HTTPHeaders) -> Awaitable[None] | None:
        text = headers.get("Content-Length", "").strip()
        length = int(text) if text.isascii() and text.isdigit() else 0
        if length > self.limit:
            self._refuse()
            if headers.get("Expect", "").lower() == "100-continue" \
                    or length > ADMIN_DISCARD_BYTES or "Transfer-Encoding" in headers:
                # no body coming, too much of it to read, or framed two ways (Tornado
                # would answer 400 after this 413): answered, and the connection closed
                self._finish_response()
            return None
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if self.refused:
            return None
        self.received += len(chunk)
        if self.received > self.limit:
            self._refuse()
            self.inner.on_connection_close()  # what it buffered is dropped
            return None
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        if self.refused:
            self._finish_response()
        else:
            self.inner.finish()

    def _finish_response(self) -> None:
        if not self.answered:
            self.answered = True
            self.request_conn.finish()

    def on_connection_close(self) -> None:
        if not self.refused:
            self.inner.on_connection_close()

    def _refuse(self) -> None:
        self.refused = True
        body = json.dumps({"error": f"body over {self.limit} bytes"}).encode()
        headers = HTTPHeaders({"Content-Type": "application/json",
                               "Content-Length": str(len(body))})
        self.request_conn.write_headers(
            ResponseStartLine("HTTP/1.1", 413, "Content Too Large"), headers, body)


def admin_application(backend: AdminBackend) -> Application:
    args = {"backend": backend}
    return Application([
        (r"/metrics", MetricsHandler, args),
        (r"/healthz", HealthzHandler, args),
        (r"/readyz", ReadyzHandler, args),
        (r"/status", StatusHandler, args),
        (r"/broadcast", BroadcastHandler, args),
        (r"/drain", DrainHandler, args),
        (r"/upgrade", UpgradeHandler, args),
        (r"/clients/([^/]+)/send", DirectHandler, args),
        (r"/channels", ChannelsHandler, args),
        (r"/channels/([^/]+)", ChannelsHandler, args),
    ], log_function=log_request)
