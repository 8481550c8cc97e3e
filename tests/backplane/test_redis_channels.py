"""Channels across instances on a real redis-server (SPEC 14 with ``redis://``): one
order per channel for the cluster, presence and joins across instances, direct
messages to another instance, resume on another instance, interest visible in
``PUBSUB``, ``history.max_channels`` for the cluster, a Redis restart, the token's
claims, and the limits and ``?channels=`` on each instance."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from ebbcast.core.waits import within
from helpers import STEP_TIMEOUT, recv_json, recv_until, wait_until

TOKEN = "secret-token"


async def pair(start_daemon: Any, redis_server: Any, **overrides: str) -> tuple[Any, Any]:
    one = await start_daemon(backplane__url=redis_server.url, **overrides)
    two = await start_daemon(backplane__url=redis_server.url, **overrides)
    return one, two


async def recv_next(conn: Any) -> dict[str, Any]:
    """The next frame but the global stream's epoch frames (an instance that
    connected to Redis after its first client tells it of the epoch)."""
    while True:
        frame = await recv_json(conn)
        if frame["type"] != "epoch" or "channel" in frame:
            return frame


async def client(d: Any, path: str) -> Any:
    conn = await d.connect(path)
    assert (await recv_json(conn))["type"] == "welcome"
    return conn


async def subscribed(conn: Any, channel: str, **options: Any) -> dict[str, Any]:
    await conn.write_message(json.dumps({"type": "subscribe", "channel": channel,
                                         **options}))
    answer = await recv_until(conn, "subscribed")
    assert answer["channel"] == channel
    return answer


async def publish(conn: Any, channel: str, text: str) -> None:
    await conn.write_message(json.dumps({"type": "publish", "channel": channel,
                                         "text": text}))


async def admin_json(d: Any, path: str, method: str = "GET",
                     body: str | None = None) -> tuple[int, Any]:
    response = await d.admin(path, method, body, TOKEN)
    return response.code, json.loads(response.body)


def subscribers_in_redis(redis_server: Any, channel: str) -> int:
    """How many Redis connections are subscribed to ``channel`` (one per instance
    with a subscriber)."""
    [(_, count)] = redis_server.client().pubsub_numsub(f"ebbcast:c/{channel}")
    return int(count)


async def test_a_channel_is_one_conversation_across_instances(start_daemon: Any,
                                                             redis_server: Any) -> None:
    one, two = await pair(start_daemon, redis_server)
    alice = await client(one, "/alice")
    bob = await client(two, "/bob")
    first = await subscribed(alice, "room", presence=True)
    assert await recv_next(alice) == {"type": "join", "channel": "room", "client_id": "alice"}
    second = await subscribed(bob, "room")
    assert (second["epoch"], second["offset"]) == (first["epoch"], 0)
    assert await recv_next(alice) == {"type": "join", "channel": "room", "client_id": "bob"}
    await publish(bob, "room", "from two")
    await publish(alice, "room", "from one")
    seen = []
    for conn in (alice, bob):
        seen.append([await recv_until(conn, "message") for _ in range(2)])
    assert seen[0] == seen[1]  # the same messages, in the same order, on both instances
    assert [m["offset"] for m in seen[0]] == [1, 2]
    assert sorted(m["text"] for m in seen[0]) == ["from one", "from two"]
    await wait_until(lambda: subscribers_in_redis(redis_server, "room") == 2)
    await wait_for_presence(one, "room", {"channel": "room", "subscribers": 2,
                                          "clients": ["alice", "bob"]})
    code, listing = await admin_json(two, "/channels")
    assert (code, listing) == (200, {"channels": [{"channel": "room", "subscribers": 2}],
                                     "total": 1})
    bob.close()
    assert await recv_next(alice) == {"type": "leave", "channel": "room", "client_id": "bob"}
    await wait_for_presence(one, "room", {"channel": "room", "subscribers": 1,
                                          "clients": ["alice"]})


async def wait_for_presence(d: Any, channel: str, expected: dict[str, Any]) -> None:
    for _ in range(200):
        code, body = await admin_json(d, f"/channels/{channel}")
        if (code, body) == (200, expected):
            return
        await wait_until(lambda: True)
    raise AssertionError(f"presence of {channel} is {body}, not {expected}")


async def test_an_instance_subscribes_in_redis_only_while_it_has_a_subscriber(
        start_daemon: Any, redis_server: Any) -> None:
    one, two = await pair(start_daemon, redis_server)
    alice = await client(one, "/alice")
    bob = await client(two, "/bob")
    await subscribed(alice, "quiet")
    await wait_until(lambda: subscribers_in_redis(redis_server, "quiet") == 1)
    # two has no subscriber to it: Redis does not send it the channel's traffic
    await publish(bob, "quiet", "one")
    assert (await recv_until(alice, "message"))["text"] == "one"
    assert subscribers_in_redis(redis_server, "quiet") == 1
    await alice.write_message(json.dumps({"type": "unsubscribe", "channel": "quiet"}))
    await recv_until(alice, "unsubscribed")
    await wait_until(lambda: subscribers_in_redis(redis_server, "quiet") == 0)
    assert "ebbcast:c/quiet" not in redis_server.client().pubsub_channels("ebbcast:c/*")


async def test_a_direct_message_reaches_a_client_on_another_instance(
        start_daemon: Any, redis_server: Any) -> None:
    one, two = await pair(start_daemon, redis_server)
    bob = await client(two, "/bob")
    alice = await client(one, "/alice")
    await wait_until(lambda: len(redis_server.client().pubsub_numsub("ebbcast:direct")) == 1
                     and redis_server.client().pubsub_numsub("ebbcast:direct")[0][1] == 2)
    assert await admin_json(one, "/clients/bob/send", "POST", "psst") == \
        (202, {"delivered": 0})  # none of bob's connections is on this instance
    got = await recv_next(bob)
    assert (got["type"], got["text"]) == ("direct", "psst")
    await admin_json(one, "/broadcast", "POST", "to all")
    assert (await recv_next(alice))["text"] == "to all"  # the direct never reached her


async def test_a_channel_resumes_on_another_instance(start_daemon: Any,
                                                     redis_server: Any) -> None:
    one, two = await pair(start_daemon, redis_server)
    alice = await client(one, "/alice")
    publisher = await client(two, "/pub")
    epoch = (await subscribed(alice, "c"))["epoch"]
    await subscribed(publisher, "c")  # to see its messages sequenced
    await publish(publisher, "c", "m1")
    assert (await recv_until(alice, "message"))["offset"] == 1
    alice.close()
    for text in ("m2", "m3"):
        await publish(publisher, "c", text)
    assert [(await recv_until(publisher, "message"))["text"] for _ in range(3)] == \
        ["m1", "m2", "m3"]
    again = await client(two, "/alice")
    answer = await subscribed(again, "c", since=1, epoch=epoch)
    assert (answer["recovered"], answer["missed"], answer["offset"]) == (True, 2, 3)
    assert [(await recv_next(again))["text"] for _ in range(2)] == ["m2", "m3"]
    await publish(publisher, "c", "m4")
    assert (await recv_until(again, "message"))["offset"] == 4
    wrong = await subscribed(await client(one, "/late"), "c", since=0, epoch="another")
    assert wrong["recovered"] is False


async def test_only_history_max_channels_keep_a_history_in_the_cluster(
        start_daemon: Any, redis_server: Any) -> None:
    one, two = await pair(start_daemon, redis_server, history__max_channels="1")
    alice = await client(one, "/alice")
    bob = await client(two, "/bob")
    epoch = (await subscribed(alice, "x"))["epoch"]
    await publish(bob, "x", "kept for now")
    assert (await recv_until(alice, "message"))["offset"] == 1
    await publish(bob, "y", "pushes x out")  # from the other instance
    await wait_until(lambda: not redis_server.client().exists("ebbcast:c/x/history"))
    lost = await subscribed(bob, "x", since=0, epoch=epoch)
    assert lost["recovered"] is False and lost["epoch"] != epoch


async def room_with_one_message(start_daemon: Any,
                                redis_server: Any) -> tuple[Any, Any, str]:
    """Alice on one instance and Bob on another, both in "room", which has had one
    message (offset 1) in the epoch returned."""
    one, two = await pair(start_daemon, redis_server)
    alice = await client(one, "/alice")
    bob = await client(two, "/bob")
    epoch = (await subscribed(alice, "room"))["epoch"]
    await subscribed(bob, "room")
    await publish(bob, "room", "before")
    for conn in (alice, bob):
        assert (await recv_until(conn, "message"))["offset"] == 1
    return alice, bob, epoch


async def test_after_a_redis_restart_subscribers_are_told_and_served_again(
        start_daemon: Any, redis_server: Any) -> None:
    alice, bob, epoch = await room_with_one_message(start_daemon, redis_server)
    redis_server.stop()
    redis_server.start()  # empty: every channel's history is gone
    told = {}
    for name, conn in (("alice", alice), ("bob", bob)):  # each instance, once back
        told[name] = await recv_next(conn)  # (the global stream's epoch frame is not this)
        assert (told[name]["type"], told[name]["channel"]) == ("epoch", "room")
    assert told["alice"] == told["bob"] and told["alice"]["epoch"] != epoch
    await wait_until(lambda: subscribers_in_redis(redis_server, "room") == 2)
    await publish(bob, "room", "after")
    for conn in (alice, bob):
        got = await recv_until(conn, "message")
        assert (got["text"], got["offset"]) == ("after", told["alice"]["offset"] + 1)


async def test_a_channels_first_messages_in_a_new_epoch_follow_the_epoch_frame(
        start_daemon: Any, redis_server: Any) -> None:
    """Redis loses the channel (here FLUSHALL, with the subscriptions kept): the next
    publish starts a new epoch. Each instance sees it arrive after a gap, reads what
    the new epoch kept, and tells its subscribers of the epoch at offset 0, then
    gives them that message, instead of skipping to the latest offset."""
    alice, bob, epoch = await room_with_one_message(start_daemon, redis_server)
    redis_server.client().flushall()
    await publish(bob, "room", "after")
    for conn in (alice, bob):
        told = await recv_next(conn)
        assert (told["type"], told["channel"], told["offset"]) == ("epoch", "room", 0)
        assert told["epoch"] != epoch
        got = await recv_next(conn)
        assert (got["type"], got["text"], got["offset"]) == ("message", "after", 1)


async def test_a_tokens_claims_hold_across_instances(start_daemon: Any,
                                                    redis_server: Any) -> None:
    key = "k" * 40
    one, two = await pair(start_daemon, redis_server, auth__mode="jwt", auth__jwt_key=key)

    def token(sub: str, **claims: Any) -> str:
        return jwt.encode({"sub": sub, "exp": time.time() + 60, **claims}, key.encode(),
                          algorithm="HS256")

    fan = await client(one, f"?token={token('fan', channels=['scores.*'])}")
    reporter = await client(two, f"?token={token('reporter', publish=['scores.a'])}")
    await fan.write_message(json.dumps({"type": "subscribe", "channel": "news"}))
    assert await recv_next(fan) == {"type": "error", "error": "forbidden", "channel": "news"}
    await subscribed(fan, "scores.a")
    await publish(reporter, "scores.b", "no")
    assert await recv_next(reporter) == {"type": "error", "error": "forbidden",
                                         "channel": "scores.b"}
    await publish(reporter, "scores.a", "goal")  # from the other instance
    got = await recv_until(fan, "message")
    assert (got["from"], got["text"], got["offset"]) == ("reporter", "goal", 1)


async def test_the_limits_and_the_handshakes_refusals_hold_on_each_instance(
        start_daemon: Any, redis_server: Any) -> None:
    """``channels.max`` counts each instance's own channels (one each here);
    ``?channels=`` is refused for the channel it cannot have, or subscribed."""
    one, two = await pair(start_daemon, redis_server, channels__max="1",
                          channels__max_per_connection="2")
    alice = await client(one, "/alice")
    bob = await client(two, "/bob")
    epoch = (await subscribed(alice, "a"))["epoch"]
    await subscribed(bob, "b")  # the other instance's one channel
    for conn, other in ((alice, "b"), (bob, "a")):  # 1 of 2 on the connection
        await conn.write_message(json.dumps({"type": "subscribe", "channel": other}))
        assert await recv_next(conn) == {"type": "error", "error": "too_many_channels",
                                         "channel": other}
    for path, status, reason in [("?channels=a,bad%20name", 400, "invalid channel: 'bad name'"),
                                 ("?channels=a,b,c", 400, "too many channels: c"),
                                 ("?channels=b", 400, "too_many_channels: b")]:
        with pytest.raises(HTTPClientError) as error:
            await within(websocket_connect(HTTPRequest(one.ws_url + path)), STEP_TIMEOUT)
        assert error.value.code == status
        assert error.value.response is not None
        assert reason in error.value.response.body.decode()
    early = await one.connect("/early?channels=a")  # the instance's own channel: room left
    welcome = await recv_json(early)
    assert welcome["channels"] == {"a": {"epoch": epoch, "offset": 0}}
    await publish(bob, "a", "from the other instance")
    got = await recv_until(early, "message")
    assert (got["channel"], got["offset"]) == ("a", 1)


async def test_while_redis_is_away_a_channel_publish_is_refused_not_lost(
        start_daemon: Any, redis_server: Any) -> None:
    """Channels keep no outbox: a publish that cannot be sequenced is refused where
    it was made (the client's ``unavailable`` error, the admin API's 503), never
    answered as if it had gone out; once Redis is back, publishes go out again."""
    one, _ = await pair(start_daemon, redis_server)
    alice = await client(one, "/alice")
    await subscribed(alice, "room")
    redis_server.stop()
    channels = one.daemon.channels.route.channels  # the process's RedisChannels
    await wait_until(lambda: not channels.up)
    await publish(alice, "room", "during")
    assert await recv_until(alice, "error") == {"type": "error", "error": "unavailable",
                                                "channel": "room"}
    code, body = await admin_json(one, "/broadcast?channel=room", "POST", "during")
    assert code == 503 and "not published" in body["error"]
    redis_server.start()
    await wait_until(lambda: channels.up)
    code, body = await admin_json(one, "/broadcast?channel=room", "POST", "after")
    assert (code, body) == (202, {"recipients": 1})
    got = await recv_until(alice, "message")
    assert got["text"] == "after"  # the first message since the outage: "during" never went
