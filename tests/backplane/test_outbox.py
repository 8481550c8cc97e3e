"""What an instance keeps for Redis while it is away (``Outbox``), what receivers
make of a publisher's numbers (``Seen``), and how a serving process treats its own
broadcasts that Redis sequences after it delivered them (``Broadcasts``)."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CollectorRegistry

from ebbcast.backplane.history import History
from ebbcast.backplane.outbox import BACKLOG, ENTRY_COST, Outbox, Outgoing
from ebbcast.backplane.seen import Seen
from ebbcast.config import Config
from ebbcast.core.metrics import Metrics
from ebbcast.serving import broadcasts as broadcasts_module
from ebbcast.serving.broadcasts import Broadcasts


def frame(number: int, text: str = "x") -> Outgoing:
    return Outgoing(text, "client", number, False)


# -- Outbox ---------------------------------------------------------------------

def test_the_outbox_counts_each_frame_at_its_length_plus_the_entry_cost() -> None:
    outbox = Outbox(limit=2 * (ENTRY_COST + 10))
    ten = frame(1, "0123456789")
    assert outbox.fits(ten.cost, redis_up=False)
    outbox.put(ten)
    outbox.put(frame(2, "abcdefghij"))
    assert (len(outbox), outbox.bytes) == (2, 2 * (ENTRY_COST + 10))
    assert not outbox.fits(frame(3, "").cost, redis_up=False)  # full: not one more byte
    assert outbox.fits(0, redis_up=False)


def test_while_redis_is_up_the_outbox_holds_a_backlog_whatever_the_outage_buffer() -> None:
    outbox = Outbox(limit=0)  # keep nothing while Redis is away
    assert not outbox.fits(frame(1).cost, redis_up=False)
    assert outbox.fits(BACKLOG, redis_up=True) and not outbox.fits(BACKLOG + 1, redis_up=True)
    big = Outbox(limit=BACKLOG * 4)
    assert big.fits(BACKLOG * 4, redis_up=True)


def test_taking_gives_the_oldest_in_order_and_frees_their_bytes() -> None:
    outbox = Outbox(limit=10_000)
    for number in range(1, 6):
        outbox.put(frame(number))
    assert [f.number for f in outbox.take(3)] == [1, 2, 3]
    assert (len(outbox), outbox.bytes) == (2, 2 * (ENTRY_COST + 1))
    assert [f.number for f in outbox.take(10)] == [4, 5]
    assert (len(outbox), outbox.bytes) == (0, 0)


def test_a_batch_put_back_goes_first_in_its_order_even_past_the_limit() -> None:
    outbox = Outbox(limit=3 * (ENTRY_COST + 1))
    for number in (1, 2, 3):
        outbox.put(frame(number))
    batch = outbox.take(2)
    outbox.put(frame(4))
    outbox.put(frame(5))  # refilled while the batch was on its way
    outbox.put_back(batch)
    assert outbox.bytes == 5 * (ENTRY_COST + 1) > outbox.limit
    assert [f.number for f in outbox.take(10)] == [1, 2, 3, 4, 5]


def test_clearing_hands_back_what_was_never_published() -> None:
    outbox = Outbox(limit=10_000)
    outbox.put(frame(1))
    outbox.put(frame(2))
    assert [f.number for f in outbox.clear()] == [1, 2]
    assert (len(outbox), outbox.bytes) == (0, 0)


# -- Seen -----------------------------------------------------------------------

def test_a_raw_frame_at_or_below_the_highest_seen_is_a_repeat_and_gaps_are_counted() -> None:
    seen = Seen()
    assert seen.raw("a", 5) == 0  # the first seen from a: no gap to count
    assert seen.raw("a", 6) == 0
    assert seen.raw("a", 9) == 2  # 7 and 8 never arrived
    assert seen.raw("a", 8) is None  # a batch sent again: already past it
    assert seen.raw("a", 9) is None
    assert seen.raw("b", 1) == 0  # each publisher on its own
    assert seen.raw("a", 10) == 0


def test_a_token_seen_before_from_the_same_publisher_is_a_repeat() -> None:
    seen = Seen()
    assert [seen.repeated("a", t) for t in (1, 2, 4)] == [False, False, False]
    assert [seen.repeated("a", t) for t in (3, 4, 5)] == [True, True, False]
    assert seen.repeated("b", 3) is False


# -- Broadcasts: what comes back after it was delivered here --------------------

class FakeFanout:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def broadcast(self, payload: str, source: str, exclude: Any = None,
                  relayed: bool = False) -> int:
        self.sent.append(payload)
        return 1


class Sequencer:
    """Stands in for Redis: takes submissions while ``up``, and keeps them."""

    def __init__(self) -> None:
        self.up = True
        self.kept: list[tuple[str, int]] = []

    def submit(self, frame: str, source: str, token: int) -> bool:
        self.kept.append((frame, token))
        return self.up


def broadcasts() -> tuple[Broadcasts, FakeFanout, Sequencer]:
    fanout, sequencer = FakeFanout(), Sequencer()
    made = Broadcasts(History(100, 0), fanout, [object()], Metrics(CollectorRegistry()),  # type: ignore[arg-type]
                      Config, lambda payload, source: None, clock=lambda: 0.0)
    made.sequenced_by("e1", 0, sequencer)
    return made, fanout, sequencer


def texts(fanout: FakeFanout) -> list[str]:
    return [json.loads(sent).get("text", json.loads(sent)["type"]) for sent in fanout.sent]


def message(text: str) -> str:
    return json.dumps({"type": "message", "text": text})


def with_offset(text: str, offset: int) -> str:
    return json.dumps({"type": "message", "text": text, "offset": offset})


def test_a_broadcast_kept_while_redis_was_away_is_delivered_at_once_and_only_recorded_later(
        ) -> None:
    made, fanout, sequencer = broadcasts()
    made.submit(message("a"), "client")
    made.deliver_sequenced("e1", 1, with_offset("a", 1), "client", 1, own=True)
    sequencer.up = False
    made.submit(message("b"), "client")  # kept for Redis; delivered here now
    assert texts(fanout) == ["a", "b"]
    sequencer.up = True
    # Redis is back in a new epoch: b is sequenced there, and comes back
    made.deliver_sequenced("e2", 1, with_offset("b", 1), "client", 2, own=True)
    made.submit(message("c"), "client")
    made.deliver_sequenced("e2", 2, with_offset("c", 2), "client", 3, own=True)
    assert texts(fanout) == ["a", "b", "epoch", "c"]
    assert (made.history.epoch, made.history.latest) == ("e2", 2)


def test_a_broadcast_given_up_on_is_delivered_here_and_not_again_when_it_comes_back() -> None:
    made, fanout, _ = broadcasts()
    made.submit(message("a"), "client")
    made.sequencing_lost()  # e.g. the publish failed: delivered here, without an offset
    assert texts(fanout) == ["a"]
    made.deliver_sequenced("e1", 1, with_offset("a", 1), "client", 1, own=True)
    assert texts(fanout) == ["a"] and made.history.latest == 1


def test_a_repeat_takes_its_offset_and_reaches_no_client() -> None:
    made, fanout, _ = broadcasts()
    made.deliver_sequenced("e1", 1, with_offset("x", 1), "client", 7, own=False)
    made.deliver_sequenced("e1", 2, with_offset("x", 2), "client", 7, own=False, repeat=True)
    made.deliver_sequenced("e1", 3, with_offset("y", 3), "client", 8, own=False)
    assert texts(fanout) == ["x", "y"] and made.history.latest == 3


def test_more_broadcasts_in_flight_than_the_limit_delivers_the_oldest_here(
        monkeypatch: Any) -> None:
    monkeypatch.setattr(broadcasts_module, "IN_FLIGHT_LIMIT", 2)
    made, fanout, _ = broadcasts()
    for text in ("a", "b", "c"):
        made.submit(message(text), "client")
    assert texts(fanout) == ["a"]  # not back in time: here, without an offset
    for offset, text in enumerate("abc", start=1):
        made.deliver_sequenced("e1", offset, with_offset(text, offset), "client", offset,
                               own=True)
    assert texts(fanout) == ["a", "b", "c"]
