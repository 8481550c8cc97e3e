"""Channels between ``ebbcast serve`` instances with workers, on a real Redis and
through a Sentinel failover (SPEC 14): the main process of each instance is its
channels' gateway to Redis, each worker getting only the channels it has
subscribers to; after a failover an instance subscribes to exactly the channels
its clients are in, on the new master."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection

from helpers import (
    QUICK,
    DaemonProcess,
    close_all,
    dial,
    http_json,
    metric,
    one_client_per_worker,
    recv_frame,
    wait_for,
)
from sentinels import Cluster

pytestmark = pytest.mark.processes
TOKEN = "secret-token"


def subscribe(ws: ClientConnection, channel: str) -> dict[str, Any]:
    ws.send(json.dumps({"type": "subscribe", "channel": channel}))
    return recv_frame(ws, "subscribed")


def publish(ws: ClientConnection, channel: str, text: str) -> None:
    ws.send(json.dumps({"type": "publish", "channel": channel, "text": text}))


def start(spawn: Any, url: str, workers: int) -> DaemonProcess:
    d = spawn("--port", "0", "--admin-port", "0", "--workers", str(workers),
              env={**QUICK, "EBBCAST_BACKPLANE_URL": url})
    wait_for(lambda: metric(d, "ebbcast_backplane_up") == 1)
    return d


def test_channels_cross_instances_with_workers_and_presence_counts_all(
        spawn: Any, redis_server: Any) -> None:
    one, two = start(spawn, redis_server.url, 2), start(spawn, redis_server.url, 2)
    opened: list[ClientConnection] = []
    try:
        clients = [*one_client_per_worker(one, 2, opened, "a"),
                   *one_client_per_worker(two, 2, opened, "b")]
        for _, ws in clients:
            subscribe(ws, "room")
        publish(clients[0][1], "room", "hello")
        for _, ws in clients:
            got = recv_frame(ws, "message")
            assert (got["channel"], got["text"], got["offset"]) == ("room", "hello", 1)
        ids = sorted(client_id for client_id, _ in clients)
        wait_for(lambda: http_json(f"{two.admin_url}/channels/room", token=TOKEN) ==
                 (200, {"channel": "room", "subscribers": 4, "clients": ids}))
        # one Redis subscription per instance, whatever its workers
        assert redis_server.client().pubsub_numsub("ebbcast:c/room") == [("ebbcast:c/room", 2)]
        target, target_ws = clients[-1]
        assert http_json(f"{one.admin_url}/clients/{target}/send", "POST", b"psst",
                         token=TOKEN) == (202, {"delivered": 0})
        assert recv_frame(target_ws, "direct")["text"] == "psst"
        assert metric(one, "ebbcast_channels") == 1 and metric(one, "ebbcast_subscriptions") == 2
    finally:
        close_all(opened)


def channel_epoch(ws: ClientConnection, channel: str) -> dict[str, Any]:
    """The next epoch frame of ``channel`` (the global stream's are skipped)."""
    while True:
        frame = recv_frame(ws, "epoch")
        if frame.get("channel") == channel:
            return frame


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path)
    yield made
    made.stop()


def test_after_a_failover_an_instance_subscribes_to_exactly_its_channels_again(
        spawn: Any, cluster: Cluster) -> None:
    one, two = start(spawn, cluster.url, 1), start(spawn, cluster.url, 2)
    opened: list[ClientConnection] = []
    try:
        near = dial(f"{one.ws_url}/near")
        far = dial(f"{two.ws_url}/far")
        opened += [near, far]
        for ws in (near, far):
            recv_frame(ws, "welcome")
            before_epoch = subscribe(ws, "room")["epoch"]
        subscribe(far, "other")
        publish(near, "room", "before")
        assert recv_frame(far, "message")["offset"] == 1
        killed = cluster.kill_master()
        promoted = cluster.wait_promoted(killed)
        master = promoted.client()
        wait_for(lambda: sorted(master.pubsub_channels("ebbcast:c/*")) ==
                 ["ebbcast:c/other", "ebbcast:c/room"])
        wait_for(lambda: master.pubsub_numsub("ebbcast:c/room") == [("ebbcast:c/room", 2)])
        # each instance, once on the new master, tells its subscribers: the promoted
        # replica's history is another epoch
        told = [channel_epoch(ws, "room") for ws in (near, far)]
        assert told[0] == told[1] and told[0]["epoch"] != before_epoch
        publish(near, "room", "after")
        for ws in (near, far):
            got = recv_frame(ws, "message")
            assert (got["text"], got["offset"]) == ("after", told[0]["offset"] + 1)
    finally:
        close_all(opened)
