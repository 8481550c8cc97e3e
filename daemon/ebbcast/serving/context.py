"""What the connections and handlers of one daemon process share, passed explicitly."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

from ebbcast.backplane.base import Backplane
from ebbcast.backplane.memory import MemoryBackplane
from ebbcast.config import Config
from ebbcast.core import frames
from ebbcast.core.lifecycle import DrainCause, Lifecycle
from ebbcast.core.metrics import Metrics
from ebbcast.serving.broadcasts import Broadcasts
from ebbcast.serving.channelhub import ChannelHub
from ebbcast.serving.fanout import Fanout
from ebbcast.serving.keepalive import Pingable
from ebbcast.serving.registry import ConnectionRegistry


class Client(Pingable, Protocol):
    """A client's connection as the serving process handles it
    (``ebbcast.serving.connection.Connection``)."""

    client_id: str

    def send_shutdown(self) -> None: ...
    def abort(self) -> None: ...


@dataclass
class DaemonContext:
    """The collaborators handlers receive through ``initialize()``.

    ``config`` is replaced (never mutated) when a SIGHUP reload applies new values,
    so handlers read it at the moment they need a setting.
    """

    config: Config
    lifecycle: Lifecycle
    registry: ConnectionRegistry[Client]
    fanout: Fanout
    metrics: Metrics
    node_id: str
    started_mono: float
    #: Submits, delivers and replays broadcasts.
    broadcasts: Broadcasts
    #: Each connection's channels (SPEC 14).
    channels: ChannelHub
    backplane: Backplane = field(default_factory=MemoryBackplane)
    rng: random.Random = field(default_factory=random.Random)
    #: Connections on the daemon's other worker processes, as last reported by
    #: the main process (0 without workers).
    elsewhere: int = 0

    def total_connections(self) -> int:
        """This process's connections plus the other workers': what clients are told."""
        return len(self.registry) + self.elsewhere

    def shutdown_frame(self) -> str:
        """The drain notice for one client, with its own reconnect delay: within
        0.5-5 s when the daemon stops (other instances may take the load), spread
        over shutdown.upgrade_spread when a new generation serves on this address."""
        plan = self.lifecycle.drain
        assert plan is not None
        if self.lifecycle.drain_cause is DrainCause.UPGRADE:
            spread_ms = int(self.config.shutdown.upgrade_spread * 1000)
            return frames.shutdown(plan.deadline_unix, self.rng.randint(0, spread_ms),
                                   reason="upgrade")
        return frames.shutdown(plan.deadline_unix, self.rng.randint(500, 5000),
                               self.backplane.peers())
