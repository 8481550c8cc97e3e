"""Channel subscriptions survive moves (SPEC 14): 100 clients of the Python client
(``ebbcast.client.Session``), each subscribed to 10 channels while the admin API
publishes to all of them, moved through an upgrade and through a drain to a
second instance on Redis: in every channel, every client gets every message once,
in order, with consecutive offsets."""

from __future__ import annotations

import asyncio
import signal
from collections import defaultdict
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient

from ebbcast.client import Session
from helpers import QUICK, STEP_TIMEOUT, DaemonProcess, metric, wait_for

pytestmark = pytest.mark.processes
CHANNELS = [f"room{n}" for n in range(10)]
CLIENTS = 100
TOKEN = "secret-token"


class Follower:
    """One session, subscribed to every channel, recording each channel's messages."""

    def __init__(self, url: str) -> None:
        self.session = Session(url, reconnect=True)
        self.messages: dict[str, list[tuple[int, str]]] = defaultdict(list)
        self.welcomes = 0
        self.subscribed = 0
        self.notes: list[dict[str, Any]] = []
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.session.connect()
        for channel in CHANNELS:
            await self.session.subscribe(channel)
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for event in self.session:
            data = event.data
            if event.raw is None:
                self.notes.append(data)
            elif data.get("type") == "welcome":
                self.welcomes += 1
            elif data.get("type") == "subscribed":
                self.subscribed += 1
            elif data.get("type") == "message" and "channel" in data:
                self.messages[data["channel"]].append((data["offset"], data["text"]))

    def has(self, rounds: int) -> bool:
        return all(len(self.messages[c]) >= rounds for c in CHANNELS)


async def until(predicate: Any, timeout: float = STEP_TIMEOUT * 3) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "not in time"
        await asyncio.sleep(0.02)


async def through_a_move(subscribe_to: DaemonProcess, publish_to: DaemonProcess,
                         move: Any) -> list[Follower]:
    followers = [Follower(f"{subscribe_to.ws_url}/c{n}") for n in range(CLIENTS)]
    for follower in followers:
        await follower.start()
    await until(lambda: all(f.subscribed == len(CHANNELS) for f in followers))
    http = AsyncHTTPClient()
    sent = 0

    async def round_of_publishes() -> None:
        nonlocal sent
        await asyncio.gather(*(http.fetch(
            f"{publish_to.admin_url}/broadcast?channel={channel}", method="POST",
            body=str(sent), headers={"Authorization": f"Bearer {TOKEN}"})
            for channel in CHANNELS))
        sent += 1

    for _ in range(5):
        await round_of_publishes()
    move()
    deadline = asyncio.get_running_loop().time() + STEP_TIMEOUT * 3
    while not all(f.welcomes >= 2 for f in followers):  # every one has moved
        assert asyncio.get_running_loop().time() < deadline, \
            f"{sum(f.welcomes < 2 for f in followers)} clients have not moved"
        await round_of_publishes()
        await asyncio.sleep(0.05)
    for _ in range(5):
        await round_of_publishes()
    await until(lambda: all(f.has(sent) for f in followers))
    for follower in followers:
        await follower.session.aclose()
        assert follower.task is not None
        await follower.task
    http.close()
    return followers


def assert_each_channel_once_in_order(followers: list[Follower]) -> None:
    for follower in followers:
        assert follower.notes == [] or all("closed" in note for note in follower.notes)
        for channel in CHANNELS:
            offsets = [offset for offset, _ in follower.messages[channel]]
            texts = [int(text) for _, text in follower.messages[channel]]
            assert texts == list(range(len(texts))), (channel, texts)
            assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))


def test_an_upgrade_moves_every_channel_subscription_losing_and_repeating_nothing(
        spawn: Any) -> None:
    d = spawn("--port", "0", "--admin-port", "0", "--workers", "2",
              env={**QUICK, "EBBCAST_SHUTDOWN_UPGRADE_SPREAD": "2s"})
    followers = asyncio.run(through_a_move(d, d, lambda: d.signal(signal.SIGUSR2)))
    assert_each_channel_once_in_order(followers)
    assert all(f.welcomes == 2 for f in followers)


def test_a_drain_moves_every_channel_subscription_to_another_instance(
        spawn: Any, redis_server: Any) -> None:
    env = {**QUICK, "EBBCAST_BACKPLANE_URL": redis_server.url,
           "EBBCAST_SHUTDOWN_DRAIN_TIMEOUT": "60s"}
    two = spawn("--port", "0", "--admin-port", "0", env=env)
    wait_for(lambda: metric(two, "ebbcast_backplane_up") == 1)
    one = spawn("--port", "0", "--admin-port", "0", "--workers", "2", "--log-level", "debug",
                env=env)
    # both workers of one know where two is: their shutdown frames will name it
    wait_for(lambda: one.log_text().count(
        f"backplane: other instances at: {two.ws_url}") == 2)
    followers = asyncio.run(through_a_move(one, two, lambda: one.signal(signal.SIGTERM)))
    assert_each_channel_once_in_order(followers)
    assert one.wait_exit() == 0
