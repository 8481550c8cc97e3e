"""Listening sockets every process uses: TLS, URLs, and surviving a lack of descriptors.

When the process has no descriptor left, accept(2) fails with EMFILE (or ENFILE
for the whole system) while the connection stays in the backlog, so the listening
socket stays readable: Tornado's accept handler would raise, asyncio would log a
traceback, and the loop would call it again at once, thousands of times a second.

Here accept() sheds instead, as nginx and libev do: it gives up a spare descriptor
kept for the purpose, accepts one waiting connection and closes it at once, takes
the spare back, and repeats until the backlog is empty; then it reports "nothing
to accept" to Tornado. Clients over the limit see their connection closed; the
daemon logs one warning per episode (at most one a minute) and keeps serving.

It also accepts at most ACCEPTS_PER_PASS connections in one pass of the event loop
(then "nothing to accept" until the next): Tornado's handler would take up to 128
at a time, each with its stream and its handshake's coroutine, so that a connect
storm held the loop some 20 ms an event, ahead of the timers due. The rest stay in
the backlog and the socket stays readable: they come in the next passes.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import ssl
import time
from urllib.parse import urlsplit

from ebbcast.config import Config, ConfigError

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 2048
#: Connections one listening socket accepts in one pass of the event loop, at most.
ACCEPTS_PER_PASS = 64


def listener_url(scheme: str, sock: socket.socket, path: str = "") -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}{path}"


def advertised_url(public_url: str, bound_ws: str) -> str | None:
    """The URL other instances' draining clients are sent to: ``server.public_url``,
    else the bound WebSocket URL, but never an unspecified address (``0.0.0.0``,
    ``::``), which no client can reach: None then."""
    if public_url:
        return public_url
    try:
        unspecified = ipaddress.ip_address(urlsplit(bound_ws).hostname or "").is_unspecified
    except ValueError:
        unspecified = False
    return None if unspecified else bound_ws


def say_if_unadvertised(config: Config, bound_ws: str) -> None:
    """Log once, at start, why this instance is named to nobody."""
    if advertised_url(config.server.public_url, bound_ws) is None:
        log.info("server.public_url is not set and the public listener is bound to %s, "
                 "which no client can reach: other instances' draining clients are not "
                 "sent here (set server.public_url to the URL clients use)",
                 urlsplit(bound_ws).hostname)


def tls_context(config: Config) -> ssl.SSLContext | None:
    if not config.tls_enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.server.tls_cert, config.server.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([("server.tls_cert", f"cannot load certificate/key: {exc}")]) \
            from exc
    return context


WARN_EVERY_SECONDS = 60.0
_EXHAUSTED = (errno.EMFILE, errno.ENFILE)


class Spare:
    """One descriptor held in reserve (``/dev/null``), to be given up for a shed."""

    def __init__(self) -> None:
        self._fd: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._warned_at = -WARN_EVERY_SECONDS
        self.shed_total = 0

    def shed(self, listener: socket.socket, exc: OSError) -> None:
        """Accept and close every connection waiting on ``listener``."""
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_SECONDS:
            self._warned_at = now
            log.warning("out of file descriptors (%s): closing new connections at once "
                        "until some are free", exc.strerror or exc)
        while True:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            try:
                conn, _ = socket.socket.accept(listener)
            except OSError as again:
                self._reopen()
                if isinstance(again, (BlockingIOError, InterruptedError)) or \
                        again.errno in _EXHAUSTED:
                    return  # the backlog is empty (or the descriptor was taken again)
                raise
            conn.close()
            self._reopen()
            self.shed_total += 1

    def _reopen(self) -> None:
        if self._fd is None:
            try:
                self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._fd = None  # still exhausted: try again at the next shed

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ShedOnExhaustion(socket.socket):
    """A listening socket whose accept() sheds instead of failing on EMFILE/ENFILE,
    and accepts at most ACCEPTS_PER_PASS connections per pass of the running loop."""

    spare: Spare
    _accepted = 0  # in this pass of the loop

    @classmethod
    def adopt(cls, sock: socket.socket, spare: Spare) -> ShedOnExhaustion:
        guarded = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        guarded.spare = spare
        return guarded

    def _counted(self) -> None:
        """One more accept in this pass; past the cap, none until the next pass."""
        if self._accepted >= ACCEPTS_PER_PASS:
            raise BlockingIOError(errno.EAGAIN, "enough accepted in this pass")
        if self._accepted == 0:
            try:  # call_soon from a callback runs in the loop's next pass
                asyncio.get_running_loop().call_soon(self._next_pass)
            except RuntimeError:  # no loop running: no pass to count in
                return
        self._accepted += 1

    def _next_pass(self) -> None:
        self._accepted = 0

    def accept(self) -> tuple[socket.socket, object]:
        self._counted()
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno not in _EXHAUSTED:
                raise
            self.spare.shed(self, exc)
            raise BlockingIOError(errno.EAGAIN, "connections shed: out of descriptors") \
                from exc
