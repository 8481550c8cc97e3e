"""Channels in the main process: the centre of every worker of every generation.

Each worker asks the main process for its subscriptions (``Subscribe``), tells it
each one that ends (``Unsubscribe``) and hands it what its clients publish
(``ChannelPublish``). The main process keeps one ``ChannelCentre`` over them: a
channel's messages get their offsets here and go only to the workers with a
subscriber to it (interest), the joins and leaves likewise, and ``GET
/channels`` is answered from it. A worker that exits leaves every channel it was
in. A direct message goes to every worker, and the answer waits for each to say
how many connections it reached (the admin API's ``POST /clients/{id}/send``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator

from ebbcast.backplane import records
from ebbcast.backplane.centre import ChannelCentre, Told
from ebbcast.backplane.channels import Ask, ChannelSequencers
from ebbcast.config import Config
from ebbcast.core.metrics import Metrics
from ebbcast.core.waits import within
from ebbcast.process.workers import Worker

log = logging.getLogger(__name__)

#: Longest a direct message's answer waits for the workers to say what they reached.
DIRECT_ANSWER_SECONDS = 2.0


class ChannelDesk:
    """The channel records of every worker; ``workers()``: every worker of every
    generation."""

    def __init__(self, workers: Callable[[], Iterator[Worker]], metrics: Metrics,
                 config: Config) -> None:
        self._workers = workers
        self._metrics = metrics
        history = config.history
        self.centre: ChannelCentre[Worker] = ChannelCentre(
            ChannelSequencers(history.size, history.ttl, history.max_channels))
        self._last_request = 0
        self._directs: dict[int, tuple[asyncio.Future[None], list[int], set[Worker]]] = {}

    def on_record(self, worker: Worker, record: records.Received) -> bool:
        """A worker's channel record handled; False for any other record."""
        match record:
            case records.Subscribe(ask):
                self.subscribe(worker, ask)
            case records.Unsubscribe(channel, client_id):
                told = self.centre.unsubscribe(worker, channel, client_id)
                if told is not None:
                    self._tell(told)
            case records.ChannelPublish(channel, frame):
                self.publish(channel, frame, counted=False)
            case records.Delivered(request, connections):
                self._delivered(worker, request, connections)
            case _:
                return False
        return True

    def subscribe(self, worker: Worker, ask: Ask) -> None:
        answer, told = self.centre.subscribe(worker, ask, time.monotonic())
        if worker.link is not None:
            worker.link.send(records.Subscribed(answer))
        self._tell(told)
        self._counted()

    def publish(self, channel: str, frame: str, counted: bool = True) -> int:
        """Sequence ``frame`` in ``channel`` and send it to the workers with a
        subscriber; how many subscribers the channel has. ``counted``: it began
        here (the admin API), not in a worker, which counted it."""
        if counted:
            self._metrics.channel_messages.inc()
        sequenced, members = self.centre.publish(channel, frame, time.monotonic())
        if members:
            packed = records.pack(records.ChannelMessage(channel, sequenced.frame))
            for worker in members:
                if worker.link is None or not worker.link.send_packed(packed):
                    self._metrics.backplane_dropped.inc()
        return self.centre.subscribers(channel)

    def _tell(self, told: Told[Worker]) -> None:
        packed = records.pack(records.Presence(told.change))
        for worker in told.members:
            if worker.link is not None:
                worker.link.send_packed(packed)
        self._counted()

    def worker_gone(self, worker: Worker) -> None:
        """``worker`` exited: each of its subscriptions ends (the others are told)."""
        for told in self.centre.forget(worker):
            self._tell(told)
        for request, (done, _, waiting) in list(self._directs.items()):
            waiting.discard(worker)
            if not waiting and not done.done():
                done.set_result(None)
        self._counted()

    def configured(self, config: Config) -> None:
        """A new generation's history.* (an upgrade)."""
        history = config.history
        self.centre.sequencers.keep(history.size, history.ttl, history.max_channels)

    async def direct(self, client_id: str, frame: str) -> int:
        """``frame`` to every connection of ``client_id`` on every worker: how many
        it reached (those that answered within DIRECT_ANSWER_SECONDS)."""
        self._last_request += 1
        request = self._last_request
        waiting = set()
        packed = records.pack(records.Direct(request, client_id, frame))
        for worker in self._workers():
            if worker.alive and worker.link is not None and worker.link.send_packed(packed):
                waiting.add(worker)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        reached = [0]
        self._directs[request] = (done, reached, waiting)
        if not waiting:
            done.set_result(None)
        try:
            await within(done, DIRECT_ANSWER_SECONDS)
        except asyncio.TimeoutError:
            log.warning("a direct message: %d workers did not answer in time", len(waiting))
        finally:
            del self._directs[request]
        return reached[0]

    def _delivered(self, worker: Worker, request: int, connections: int) -> None:
        entry = self._directs.get(request)
        if entry is None:
            return
        done, reached, waiting = entry
        reached[0] += connections
        waiting.discard(worker)
        if not waiting and not done.done():
            done.set_result(None)

    def listing(self, limit: int) -> tuple[list[tuple[str, int]], int]:
        return self.centre.listing(limit), self.centre.channels

    def presence(self, channel: str) -> tuple[int, list[str]]:
        return self.centre.subscribers(channel), self.centre.clients(channel)

    def _counted(self) -> None:
        self._metrics.channels.set(self.centre.channels)
