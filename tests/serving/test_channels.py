"""Channels without I/O (ebbcast.serving.channels): names, the client's commands,
what a token's claims allow, and the subscription table with its limits and its
interest (first and last local subscriber)."""

from __future__ import annotations

import json

import pytest

from ebbcast.serving.channels import (
    BadCommand,
    ChannelRights,
    Publish,
    Refused,
    Subscribe,
    Subscriptions,
    Unsubscribe,
    read_command,
    valid_channel,
)


@pytest.mark.parametrize("name, valid", [
    ("scores", True), ("a", True), ("user:42@eu-west.1_x", True), ("x" * 128, True),
    ("", False), ("x" * 129, False), ("with space", False), ("slash/no", False),
    ("é", False), (42, False), (None, False),
])
def test_a_channel_name_is_1_to_128_of_the_allowed_characters(name: object,
                                                             valid: bool) -> None:
    assert valid_channel(name) is valid


@pytest.mark.parametrize("frame, command", [
    ({"type": "subscribe", "channel": "c"}, Subscribe("c")),
    ({"type": "subscribe", "channel": "c", "since": 4, "epoch": "e", "presence": True},
     Subscribe("c", 4, "e", True)),
    ({"type": "unsubscribe", "channel": "c"}, Unsubscribe("c")),
    ({"type": "publish", "channel": "c", "text": "hi"}, Publish("c", "hi")),
    ({"type": "subscribe", "channel": "bad name"}, BadCommand("bad_channel", "bad name")),
    ({"type": "publish", "channel": 7, "text": "x"}, BadCommand("bad_channel")),
    ({"type": "publish", "channel": "c"}, BadCommand("bad_command", "c")),
    ({"type": "subscribe", "channel": "c", "since": 4}, BadCommand("bad_command", "c")),
    ({"type": "subscribe", "channel": "c", "since": -1, "epoch": "e"},
     BadCommand("bad_command", "c")),
    ({"type": "subscribe", "channel": "c", "since": True, "epoch": "e"},
     BadCommand("bad_command", "c")),
    ({"type": "subscribe", "channel": "c", "presence": "yes"}, BadCommand("bad_command", "c")),
])
def test_a_command_is_read_or_refused_for_what_is_wrong(frame: dict[str, object],
                                                        command: object) -> None:
    assert read_command(json.dumps(frame)) == command


@pytest.mark.parametrize("text", [
    "hello", "", "{not json", "[1, 2]", '{"type": "message", "text": "x"}', '{"text": "x"}',
    '"subscribe"', "{" * 100_000,
])
def test_every_other_text_frame_is_a_global_broadcast(text: str) -> None:
    assert read_command(text) is None


def test_without_claims_a_client_may_do_anything_unless_configured_otherwise() -> None:
    rights = ChannelRights.from_claims(None, None)
    assert isinstance(rights, ChannelRights)
    assert rights.subscribe.allow("any") and rights.may_publish("any") and rights.publish_global
    closed = ChannelRights.from_claims(None, None, client_publish=False)
    assert isinstance(closed, ChannelRights)
    assert closed.subscribe.allow("any") and not closed.may_publish("any")
    assert closed.publish_global  # channels.client_publish leaves the global stream be


def test_the_channels_claim_bounds_subscribing_and_publishing() -> None:
    rights = ChannelRights.from_claims(["lobby", "match.*"], None)
    assert isinstance(rights, ChannelRights)
    assert [rights.subscribe.allow(c) for c in ("lobby", "match.7", "match", "lobby2")] == \
        [True, True, False, False]
    assert rights.may_publish("match.7") and not rights.may_publish("other")


def test_publish_keeps_its_boolean_meaning_or_names_channels() -> None:
    read_only = ChannelRights.from_claims(None, False)
    assert isinstance(read_only, ChannelRights)
    assert not read_only.publish_global and not read_only.may_publish("c")
    assert read_only.subscribe.allow("c")
    listed = ChannelRights.from_claims(["a", "b.*"], ["b.*"])
    assert isinstance(listed, ChannelRights)
    assert not listed.publish_global  # a list: those channels only
    assert listed.may_publish("b.1") and not listed.may_publish("a")


@pytest.mark.parametrize("channels, publish", [
    ("lobby", None), ([1], None), (["bad name"], None), (None, "yes"), (None, [3]),
])
def test_claims_that_cannot_be_read_say_why(channels: object, publish: object) -> None:
    assert isinstance(ChannelRights.from_claims(channels, publish), str)


def test_subscriptions_keep_each_channels_subscribers_and_forget_an_empty_channel() -> None:
    table: Subscriptions[str] = Subscriptions(10, 100)
    assert table.subscribe("a", "c") is None and table.subscribe("b", "c") is None
    assert table.subscribe("a", "c") is None  # again: nothing changes
    assert (table.subscribers("c"), table.subscriptions, table.channels) == (("a", "b"), 2, 1)
    assert table.unsubscribe("a", "c") and not table.unsubscribe("a", "c")
    table.subscribe("b", "d")
    assert (table.subscribers("c"), table.channels) == (("b",), 2)
    assert sorted(table.drop("b")) == ["c", "d"]
    assert (table.channels, table.subscriptions, table.counts()) == (0, 0, {})


def test_the_limits_and_the_claims_refuse_a_subscription_and_change_nothing() -> None:
    table: Subscriptions[str] = Subscriptions(max_per_connection=2, max_channels=3)
    for channel in ("x", "y"):
        assert table.subscribe("a", channel) is None
    assert table.subscribe("a", "z") == Refused("too_many_channels")
    assert table.subscribe("b", "z") is None
    assert table.subscribe("b", "w") == Refused("too_many_channels")  # 3 channels here
    assert table.subscribe("b", "x") is None  # an existing channel still takes him
    rights = ChannelRights.from_claims(["x"], None)
    assert isinstance(rights, ChannelRights)
    assert table.subscribe("c", "y", rights) == Refused("forbidden")
    assert table.counts() == {"x": 2, "y": 1, "z": 1}
    assert table.channels_of("a") == ("x", "y")
