"""Listening sockets: binding them, TLS, and surviving a lack of descriptors.

Binding. The public address is bound with SO_REUSEPORT, one socket set per
worker, so the kernel spreads new connections over the workers, and so that more
sets can join the same port when a new generation asks for more workers (see
``ebbcast.generations``). Sockets are never closed and re-bound while the daemon
runs: they are inherited by each worker and handed to each new generation.

When the process has no descriptor left, accept(2) fails with EMFILE (or ENFILE
for the whole system) while the connection stays in the backlog, so the listening
socket stays readable: Tornado's accept handler would raise, asyncio would log a
traceback, and the loop would call it again at once, thousands of times a second.

Here accept() sheds instead, as nginx and libev do: it gives up a spare descriptor
kept for the purpose, accepts one waiting connection and closes it at once, takes
the spare back, and repeats until the backlog is empty; then it reports "nothing
to accept" to Tornado. Clients over the limit see their connection closed; the
daemon logs one warning per episode (at most one a minute) and keeps serving.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import time

from tornado.netutil import bind_sockets

from ebbcast.config import Config, ConfigError

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 2048


class BindError(Exception):
    """A listener's address could not be bound."""

    def __init__(self, address: str, error: OSError) -> None:
        self.address = address
        self.error = error
        super().__init__(f"cannot bind {address}: {error.strerror or error}")


def listener_url(scheme: str, sock: socket.socket, path: str = "") -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}{path}"


def bind_listener(name: str, host: str, port: int, spare: Spare) -> list[socket.socket]:
    """Bind and listen on every address of ``host``; BindError names the listener."""
    try:
        sockets = bind_sockets(port, host or None, backlog=LISTEN_BACKLOG)
    except OSError as exc:
        raise BindError(f"{name} {host}:{port}", exc) from exc
    return [ShedOnExhaustion.adopt(sock, spare) for sock in sockets]


def bind_public(host: str, port: int, count: int) -> list[list[socket.socket]]:
    """``count`` sets of listening sockets on one address, with SO_REUSEPORT.

    Port 0 picks a free port for the first set; the others use the same one. A
    given port is first bound once without SO_REUSEPORT and released: otherwise a
    second ebbcast on the same port would quietly share it, taking part of the
    first one's connections, instead of failing with exit 3.
    """
    try:
        if port:
            for sock in bind_sockets(port, host or None):
                sock.close()
        first = bind_sockets(port, host or None, backlog=LISTEN_BACKLOG, reuse_port=True)
        port = first[0].getsockname()[1]
        rest = [bind_sockets(port, host or None, backlog=LISTEN_BACKLOG, reuse_port=True)
                for _ in range(count - 1)]
    except OSError as exc:
        raise BindError(f"public listener {host}:{port}", exc) from exc
    return [first, *rest]


def bind_idle_like(model: list[socket.socket]) -> list[socket.socket]:
    """One more socket set on the addresses of ``model``, bound with SO_REUSEPORT
    but not listening: the kernel sends it no connection until its new owner calls
    listen() (``ebbcast.daemon``), so if that owner never starts, closing it loses
    nothing."""
    sockets = []
    try:
        for sock in model:
            idle = socket.socket(sock.family, socket.SOCK_STREAM)
            sockets.append(idle)
            idle.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            idle.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if sock.family == socket.AF_INET6:
                idle.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            idle.setblocking(False)
            idle.bind(sock.getsockname())
    except OSError as exc:
        for idle in sockets:
            idle.close()
        raise BindError(f"public listener {listener_url('tcp', model[0])}", exc) from exc
    return sockets


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
    """A listening socket whose accept() sheds instead of failing on EMFILE/ENFILE."""

    spare: Spare

    @classmethod
    def adopt(cls, sock: socket.socket, spare: Spare) -> ShedOnExhaustion:
        guarded = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        guarded.spare = spare
        return guarded

    def accept(self) -> tuple[socket.socket, object]:
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno not in _EXHAUSTED:
                raise
            self.spare.shed(self, exc)
            raise BlockingIOError(errno.EAGAIN, "connections shed: out of descriptors") \
                from exc
