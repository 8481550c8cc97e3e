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
from collections.abc import Callable, Iterator

from ebbcast.backplane import records
from ebbcast.backplane.centre import Channels
from ebbcast.backplane.channels import Answer, Ask, PresenceChange
from ebbcast.backplane.redischannels import channels_for
from ebbcast.config import Config
from ebbcast.core.metrics import Metrics
from ebbcast.core.waits import within
from ebbcast.process.workers import Worker

log = logging.getLogger(__name__)

#: Longest a direct message's answer waits for the workers to say what they reached.
DIRECT_ANSWER_SECONDS = 2.0


class ChannelDesk:
    """The channel records of every worker (``workers()``: every worker of every
    generation), and the ``ChannelSink`` of the instance's channels."""

    def __init__(self, workers: Callable[[], Iterator[Worker]], metrics: Metrics,
                 config: Config, instance: str = "") -> None:
        self._workers = workers
        self._metrics = metrics
        self.plane: Channels[Worker] = channels_for(config, self, instance)
        self._last_request = 0
        self._directs: dict[int, tuple[asyncio.Future[None], list[int], set[Worker]]] = {}

    def on_record(self, worker: Worker, record: records.Received) -> bool:
        """A worker's channel record handled; False for any other record."""
        match record:
            case records.ChannelPublish(channel, frame):  # the many: first
                self.plane.publish(channel, frame)
            case records.Subscribe(ask):
                self.plane.subscribe(worker, ask)
                self._counted()
            case records.Unsubscribe(channel, client_id):
                self.plane.unsubscribe(worker, channel, client_id)
                self._counted()
            case records.Delivered(request, connections):
                self._delivered(worker, request, connections)
            case _:
                return False
        return True

    def publish(self, channel: str, frame: str) -> int | None:
        """The admin API's publish: sequenced, and sent to the workers with a
        subscriber; how many subscribers the channel has on this instance (None:
        it cannot be published now)."""
        if not self.plane.publish(channel, frame):
            return None
        self._metrics.channel_messages.inc()
        return self.plane.subscribers(channel)

    # -- ChannelSink ---------------------------------------------------------------------

    def answer(self, member: Worker, answer: Answer) -> None:
        self._send([member], records.Subscribed(answer))

    def message(self, members: list[Worker], channel: str, frame: str) -> None:
        self._send(members, records.ChannelMessage(channel, frame))

    def tell(self, change: PresenceChange, members: list[Worker]) -> None:
        self._send(members, records.Presence(change))

    def direct(self, client_id: str, frame: str) -> None:
        """From another instance: to every worker (no answer is awaited)."""
        self._send(list(self._workers()), records.Direct(0, client_id, frame))

    def available(self, up: bool) -> None:
        """Every worker told whether a publish can go out now, so that its client
        gets the ``unavailable`` error rather than a publish lost on the way."""
        self._send(list(self._workers()), records.ChannelsUp(up))

    def introduce(self, worker: Worker) -> None:
        """A new worker told, if publishes cannot go out now (it assumes they can)."""
        if not self.plane.up:
            self._send([worker], records.ChannelsUp(False))

    def _send(self, members: list[Worker], record: records.Record) -> None:
        packed: list[bytes] = []

        def pack_once() -> bytes:
            if not packed:
                packed.append(records.pack(record))
            return packed[0]

        for worker in members:
            if not worker.take_channel(record, pack_once):
                self._metrics.backplane_dropped.inc()

    def direct_route(self, worker: Worker) -> DirectRoute:
        """The ``ChannelRoute`` of the worker inside the main process: calls."""
        return DirectRoute(self, worker)

    # -- workers come and go ---------------------------------------------------------------

    def worker_gone(self, worker: Worker) -> None:
        """``worker`` exited: each of its subscriptions ends (the others are told)."""
        self.plane.forget(worker)
        for done, _, waiting in list(self._directs.values()):
            waiting.discard(worker)
            if not waiting and not done.done():
                done.set_result(None)
        self._counted()

    def configured(self, config: Config) -> None:
        """A new generation's history.* (an upgrade)."""
        self.plane.configured(config)

    # -- the admin API (ebbcast.process.admin.ChannelAdmin) ------------------------------

    async def send_direct(self, client_id: str, frame: str) -> int:
        """``frame`` to every connection of ``client_id`` on every worker (and every
        other instance): how many it reached here (the workers that answered within
        DIRECT_ANSWER_SECONDS)."""
        self.plane.direct(client_id, frame)
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

    async def listing(self, limit: int) -> tuple[list[tuple[str, int]], int]:
        return await self.plane.listing(limit)

    async def presence(self, channel: str) -> tuple[int, list[str]]:
        return await self.plane.presence(channel)

    def _counted(self) -> None:
        self._metrics.channels.set(self.plane.channels)


class DirectRoute:
    """How the serving process inside the main process reaches its channels
    (``ebbcast.backplane.base.ChannelRoute``): by calls, where a worker of its own
    sends records; the answers come back by calls too (``LocalWorker.take_channel``)."""

    def __init__(self, desk: ChannelDesk, worker: Worker) -> None:
        self._desk = desk
        self._worker = worker

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def ask(self, ask: Ask) -> bool:
        self._desk.on_record(self._worker, records.Subscribe(ask))
        return True

    def leave(self, channel: str, client_id: str) -> None:
        self._desk.on_record(self._worker, records.Unsubscribe(channel, client_id))

    def publish(self, channel: str, frame: str) -> bool:
        return self._desk.plane.publish(channel, frame)  # on_record's, without the record
