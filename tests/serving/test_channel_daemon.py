"""Channels in one serving process, over real sockets (SPEC 14): subscribe,
publish, unsubscribe, the limits and the token's claims, ``?channels=`` at the
handshake, resume per channel, presence, direct messages, the admin API and the
metrics; and the global stream as it was."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from ebbcast.core.waits import within
from helpers import STEP_TIMEOUT, recv_json, recv_until

KEY = "k" * 40
JWT = {"auth__mode": "jwt", "auth__jwt_key": KEY}
TOKEN = "secret-token"


def token(sub: str, **claims: Any) -> str:
    return jwt.encode({"sub": sub, "exp": time.time() + 60, **claims}, KEY.encode(),
                      algorithm="HS256")


async def client(d: Any, path: str = "") -> tuple[WebSocketClientConnection, dict[str, Any]]:
    conn = await d.connect(path)
    welcome = await recv_json(conn)
    assert welcome["type"] == "welcome"
    return conn, welcome


async def send(conn: WebSocketClientConnection, **command: Any) -> None:
    await conn.write_message(json.dumps(command))


async def subscribed(conn: WebSocketClientConnection, channel: str,
                     **options: Any) -> dict[str, Any]:
    await send(conn, type="subscribe", channel=channel, **options)
    answer = await recv_until(conn, "subscribed")
    assert answer["channel"] == channel
    return answer


async def admin_json(d: Any, path: str, method: str = "GET", body: str | None = None,
                     token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    response = await d.admin(path, method, body, token)
    return response.code, json.loads(response.body)


# -- subscribe, publish, unsubscribe ---------------------------------------------------

async def test_a_channel_message_reaches_its_subscribers_only_with_the_channels_offset(
        start_daemon: Any) -> None:
    d = await start_daemon()
    alice, _ = await client(d, "/alice")
    bob, _ = await client(d, "/bob")
    carol, _ = await client(d, "/carol")
    first = await subscribed(alice, "scores")
    assert set(first) == {"type", "channel", "epoch", "offset"} and first["offset"] == 0
    second = await subscribed(bob, "scores")
    assert (second["epoch"], second["offset"]) == (first["epoch"], 0)
    await send(carol, type="publish", channel="scores", text="1-0")
    for conn in (alice, bob):
        got = await recv_until(conn, "message")
        assert {k: got[k] for k in ("channel", "from", "text", "offset")} == \
            {"channel": "scores", "from": "carol", "text": "1-0", "offset": 1}
    # carol is not subscribed: the next frame she gets is a later global broadcast
    await carol.write_message("global")
    got = await recv_until(carol, "message")
    assert got["text"] == "global" and "channel" not in got
    # and the subscribers still get the global stream, with its own offsets
    glob = await recv_until(alice, "message")
    assert glob["text"] == "global" and "channel" not in glob


async def test_unsubscribe_stops_the_channel_and_commands_that_cannot_be_done_say_why(
        start_daemon: Any) -> None:
    d = await start_daemon()
    alice, _ = await client(d, "/alice")
    await subscribed(alice, "a")
    await subscribed(alice, "b")
    await send(alice, type="subscribe", channel="a")
    assert await recv_json(alice) == {"type": "error", "error": "already_subscribed",
                                      "channel": "a"}
    await send(alice, type="subscribe", channel="no spaces")
    assert await recv_json(alice) == {"type": "error", "error": "bad_channel",
                                      "channel": "no spaces"}
    await send(alice, type="unsubscribe", channel="a")
    assert await recv_json(alice) == {"type": "unsubscribed", "channel": "a",
                                      "reason": "client"}
    await send(alice, type="unsubscribe", channel="a")
    assert await recv_json(alice) == {"type": "error", "error": "not_subscribed",
                                      "channel": "a"}
    await send(alice, type="publish", channel="a", text="to a")
    await send(alice, type="publish", channel="b", text="to b")
    got = await recv_until(alice, "message")  # not "to a": she left a
    assert (got["channel"], got["text"]) == ("b", "to b")


async def test_a_json_frame_that_is_not_a_command_is_a_global_broadcast(
        start_daemon: Any) -> None:
    d = await start_daemon()
    alice, _ = await client(d, "/alice")
    text = json.dumps({"type": "chat", "channel": "a"})
    await alice.write_message(text)
    got = await recv_until(alice, "message")
    assert got["text"] == text and "channel" not in got


# -- limits and rights ----------------------------------------------------------------

async def test_over_either_limit_a_subscribe_gets_an_error_and_nothing_else_changes(
        start_daemon: Any) -> None:
    d = await start_daemon(channels__max_per_connection="2", channels__max="3")
    alice, _ = await client(d, "/alice")
    bob, _ = await client(d, "/bob")
    await subscribed(alice, "a")
    await subscribed(alice, "b")
    await send(alice, type="subscribe", channel="c")
    assert await recv_json(alice) == {"type": "error", "error": "too_many_channels",
                                      "channel": "c"}
    await subscribed(bob, "c")  # the third channel of the process
    await send(bob, type="subscribe", channel="d")
    assert await recv_json(bob) == {"type": "error", "error": "too_many_channels",
                                    "channel": "d"}
    await subscribed(bob, "a")  # a channel that has a subscriber already is no new one
    await send(bob, type="publish", channel="a", text="still open")
    assert (await recv_until(alice, "message"))["text"] == "still open"
    refused = d.daemon.metrics.subscribe_refused.labels("too_many_channels")._value.get()
    assert refused == 2


async def test_the_tokens_claims_bound_what_a_client_may_subscribe_and_publish_to(
        start_daemon: Any) -> None:
    d = await start_daemon(**JWT)
    fan, _ = await client(d, f"?token={token('fan', channels=['scores.*'])}")
    await send(fan, type="subscribe", channel="news")
    assert await recv_json(fan) == {"type": "error", "error": "forbidden", "channel": "news"}
    await subscribed(fan, "scores.match1")
    reporter, _ = await client(d, f"?token={token('reporter', publish=['scores.match1'])}")
    await reporter.write_message("global text")
    assert await recv_json(reporter) == {"type": "error", "error": "read_only"}
    await send(reporter, type="publish", channel="scores.match2", text="no")
    assert await recv_json(reporter) == {"type": "error", "error": "forbidden",
                                         "channel": "scores.match2"}
    await send(reporter, type="publish", channel="scores.match1", text="goal")
    got = await recv_until(fan, "message")
    assert (got["from"], got["text"]) == ("reporter", "goal")
    reader, _ = await client(d, f"?token={token('reader', publish=False)}")
    await send(reader, type="publish", channel="scores.match1", text="no")
    assert await recv_json(reader) == {"type": "error", "error": "forbidden",
                                       "channel": "scores.match1"}
    await subscribed(reader, "scores.match1")  # read-only still subscribes


async def test_without_tokens_client_publish_false_keeps_channels_to_the_admin_api(
        start_daemon: Any) -> None:
    d = await start_daemon(channels__client_publish="false")
    alice, _ = await client(d, "/alice")
    await subscribed(alice, "news")
    await send(alice, type="publish", channel="news", text="no")
    assert await recv_json(alice) == {"type": "error", "error": "forbidden",
                                      "channel": "news"}
    code, body = await admin_json(d, "/broadcast?channel=news", "POST", "headline")
    assert (code, body) == (202, {"recipients": 1})
    got = await recv_until(alice, "message")
    assert (got["from"], got["text"], got["offset"]) == ("admin", "headline", 1)
    await alice.write_message("global still works")
    assert (await recv_until(alice, "message"))["text"] == "global still works"


# -- ?channels= at the handshake ------------------------------------------------------------

async def test_channels_at_the_handshake_are_in_the_welcome_and_deliver_at_once(
        start_daemon: Any) -> None:
    d = await start_daemon()
    publisher, _ = await client(d, "/pub")
    await send(publisher, type="publish", channel="a", text="before")
    early, welcome = await client(d, "/early?channels=a,b")
    assert set(welcome["channels"]) == {"a", "b"}
    assert welcome["channels"]["a"]["offset"] == 1 and welcome["channels"]["b"]["offset"] == 0
    await send(publisher, type="publish", channel="b", text="after")
    got = await recv_until(early, "message")
    assert (got["channel"], got["text"], got["offset"]) == ("b", "after", 1)


@pytest.mark.parametrize("query, status, reason", [
    ("channels=ok,bad%20name", 400, "invalid channel: 'bad name'"),
    ("channels=a,b,c", 400, "too many channels: c"),
])
async def test_a_handshake_naming_a_channel_it_cannot_have_is_refused_naming_it(
        start_daemon: Any, query: str, status: int, reason: str) -> None:
    d = await start_daemon(channels__max_per_connection="2")
    await refused(d, f"?{query}", status, reason)


async def test_a_handshake_naming_a_forbidden_channel_is_refused_403(
        start_daemon: Any) -> None:
    d = await start_daemon(**JWT)
    await refused(d, f"?channels=scores.a,news&token={token('fan', channels=['scores.*'])}",
                  403, "forbidden channel: news")
    _, welcome = await client(d, f"?channels=scores.a&token={token('fan', channels=['scores.*'])}")
    assert set(welcome["channels"]) == {"scores.a"}


async def refused(d: Any, path: str, status: int, reason: str) -> None:
    with pytest.raises(HTTPClientError) as error:
        await within(websocket_connect(HTTPRequest(d.ws_url + path)), STEP_TIMEOUT)
    assert error.value.code == status
    assert error.value.response is not None and reason in error.value.response.body.decode()


# -- resume per channel ------------------------------------------------------------------

async def test_a_resume_into_a_channel_replays_exactly_what_was_missed(
        start_daemon: Any) -> None:
    d = await start_daemon()
    publisher, _ = await client(d, "/pub")
    alice, _ = await client(d, "/alice")
    first = await subscribed(alice, "c")
    for n in (1, 2):
        await send(publisher, type="publish", channel="c", text=f"m{n}")
        assert (await recv_until(alice, "message"))["offset"] == n
    alice.close()
    for n in (3, 4, 5):
        await send(publisher, type="publish", channel="c", text=f"m{n}")
    again, _ = await client(d, "/alice")
    answer = await subscribed(again, "c", since=2, epoch=first["epoch"])
    assert (answer["recovered"], answer["missed"], answer["offset"]) == (True, 3, 5)
    replayed = [await recv_json(again) for _ in range(3)]
    assert [(m["offset"], m["text"]) for m in replayed] == [(3, "m3"), (4, "m4"), (5, "m5")]
    await send(publisher, type="publish", channel="c", text="m6")
    assert (await recv_until(again, "message"))["offset"] == 6  # no gap, no repeat


async def test_a_resume_that_cannot_be_vouched_for_is_not_recovered(
        start_daemon: Any) -> None:
    d = await start_daemon(history__max_channels="1")
    publisher, _ = await client(d, "/pub")
    alice, _ = await client(d, "/alice")
    first = await subscribed(alice, "c")
    wrong = await subscribed(publisher, "c", since=0, epoch="not-the-epoch")
    assert (wrong["recovered"], "missed" in wrong) == (False, False)
    await send(publisher, type="publish", channel="other", text="pushes c out")
    back, _ = await client(d, "/back")
    lost = await subscribed(back, "c", since=0, epoch=first["epoch"])
    assert lost["recovered"] is False and lost["epoch"] != first["epoch"]


# -- presence, direct messages, the admin API -----------------------------------------

async def test_presence_joins_leaves_and_the_admin_view(start_daemon: Any) -> None:
    d = await start_daemon()
    watcher, _ = await client(d, "/watcher")
    await subscribed(watcher, "room", presence=True)
    assert await recv_json(watcher) == {"type": "join", "channel": "room",
                                        "client_id": "watcher"}
    bob, _ = await client(d, "/bob")
    await subscribed(bob, "room")
    assert await recv_json(watcher) == {"type": "join", "channel": "room", "client_id": "bob"}
    await subscribed(bob, "lobby")
    code, room = await admin_json(d, "/channels/room")
    assert (code, room) == (200, {"channel": "room", "subscribers": 2,
                                  "clients": ["bob", "watcher"]})
    code, listing = await admin_json(d, "/channels?limit=1")
    assert (code, listing) == (200, {"channels": [{"channel": "room", "subscribers": 2}],
                                     "total": 2})
    bob.close()
    assert await recv_json(watcher) == {"type": "leave", "channel": "room", "client_id": "bob"}
    code, room = await admin_json(d, "/channels/room")
    assert room["subscribers"] == 1 and room["clients"] == ["watcher"]
    assert (await d.admin("/channels")).code == 401
    assert (await admin_json(d, "/channels/bad%20name"))[0] == 400


async def test_a_direct_message_reaches_every_connection_of_that_client_id_only(
        start_daemon: Any) -> None:
    d = await start_daemon()
    bob1, _ = await client(d, "/bob")
    bob2, _ = await client(d, "/bob")
    alice, _ = await client(d, "/alice")
    code, body = await admin_json(d, "/clients/bob/send", "POST", "for bob")
    assert (code, body) == (202, {"delivered": 2})
    for conn in (bob1, bob2):
        got = await recv_json(conn)
        assert (got["type"], got["from"], got["text"]) == ("direct", "admin", "for bob")
    await admin_json(d, "/broadcast", "POST", "for all")
    assert (await recv_json(alice))["text"] == "for all"  # the direct never came to her
    assert (await admin_json(d, "/clients/nobody/send", "POST", "x")) == \
        (202, {"delivered": 0})
    assert (await d.admin("/clients/bob/send", "POST", "x", token=None)).code == 401


async def test_the_channel_metrics_count_channels_subscriptions_and_messages(
        start_daemon: Any) -> None:
    d = await start_daemon()
    alice, _ = await client(d, "/alice")
    bob, _ = await client(d, "/bob")
    await subscribed(alice, "a")
    await subscribed(bob, "a")
    await subscribed(bob, "b")
    await send(alice, type="publish", channel="b", text="x")
    await recv_until(bob, "message")
    await admin_json(d, "/clients/bob/send", "POST", "y")
    await send(bob, type="subscribe", channel="bad name")
    await recv_until(bob, "error")
    exposition = (await d.admin("/metrics")).body.decode()
    for line in ("ebbcast_channels 2.0", "ebbcast_subscriptions 3.0",
                 "ebbcast_channel_messages_total 1.0", "ebbcast_direct_messages_total 1.0",
                 'ebbcast_subscribe_refused_total{reason="bad_channel"} 1.0'):
        assert f"\n{line}\n" in exposition, line
