"""What a serving process is for: on its own, or a member under the main process.

A serving process (``ebbcast.serving.process.Daemon``) is handed one role, an
object that satisfies its ``Role`` protocol; this module never imports it, and
sees it only as ``Served``, the few things a role asks of it:

- ``Standalone``: on its own, binding its listeners and the admin listener and
  speaking sd_notify itself (embedding, and the in-process tests);
- ``Member``: one of the serving processes under the main process
  (``ebbcast.process.supervisor``): a worker in a process of its own, or the one
  serving process of a single-process daemon, run inside the main process. It
  serves the sockets it is handed and talks to the main process over a relay link.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Protocol

from tornado.httpserver import HTTPServer

from ebbcast import __version__
from ebbcast.backplane.base import Backplane, ChannelFeed, ChannelRoute, SequencedFeed
from ebbcast.backplane.centre import Channels, LocalRoute
from ebbcast.backplane.memory import MemoryBackplane
from ebbcast.backplane.names import new_instance_id
from ebbcast.backplane.redischannels import channels_for
from ebbcast.backplane.relay import LinkPeer, LinkRoute, RelayBackplane, WorkerLink
from ebbcast.config import Config
from ebbcast.core.lifecycle import Lifecycle, State
from ebbcast.core.metrics import Metrics, Readiness
from ebbcast.core.sockets import ShedOnExhaustion, Spare, listener_url, say_if_unadvertised
from ebbcast.process.admin import admin_server, build_status
from ebbcast.process.listener import bind_listener
from ebbcast.process.notify import SystemdNotifier

log = logging.getLogger(__name__)


@dataclass
class WorkerSetup:
    """What a serving process gets from the main process (see
    ``ebbcast.process.supervisor``): its index and generation, its end of the relay
    link, its public sockets, and whether to wait for the main process's ACCEPT
    (``hold``: a new generation starts fully, then takes over) and whether it runs
    inside the main process (``local``: signals come from the main process's loop,
    not the kernel)."""

    index: int
    relay: socket.socket
    public: list[socket.socket]
    generation: int = 1
    hold: bool = False
    local: bool = False
    #: The id of the daemon (``ebbcast.backplane.names.new_instance_id``).
    instance: str = ""

    @property
    def name(self) -> str:
        return f"worker {self.index}" if self.generation == 1 else \
            f"worker {self.index} of generation {self.generation}"


class Served(LinkPeer, Protocol):
    """What a role sees of the serving process it is handed to."""

    lifecycle: Lifecycle
    metrics: Metrics
    spare: Spare
    servers: dict[str, HTTPServer]
    urls: dict[str, str]
    bound_ws: str

    @property
    def config(self) -> Config: ...
    @property
    def node_id(self) -> str: ...
    @property
    def started_mono(self) -> float: ...
    def connection_count(self) -> int: ...
    def submit(self, payload: str, source: str) -> int: ...
    def request_drain(self, source: str) -> None: ...
    @property
    def feed(self) -> SequencedFeed:
        """Where broadcasts sequenced elsewhere go."""
    @property
    def channels(self) -> ChannelFeed:
        """Where the answers of the channels' route go."""
    def sequence_here(self) -> None:
        """Give this process's broadcasts their offsets here (``memory://`` alone)."""


class Standalone:
    """Binds both listeners, accepts at once, speaks sd_notify."""

    quiet = False
    takes_signals = True
    counts_failovers = True

    def __init__(self, notifier: SystemdNotifier, config: Config) -> None:
        self.notifier = notifier
        self._config = config
        self._admin_urls = ""
        self.instance = new_instance_id()
        self.route: LocalRoute | None = None  # made in channel_route()

    def attach(self, served: Served) -> None:
        served.metrics.registry.register(
            Readiness(lambda: served.lifecycle.state is State.SERVING))

    def public_sockets(self, spare: Spare) -> list[socket.socket]:
        return bind_listener("public listener", self._config.server.host,
                             self._config.server.port, spare)

    def memory_backplane(self, metrics: Metrics) -> Backplane:
        return MemoryBackplane()

    def memory_sequencing(self, served: Served) -> None:
        served.sequence_here()

    def channel_route(self, served: Served) -> ChannelRoute:
        """Channels are decided here: this process is their one member."""
        route = self.route = LocalRoute(served.channels)
        route.channels = channels_for(served.config, route, self.instance)
        return route

    def start(self, served: Served) -> None:
        config = served.config
        admin = bind_listener("admin listener", config.admin.host, config.admin.port,
                              served.spare)
        assert self.route is not None and self.route.channels is not None
        server = admin_server(ProcessAdmin(served, LocalChannelAdmin(self.route.channels,
                                                                     served)))
        server.add_sockets(admin)
        served.servers["admin"] = server
        served.urls["admin"] = listener_url("http", admin[0])
        self._admin_urls = ",".join(listener_url("http", s) for s in admin)
        served.start_accepting()

    def serving(self, served: Served) -> None:
        log.info("ebbcast %s (pid %d) started", __version__, os.getpid())
        log.info("serving ws=%s admin=%s", served.bound_ws, self._admin_urls)
        say_if_unadvertised(served.config, served.bound_ws)
        self.notifier.ready(f"serving on {served.urls['ws']}")
        self.notifier.start_watchdog()

    def report_count(self, count: int) -> None:
        pass

    def drain_progress(self, status: str, extend_seconds: float, first: bool) -> None:
        if first:
            self.notifier.stopping(status)
        self.notifier.progress(status, extend_seconds)

    def who_asked(self, asked: str) -> str:
        return asked

    def close(self) -> None:
        self.notifier.notify("STATUS=stopped")
        self.notifier.close()


class LocalChannelAdmin:
    """The admin API's channels (``ebbcast.process.admin.ChannelAdmin``) of a
    process on its own: its own channels, its own connections."""

    def __init__(self, channels: Channels[str], served: Served) -> None:
        self._channels = channels
        self._served = served

    def publish(self, channel: str, frame: str) -> int | None:
        if not self._channels.publish(channel, frame):
            return None
        self._served.metrics.channel_messages.inc()
        return self._channels.subscribers(channel)

    async def send_direct(self, client_id: str, frame: str) -> int:
        self._channels.direct(client_id, frame)  # to the other instances
        return self._served.channels.direct(client_id, frame)

    async def listing(self, limit: int) -> tuple[list[tuple[str, int]], int]:
        return await self._channels.listing(limit)

    async def presence(self, channel: str) -> tuple[int, list[str]]:
        return await self._channels.presence(channel)


class ProcessAdmin:
    """The admin backend (``ebbcast.process.admin.AdminBackend``) of a process on its own."""

    def __init__(self, served: Served, channels: LocalChannelAdmin) -> None:
        self._served = served
        self.channels = channels

    @property
    def config(self) -> Config:
        return self._served.config

    @property
    def state(self) -> State:
        return self._served.lifecycle.state

    def status_report(self, now_mono: float) -> dict[str, Any]:
        served = self._served
        return build_status(served.lifecycle, served.started_mono, now_mono,
                            [(os.getpid(), served.connection_count())])

    def exposition(self) -> bytes:
        return self._served.metrics.exposition()

    def broadcast(self, payload: str) -> int:
        return self._served.submit(payload, "admin")

    def request_drain(self, source: str) -> None:
        self._served.request_drain(source)

    def request_upgrade(self, source: str) -> str | None:
        return "this process serves on its own, with no main process to run an upgrade"


class Member:
    """Serves the sockets the main process handed over; reports over the link."""

    quiet = True

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup = setup
        self.link: WorkerLink | None = None
        #: inside the main process, signals come from its loop
        self.takes_signals = not setup.local
        #: every serving process sees a Redis failover: the first one counts it
        self.counts_failovers = setup.index == 0
        self.instance = setup.instance or new_instance_id()

    def attach(self, served: Served) -> None:
        self.link = WorkerLink(self.setup.relay, served.node_id, served, served.feed,
                               served.channels)

    def public_sockets(self, spare: Spare) -> list[socket.socket]:
        return [ShedOnExhaustion.adopt(sock, spare) for sock in self.setup.public]

    def memory_backplane(self, metrics: Metrics) -> Backplane:
        assert self.link is not None
        return RelayBackplane(self.link, metrics.backplane_dropped.inc)

    def memory_sequencing(self, served: Served) -> None:
        pass  # the main process says so first, if it sequences (ebbcast.backplane.relay)

    def channel_route(self, served: Served) -> ChannelRoute:
        """The main process decides channels for every worker of every generation."""
        assert self.link is not None
        return LinkRoute(self.link)

    def start(self, served: Served) -> None:
        assert self.link is not None
        self.link.start()
        if not self.setup.hold:
            served.start_accepting()
        self.link.ready(__version__)

    def serving(self, served: Served) -> None:
        # inside the main process, its "serving ws=..." says it
        log.log(logging.DEBUG if self.setup.local else logging.INFO, "%s (pid %d) serving",
                self.setup.name, os.getpid())

    def report_count(self, count: int) -> None:
        if self.link is not None:
            self.link.report_count(count)

    def drain_progress(self, status: str, extend_seconds: float, first: bool) -> None:
        pass  # the main process tells systemd, with the totals

    def who_asked(self, asked: str) -> str:
        """A member stops only when its main process tells it (with a signal, however
        the main process was asked: a signal, POST /drain, ...)."""
        return f"the main process ({asked})"

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
