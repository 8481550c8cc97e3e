"""The order of a channel's messages in one instance on Redis
(ebbcast.backplane.channelstreams), called directly: held while a position is read,
released around the answer, a gap reported, nothing delivered twice."""

from __future__ import annotations

from ebbcast.backplane.channelstreams import Streams


def streams() -> tuple[Streams, list[tuple[str, str]]]:
    sent: list[tuple[str, str]] = []
    return Streams(lambda channel, frame: sent.append((channel, frame))), sent


def test_messages_held_for_a_position_go_out_up_to_it_before_and_the_rest_after() -> None:
    order, sent = streams()
    order.hold("c")
    for offset in (4, 5, 6):
        assert order.arrived("c", "e", offset, f"m{offset}")
    assert sent == []  # held while the position is read
    order.release("c", "e", 5, before=True)
    assert sent == [("c", "m4"), ("c", "m5")]  # up to the position: before the answer
    order.release("c", "e", 5, before=False)
    assert sent[2:] == [("c", "m6")]  # the last reader done: the rest
    assert order.arrived("c", "e", 7, "m7") and sent[-1] == ("c", "m7")


def test_a_second_reader_keeps_the_hold_until_it_is_answered_too() -> None:
    order, sent = streams()
    order.hold("c")
    order.hold("c")
    order.arrived("c", "e", 1, "m1")
    order.arrived("c", "e", 2, "m2")
    order.release("c", "e", 1, before=True)
    order.release("c", "e", 1, before=False)
    assert sent == [("c", "m1")]  # m2 waits for the second answer
    order.release("c", "e", 2, before=True)
    order.release("c", "e", 2, before=False)
    assert sent == [("c", "m1"), ("c", "m2")]


def test_a_gap_or_another_epoch_is_reported_and_nothing_is_delivered_twice() -> None:
    order, sent = streams()
    order.arrived("c", "e", 1, "m1")
    assert not order.arrived("c", "e", 3, "m3")  # 2 was missed: the caller catches up
    assert order.last["c"] == ("e", 1) and sent == [("c", "m1")]
    order.deliver("c", "e", 2, "m2")  # the catch-up
    order.release("c", "e", 2, before=True)
    order.release("c", "e", 2, before=False)
    order.deliver("c", "e", 2, "m2 again")  # live and catch-up overlapping
    assert sent == [("c", "m1"), ("c", "m2"), ("c", "m3")]
    assert not order.arrived("c", "f", 1, "new epoch")
