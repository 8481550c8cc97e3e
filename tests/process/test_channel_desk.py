"""The main process's channels (ebbcast.process.channeldesk) with fake workers: a
channel's messages and presence reach only the workers with a subscriber
(interest), a worker that exits leaves its channels, a direct message adds up
every worker's answer."""

from __future__ import annotations

import asyncio
from typing import Any

from ebbcast.backplane import records
from ebbcast.backplane.centre import MemoryChannels
from ebbcast.backplane.channels import Ask
from ebbcast.backplane.relay import Unpacker
from ebbcast.config import Config
from ebbcast.core.metrics import Metrics
from ebbcast.process.channeldesk import ChannelDesk
from ebbcast.process.workers import Worker


class FakeLink:
    """What a worker's link was sent, as records."""

    def __init__(self) -> None:
        self.sent: list[records.Received] = []

    def send(self, record: records.Record) -> bool:
        return self.send_packed(records.pack(record))

    def send_packed(self, packed: bytes) -> bool:
        self.sent.extend(records.parse(kind, body) for kind, body in Unpacker().feed(packed))
        return True

    def kinds(self) -> list[str]:
        return [type(record).__name__ for record in self.sent]


class FakeWorker(Worker):
    def __init__(self, index: int) -> None:
        super().__init__(index, [])
        self.link = FakeLink()  # type: ignore[assignment]

    @property
    def alive(self) -> bool:
        return True

    @property
    def sent(self) -> FakeLink:
        assert isinstance(self.link, FakeLink)
        return self.link


def desk_of(workers: list[FakeWorker]) -> ChannelDesk:
    return ChannelDesk(lambda: iter(workers), Metrics(), Config())


def test_a_channel_message_goes_only_to_workers_with_a_subscriber() -> None:
    w0, w1, w2 = workers = [FakeWorker(i) for i in range(3)]
    desk = desk_of(workers)
    desk.on_record(w0, records.Subscribe(Ask(1, "a", "alice")))
    desk.on_record(w1, records.Subscribe(Ask(1, "b", "bob")))
    desk.on_record(w2, records.ChannelPublish("a", '{"type":"message","channel":"a"}'))
    assert desk.publish("b", '{"type":"message","channel":"b"}') == 1
    assert w0.sent.kinds() == ["Subscribed", "Presence", "ChannelMessage"]
    assert w1.sent.kinds() == ["Subscribed", "Presence", "ChannelMessage"]  # b's, not a's
    assert w2.sent.kinds() == []  # the publisher has no subscriber: nothing comes back
    message = w0.sent.sent[2]
    assert isinstance(message, records.ChannelMessage) and '"offset":1' in message.frame


def test_the_last_subscriber_of_a_worker_leaving_ends_its_interest() -> None:
    w0, w1 = workers = [FakeWorker(i) for i in range(2)]
    desk = desk_of(workers)
    desk.on_record(w0, records.Subscribe(Ask(1, "a", "alice")))
    desk.on_record(w1, records.Subscribe(Ask(1, "a", "bob")))
    desk.on_record(w0, records.Unsubscribe("a", "alice"))
    before = len(w0.sent.sent)
    assert desk.publish("a", '{"type":"message"}') == 1
    assert len(w0.sent.sent) == before and w1.sent.kinds()[-1] == "ChannelMessage"


def test_a_worker_that_exits_leaves_its_channels_and_the_others_see_it_leave() -> None:
    w0, w1 = workers = [FakeWorker(i) for i in range(2)]
    desk = desk_of(workers)
    desk.on_record(w0, records.Subscribe(Ask(1, "a", "alice")))
    desk.on_record(w1, records.Subscribe(Ask(1, "a", "bob")))
    desk.worker_gone(w0)
    leave = w1.sent.sent[-1]
    assert isinstance(leave, records.Presence)
    assert (leave.change.client_id, leave.change.joined) == ("alice", False)
    plane = desk.plane
    assert isinstance(plane, MemoryChannels)
    assert (plane.centre.subscribers("a"), plane.centre.clients("a")) == (1, ["bob"])


def test_a_direct_message_adds_up_what_each_worker_reached(io_loop: Any) -> None:
    w0, w1 = workers = [FakeWorker(i) for i in range(2)]
    desk = desk_of(workers)

    async def send() -> int:
        asking = asyncio.ensure_future(desk.send_direct("bob", '{"type":"direct"}'))
        await asyncio.sleep(0)
        for worker, reached in ((w0, 2), (w1, 1)):
            direct = worker.sent.sent[-1]
            assert isinstance(direct, records.Direct) and direct.client_id == "bob"
            desk.on_record(worker, records.Delivered(direct.request, reached))
        return await asking

    assert io_loop.run_sync(send) == 3
