"""A serving process's channels (``ChannelHub``) against a route that answers only
when the test says: what an answer that comes late, or never, leaves behind."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry

from ebbcast.backplane.channels import Answer, Ask
from ebbcast.config import Config
from ebbcast.core.metrics import Metrics
from ebbcast.serving.channelhub import ChannelHub
from ebbcast.serving.channels import ChannelRights, Subscribe
from ebbcast.serving.fanout import Fanout
from ebbcast.serving.registry import ConnectionRegistry


class Client:
    """Stands in for a connection: the frames written to it, as JSON."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.rights = ChannelRights()
        self.frames: list[dict[str, object]] = []

    def send_text(self, text: str) -> None:
        self.frames.append(json.loads(text))

    def send_frame(self, frame: bytes) -> bool:
        return True


class SlowRoute:
    """Keeps every ask; answers nothing by itself."""

    def __init__(self) -> None:
        self.asks: list[Ask] = []
        self.left: list[tuple[str, str]] = []

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def ask(self, ask: Ask) -> bool:
        self.asks.append(ask)
        return True

    def leave(self, channel: str, client_id: str) -> None:
        self.left.append((channel, client_id))

    def publish(self, channel: str, frame: str) -> bool:
        return True


def hub_with(route: SlowRoute) -> ChannelHub:
    metrics = Metrics(CollectorRegistry())
    registry: ConnectionRegistry[Client] = ConnectionRegistry()
    hub = ChannelHub(Fanout(registry, metrics), metrics,  # type: ignore[arg-type]
                     Config, lambda client_id: ())
    hub.route = route
    return hub


def answer(ask: Ask, offset: int) -> Answer:
    return Answer(ask.request, ask.channel, "E", offset)


def test_a_subscription_ended_before_its_answer_leaves_nothing_waiting() -> None:
    route = SlowRoute()
    hub = hub_with(route)
    alice, bob = Client("alice"), Client("bob")
    assert hub.subscribe(alice, Subscribe("room")) is None
    assert hub.subscribe(bob, Subscribe("room")) is None
    assert hub.unanswered == 2
    hub.unsubscribe(alice, "room")
    hub.closed(bob)  # the route may never answer these: nothing is kept for them
    assert hub.unanswered == 0
    assert route.left == [("room", "alice"), ("room", "bob")]
    for ask in route.asks:  # and if it answers after all, no one is written to
        hub.answered(answer(ask, 1))
    assert alice.frames == [] and bob.frames == []


def test_an_answer_to_an_earlier_subscription_is_not_taken_for_the_new_one() -> None:
    route = SlowRoute()
    hub = hub_with(route)
    alice = Client("alice")
    hub.subscribe(alice, Subscribe("room"))
    hub.unsubscribe(alice, "room")
    hub.subscribe(alice, Subscribe("room"))
    first, second = route.asks
    hub.answered(answer(first, 1))  # late: for the subscription that ended
    assert alice.frames == [] and hub.unanswered == 1
    hub.answered(answer(second, 7))
    assert alice.frames == [{"type": "subscribed", "channel": "room", "epoch": "E",
                             "offset": 7}]
    assert hub.unanswered == 0
