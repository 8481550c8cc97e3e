"""Deployments on one Redis, and the URL an instance is known by: ``backplane.prefix``
keeps deployments apart (broadcasts, offsets, node keys), ``server.public_url`` is
what draining clients elsewhere are sent to, and an unspecified address is never
advertised."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import pytest

from ebbcast.backplane.names import RedisNames
from ebbcast.core.sockets import advertised_url
from helpers import RedisServer, recv_until, wait_until

PUBLIC = "wss://chat.example.com/ws"


@pytest.mark.parametrize("public_url, bound, advertised", [
    ("", "ws://10.0.0.7:8000/ws", "ws://10.0.0.7:8000/ws"),
    ("", "ws://0.0.0.0:8000/ws", None),
    ("", "ws://[::]:8000/ws", None),
    (PUBLIC, "ws://0.0.0.0:8000/ws", PUBLIC),
    (PUBLIC, "ws://127.0.0.1:8000/ws", PUBLIC),
])
def test_the_advertised_url_is_the_public_one_and_never_unspecified(
        public_url: str, bound: str, advertised: str | None) -> None:
    assert advertised_url(public_url, bound) == advertised


def test_other_instances_are_told_apart_by_their_key_and_an_older_release_by_url() -> None:
    from ebbcast.backplane.nodes import other_instances

    names = RedisNames()
    mine = names.instance_keys("host:1:aa")
    urls = {names.node_key("host:1:aa", "host:7/cd"): PUBLIC.encode(),  # a sibling
            names.node_key("host:2:bb", "host:8/ef"): PUBLIC.encode(),  # behind one proxy
            "ebbcast:node:host:6/01": PUBLIC.encode(),  # this instance, a release before
            "ebbcast:node:host:9/02": b"ws://10.0.0.9:8000/ws",  # another, a release before
            names.node_key("host:3:cc", "host:9/03"): None}  # expired between SCAN and MGET
    assert other_instances(names, mine, urls, PUBLIC) == ["ws://10.0.0.9:8000/ws", PUBLIC]


def test_every_name_is_under_the_prefix() -> None:
    names = RedisNames("staging")
    every = [names.channel, names.sequenced_channel, names.stream, *names.keys,
             names.node_key("host:1:ab", "host:7/cd")]
    assert all(name.startswith("staging:") for name in every)
    assert RedisNames().channel == "ebbcast:broadcast"  # as it always was


async def pair_up(start_daemon: Any, url: str, **overrides: str) -> tuple[Any, Any]:
    """Two instances on ``url``, each seeing the other's node key."""
    one = await start_daemon(backplane__url=url, **overrides)
    two = await start_daemon(backplane__url=url, **overrides)
    await wait_until(lambda: one.daemon.ctx.backplane.peers() != []
                     and two.daemon.ctx.backplane.peers() != [])
    return one, two


@pytest.mark.processes
async def test_two_deployments_with_their_own_prefix_share_one_redis_unseen(
        start_daemon: Any, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis", prefixes=("ebbcast", "staging"))
    redis.start()
    try:
        prod = await pair_up(start_daemon, redis.url, broadcast__periodic_interval="0")
        staging = await pair_up(start_daemon, redis.url, backplane__prefix="staging",
                                broadcast__periodic_interval="0")
        # node keys: each instance names only its own deployment's other instance
        for one, two in (prod, staging):
            assert one.daemon.ctx.backplane.peers() == [two.ws_url]
            assert two.daemon.ctx.backplane.peers() == [one.ws_url]
        (p1, _), (p2, _) = [await d.connect_welcomed() for d in prod]
        (s1, _), (s2, _) = [await d.connect_welcomed() for d in staging]
        await p1.write_message("production")
        got = await recv_until(p2, "message")
        assert (got["text"], got["offset"]) == ("production", 1)
        await s1.write_message("staging")
        # its own offsets (shared with production's, it would be 2), and nothing of
        # production's before it
        got = await recv_until(s2, "message")
        assert (got["text"], got["offset"]) == ("staging", 1)
        await p1.write_message("production again")
        got = await recv_until(p2, "message")  # staging's broadcast would come first
        assert (got["text"], got["offset"]) == ("production again", 2)
        with redis.client() as client:
            keys = set(client.keys("*"))
        for prefix in ("ebbcast", "staging"):
            assert {f"{prefix}:epoch", f"{prefix}:offset", f"{prefix}:history"} <= keys
            assert sum(key.startswith(f"{prefix}:node:") for key in keys) == 2
        assert all(key.split(":")[0] in ("ebbcast", "staging") for key in keys)
        for conn in (p1, p2, s1, s2):
            conn.close()
    finally:
        redis.stop()


async def test_behind_one_proxy_a_drain_names_the_shared_public_url(
        start_daemon: Any, redis_server: Any) -> None:
    """Every instance advertises the proxy's URL: a draining one names it while
    another instance is live, although it is its own URL too."""
    one, two = await pair_up(start_daemon, redis_server.url, server__public_url=PUBLIC,
                             shutdown__drain_timeout="60s")
    assert one.daemon.ctx.backplane.peers() == [PUBLIC]
    conn, _ = await one.connect_welcomed()
    one.daemon.record_signal(signal.SIGTERM)
    frame = await recv_until(conn, "shutdown")  # after an epoch frame, maybe
    assert frame["nodes"] == [PUBLIC]
    conn.close()
    await one.stopped()


async def test_an_instance_bound_to_an_unspecified_address_advertises_nothing(
        start_daemon: Any, redis_server: Any, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="ebbcast.core.sockets")
    hidden = await start_daemon(backplane__url=redis_server.url, server__host="0.0.0.0")
    seen = await start_daemon(backplane__url=redis_server.url)
    # the hidden one's heartbeat has run since the other's key was written: had it
    # advertised anything, its key would be there too
    await wait_until(lambda: hidden.daemon.ctx.backplane.peers() == [seen.ws_url])
    with redis_server.client() as client:
        assert [client.get(key) for key in client.keys("ebbcast:node:*")] == [seen.ws_url]
    assert seen.daemon.ctx.backplane.peers() == []
    assert "bound to 0.0.0.0, which no client can reach" in caplog.text
