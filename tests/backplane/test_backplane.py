"""The redis:// backplane with a real redis-server: two instances, and an outage."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from typing import Any

from helpers import REPO, STEP_TIMEOUT, recv, recv_json, wait_until
from ebbcast.backplane.base import BACKOFF_MAX, Envelope, backoff_delays
from ebbcast.backplane.outbox import ENTRY_COST


def test_backplane_messages_round_trip():
    text = Envelope("node:1", "client", 7, "héllo\nworld")
    assert text.encode() == "node:1\nclient\n7\nthéllo\nworld".encode()
    assert Envelope.decode(text.encode()) == text
    binary = Envelope("n", "admin", 0, b"\x00\n\xff")
    assert Envelope.decode(binary.encode()) == binary


async def test_peers_are_told_apart_by_instance_not_by_url(io_loop, redis_server):
    """Behind one proxy every instance advertises the same URL: another instance's
    counts, a sibling serving process's (same instance) never does."""
    from ebbcast.backplane.redis import RedisBackplane

    url = "wss://chat.example.com/ws"
    first, sibling, other = (RedisBackplane(redis_server.url, "node", lambda payload, src: None,
                                            lambda up: None, lambda count: None,
                                            instance=instance)
                             for instance in ("host:1:aa", "host:1:aa", "host:2:bb"))
    for plane in (first, sibling, other):
        plane.advertise(url)
        plane.start()
    try:
        await wait_until(lambda: other.peers() == [url] and first.peers() == [url])
        other.advertise(None)  # the other instance drains: only the sibling is left
        await wait_until(lambda: first.peers() == [] and sibling.peers() == [])
        assert other.peers() == [url]
    finally:
        for plane in (first, sibling, other):
            await plane.stop()


def test_reconnect_backoff_grows_with_jitter_and_is_capped():
    delays = backoff_delays(random.Random(7))
    first = [next(delays) for _ in range(12)]
    assert 0.05 <= first[0] <= 0.1 and first[3] > first[0]
    assert all(d <= BACKOFF_MAX for d in first) and first[-1] >= BACKOFF_MAX / 2


async def pair(start_daemon, redis_server, **overrides):
    one = await start_daemon(backplane__url=redis_server.url, **overrides)
    two = await start_daemon(backplane__url=redis_server.url)
    await wait_until(lambda: one.daemon.metrics.backplane_up._value.get() == 1
                     and two.daemon.metrics.backplane_up._value.get() == 1)
    return one, two


async def test_frames_cross_instances_both_ways_exactly_once_in_one_order(start_daemon,
                                                                         redis_server):
    """Redis sequences every broadcast: every client of either instance sees the same
    frames in the same order, with consecutive offsets, each sender's in its order."""
    one, two = await pair(start_daemon, redis_server)
    a, welcome = await one.connect_welcomed("/a")
    a2, _ = await one.connect_welcomed("/a2")
    b, _ = await two.connect_welcomed("/b")
    for text in ("one", "two", "three"):
        await a.write_message(text)
    await b.write_message("from b")
    seen = []
    for conn in (a, a2, b):
        seen.append([await recv_json(conn) for _ in range(4)])
    assert seen[0] == seen[1] == seen[2]  # the same frames, offsets and order everywhere
    texts = [frame["text"] for frame in seen[0]]
    assert sorted(texts) == ["from b", "one", "three", "two"]
    assert [t for t in texts if t != "from b"] == ["one", "two", "three"]  # sender's order
    assert welcome["offset"] == 0  # a Redis of its own: nothing from an earlier run
    assert [frame["offset"] for frame in seen[0]] == [1, 2, 3, 4]
    await a.write_message("marker")  # anything duplicated would arrive before it
    assert (await recv_json(b))["text"] == "marker"
    assert (await recv_json(a))["text"] == "marker"


async def test_admin_broadcasts_cross_and_periodic_frames_stay_local(start_daemon,
                                                                     redis_server):
    one, two = await pair(start_daemon, redis_server, broadcast__periodic_interval="50ms")
    a, _ = await one.connect_welcomed()
    b, _ = await two.connect_welcomed()
    periodic = await recv_json(a)
    assert periodic["type"] == "periodic"  # instance one has periodic frames...
    assert (await two.admin("/broadcast", "POST", "to all", token="secret-token")).code == 202
    frame = await recv_json(b)  # ...instance two has none: its first frame is the admin's
    assert (frame["type"], frame["from"], frame["text"]) == ("message", "admin", "to all")
    while (frame := await recv_json(a))["type"] == "periodic":
        pass
    assert frame["text"] == "to all"


async def test_redis_outage_keeps_local_delivery_and_publishes_what_it_kept_after(
        start_daemon, redis_server):
    """A frame sent while Redis is away reaches the sender's instance at once
    (without an offset), waits in the outbox (counted in bytes), and crosses once
    Redis is back, sequenced in the new epoch; the sender's clients, who had it,
    do not get it again."""
    one, two = await pair(start_daemon, redis_server)
    a, _ = await one.connect_welcomed("/a")
    a2, _ = await one.connect_welcomed("/a2")
    b, _ = await two.connect_welcomed("/b")
    metrics = await redis_gone(redis_server, one)
    await a.write_message("during the outage")
    assert (await recv_json(a2))["text"] == "during the outage"  # local delivery goes on
    during = await recv_json(a)  # its own frame, delivered here without an offset
    assert during["text"] == "during the outage" and "offset" not in during
    exposition = (await one.admin("/metrics")).body.decode()
    assert "ebbcast_backplane_up 0.0" in exposition
    assert metrics.backplane_buffered._value.get() == len(during_frame(during)) + ENTRY_COST
    old_epoch = one.daemon.broadcasts.history.epoch
    since = f"?since={one.daemon.broadcasts.history.latest}&epoch={old_epoch}"
    _, resumed = await one.connect_welcomed(since)  # it would have missed that frame
    assert resumed["recovered"] is False
    redis_server.start()  # the same port: both instances reconnect with backoff
    await wait_until(lambda: metrics.backplane_up._value.get() == 1
                     and two.daemon.metrics.backplane_up._value.get() == 1, timeout=30)
    for conn in (a, a2, b):  # a Redis without persistence lost the history: told first
        epoch = await recv_json(conn)
        assert (epoch["type"], epoch["offset"]) == ("epoch", 0)
        assert epoch["epoch"] != old_epoch
    kept = await recv_json(b)  # what was kept, sequenced first in the new epoch
    assert (kept["text"], kept["offset"]) == ("during the outage", 1)
    await a.write_message("after the outage")
    for conn in (a, a2, b):  # not "during the outage" again on instance one
        after = await recv_json(conn)
        assert (after["text"], after["offset"]) == ("after the outage", 2)
    await wait_until(lambda: metrics.backplane_buffered._value.get() == 0)
    assert lost_counts(one, two) == {"one dropped": 0, "one missed": 0,
                                     "two dropped": 0, "two missed": 0}


async def redis_gone(redis_server: Any, daemon: Any) -> Any:
    """Stop Redis and wait until ``daemon`` has seen it go; its metrics."""
    redis_server.stop()
    metrics = daemon.daemon.metrics
    await wait_until(lambda: metrics.backplane_up._value.get() == 0)
    return metrics


def during_frame(frame: dict[str, Any]) -> str:
    """A frame as the daemon wrote it: compact JSON, in its own key order."""
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


async def test_beyond_the_outage_buffer_a_frame_is_dropped_and_counted(start_daemon,
                                                                      redis_server):
    one, two = await pair(start_daemon, redis_server, backplane__outage_buffer="0")
    a, _ = await one.connect_welcomed("/a")
    b, _ = await two.connect_welcomed("/b")
    metrics = await redis_gone(redis_server, one)
    await a.write_message("during the outage")
    assert (await recv_json(a))["text"] == "during the outage"  # here, at once
    assert metrics.backplane_dropped._value.get() == 1
    old_epoch = one.daemon.broadcasts.history.epoch
    redis_server.start()
    await wait_until(lambda: metrics.backplane_up._value.get() == 1
                     and two.daemon.metrics.backplane_up._value.get() == 1, timeout=30)
    for conn in (a, b):
        epoch = await recv_json(conn)
        assert epoch["type"] == "epoch" and epoch["epoch"] != old_epoch
    await a.write_message("after the outage")
    after = await recv_json(b)  # and never the lost one
    assert (after["text"], after["offset"]) == ("after the outage", epoch["offset"] + 1)
    # the one frame lost to instance two is counted once: dropped where it was sent
    assert lost_counts(one, two) == {"one dropped": 1, "one missed": 0,
                                     "two dropped": 0, "two missed": 0}


def lost_counts(one: Any, two: Any) -> dict[str, float]:
    """ebbcast_backplane_dropped_total and _missed_total of two in-process instances."""
    return {f"{name} {kind}": getattr(d.daemon.metrics, f"backplane_{kind}")._value.get()
            for name, d in (("one", one), ("two", two)) for kind in ("dropped", "missed")}


def test_a_daemon_whose_redis_is_down_serves_locally_and_says_so(spawn):
    import json
    import signal
    import socket

    from websockets.sync.client import connect

    from helpers import STEP_TIMEOUT

    # a port where nothing can listen: bound here (connecting to it is refused) and
    # held for the whole test, so no other process can take it meanwhile
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        d = spawn("--port", "0", "--admin-port", "0",
                  env={"EBBCAST_BACKPLANE_URL": f"redis://127.0.0.1:{port}/0"})
        d.wait_for_log(rf"backplane unreachable: 127.0.0.1:{port}; local delivery goes on")
        with connect(d.ws_url) as one, connect(d.ws_url) as two:
            json.loads(one.recv(timeout=STEP_TIMEOUT))
            json.loads(two.recv(timeout=STEP_TIMEOUT))
            one.send("local")
            while (frame := json.loads(two.recv(timeout=STEP_TIMEOUT)))["type"] != "message":
                pass
            assert frame["text"] == "local"
        metrics = d.metrics_text()
        assert "ebbcast_backplane_up 0.0" in metrics
        assert "ebbcast_backplane_dropped_total 0.0" in metrics  # kept for Redis meanwhile
        assert "ebbcast_backplane_buffered_bytes 0.0" not in metrics
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
        assert d.log_text().count("backplane unreachable") == 1
        # Redis never came: what was kept is counted lost at the stop, and said so
        d.wait_for_log(r"backplane: stopping with 1 frames never published \(Redis away\)")


async def test_a_draining_instance_names_the_live_ones_in_its_shutdown_frame(start_daemon,
                                                                            redis_server):
    import signal

    one, two = await pair(start_daemon, redis_server, shutdown__drain_timeout="60s")
    a, _ = await one.connect_welcomed()
    await wait_until(lambda: one.daemon.ctx.backplane.peers() == [two.ws_url])
    one.daemon.record_signal(signal.SIGTERM)
    frame = await recv_json(a)
    assert frame["type"] == "shutdown" and frame["nodes"] == [two.ws_url]
    a.close()
    await one.stopped()


async def node_key_events(redis_server: Any) -> Any:
    """A subscription to keyspace events of the instances' node keys (set, expire, del)."""
    import redis.asyncio

    client = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port)
    await client.config_set("notify-keyspace-events", "Kg$")
    events = client.pubsub()
    await events.psubscribe("__keyspace@0__:ebbcast:node:*")
    return client, events


async def next_event(events: Any, wanted: str) -> str:
    """The key of the next keyspace event ``wanted`` ("set", "del")."""
    deadline = asyncio.get_running_loop().time() + STEP_TIMEOUT
    while True:
        left = deadline - asyncio.get_running_loop().time()
        assert left > 0, f"no {wanted} event in time"
        message = await events.get_message(ignore_subscribe_messages=True, timeout=left)
        if message is not None and message["data"] == wanted.encode():
            return message["channel"].decode().split(":", 1)[1]


def test_the_docs_state_the_node_keys_timing_as_the_code_has_it():
    from ebbcast.backplane.nodes import HEARTBEAT_SECONDS, NODE_TTL_SECONDS

    readme = (REPO / "docs" / "scaling.md").read_text()
    assert (f"refreshed every {HEARTBEAT_SECONDS:g} s with a {NODE_TTL_SECONDS} s TTL"
            in " ".join(readme.split()))


async def test_the_node_key_names_the_instance_and_is_refreshed_before_it_expires(
        start_daemon, redis_server):
    from ebbcast.backplane.nodes import NODE_TTL_SECONDS

    from ebbcast.backplane.nodes import HEARTBEAT_SECONDS

    client, events = await node_key_events(redis_server)
    one = await start_daemon(backplane__url=redis_server.url)
    key = await next_event(events, "set")  # written as it starts...
    written = asyncio.get_running_loop().time()
    assert (await client.get(key)).decode() == one.ws_url
    assert 0 < await client.ttl(key) <= NODE_TTL_SECONDS  # ...to expire if it dies...
    assert await next_event(events, "set") == key  # ...unless refreshed, as it is
    # by the heartbeat, a beat later (half a beat: room for this reader's own delays)
    assert asyncio.get_running_loop().time() - written >= HEARTBEAT_SECONDS / 2
    assert 0 < await client.ttl(key) <= NODE_TTL_SECONDS
    await events.aclose()
    await client.aclose()


async def test_a_draining_instance_withdraws_its_node_key_at_once(start_daemon, redis_server,
                                                                 monkeypatch):
    """With the next heartbeat a minute away, the key can only be gone within
    STEP_TIMEOUT if the drain's start itself withdrew it; the drain goes on."""
    import signal

    monkeypatch.setattr("ebbcast.backplane.nodes.HEARTBEAT_SECONDS", 60.0)
    client, events = await node_key_events(redis_server)
    one = await start_daemon(backplane__url=redis_server.url, shutdown__drain_timeout="60s")
    key = await next_event(events, "set")
    conn, _ = await one.connect_welcomed()
    one.daemon.record_signal(signal.SIGTERM)
    assert await next_event(events, "del") == key
    assert await client.exists(key) == 0
    assert one.daemon.lifecycle.state.value == "draining"  # its client still served
    conn.close()
    await one.stopped()
    await events.aclose()
    await client.aclose()


async def test_redis_restarted_under_load_loses_nothing(start_daemon, redis_server):
    """A steady stream of frames while Redis stops and comes back: every one reaches
    the local client in order at once; the outage shows in the metrics; the far side
    gets every frame too, none twice, in order: those sent while Redis was away were
    kept and published once it was back. (The stream of the new epoch holds them
    all, for the far instance if it resubscribes after they were published.)"""
    import asyncio

    one, two = await pair(start_daemon, redis_server, limits__messages_per_second="0",
                          history__size="100000")
    sender, _ = await one.connect_welcomed("/sender")
    local, _ = await one.connect_welcomed("/local")
    far, _ = await two.connect_welcomed("/far")
    metrics = one.daemon.metrics
    sent = 0

    async def send_some(count: int) -> None:
        nonlocal sent
        for _ in range(count):
            await sender.write_message(str(sent))
            sent += 1
            await asyncio.sleep(0.002)

    await send_some(100)
    # Redis stops once the far side has the first 100 (the last of them could still
    # be on its way to Redis otherwise: dropped, counted, but not "sent while up")
    crossed = [(await recv_json(far))["text"] for _ in range(100)]
    redis_server.stop()
    while metrics.backplane_up._value.get() == 1:  # frames keep coming as it goes down
        await send_some(10)
    await send_some(100)
    redis_server.start()
    while metrics.backplane_up._value.get() == 0 or \
            two.daemon.metrics.backplane_up._value.get() == 0:
        await send_some(10)
    await send_some(100)
    await sender.write_message("end")

    async def texts_and_epochs(conn: Any) -> tuple[list[str], int]:
        texts, epochs = [], 0
        while (frame := await recv_json(conn)).get("text") != "end":
            if frame["type"] == "epoch":
                epochs += 1
            else:
                texts.append(frame["text"])
        return texts, epochs

    for conn in (sender, local):  # nothing lost locally, in order; the new epoch told
        assert await texts_and_epochs(conn) == ([*map(str, range(sent))], 1)
    far_texts, far_epochs = await texts_and_epochs(far)
    assert [int(text) for text in crossed + far_texts] == list(range(sent))
    assert far_epochs == 1  # the far side's clients know their offsets start again
    assert lost_counts(one, two) == {"one dropped": 0, "one missed": 0, "two dropped": 0,
                                     "two missed": 0}
    exposition = (await one.admin("/metrics")).body.decode()
    assert "ebbcast_backplane_up 1.0" in exposition


def subscriptions(redis_server: Any) -> set[str]:
    """The ids of the Redis clients that hold the backplane's subscription (every
    instance's own): the one to its two channels, ``ebbcast:broadcast`` and
    ``ebbcast:sequenced`` (the channels' own, to ``ebbcast:direct`` and to channels
    with a subscriber, is another)."""
    with redis_server.client() as redis:
        return {str(c["id"]) for c in redis.client_list(_type="pubsub") if c["sub"] == "2"}


async def second_instance_with_its_subscription(start_daemon: Any, redis_server: Any,
                                                **overrides: str) -> tuple[Any, Any, str]:
    """Two instances on one Redis, and the id of the second one's subscription."""
    up = lambda d: d.daemon.metrics.backplane_up._value.get() == 1  # noqa: E731
    one = await start_daemon(backplane__url=redis_server.url, **overrides)
    await wait_until(lambda: up(one) and len(subscriptions(redis_server)) == 1)
    before = subscriptions(redis_server)
    two = await start_daemon(backplane__url=redis_server.url, **overrides)
    await wait_until(lambda: up(two) and len(subscriptions(redis_server)) == 2)
    (theirs,) = subscriptions(redis_server) - before
    return one, two, theirs


async def send_until(sender: Any, done: Callable[[], bool]) -> int:
    """Frames "0", "1", ... until ``done()``, then "end"; how many numbers were sent."""
    sent = 0
    deadline = asyncio.get_running_loop().time() + STEP_TIMEOUT
    while not done():
        assert asyncio.get_running_loop().time() < deadline, "never done"
        await sender.write_message(str(sent))
        sent += 1
        await asyncio.sleep(0.002)
    await sender.write_message("end")
    return sent


async def numbers_until_end(conn: Any, text: Callable[[Any], str]) -> list[int]:
    numbers = []
    while (got := text(await recv(conn))) != "end":
        numbers.append(int(got))
    return numbers


def test_raw_frames_sent_while_a_subscription_was_down_are_each_counted_missed(
        spawn, redis_server):
    """Redis pub/sub keeps nothing for an absent subscriber: with the raw envelope
    (no offsets, no history) what instance two missed is lost, and counted there,
    exactly: the frames one sent minus those two's client got. (Two processes: an
    instance never delivers frames that carry its own node id, host and pid.)"""
    from helpers import close_all, dial, metric, wait_for

    env = {"EBBCAST_BACKPLANE_URL": redis_server.url, "EBBCAST_BROADCAST_ENVELOPE": "raw",
           "EBBCAST_BROADCAST_PERIODIC_INTERVAL": "0", "EBBCAST_LIMITS_MESSAGES_PER_SECOND": "0",
           "EBBCAST_BROADCAST_ECHO_TO_SENDER": "false"}
    one = spawn("--port", "0", "--admin-port", "0", env=env)
    wait_for(lambda: len(subscriptions(redis_server)) == 1)
    before = subscriptions(redis_server)
    two = spawn("--port", "0", "--admin-port", "0", env=env)
    wait_for(lambda: len(subscriptions(redis_server)) == 2)
    (theirs,) = subscriptions(redis_server) - before
    sender, far = dial(one.ws_url), dial(two.ws_url)
    sender.send("first")  # both clients are in: this one crosses
    assert far.recv(timeout=STEP_TIMEOUT) == "first"
    with redis_server.client() as redis:
        assert redis.client_kill_filter(_id=theirs) == 1  # two resubscribes after a backoff
    sent = 0
    while metric(two, "ebbcast_backplane_missed_total") == 0:  # counted at the next frame
        assert sent < 10_000, "instance two never counted a missed frame"
        sender.send(str(sent))
        sent += 1
    sender.send("end")
    got = []
    while (text := far.recv(timeout=STEP_TIMEOUT)) != "end":
        got.append(int(text))
    assert got == sorted(set(got)) and set(got) <= set(range(sent))
    lost = {f"{name} {kind}": metric(d, f"ebbcast_backplane_{kind}_total")
            for name, d in (("one", one), ("two", two)) for kind in ("dropped", "missed")}
    assert lost == {"one dropped": 0, "one missed": 0, "two dropped": 0,
                    "two missed": sent - len(got)}
    close_all([sender, far])


async def test_json_frames_sent_while_a_subscription_was_down_come_from_the_history(
        start_daemon, redis_server):
    """With offsets (the json envelope), a gap is filled from Redis's history stream:
    instance two's client gets every frame, once, in order; nothing is counted lost."""
    one, two, theirs = await second_instance_with_its_subscription(
        start_daemon, redis_server, limits__messages_per_second="0")
    sender, _ = await one.connect_welcomed("/sender")
    far, _ = await two.connect_welcomed("/far")
    with redis_server.client() as redis:
        assert redis.client_kill_filter(_id=theirs) == 1
    resubscribed = lambda: theirs not in subscriptions(redis_server) and \
        len(subscriptions(redis_server)) == 2  # noqa: E731
    sent = await send_until(sender, resubscribed)
    got = await numbers_until_end(far, lambda frame: json.loads(frame)["text"])
    assert got == list(range(sent))
    assert lost_counts(one, two) == {"one dropped": 0, "one missed": 0, "two dropped": 0,
                                     "two missed": 0}


async def test_raw_frames_sent_while_the_senders_subscription_was_down_cross_after(
        start_daemon, redis_server):
    """With the raw envelope too, what an instance could not publish while its own
    subscription was down (its backplane down) is kept and published once it is
    back: the far client gets every frame, once, in order; nothing is counted lost."""
    raw = {"broadcast__envelope": "raw", "limits__messages_per_second": "0",
           "broadcast__echo_to_sender": "false"}
    one = await start_daemon(backplane__url=redis_server.url, **raw)
    await wait_until(lambda: len(subscriptions(redis_server)) == 1)
    ones = subscriptions(redis_server)
    two = await start_daemon(backplane__url=redis_server.url, **raw)
    await wait_until(lambda: len(subscriptions(redis_server)) == 2)
    twos = subscriptions(redis_server) - ones  # stays: two's subscription is never cut
    sender, far = await one.connect("/sender"), await two.connect("/far")  # no welcome
    buffered = one.daemon.metrics.backplane_buffered
    one_up = lambda: one.daemon.metrics.backplane_up._value.get() == 1  # noqa: E731
    sent, kept = 0, False
    for _ in range(20):  # until a frame is seen waiting (one may be back within ms)
        (ones,) = subscriptions(redis_server) - twos
        with redis_server.client() as redis:
            assert redis.client_kill_filter(_id=ones) == 1  # one resubscribes after a backoff
        await wait_until(lambda: not one_up() or ones not in subscriptions(redis_server))
        while not (one_up() and len(subscriptions(redis_server)) == 2):
            await sender.write_message(str(sent))
            sent += 1
            await asyncio.sleep(0.002)
            kept = kept or buffered._value.get() > 0
        if kept:
            break
    assert kept, "no frame was ever kept while one's subscription was down"
    await sender.write_message("end")
    got = await numbers_until_end(far, lambda frame: frame)
    assert got == list(range(sent))
    assert lost_counts(one, two) == {"one dropped": 0, "one missed": 0, "two dropped": 0,
                                     "two missed": 0}


class ExecutedThenCut:
    """Makes the first pipeline that publishes ``channel`` run in Redis and then
    fail as if the connection broke before the answer came back."""

    def __init__(self, monkeypatch: Any, channel: str) -> None:
        from redis.asyncio.client import Pipeline
        from redis.exceptions import ConnectionError as RedisConnectionError

        real = Pipeline.execute
        self.cut = 0

        async def execute(pipe: Any, raise_on_error: bool = True) -> Any:
            publishes = any(channel in map(str, args) for args, _ in pipe.command_stack)
            result = await real(pipe, raise_on_error)
            if publishes and not self.cut:
                self.cut += 1
                raise RedisConnectionError("the answer was lost on the way")
            return result

        monkeypatch.setattr(Pipeline, "execute", execute)


class Feed:
    """A history feed that records what it is given (``HistoryFeed``)."""

    def __init__(self) -> None:
        self.epoch, self.latest = "", 0
        self.given: list[tuple[int, bool, bool]] = []  # offset, own, repeat
        self.lost = 0

    def position(self) -> tuple[str, int]:
        return self.epoch, self.latest

    def preload(self, epoch: str, base: int, entries: list[Any]) -> None:
        self.epoch, self.latest = epoch, base

    def new_epoch(self, epoch: str, base: int) -> None:
        raise AssertionError("no new epoch here")

    def sequencing_lost(self) -> None:
        self.lost += 1

    def deliver_sequenced(self, epoch: str, offset: int, frame: str, source: str, token: int,
                          own: bool, repeat: bool = False) -> None:
        if offset > self.latest:
            self.latest = offset
            self.given.append((offset, own, repeat))


async def test_a_batch_redis_ran_but_never_answered_is_sent_again_and_seen_once(
        io_loop, redis_server, monkeypatch):
    """Redis runs a publish whose answer is lost: the publisher sends the batch
    again, and receivers drop what they had by its number. Raw frames: delivered
    once. Sequenced ones: the second copy takes an offset, marked a repeat, which a
    serving process records and delivers to nobody (``Broadcasts.deliver``)."""
    from ebbcast.backplane.names import RedisNames
    from ebbcast.backplane.redis import RedisBackplane

    names = RedisNames()
    cut_raw = ExecutedThenCut(monkeypatch, names.channel)
    got: list[Any] = []
    feeds = Feed(), Feed()
    sender, receiver = (RedisBackplane(redis_server.url, "node", deliver, lambda up: None,
                                       lambda count: None, history=feed, history_size=100)
                        for deliver, feed in ((lambda p, s: None, feeds[0]),
                                              (lambda p, s: got.append(p), feeds[1])))
    for plane in (sender, receiver):
        plane.start()
    try:
        await wait_until(lambda: sender.up and receiver.up)
        for text in ("1", "2", "3"):
            sender.publish(text, "client")
        await wait_until(lambda: cut_raw.cut == 1)  # (the receiver may have them first)
        sender.publish("4", "client")  # after the batch sent again: its copies came first
        await wait_until(lambda: got[-1:] == ["4"])
        assert got == ["1", "2", "3", "4"]
        ExecutedThenCut(monkeypatch, names.sequenced_channel)
        for token in (1, 2):
            assert sender.submit(json.dumps({"text": str(token)}), "client", token)
        for feed, own in zip(feeds, (True, False)):  # the sender's own, the receiver's
            await wait_until(lambda: len(feed.given) == 4)
            assert feed.given == [(1, own, False), (2, own, False), (3, own, True),
                                  (4, own, True)]
        assert feeds[0].lost == 1  # the sender's process delivered its own at once
    finally:
        for plane in (sender, receiver):
            await plane.stop()


def test_an_instance_with_workers_and_a_single_one_share_redis(spawn, redis_server):
    """The README's two commands: `ebbcast --workers 2` and a plain instance, both on
    one Redis. Every client of either sees every frame exactly once."""
    import signal

    from helpers import clients_on_every_worker, metric, recv_frame, wait_for

    env = {"EBBCAST_BACKPLANE_URL": redis_server.url,
           "EBBCAST_BROADCAST_PERIODIC_INTERVAL": "0"}
    many = spawn("--port", "0", "--admin-port", "0", "--workers", "2", env=env)
    single = spawn("--port", "0", "--admin-port", "0", env=env)
    for d in (many, single):
        wait_for(lambda: metric(d, "ebbcast_backplane_up") == 1)
    (a,), (b,) = clients_on_every_worker(many, 2).values()
    (c,) = clients_on_every_worker(single, 1).values()
    c = c[0]
    for ws, name in ((a, "a"), (b, "b"), (c, "c")):
        ws.send(f"from {name}")
    for ws in (a, b, c):
        texts = sorted(recv_frame(ws)["text"] for _ in range(3))
        assert texts == ["from a", "from b", "from c"]
    c.send("marker")  # a duplicate of anything would arrive before it
    assert all(recv_frame(ws)["text"] == "marker" for ws in (a, b, c))
    for ws in (a, b, c):
        ws.close()
    for d in (many, single):
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0


def test_rediss_reaches_a_redis_server_that_speaks_only_tls(spawn, tmp_path):
    import signal

    from helpers import RedisServer, close_all, dial, metric, recv_frame, wait_for

    redis = RedisServer(tmp_path / "redis", tls_dir=tmp_path)
    redis.start()
    try:
        assert redis.url.startswith("rediss://ebbcast:acl-test-password@127.0.0.1:")
        env = {"EBBCAST_BACKPLANE_URL": redis.url, "EBBCAST_BROADCAST_PERIODIC_INTERVAL": "0"}
        one = spawn("--port", "0", "--admin-port", "0", env=env)
        two = spawn("--port", "0", "--admin-port", "0", env=env)
        for d in (one, two):
            wait_for(lambda: metric(d, "ebbcast_backplane_up") == 1)
        a, b = dial(one.ws_url), dial(two.ws_url)
        recv_frame(a, "welcome")
        recv_frame(b, "welcome")
        a.send("over TLS to Redis and back")
        assert recv_frame(b)["text"] == "over TLS to Redis and back"
        close_all([a, b])
        for d in (one, two):
            d.signal(signal.SIGTERM)
            assert d.wait_exit() == 0
            assert "backplane connected: 127.0.0.1:" in d.log_text()
    finally:
        redis.stop()



class ClosingSlowly:
    """A redis-py client as the backplane uses it, Redis gone: every command fails,
    and the first close hangs until cancelled (as closing a lost connection can)."""

    made: list[ClosingSlowly] = []

    def __init__(self, first_close_started: asyncio.Event) -> None:
        self.closed = False
        self._first_close_started = first_close_started
        ClosingSlowly.made.append(self)

    def pubsub(self) -> Any:
        import contextlib

        @contextlib.asynccontextmanager
        async def lost() -> Any:
            yield self
        return lost()

    async def subscribe(self, *channels: str) -> None:
        raise ConnectionError("Redis is gone")

    set = delete = subscribe

    def register_script(self, script: str) -> None:
        return None

    async def aclose(self) -> None:
        if not self._first_close_started.is_set():
            self._first_close_started.set()
            await asyncio.Event().wait()  # until cancelled
        self.closed = True


class FailingToClose(ClosingSlowly):
    """The first close fails (redis-py raises when a disconnect times out)."""

    async def aclose(self) -> None:
        if not self._first_close_started.is_set():
            self._first_close_started.set()
            raise ConnectionError("timed out closing")
        self.closed = True


def started_on(client_class: type[ClosingSlowly]) -> Any:
    """A RedisBackplane started with clients of ``client_class`` (listed in
    ClosingSlowly.made); ``first_close_started`` is set as the first close begins."""
    from ebbcast.backplane.redis import RedisBackplane

    plane = RedisBackplane("redis://127.0.0.1:1/0", "node", lambda payload, source: None,
                           lambda up: None, lambda count: None)
    plane.first_close_started = asyncio.Event()
    ClosingSlowly.made = []
    plane._target.client = lambda: client_class(plane.first_close_started)
    plane.start()
    return plane


async def test_a_subscription_whose_client_fails_to_close_is_tried_again(io_loop):
    """A failed close of a lost subscription's client does not end the subscriber:
    it subscribes again (a new client, after the backoff); stop() closes them all."""
    plane = started_on(FailingToClose)
    await wait_until(lambda: len(ClosingSlowly.made) >= 4)  # a second subscriber client
    await asyncio.wait_for(plane.stop(), STEP_TIMEOUT)
    assert all(client.closed for client in ClosingSlowly.made)


async def test_a_stop_that_cuts_a_client_close_short_still_closes_that_client(io_loop):
    """The stop cancels the subscriber as it closes the client of its lost
    subscription: stop() closes that client again, so no connection outlives it."""
    plane = started_on(ClosingSlowly)
    await asyncio.wait_for(plane.first_close_started.wait(), STEP_TIMEOUT)
    await asyncio.wait_for(plane.stop(), STEP_TIMEOUT)
    assert len(ClosingSlowly.made) == 3  # subscriber, publisher, heartbeat
    assert [client.closed for client in ClosingSlowly.made] == [True, True, True]
