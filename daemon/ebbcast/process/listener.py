"""Binding the listeners.

The public address is bound with SO_REUSEPORT, one socket set per worker, so the
kernel spreads new connections over the workers, and so that more sets can join
the same port when a new generation asks for more workers (see
``ebbcast.process.generations``). Sockets are never closed and re-bound while the
daemon runs: they are inherited by each worker and handed to each new generation.
Every listener is wrapped to shed on descriptor exhaustion (``ebbcast.core.sockets``).
"""

from __future__ import annotations

import socket

from tornado.netutil import bind_sockets

from ebbcast.core.sockets import LISTEN_BACKLOG, ShedOnExhaustion, Spare, listener_url


class BindError(Exception):
    """A listener's address could not be bound."""

    def __init__(self, address: str, error: OSError) -> None:
        self.address = address
        self.error = error
        super().__init__(f"cannot bind {address}: {error.strerror or error}")


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
    listen() (``ebbcast.serving.process``), so if that owner never starts, closing it loses
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
