"""One serving process: listeners, signals, and the drain (SPEC sections 1, 5, 7).

Signal handlers only record the signal in a queue; the supervising coroutine acts
on it, as gunicorn's arbiter does. The drain, in order: the state becomes DRAINING
(``/readyz`` answers 503), the public listener stops accepting, every client gets
the shutdown frame, and the clients keep being served until the last one leaves
(exit at once), the deadline passes (close with shutdown.close_code), or a second
stop signal arrives (close with 1001 now).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_sockets
from tornado.web import Application

from ebbcast import __version__
from ebbcast.admin import ADMIN_MAX_BODY_BYTES, ProcessAdmin, admin_application, log_request
from ebbcast.backplane import Backplane, MemoryBackplane, RedisBackplane
from ebbcast.config import Config, ConfigError, reload_config
from ebbcast.context import DaemonContext
from ebbcast.fanout import Fanout
from ebbcast.gcpolicy import CollectorPolicy
from ebbcast.handlers import CLIENT_ID_PATTERN, BroadcastSocket, PageHandler, load_page
from ebbcast.keepalive import Keepalive
from ebbcast.lifecycle import (STOP_SIGNALS, Lifecycle, State, StopReason, handle_signals,
                               stop_request, unhandle_signals)
from ebbcast.listener import ShedOnExhaustion, Spare
from ebbcast.logs import set_level
from ebbcast.metrics import Metrics
from ebbcast.notify import SystemdNotifier
from ebbcast.periodic import PeriodicBroadcaster
from ebbcast.registry import ConnectionRegistry
from ebbcast.relay import RelayBackplane, WorkerLink

log = logging.getLogger(__name__)

#: How long clients closed at the deadline get to finish their close handshake
#: (below Tornado's own 5 s, so that ebbcast, not Tornado, ends the wait).
DEADLINE_CLOSE_GRACE = 3.0
#: The same after a second stop signal, which asks for a prompt exit.
FORCED_CLOSE_GRACE = 2.0
LISTEN_BACKLOG = 2048
#: Caps on what the public listener reads before a handshake.
MAX_HEADER_BYTES = 16 * 1024
MAX_PUBLIC_BODY_BYTES = 64 * 1024


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


@dataclass
class WorkerSetup:
    """What a worker process gets from the main process (see ebbcast.supervisor):
    its index, its end of the relay link, and its already bound public sockets."""

    index: int
    relay: socket.socket
    public: list[socket.socket]


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


class Daemon:
    """Runs one process until it has stopped; ``run()`` returns the StopReason.

    On its own (``worker=None``) it binds both listeners and speaks sd_notify. As
    a worker it serves the public sockets it was given, has no admin listener and
    reports to the main process over its relay link instead.
    """

    def __init__(self, config: Config, reload: Callable[[], Config],
                 notifier: SystemdNotifier | None = None, handle_signals: bool = True,
                 worker: WorkerSetup | None = None) -> None:
        self._worker = worker
        self._handle_signals = handle_signals
        self.serving = asyncio.Event()
        self._tls = tls_context(config)
        self._reload_config = reload
        self._notifier = notifier or SystemdNotifier()
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.lifecycle = Lifecycle()
        self.metrics = Metrics()
        registry: ConnectionRegistry[BroadcastSocket] = ConnectionRegistry(self._on_count)
        self.ctx = DaemonContext(
            config=config, lifecycle=self.lifecycle, registry=registry,
            fanout=Fanout(registry, self.metrics),  # type: ignore[arg-type]
            metrics=self.metrics, node_id=f"{socket.gethostname()}:{os.getpid()}",
            request_drain=self._request_drain, started_mono=time.monotonic())
        self._link: WorkerLink | None = None
        if worker is not None:
            self._link = WorkerLink(worker.relay, self.ctx.node_id,
                                    deliver=self._deliver_remote, inject=self._inject,
                                    on_others=self._on_others, on_lost=self._on_main_lost)
        self.ctx.backplane = self._make_backplane(config)
        self._periodic = PeriodicBroadcaster(self.ctx)
        self._keepalive = Keepalive(registry, self.ctx.fanout, lambda: self.ctx.config)
        self._gc_policy = CollectorPolicy(lambda: len(registry))
        self._servers: dict[str, HTTPServer] = {}
        self._spare = Spare()  # a descriptor in reserve, see ebbcast.listener
        self._watchdog: PeriodicCallback | None = None
        self._next_tick = 0.0
        self.urls: dict[str, str] = {}

    def _make_backplane(self, config: Config) -> Backplane:
        if config.backplane.url == "memory://":
            self.metrics.backplane_up.set(1)
            if self._link is not None:
                return RelayBackplane(self._link, self.metrics.backplane_dropped.inc)
            return MemoryBackplane()
        metrics = self.metrics
        return RedisBackplane(config.backplane.url, self.ctx.node_id,
                              deliver=self._deliver_remote,
                              on_state=lambda up: metrics.backplane_up.set(1 if up else 0),
                              on_dropped=metrics.backplane_dropped.inc,
                              on_missed=metrics.backplane_missed.inc)

    def _deliver_remote(self, payload: str | bytes, source: str) -> None:
        """A frame another worker or instance sent: fan it out to this one's clients."""
        self.ctx.fanout.broadcast(payload, source, relayed=True)

    def _inject(self, payload: str | bytes, source: str) -> None:
        """An admin broadcast the main process handed to this worker: deliver it
        here and publish it, as a local client's frame would be."""
        self.ctx.fanout.broadcast(payload, source)
        self.ctx.backplane.publish(payload, source)

    def _on_others(self, count: int) -> None:
        self.ctx.elsewhere = count

    def _on_main_lost(self) -> None:
        if self.lifecycle.state is not State.STOPPING:
            log.warning("the main process is gone: draining")
            self._request_drain("the main process's exit")

    # -- start-up ----------------------------------------------------------------

    async def run(self) -> StopReason:
        loop = asyncio.get_running_loop()
        if self._handle_signals:
            handle_signals(loop, self.record_signal)
        try:
            self._start()
            await self._supervise()
        finally:
            self._teardown(loop)
            await self.ctx.backplane.stop()
        assert self.lifecycle.stop_reason is not None
        return self.lifecycle.stop_reason

    def _start(self) -> None:
        config = self.ctx.config
        scheme = "https" if self._tls else "http"
        if self._worker is None:
            public = bind_listener("public listener", config.server.host, config.server.port,
                           self._spare)
        else:
            public = [ShedOnExhaustion.adopt(sock, self._spare) for sock in self._worker.public]
        self._servers["public"] = HTTPServer(
            self._public_application(), ssl_options=self._tls, xheaders=False,
            max_header_size=MAX_HEADER_BYTES, max_body_size=MAX_PUBLIC_BODY_BYTES,
            idle_connection_timeout=60)
        self._servers["public"].add_sockets(public)
        self.urls = {"ws": listener_url(scheme, public[0], config.server.ws_path),
                     "page": listener_url(scheme, public[0], "/")}
        bound = {"ws": ",".join(listener_url(scheme, s, config.server.ws_path) for s in public)}
        if self._worker is None:
            admin = bind_listener("admin listener", config.admin.host, config.admin.port, self._spare)
            self._servers["admin"] = HTTPServer(admin_application(ProcessAdmin(self.ctx)),
                                                max_body_size=ADMIN_MAX_BODY_BYTES)
            self._servers["admin"].add_sockets(admin)
            self.urls["admin"] = listener_url("http", admin[0])
            bound["admin"] = ",".join(listener_url("http", s) for s in admin)
        self.ctx.backplane.advertise(self.urls["ws"].replace("http", "ws", 1))
        self.ctx.backplane.start()
        self.lifecycle.serve()
        self.serving.set()
        self._periodic.start()
        self._keepalive.start()
        self._gc_policy.start()
        if self._worker is not None and self._link is not None:
            self._link.start()
            self._link.ready()
            log.info("worker %d (pid %d) serving", self._worker.index, os.getpid())
            return
        log.info("ebbcast %s (pid %d) started", __version__, os.getpid())
        log.info("serving ws=%s admin=%s", bound["ws"], bound["admin"])
        self._notifier.ready(f"serving on {self.urls['ws']}")
        if self._notifier.watchdog_interval:
            self._watchdog = PeriodicCallback(self._send_watchdog,
                                              self._notifier.watchdog_interval * 1000)
            self._watchdog.start()

    def _send_watchdog(self) -> None:
        self._notifier.watchdog()

    def _public_application(self) -> Application:
        path = re.escape(self.ctx.config.server.ws_path)
        ws_args = {"ctx": self.ctx}
        return Application([
            (r"/", PageHandler, {"page": load_page(self.ctx.config.server.ws_path)}),
            (path, BroadcastSocket, ws_args),
            (rf"{path}/({CLIENT_ID_PATTERN})", BroadcastSocket, ws_args),
        ], log_function=log_request)

    # -- events ------------------------------------------------------------------

    def record_signal(self, signum: int) -> None:
        """The signal handler: it records only; ``_supervise`` acts."""
        self._events.put_nowait(("signal", signum))

    def _request_drain(self, source: str) -> None:
        self._events.put_nowait(("drain", source))

    def _on_count(self, count: int) -> None:
        self.metrics.connections.set(count)
        if self._link is not None:
            self._link.report_count(count)
        if count == 0 and self.lifecycle.state is State.DRAINING:
            self._events.put_nowait(("empty", None))

    async def _supervise(self) -> None:
        while self.lifecycle.state is not State.STOPPING:
            timeout = None
            if self.lifecycle.state is State.DRAINING:
                timeout = max(0.0, self._next_tick - time.monotonic())
            try:
                kind, detail = await asyncio.wait_for(self._events.get(), timeout)
            except asyncio.TimeoutError:
                kind, detail = "tick", None
            self._act(kind, detail)
        await self._await_closed()

    def _act(self, kind: str, detail: Any) -> None:
        state = self.lifecycle.state
        if kind == "signal" and detail == signal.SIGHUP:
            self.reload()
        elif kind == "signal" and state is State.DRAINING:
            log.info("%s during the drain: closing the remaining clients now",
                     signal.Signals(detail).name)
            self._close_all("forced", 1001, "server stopping")
            self.lifecycle.stop(StopReason.FORCED)
        elif kind in ("signal", "drain") and state is State.SERVING:
            self._begin_drain(stop_request(kind, detail))
        if self.lifecycle.state is State.DRAINING:
            self._drain_step(time.monotonic())

    # -- the drain ---------------------------------------------------------------

    def _begin_drain(self, source: str) -> None:
        now_mono, now_unix = time.monotonic(), time.time()
        plan = self.lifecycle.begin_drain(now_mono, now_unix,
                                          self.ctx.config.shutdown.drain_timeout)
        if plan is None:
            return
        self._servers["public"].stop()
        self.ctx.backplane.advertise(None)
        self.metrics.drain_started_at(plan.started_unix, plan.deadline_unix)
        remaining = len(self.ctx.registry)
        log.info("drain started by %s: %d connections, %s", source, remaining,
                 plan.deadline_text())
        status = self._drain_status(now_mono)
        self._notifier.stopping(status)
        self._notifier.progress(status, self._extend_seconds())
        if self.ctx.config.broadcast.envelope == "json":
            for conn in self.ctx.registry.snapshot():
                conn.send_shutdown()
        self._next_tick = plan.next_tick(now_mono, self.ctx.config.shutdown.progress_interval)

    def _drain_status(self, now_mono: float) -> str:
        plan = self.lifecycle.drain
        assert plan is not None
        return plan.status(len(self.ctx.registry), now_mono)

    def _extend_seconds(self) -> float:
        """How long systemd should wait beyond now: past the next tick, with margin."""
        return 3 * self.ctx.config.shutdown.progress_interval + DEADLINE_CLOSE_GRACE

    def _drain_step(self, now_mono: float) -> None:
        plan = self.lifecycle.drain
        assert plan is not None
        if len(self.ctx.registry) == 0:
            log.info("drain complete: no connections remain")
            self.lifecycle.stop(StopReason.DRAINED)
        elif plan.expired(now_mono):
            log.info("drain deadline reached: closing %d connections with code %d",
                     len(self.ctx.registry), self.ctx.config.shutdown.close_code)
            self._close_all("drain_deadline", self.ctx.config.shutdown.close_code,
                            "drain deadline")
            self.lifecycle.stop(StopReason.DEADLINE)
        elif now_mono >= self._next_tick:
            status = self._drain_status(now_mono)
            # a worker's own progress is detail: the main process logs the totals
            log.log(logging.DEBUG if self._worker else logging.INFO, "%s", status)
            self._notifier.progress(status, self._extend_seconds())
            self._next_tick = plan.next_tick(now_mono,
                                             self.ctx.config.shutdown.progress_interval)

    def _close_all(self, reason: str, code: int, text: str) -> None:
        for conn in self.ctx.registry.snapshot():
            conn.end(reason, code, text)

    async def _await_closed(self) -> None:
        """Give closing clients a few seconds for their close handshake, then abort.

        Another stop signal meanwhile aborts them at once.
        """
        registry = self.ctx.registry
        grace = FORCED_CLOSE_GRACE if self.lifecycle.stop_reason is StopReason.FORCED \
            else DEADLINE_CLOSE_GRACE
        give_up = time.monotonic() + grace
        while len(registry) and time.monotonic() < give_up:
            event = asyncio.ensure_future(self._events.get())
            empty = asyncio.ensure_future(registry.wait_empty())
            await asyncio.wait({event, empty}, timeout=give_up - time.monotonic(),
                               return_when=asyncio.FIRST_COMPLETED)
            empty.cancel()
            if not event.done():
                event.cancel()
            elif event.result()[0] == "signal" and event.result()[1] in STOP_SIGNALS:
                break
        if len(registry):
            log.info("aborting %d connections that did not finish closing", len(registry))
            for conn in registry.snapshot():
                conn.on_connection_close()
        log.info("stopped (%s)", self.lifecycle.stop_reason.value
                 if self.lifecycle.stop_reason else "normal")

    # -- reload ------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: re-read the configuration and apply the reloadable keys (a
        worker says it at DEBUG: its main process has logged the same once)."""
        reloaded = reload_config(self.ctx.config, self._reload_config,
                                 quiet=self._worker is not None)
        if reloaded is None:
            return
        self.ctx.config, changed = reloaded
        set_level(self.ctx.config.logging.level)
        if "broadcast.periodic_interval" in changed:
            self._periodic.restart()
        if any(key.startswith("keepalive.") for key in changed):
            self._keepalive.start()
        plan = self.lifecycle.drain
        if plan is not None and "shutdown.progress_interval" in changed:
            self._next_tick = plan.next_tick(time.monotonic(),
                                             self.ctx.config.shutdown.progress_interval)

    # -- teardown ----------------------------------------------------------------

    def _teardown(self, loop: asyncio.AbstractEventLoop) -> None:
        self.lifecycle.stop(StopReason.NORMAL)
        if self._handle_signals:
            unhandle_signals(loop)
        self._periodic.stop()
        self._keepalive.stop()
        self._gc_policy.stop()
        if self._watchdog is not None:
            self._watchdog.stop()
        for server in self._servers.values():
            server.stop()
        self._notifier.notify("STATUS=stopped")
        self._notifier.close()
        self._spare.close()
        if self._link is not None:
            self._link.close()
