"""One serving process: its clients, its signals, and the drain.

A ``Daemon`` serves WebSocket clients in one process, in the role it is handed
(``Role``): on its own, or as a member under the main process
(``ebbcast.process.roles`` has both; this module never imports them).

Signal handlers only record the signal; the loop (``ebbcast.core.loop``) acts on it.
The drain, in order: the state becomes DRAINING, the public listener stops
accepting, every client gets the shutdown frame, and the clients keep being
served until the last one leaves (stop at once), the deadline passes (close with
shutdown.close_code), or a second stop signal arrives (close with 1001 now). A
drain for an upgrade (the main process's ``HandOver`` record) is the same, with
``"reason":"upgrade"`` in the shutdown frame; a stop signal then turns it into a
stop's drain, and the next one forces it. Once stopping, the clients still
closing get a few seconds for their close handshake, on the same loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from typing import Protocol

from tornado.httpserver import HTTPServer

from ebbcast.backplane.base import Backplane, ChannelRoute, SequencedFeed
from ebbcast.backplane.history import History
from ebbcast.backplane.names import RedisNames
from ebbcast.backplane.redis import RedisBackplane
from ebbcast.config import Config, ConfigError, is_reloadable, reload_config
from ebbcast.core.events import Common, DrainRequested, SignalReceived, Tick, who_asked
from ebbcast.core.lifecycle import (
    DEADLINE_CLOSE_GRACE,
    FORCED_CLOSE_GRACE,
    STOP_SIGNALS,
    DrainCause,
    Lifecycle,
    State,
    StopReason,
)
from ebbcast.core.logs import log_request, set_level
from ebbcast.core.loop import Loop, Progress, Step, common_step, extend_seconds
from ebbcast.core.metrics import Metrics
from ebbcast.core.sockets import LISTEN_BACKLOG, Spare, advertised_url, listener_url, tls_context
from ebbcast.serving.auth import TokenVerifier
from ebbcast.serving.broadcasts import Broadcasts
from ebbcast.serving.channelhub import ChannelHub
from ebbcast.serving.context import Client, DaemonContext
from ebbcast.serving.events import FanoutBroken, HandOver, NoConnections, ServingEvent
from ebbcast.serving.fanout import Fanout
from ebbcast.serving.gcpolicy import CollectorPolicy
from ebbcast.serving.handlers import (
    CATCH_UP_SECONDS,
    PublicRouter,
    PublicServer,
    public_application,
)
from ebbcast.serving.keepalive import Keepalive
from ebbcast.serving.periodic import PeriodicBroadcaster
from ebbcast.serving.registry import ConnectionRegistry
from ebbcast.serving.wire import open_http_connections

log = logging.getLogger(__name__)

#: After handing over, how long a generation with no clients left still waits for
#: the HTTP connections it had accepted (a handshake not yet read, a keep-alive
#: connection about to send one) before it exits; a handshake on one completes
#: and the client is told to move.
HANDOVER_GRACE = 2.0
#: Broadcast batches that may fail in a row before this process gives up: it
#: closes its clients (1011) and stops with exit 1, so that its supervisor (the
#: main process, or systemd) starts a fresh one instead of it serving broken.
FANOUT_FAILURE_LIMIT = 5
#: Caps on what the public listener reads before a handshake.
#: Tornado's limit for the request line and headers (it closes a longer request
#: unanswered); ebbcast.serving.handshake answers 431 from MAX_HEADER_BLOCK (16 KiB) on.
MAX_HEADER_BYTES = 64 * 1024
MAX_PUBLIC_BODY_BYTES = 64 * 1024


class Role(Protocol):
    """What differs between a process on its own and one under a main process
    (``ebbcast.process.roles``: Standalone, Member)."""

    #: The main process logs totals; a member says its own at DEBUG.
    quiet: bool
    #: Whether the kernel's signals are this process's (not inside the main process).
    takes_signals: bool
    #: Whether this process counts a Redis failover (every one sees it: one counts).
    counts_failovers: bool
    #: The daemon this process serves for: other instances tell it apart by this.
    instance: str

    def attach(self, daemon: Daemon) -> None:
        """Called once, first thing, as the serving process is built."""
    def public_sockets(self, spare: Spare) -> list[socket.socket]: ...
    def memory_backplane(self, metrics: Metrics) -> Backplane: ...
    def memory_sequencing(self, daemon: Daemon) -> None:
        """Who gives ``memory://`` broadcasts their offsets (``daemon.broadcasts``)."""
    def channel_route(self, daemon: Daemon) -> ChannelRoute:
        """Where this process's channel traffic goes (after ``attach``)."""
    def start(self, daemon: Daemon) -> None: ...
    def serving(self, daemon: Daemon) -> None: ...
    def report_count(self, count: int) -> None: ...
    def drain_progress(self, status: str, extend_seconds: float, first: bool) -> None:
        """The drain's progress, for whoever tells systemd (``first``: it began)."""
    def who_asked(self, asked: str) -> str:
        """Who started a drain or a stop, for the log, from who sent the event."""
    def close(self) -> None: ...


def client_tokens(config: Config) -> TokenVerifier | None:
    """The client token checks auth.* asks for (None: anyone may connect)."""
    auth = config.auth
    try:
        return TokenVerifier.from_settings(auth.mode, config.jwt_secret,
                                           auth.jwt_public_key_file, auth.audience,
                                           auth.leeway, config.files.public_keys or None)
    except ValueError as exc:
        raise ConfigError([("auth.jwt_public_key_file", str(exc))]) from None


class Daemon:
    """Runs one serving process until it has stopped; ``run()`` returns the
    StopReason. ``role``: on its own, or a member of a main process's daemon."""

    def __init__(self, config: Config, reload: Callable[[], Config], role: Role,
                 handle_signals: bool = True, metrics: Metrics | None = None) -> None:
        self._role = role
        self._loop: Loop[ServingEvent] = Loop(handle_signals and role.takes_signals)
        self.serving = asyncio.Event()
        self._tls = tls_context(config)
        self._reload_config = reload
        self.lifecycle = Lifecycle()
        self.metrics = metrics or Metrics()
        registry: ConnectionRegistry[Client] = ConnectionRegistry(
            self._on_count, key=lambda conn: conn.client_id)
        fanout = Fanout(registry, self.metrics,  # type: ignore[arg-type]
                        on_failing=self._on_fanout_failing)
        self.broadcasts = Broadcasts(
            History(config.history.size, config.history.ttl), fanout, registry, self.metrics,
            lambda: self.ctx.config,
            lambda payload, source: self.ctx.backplane.publish(payload, source))
        self.channels = ChannelHub(fanout, self.metrics, lambda: self.ctx.config,
                                   registry.keyed)  # type: ignore[arg-type]
        self.ctx = DaemonContext(
            config=config, lifecycle=self.lifecycle, registry=registry, fanout=fanout,
            metrics=self.metrics, node_id=f"{socket.gethostname()}:{os.getpid()}",
            started_mono=time.monotonic(),
            broadcasts=self.broadcasts, channels=self.channels)
        self.servers: dict[str, HTTPServer] = {}
        self.spare = Spare()  # a descriptor in reserve, see ebbcast.core.sockets
        self.urls: dict[str, str] = {}
        self.bound_ws = ""
        role.attach(self)
        self.channels.route = role.channel_route(self)
        self.ctx.backplane = self._make_backplane(config, role.counts_failovers)
        self._periodic = PeriodicBroadcaster(self.ctx)
        self._keepalive = Keepalive(registry, lambda: self.ctx.config)
        self._gc_policy = CollectorPolicy(lambda: len(registry),
                                          quiet=lambda: self.ctx.fanout.idle)
        self._public: list[socket.socket] = []
        self._progress = Progress()
        self._give_up = math.inf  # stopping: when closing clients are aborted

    # -- what a role asks (ebbcast.process.roles.Served) --------------------------

    @property
    def config(self) -> Config:
        return self.ctx.config

    @property
    def node_id(self) -> str:
        return self.ctx.node_id

    @property
    def started_mono(self) -> float:
        return self.ctx.started_mono

    def connection_count(self) -> int:
        return len(self.ctx.registry)

    def submit(self, payload: str, source: str) -> int:
        return self.broadcasts.submit(payload, source)

    def sequence_here(self) -> None:
        self.broadcasts.sequence_here()

    def _make_backplane(self, config: Config, counts_failovers: bool) -> Backplane:
        if config.backplane.url == "memory://":
            self.metrics.backplane_up.set(1)
            self._role.memory_sequencing(self)
            return self._role.memory_backplane(self.metrics)
        metrics = self.metrics
        redis = RedisBackplane(config.backplane.url, self.ctx.node_id,
                               names=RedisNames(config.backplane.prefix),
                               instance=self._role.instance, deliver=self.deliver_remote,
                               on_state=lambda up: metrics.backplane_up.set(1 if up else 0),
                               on_dropped=metrics.backplane_dropped.inc,
                               on_missed=metrics.backplane_missed.inc,
                               history=self.broadcasts, history_size=config.history.size,
                               outage_buffer=config.backplane.outage_buffer,
                               on_buffered=metrics.backplane_buffered.set,
                               on_failover=metrics.backplane_failovers.inc
                               if counts_failovers else lambda: None)
        self.broadcasts.sequencing = redis
        return redis

    # -- what the main process asks (ebbcast.backplane.relay.LinkPeer) -------------

    @property
    def feed(self) -> SequencedFeed:
        """Where broadcasts sequenced elsewhere go: this process's Broadcasts."""
        return self.broadcasts

    def route_channels(self, route: ChannelRoute) -> None:
        self.channels.route = route  # by calls, inside the main process (before any client)

    def deliver_remote(self, payload: str | bytes, source: str) -> None:
        """A frame another worker or instance sent: to this one's clients."""
        self.ctx.fanout.broadcast(payload, source, relayed=True)

    def inject(self, payload: str | bytes, source: str) -> None:
        """An admin broadcast the main process handed to this worker: submitted as
        a local client's frame would be."""
        self.broadcasts.submit(payload, source)

    def set_elsewhere(self, count: int) -> None:
        self.ctx.elsewhere = count

    def hand_over(self) -> None:
        self._loop.put(HandOver())

    def main_lost(self) -> None:
        self.broadcasts.sequencing_lost()
        if self.lifecycle.state is not State.STOPPING:
            log.warning("the main process is gone: draining")
            self.request_drain("the main process's exit")

    def record_signal(self, signum: int) -> None:
        """The signal handler (or the main process, for a member inside it): it
        records only; the loop acts."""
        self._loop.record_signal(signum)

    def request_drain(self, source: str) -> None:
        """Start the drain exactly as SIGTERM does; ``source`` names who asked."""
        self._loop.put(DrainRequested(source))

    # -- the loop (ebbcast.core.loop.LoopOwner) -----------------------------------

    async def run(self) -> StopReason:
        return await self._loop.run(self)

    def start(self) -> None:
        config = self.ctx.config
        scheme = "https" if self._tls else "http"
        self._public = self._role.public_sockets(self.spare)
        self._router = PublicRouter(self.ctx, public_application(self.ctx, log_request),
                                    client_tokens(config))
        self.servers["public"] = PublicServer(
            self._router,
            ssl_options=self._tls, xheaders=False,
            max_header_size=MAX_HEADER_BYTES, max_body_size=MAX_PUBLIC_BODY_BYTES,
            idle_connection_timeout=config.server.header_timeout,
            body_timeout=config.server.body_timeout)
        self.urls = {"ws": listener_url(scheme, self._public[0], config.server.ws_path),
                     "page": listener_url(scheme, self._public[0], "/")}
        self.bound_ws = ",".join(listener_url(scheme, s, config.server.ws_path)
                                 for s in self._public)
        self.ctx.backplane.advertise(advertised_url(
            config.server.public_url, self.urls["ws"].replace("http", "ws", 1)))
        self.ctx.backplane.start()
        self.channels.start()
        self._keepalive.start()
        self._gc_policy.start()
        self._role.start(self)

    def start_accepting(self) -> None:
        """Take connections from the public sockets (once)."""
        if self.lifecycle.state is not State.STARTING:
            return
        for sock in self._public:
            sock.listen(LISTEN_BACKLOG)  # a socket bound for a new generation may not be yet
        self.servers["public"].add_sockets(self._public)
        self.lifecycle.serve()
        self.serving.set()
        self._periodic.start()
        self._role.serving(self)

    def wake_at(self) -> float:
        return min(self._progress.next_at, self._give_up)

    def finished(self) -> bool:
        """Stopping, with every client closed or out of time to close."""
        return self.lifecycle.state is State.STOPPING and (
            len(self.ctx.registry) == 0 or time.monotonic() >= self._give_up)

    def act(self, event: ServingEvent | Common, now: float) -> None:
        if self.lifecycle.state is State.STOPPING:  # clients are closing
            if isinstance(event, SignalReceived) and event.signum in STOP_SIGNALS:
                self._give_up = now  # another stop signal: abort them now
            return
        match event:
            case SignalReceived() | DrainRequested() | Tick():
                self._common(event, now)
            case HandOver() if self.lifecycle.state is State.SERVING:
                self._begin_drain("the new generation", DrainCause.UPGRADE, now)
            case FanoutBroken(failures):
                log.error("broadcasts failed %d times in a row: closing every client and "
                          "stopping (exit 1), so that a fresh process takes over", failures)
                self.lifecycle.record(StopReason.FAILED)
                self._close_all("error", 1011, "internal error")
                self.lifecycle.stop(StopReason.FAILED)
        if self.lifecycle.state is State.DRAINING:
            self._drain_step(now)
        self._begin_closing(now)

    def _common(self, event: Common, now: float) -> None:
        step = common_step(event, self.lifecycle.state)
        if step is Step.RELOAD:
            self.reload()
        elif step is Step.UPGRADE:
            log.info("SIGUSR2 ignored: the main process runs upgrades")
        elif step in (Step.STOP_NOW, Step.DRAIN):
            assert isinstance(event, (SignalReceived, DrainRequested))
            asked = self._role.who_asked(who_asked(event))
            if step is Step.DRAIN:
                self._begin_drain(asked, DrainCause.STOP, now)
            else:
                log.info("%s before serving: stopping", asked)
                self.lifecycle.stop(StopReason.NORMAL)
        elif step is Step.STOP_SIGNAL_AGAIN and isinstance(event, SignalReceived):
            if self.lifecycle.escalate():
                log.info("%s while handing over: the drain goes on; another stop "
                         "signal closes the remaining clients now", event.name)
            elif self.lifecycle.state is State.DRAINING:
                log.info("%s during the drain: closing the remaining clients now", event.name)
                self._close_all("forced", 1001, "server stopping")
                self.lifecycle.stop(StopReason.FORCED)

    def _begin_closing(self, now: float) -> None:
        """Stopping: closing clients get a few seconds for their close handshake
        (less after a forced stop); handshakes still waiting to catch up are
        refused (503) now."""
        if self.lifecycle.state is not State.STOPPING or self._give_up != math.inf:
            return
        forced = self.lifecycle.stop_reason is StopReason.FORCED
        self._give_up = now + (FORCED_CLOSE_GRACE if forced else DEADLINE_CLOSE_GRACE)
        self._progress.stop()
        self.broadcasts.release_waiting()

    async def wind_down(self) -> None:
        await self._router.all_answered(CATCH_UP_SECONDS)
        registry = self.ctx.registry
        if len(registry):
            log.info("aborting %d connections that did not finish closing", len(registry))
            for conn in registry.snapshot():
                conn.abort()
        log.log(logging.DEBUG if self._role.quiet else logging.INFO, "stopped (%s)",
                self.lifecycle.stop_reason.value if self.lifecycle.stop_reason else "normal")

    async def teardown(self) -> None:
        self.lifecycle.stop(StopReason.NORMAL)
        self._periodic.stop()
        self._keepalive.stop()
        self._gc_policy.stop()
        for server in self.servers.values():
            server.stop()
        for sock in self._public:  # those a held member never got to serve
            sock.close()
        self._role.close()
        self.spare.close()
        await self.ctx.backplane.stop()
        await self.channels.stop()

    def _on_fanout_failing(self, in_a_row: int) -> None:
        if in_a_row == FANOUT_FAILURE_LIMIT:
            self._loop.put(FanoutBroken(in_a_row))

    def _on_count(self, count: int) -> None:
        self.metrics.connections.set(count)
        self._role.report_count(count)
        if count == 0 and self.lifecycle.state in (State.DRAINING, State.STOPPING):
            self._loop.put(NoConnections())

    # -- the drain ---------------------------------------------------------------

    def _begin_drain(self, source: str, cause: DrainCause, now_mono: float) -> None:
        plan = self.lifecycle.begin_drain(now_mono, time.time(),
                                          self.ctx.config.shutdown.drain_timeout, cause)
        if plan is None:
            return
        self.servers["public"].stop()  # closes this process's copies only
        if cause is DrainCause.STOP:  # handshakes waiting to catch up: refused now
            self.broadcasts.release_waiting()  # (handing over, they are still accepted)
        self.ctx.backplane.advertise(None)
        remaining = len(self.ctx.registry)
        if cause is DrainCause.UPGRADE:
            log.info("%s serves: handing over, %d connections told to move, %s", source,
                     remaining, plan.deadline_text())
        else:
            self.metrics.drain_started_at(plan.started_unix, plan.deadline_unix)
            log.info("drain started by %s: %d connections, %s", source, remaining,
                     plan.deadline_text())
        interval = self.ctx.config.shutdown.progress_interval
        self._role.drain_progress(self._drain_status(now_mono), extend_seconds(interval), True)
        if self.ctx.config.broadcast.envelope == "json":
            for conn in self.ctx.registry.snapshot():
                conn.send_shutdown()
        self._progress.schedule(plan, now_mono, interval)
        if cause is DrainCause.UPGRADE:  # look again when the grace ends
            self._progress.next_at = min(self._progress.next_at, now_mono + HANDOVER_GRACE)

    def _drain_status(self, now_mono: float) -> str:
        plan = self.lifecycle.drain
        assert plan is not None
        return plan.status(len(self.ctx.registry), now_mono)

    def _drain_step(self, now_mono: float) -> None:
        plan = self.lifecycle.drain
        assert plan is not None
        if len(self.ctx.registry) == 0 and not self._accepted_pending(now_mono):
            log.info("drain complete: no connections remain")
            self.lifecycle.finish_drain(now_mono)
        elif plan.expired(now_mono):
            log.info("drain deadline reached: closing %d connections with code %d",
                     len(self.ctx.registry), self.ctx.config.shutdown.close_code)
            self._close_all("drain_deadline", self.ctx.config.shutdown.close_code,
                            "drain deadline")
            self.lifecycle.finish_drain(now_mono)
        elif self._progress.due(now_mono):
            interval = self.ctx.config.shutdown.progress_interval
            status = self._drain_status(now_mono)
            log.log(logging.DEBUG if self._role.quiet else logging.INFO, "%s", status)
            self._role.drain_progress(status, extend_seconds(interval), False)
            self._progress.schedule(plan, now_mono, interval)

    def _accepted_pending(self, now_mono: float) -> bool:
        """While handing over: HTTP connections accepted before, within the grace."""
        plan = self.lifecycle.drain
        assert plan is not None
        return self.lifecycle.drain_cause is DrainCause.UPGRADE and \
            now_mono < plan.started_mono + HANDOVER_GRACE and \
            open_http_connections(self.servers["public"]) > 0

    def _close_all(self, reason: str, code: int, text: str) -> None:
        for conn in self.ctx.registry.snapshot():
            conn.end(reason, code, text)

    # -- reload ------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: re-read the configuration and apply the reloadable keys (a
        member says it at DEBUG: its main process has logged the same once)."""
        reloaded = reload_config(self.ctx.config, self._reload_config, quiet=self._role.quiet)
        if reloaded is None:
            return
        self.ctx.config, changed = reloaded
        set_level(self.ctx.config.logging.level)
        if "broadcast.periodic_interval" in changed:
            self._periodic.restart()
        if any(key.startswith("keepalive.") for key in changed):
            self._keepalive.start()
        if any(key.startswith("auth.") for key in changed):
            # checked as the configuration loaded: a new handshake meets the new keys,
            # and a connection already made keeps the grant it was given
            self._router.tokens = client_tokens(self.ctx.config)
        self._progress.reloaded(self.lifecycle, changed, time.monotonic(),
                                self.ctx.config.shutdown.progress_interval)
        # after the new log level is set: a reload to "debug" shows this line too
        log.debug("reload applied by this serving process: %s",
                  ", ".join(key for key in changed if is_reloadable(key)) or "no change")
