"""The channel centre (ebbcast.backplane.centre) called directly: who is interested
in a channel, presence counted by subscription and told to the interested, a
member that goes leaving everything, answers and resumes, the listing."""

from __future__ import annotations

import itertools

from ebbcast.backplane.centre import ChannelCentre
from ebbcast.backplane.channels import Answer, Ask, ChannelSequencers, PresenceChange
from ebbcast.backplane.history import Resume


def centre(max_channels: int = 10) -> ChannelCentre[str]:
    epochs = (f"e{n}" for n in itertools.count(1))
    return ChannelCentre(ChannelSequencers(100, 0, max_channels, lambda: next(epochs)))


def test_a_channels_messages_go_only_to_the_members_with_a_subscriber() -> None:
    table = centre()
    table.subscribe("w1", Ask(1, "a", "alice"), 0.0)
    table.subscribe("w2", Ask(1, "b", "bob"), 0.0)
    sequenced, members = table.publish("a", '{"type":"message"}', 0.0)
    assert members == ["w1"] and sequenced.offset == 1
    assert table.publish("nobody", '{"type":"message"}', 0.0)[1] == []


def test_joins_are_told_to_every_interested_member_and_leaves_to_those_left() -> None:
    table = centre()
    answer, told = table.subscribe("w1", Ask(7, "a", "alice"), 0.0)
    assert answer == Answer(7, "a", "e1", 0)
    assert (told.change, told.members) == (PresenceChange("a", "alice", True), ["w1"])
    _, told = table.subscribe("w2", Ask(1, "a", "bob"), 0.0)
    assert told.members == ["w1", "w2"]
    leave = table.unsubscribe("w2", "a", "bob")
    assert leave is not None
    assert (leave.change, leave.members) == (PresenceChange("a", "bob", False), ["w1"])
    assert table.unsubscribe("w2", "a", "bob") is None  # not twice
    assert table.interested("a") == ["w1"]


def test_a_client_connected_twice_counts_twice_and_is_listed_once() -> None:
    table = centre()
    table.subscribe("w1", Ask(1, "a", "alice"), 0.0)
    table.subscribe("w2", Ask(1, "a", "alice"), 0.0)
    table.subscribe("w2", Ask(2, "a", "bob"), 0.0)
    assert (table.subscribers("a"), table.clients("a")) == (3, ["alice", "bob"])
    table.unsubscribe("w1", "a", "alice")
    assert (table.subscribers("a"), table.clients("a")) == (2, ["alice", "bob"])


def test_a_member_that_goes_leaves_every_channel_and_the_others_are_told() -> None:
    table = centre()
    table.subscribe("w1", Ask(1, "a", "alice"), 0.0)
    table.subscribe("w1", Ask(2, "b", "alice"), 0.0)
    table.subscribe("w2", Ask(1, "a", "bob"), 0.0)
    told = table.forget("w1")
    assert sorted((t.change.channel, tuple(t.members)) for t in told) == \
        [("a", ("w2",)), ("b", ())]
    assert table.listing(10) == [("a", 1)] and table.channels == 1


def test_a_resume_is_answered_from_the_channels_history() -> None:
    table = centre()
    table.subscribe("w1", Ask(1, "a", "alice"), 0.0)
    for n in range(3):
        table.publish("a", f'{{"n":{n}}}', 0.0)
    answer, _ = table.subscribe("w1", Ask(2, "a", "alice", Resume(1, "e1")), 0.0)
    assert answer == Answer(2, "a", "e1", 3, True, ('{"n":1,"offset":2}', '{"n":2,"offset":3}'))
    other, _ = table.subscribe("w1", Ask(3, "a", "bob", Resume(1, "e9")), 0.0)
    assert (other.recovered, other.frames) == (False, ())


def test_the_listing_is_largest_first_then_by_name_and_limited() -> None:
    table = centre()
    for channel, count in (("b", 1), ("a", 1), ("c", 3)):
        for n in range(count):
            table.subscribe("w1", Ask(n, channel, f"client{n}"), 0.0)
    assert table.listing(10) == [("c", 3), ("a", 1), ("b", 1)]
    assert table.listing(2) == [("c", 3), ("a", 1)]
