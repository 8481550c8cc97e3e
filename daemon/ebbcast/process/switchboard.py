"""What the main process does with its workers' records, and the offsets it gives.

Each worker's records (``ebbcast.backplane.records``) arrive here: a frame is
relayed to every other worker, a count or readiness is noted, a broadcast to
sequence gets its offset. With ``memory://`` the main process is the sequencer: it
gives each broadcast the next offset, keeps it in its history and hands it to every
worker of every generation, the sender's included, so every worker delivers in one
order; a worker starting is first told the epoch and the history so far. The
serving process that runs inside the main process gets all this by calls, and
sequences by calls too (``DirectSequencing``). It also tells each worker how many
connections the others have, for the ``connections`` of its frames.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from ebbcast.backplane import records
from ebbcast.backplane.base import Envelope
from ebbcast.backplane.records import Received, pack
from ebbcast.backplane.sequencer import Sequencer
from ebbcast.config import Config
from ebbcast.core.metrics import Metrics
from ebbcast.process.channeldesk import ChannelDesk
from ebbcast.process.workers import Worker


class DirectSequencing:
    """How the serving process inside the main process has its broadcasts
    sequenced (``ebbcast.backplane.base.Sequencing``): by a call, no relay link."""

    def __init__(self, switchboard: Switchboard, worker: Worker) -> None:
        self._switchboard = switchboard
        self._worker = worker

    def submit(self, frame: str, source: str, token: int) -> bool:
        self._switchboard.sequence(self._worker, "local", source, frame, token)
        return True


class Switchboard:
    """``workers()``: every worker of every generation; ``on_ready(worker)``: a
    worker said it is ready. ``sequencer``: None when Redis gives the offsets."""

    def __init__(self, workers: Callable[[], Iterator[Worker]], metrics: Metrics,
                 sequencer: Sequencer | None, on_ready: Callable[[Worker], None],
                 channels: ChannelDesk) -> None:
        self._workers = workers
        self._metrics = metrics
        self.sequencer = sequencer
        self.channels = channels
        self._on_ready = on_ready
        self._counts_changed = False

    def introduce(self, worker: Worker, hold: bool) -> None:
        """A worker's first records: the sequencer and its history, then ``Accept``,
        unless it is held for an upgrade (it is always started held, so it knows
        before its first client whether broadcasts are sequenced)."""
        link = worker.link
        assert link is not None
        if self.sequencer is not None:
            history, now = self.sequencer.history, time.monotonic()
            history.trim(now)
            kept = history.after(0, now)
            base = kept[0].offset - 1 if kept else history.latest
            worker.take_sequencer(history.epoch, base, kept,
                                  lambda: DirectSequencing(self, worker))
        worker.take_channels(lambda: self.channels.direct_route(worker))
        self.channels.introduce(worker)
        if not hold:
            link.send(records.Accept())

    def on_record(self, worker: Worker, record: Received) -> None:
        worker.last_heard = time.monotonic()
        match record:
            case records.Sequence(envelope):
                if self.sequencer is not None and isinstance(envelope.payload, str):
                    self.sequence(worker, envelope.node, envelope.source, envelope.payload,
                                  envelope.seq)
            case records.Frame():  # to every other worker, ready or still starting
                packed = pack(record)
                for other in self._workers():
                    if other is not worker and other.link is not None:
                        if not other.link.send_packed(packed):
                            self._metrics.backplane_dropped.inc()
            case records.Capabilities(names):
                worker.sequenced = records.OFFSETS in names
            case records.Count(connections):
                worker.connections = connections
                self.counts_changed()
            case records.Ready(version):
                worker.ready = True
                worker.version = version
                self.counts_changed()
                self._on_ready(worker)
            case _:  # after the global stream's records, which are the many
                self.channels.on_record(worker, record)

    def sequence(self, origin: Worker | None, node: str, source: str, frame: str,
                 token: int) -> None:
        """Give ``frame`` the next offset and hand it to every worker in that order
        (``origin`` sent it, with ``token``)."""
        assert self.sequencer is not None
        offset, sequenced = self.sequencer.sequence(frame, time.monotonic())
        envelope = Envelope(node, source, token, sequenced)
        packed: list[bytes] = []

        def pack_once() -> bytes:
            if not packed:
                packed.append(pack(records.Ordered(offset, envelope)))
            return packed[0]

        for worker in self._workers():
            if not worker.take_ordered(self.sequencer.epoch, offset, envelope,
                                       worker is origin, pack_once):
                self._metrics.backplane_dropped.inc()

    def inject(self, workers: list[Worker], payload: str) -> bool:
        """An admin broadcast handed to one ready worker of ``workers``, which
        delivers it to its clients and publishes it on; False if none took it."""
        for worker in workers:
            if worker.ready and worker.link is not None and \
                    worker.link.send(records.Inject(Envelope("main", "admin", 0, payload))):
                return True
        return False

    def configured(self, config: Config) -> None:
        """A new generation serves with ``config``: the history the main process
        keeps for every generation takes its history.* (``memory://``)."""
        if self.sequencer is not None:
            self.sequencer.keep(config.history.size, config.history.ttl)
        self.channels.configured(config)

    def worker_gone(self, worker: Worker) -> None:
        """A worker exited: its count is gone, and its subscriptions."""
        self.counts_changed()
        self.channels.worker_gone(worker)

    def counts_changed(self) -> None:
        """A worker's count changed, or a worker came or went: tell the others."""
        self._counts_changed = True

    def tell_counts(self) -> None:
        """Tell each ready worker the connections on all the others (if they changed)."""
        if not self._counts_changed:
            return
        self._counts_changed = False
        total = sum(w.connections for w in self._workers() if w.alive)
        for worker in self._workers():
            if worker.ready and worker.link is not None:
                worker.link.send(records.Others(total - worker.connections))
