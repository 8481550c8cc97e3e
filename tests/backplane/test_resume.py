"""Resume (``/ws?since=N&epoch=E``) end to end, with daemons as subprocesses: a
publisher that never pauses, a subscriber cut off and resumed again and again;
across upgrades, drains, restarts and Redis restarts."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from helpers import (QUICK, STEP_TIMEOUT, DaemonProcess, RedisServer, metric, recv_json,
                     recv_until, serve_on_a_port_of_its_own, wait_for)

ROUNDS = 100


class Publisher:
    """Sends 0, 1, 2, ... as fast as the loop turns (1 ms apart), until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Publisher:
        self._ws = await connect(self.url, max_queue=None)  # never reads: never blocks
        await recv_json(self._ws)  # welcome
        self._task = asyncio.ensure_future(self._run())
        return self

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self._ws.send(str(self.sent))
            self.sent += 1
            await asyncio.sleep(0.001)

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task
        await self._ws.close()


class Subscriber:
    """One logical subscriber over many connections: checks every offset follows
    the last and records the numbers it was given."""

    def __init__(self) -> None:
        self.epoch: str | None = None
        self.offset = 0
        self.numbers: list[int] = []
        self.servers: set[str] = set()
        #: The ``missed`` of every resuming welcome.
        self.missed = 0

    def url(self, base: str) -> str:
        if self.epoch is None:
            return base
        return f"{base}?since={self.offset}&epoch={self.epoch}"

    async def connect(self, base: str) -> tuple[ClientConnection, dict[str, Any]]:
        ws = await connect(self.url(base))
        welcome = await recv_json(ws)
        assert welcome["type"] == "welcome"
        if self.epoch is None:
            self.epoch, self.offset = welcome["epoch"], welcome["offset"]
        else:
            assert welcome["recovered"] is True, welcome
            assert welcome["epoch"] == self.epoch
            self.missed += welcome["missed"]
        self.servers.add(welcome["server"])
        return ws, welcome

    def take(self, frame: dict[str, Any]) -> None:
        assert frame["offset"] == self.offset + 1, (frame, self.offset)
        self.offset = frame["offset"]
        self.numbers.append(int(frame["text"]))

    async def read(self, ws: ClientConnection, count: int) -> None:
        for _ in range(count):
            self.take(await recv_until(ws))

    def assert_every_number_once_in_order(self) -> None:
        first = self.numbers[0]
        assert self.numbers == list(range(first, first + len(self.numbers)))


async def kill_and_resume(publish_url: str, subscribe_urls: list[str]) -> Subscriber:
    """ROUNDS times: connect (resuming after the first), read a few live frames,
    then drop the TCP connection without a close handshake while the publisher
    goes on."""
    subscriber = Subscriber()
    async with Publisher(publish_url):
        for round_ in range(ROUNDS):
            ws, _ = await subscriber.connect(subscribe_urls[round_ % len(subscribe_urls)])
            await subscriber.read(ws, 3)
            ws.transport.abort()
            await ws.wait_closed()
    subscriber.assert_every_number_once_in_order()
    assert len(subscriber.numbers) >= 3 * ROUNDS
    return subscriber


def serve(spawn: Any, *args: str, **env: str) -> DaemonProcess:
    return spawn("--port", "0", "--admin-port", "0", *args, env={**QUICK, **env})


def test_a_killed_client_resumes_100_times_in_one_process(spawn):
    d = serve(spawn)
    subscriber = asyncio.run(kill_and_resume(d.ws_url, [d.ws_url]))
    assert metric(d, 'ebbcast_resumes_total{result="recovered"}') == ROUNDS - 1
    # what the welcomes said they replayed (how many, depends on the publisher's pace)
    assert metric(d, "ebbcast_resumed_messages_total") == subscriber.missed
    assert len(subscriber.servers) == 1


def test_a_killed_client_resumes_100_times_on_either_worker(spawn):
    d = serve(spawn, "--workers", "2")
    subscriber = asyncio.run(kill_and_resume(d.ws_url, [d.ws_url]))
    assert len(subscriber.servers) == 2  # resumed on the other worker too
    assert metric(d, 'ebbcast_resumes_total{result="recovered"}') == ROUNDS - 1


def test_a_killed_client_resumes_100_times_on_either_instance(spawn, redis_server):
    one = serve(spawn, EBBCAST_BACKPLANE_URL=redis_server.url)
    two = serve(spawn, "--workers", "2", EBBCAST_BACKPLANE_URL=redis_server.url)
    for d in (one, two):
        wait_for(lambda: metric(d, "ebbcast_backplane_up") == 1)
    subscriber = asyncio.run(kill_and_resume(one.ws_url, [one.ws_url, two.ws_url]))
    assert len(subscriber.servers) >= 2
    recovered = sum(metric(d, 'ebbcast_resumes_total{result="recovered"}') for d in (one, two))
    assert recovered == ROUNDS - 1


# -- moves: an upgrade, a drain to another instance ----------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_the_command_line_client_misses_nothing_across_an_upgrade(spawn, workers):
    """`ebbcast client --reconnect` moves make-before-break when the new generation
    serves, resuming from the last offset it printed, while the publisher goes on."""
    d = serve(spawn, "--workers", str(workers), EBBCAST_SHUTDOWN_UPGRADE_SPREAD="1s")

    async def scenario() -> list[dict[str, Any]]:
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ebbcast", "client", d.ws_url, "--reconnect",
            "--listen", "30", stdout=subprocess.PIPE)
        assert client.stdout is not None
        lines: list[dict[str, Any]] = []

        async def line() -> dict[str, Any]:
            raw = await asyncio.wait_for(client.stdout.readline(), STEP_TIMEOUT)  # type: ignore
            lines.append(json.loads(raw))
            return lines[-1]

        assert (await line())["type"] == "welcome"
        async with Publisher(d.ws_url) as publisher:
            while len(lines) < 50:
                await line()
            d.signal(signal.SIGUSR2)
            while sum(1 for frame in lines if frame.get("type") == "welcome") < 2:
                await line()  # moved: the new generation's welcome, recovered
            for _ in range(50):
                await line()
        while lines[-1].get("text") != str(publisher.sent - 1):
            await line()
        client.terminate()
        await client.wait()
        return lines

    lines = asyncio.run(scenario())
    welcomes = [frame for frame in lines if frame.get("type") == "welcome"]
    assert welcomes[1]["recovered"] is True and welcomes[1]["server"] != welcomes[0]["server"]
    messages = [frame for frame in lines if frame.get("type") == "message"]
    numbers = [int(frame["text"]) for frame in messages]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # once, in order
    offsets = [frame["offset"] for frame in messages]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    assert not any("resume" in frame for frame in lines)


def test_a_client_moved_by_a_drain_to_another_instance_misses_nothing(spawn, redis_server):
    one = serve(spawn, EBBCAST_BACKPLANE_URL=redis_server.url)
    two = serve(spawn, EBBCAST_BACKPLANE_URL=redis_server.url)
    for d in (one, two):
        wait_for(lambda: metric(d, "ebbcast_backplane_up") == 1)

    async def scenario() -> Subscriber:
        subscriber = Subscriber()
        async with Publisher(two.ws_url):
            old, _ = await subscriber.connect(one.ws_url)
            await subscriber.read(old, 20)
            one.signal(signal.SIGTERM)
            while (frame := await recv_json(old))["type"] != "shutdown":
                if frame["type"] == "message":
                    subscriber.take(frame)
            new, welcome = await subscriber.connect(two.ws_url)  # make...
            await old.close()  # ...before break
            await subscriber.read(new, 50)
            await new.close()
        return subscriber

    subscriber = asyncio.run(scenario())
    subscriber.assert_every_number_once_in_order()
    assert one.wait_exit() == 0


# -- when it cannot recover ----------------------------------------------------------

async def resume_once(url: str, since: int, epoch: str,
                      then: Callable[[], Awaitable[object]]) -> tuple[dict[str, Any], ...]:
    """Resume, then make a broadcast happen; the welcome and the next message."""
    async with connect(f"{url}?since={since}&epoch={epoch}") as ws:
        welcome = await recv_json(ws)
        await then()
        return welcome, await recv_until(ws)


def test_after_a_full_restart_the_epoch_is_new_and_nothing_is_recovered(spawn):
    d = serve(spawn)

    async def first_life() -> dict[str, Any]:
        async with connect(d.ws_url) as ws:
            await recv_json(ws)
            await ws.send("before the restart")
            return await recv_until(ws)

    before = asyncio.run(first_life())
    epoch = json.loads(subprocess.run(
        [sys.executable, "-m", "ebbcast", "client", d.ws_url, "--count", "1"],
        capture_output=True, text=True, timeout=STEP_TIMEOUT).stdout)["epoch"]
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    again = serve(spawn)  # a new daemon (its port does not matter: the epoch does)

    async def resume() -> tuple[dict[str, Any], ...]:
        async def publish() -> None:
            async with connect(again.ws_url) as other:
                await recv_json(other)
                await other.send("after the restart")
        return await resume_once(again.ws_url, before["offset"], epoch, publish)

    welcome, live = asyncio.run(resume())
    assert welcome["recovered"] is False and welcome["epoch"] != epoch
    assert "missed" not in welcome
    assert (live["text"], live["offset"]) == ("after the restart", 1)  # then live frames
    assert metric(again, 'ebbcast_resumes_total{result="not_recovered"}') == 1


async def one_client_on_each_worker(url: str,
                                    workers: int) -> list[tuple[ClientConnection, dict[str, Any]]]:
    """Connect until every worker has a client (told apart by the ``server`` of its
    welcome); the others are closed. Each client with its welcome."""
    on: dict[str, tuple[ClientConnection, dict[str, Any]]] = {}
    for _ in range(200):
        ws = await connect(url)
        welcome = await recv_json(ws)
        if welcome["server"] in on:
            await ws.close()
        on.setdefault(welcome["server"], (ws, welcome))
        if len(on) == workers:
            return list(on.values())
    raise AssertionError("the kernel never picked every worker")


def test_an_offset_older_than_the_history_is_not_recovered(spawn):
    """Two workers, each resume made once both have delivered every broadcast, so
    the worker it lands on is never behind (a worker behind makes the client wait:
    tested on its own)."""
    d = serve(spawn, "--workers", "2", EBBCAST_HISTORY_SIZE="3")

    async def scenario() -> tuple[dict[str, Any], ...]:
        watchers = await one_client_on_each_worker(d.ws_url, 2)
        sender, welcome = watchers[0]
        base, epoch = welcome["offset"], welcome["epoch"]

        async def publish(text: str) -> None:
            await sender.send(text)
            for watcher, _ in watchers:  # every worker has delivered it
                assert (await recv_until(watcher))["text"] == text

        for n in range(6):
            await publish(str(n))
        # 6 broadcasts, 3 kept: the 4th to the 6th; the 2nd is gone
        old, live = await resume_once(d.ws_url, base + 1, epoch, lambda: publish("live"))
        # 7 now, the 5th to the 7th kept
        async with connect(f"{d.ws_url}?since={base + 4}&epoch={epoch}") as again:
            recent = await recv_json(again)
            await publish("later")  # the 8th
            after = [(await recv_until(again))["offset"] - base for _ in range(4)]
        for watcher, _ in watchers:
            await watcher.close()
        return old, live, recent, after

    old, live, recent, after = asyncio.run(scenario())
    assert old["recovered"] is False and live["text"] == "live"
    assert (recent["recovered"], recent["missed"]) == (True, 3)
    assert after == [5, 6, 7, 8]  # each once, in order: replayed, then live


def test_invalid_since_is_refused_with_400_and_a_reason(spawn):
    d = serve(spawn)
    from websockets.exceptions import InvalidStatus

    async def attempt(query: str) -> Any:
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"{d.ws_url}?{query}")
        return refused.value.response

    for query in ("since=-1&epoch=x", "since=abc&epoch=x", "since=1e3&epoch=x"):
        response = asyncio.run(attempt(query))
        assert response.status_code == 400 and b"invalid since" in response.body

    async def fine() -> dict[str, Any]:  # the same request with a valid since is served
        async with connect(f"{d.ws_url}?since=0&epoch=x") as ws:
            return await recv_json(ws)

    assert asyncio.run(fine())["recovered"] is False


def test_a_redis_restart_starts_a_new_epoch_that_clients_are_told(spawn, redis_server):
    d = serve(spawn, EBBCAST_BACKPLANE_URL=redis_server.url)
    wait_for(lambda: metric(d, "ebbcast_backplane_up") == 1)

    async def scenario() -> tuple[dict[str, Any], ...]:
        async with connect(d.ws_url) as ws:
            welcome = await recv_json(ws)
            await ws.send("one")
            one = await recv_until(ws)
            restart(redis_server)
            epoch_frame = await recv_json(ws)  # the history was lost with Redis: told

            async def publish() -> None:
                await ws.send("two")

            resumed, live = await resume_once(d.ws_url, one["offset"], welcome["epoch"],
                                              publish)
            return welcome, epoch_frame, resumed, live

    welcome, epoch_frame, resumed, live = asyncio.run(scenario())
    assert epoch_frame["type"] == "epoch" and epoch_frame["epoch"] != welcome["epoch"]
    assert resumed["recovered"] is False and resumed["epoch"] == epoch_frame["epoch"]
    assert (live["text"], live["offset"]) == ("two", epoch_frame["offset"] + 1)


def restart(redis_server: RedisServer) -> None:
    redis_server.stop()
    redis_server.start()


# -- in one process on its own (the embedded daemon) ---------------------------------

async def test_an_embedded_daemon_sequences_and_replays_by_itself(start_daemon):
    from helpers import recv_json

    d = await start_daemon()
    a, welcome = await d.connect_welcomed()
    await a.write_message("one")
    one = await recv_json(a)
    assert one["offset"] == welcome["offset"] + 1 == 1
    await a.write_message("two")
    await recv_json(a)
    b, resumed = await d.connect_welcomed(f"?since=1&epoch={welcome['epoch']}")
    assert (resumed["recovered"], resumed["missed"]) == (True, 1)
    assert (await recv_json(b))["text"] == "two"


async def test_a_client_ahead_of_this_process_waits_for_it_instead_of_not_recovering(
        start_daemon):
    """A client may have seen an offset (on another worker or instance) that this
    process has not delivered yet: its handshake waits for it, then recovers."""
    from helpers import recv_json, wait_until

    d = await start_daemon()
    a, welcome = await d.connect_welcomed()
    ahead = asyncio.ensure_future(
        d.connect_welcomed(f"?since={welcome['offset'] + 1}&epoch={welcome['epoch']}"))
    broadcasts = d.daemon.broadcasts
    await wait_until(lambda: broadcasts.waiting == 1)  # it waits for offset 1
    await a.write_message("seen elsewhere already")
    b, resumed = await asyncio.wait_for(ahead, STEP_TIMEOUT)
    assert (resumed["recovered"], resumed["missed"]) == (True, 0)
    await a.write_message("new")
    frame = await recv_json(b)  # not the one it had seen
    assert (frame["text"], frame["offset"]) == ("new", welcome["offset"] + 2)


def from_the_future(welcome: dict[str, Any]) -> str:
    """A resume from an offset this epoch will not reach: its handshake waits the
    whole CATCH_UP_SECONDS, then goes on."""
    return f"?since={welcome['offset'] + 10**15}&epoch={welcome['epoch']}"


async def handshake_status(url: str, kept: list[Any]) -> int:
    """101 (welcomed: the connection is kept open in ``kept``) or the HTTP status of
    the refusal."""
    from tornado.httpclient import HTTPClientError
    from tornado.websocket import websocket_connect

    try:
        conn = await asyncio.wait_for(websocket_connect(url), STEP_TIMEOUT)
    except HTTPClientError as refused:
        return refused.code
    kept.append(conn)
    assert (await recv_json(conn))["type"] == "welcome"
    return 101


async def test_resumes_that_time_out_waiting_leave_no_waiter_behind(start_daemon):
    d = await start_daemon()
    _, welcome = await d.connect_welcomed()
    kept: list[Any] = []
    statuses = await asyncio.gather(*(handshake_status(d.ws_url + from_the_future(welcome),
                                                       kept) for _ in range(200)))
    assert statuses == [101] * 200  # welcomed, not recovered, after the wait
    assert d.daemon.broadcasts.waiting == 0
    for conn in kept:
        conn.close()


async def test_the_connection_limit_holds_for_handshakes_that_waited(start_daemon):
    """max_connections is checked when a connection is admitted, after any wait."""
    d = await start_daemon(server__max_connections="5")
    _, welcome = await d.connect_welcomed()  # one of the five
    kept: list[Any] = []  # open until every handshake is answered
    statuses = await asyncio.gather(*(handshake_status(d.ws_url + from_the_future(welcome),
                                                       kept) for _ in range(30)))
    assert sorted(statuses) == [101] * 4 + [503] * 26
    for conn in kept:
        conn.close()
    rejected = d.daemon.metrics.rejected.labels("max_connections")._value.get()
    assert rejected == 26


async def test_with_workers_each_holds_its_connection_limit_for_handshakes_that_waited(
        io_loop, spawn):
    """--workers 2, server.max_connections 5 (per serving process): 30 resumes from
    the future, each admitted after its wait or refused then; no worker holds more
    than 5, one that refused holds exactly 5, and every 101 is a connection there."""
    from tornado.websocket import websocket_connect

    from helpers import FAST, http_json

    d = spawn(*FAST, "--workers", "2", env={**QUICK, "EBBCAST_SERVER_MAX_CONNECTIONS": "5"})
    first = await websocket_connect(d.ws_url)
    welcome = await recv_json(first)
    kept: list[Any] = [first]  # open until every handshake is answered and counted
    statuses = await asyncio.gather(*(handshake_status(d.ws_url + from_the_future(welcome),
                                                       kept) for _ in range(30)))
    _, status = await asyncio.to_thread(http_json, d.admin_url + "/status")
    for conn in kept:
        conn.close()
    per_worker = [w["connections"] for w in status["workers"]]
    assert max(per_worker) == 5 and len(per_worker) == 2, per_worker
    welcomed = sum(per_worker) - 1  # the first client's is one of them
    assert sorted(statuses) == [101] * welcomed + [503] * (30 - welcomed)


@pytest.mark.parametrize("client_stays", [True, False], ids=["draining", "no client left"])
async def test_a_drain_refuses_the_handshakes_still_waiting(start_daemon, monkeypatch,
                                                            client_stays):
    """Waiting far longer than STEP_TIMEOUT: the drain's start itself answers them;
    with no connection to drain, the process stops at once and answers them first."""
    from helpers import wait_until

    monkeypatch.setattr("ebbcast.serving.handlers.CATCH_UP_SECONDS", 10 * STEP_TIMEOUT)
    d = await start_daemon(shutdown__drain_timeout="60s")
    a, welcome = await d.connect_welcomed()
    if not client_stays:
        a.close()
        await wait_until(lambda: len(d.daemon.ctx.registry) == 0)
    kept: list[Any] = []
    waiting = [asyncio.ensure_future(handshake_status(d.ws_url + from_the_future(welcome),
                                                      kept)) for _ in range(3)]
    await wait_until(lambda: d.daemon.broadcasts.waiting == 3)
    d.daemon.record_signal(signal.SIGTERM)
    assert await asyncio.gather(*waiting) == [503] * 3
    assert d.daemon.metrics.rejected.labels("draining")._value.get() == 3
    a.close()
    await d.stopped()


async def test_with_workers_a_drain_refuses_the_handshakes_still_waiting(io_loop, spawn, tmp_path):
    """--workers 2, from a copy whose catch-up wait is a minute and that says on
    stderr when a handshake starts waiting: six resumes from the future wait, then
    SIGTERM; each is answered 503 within STEP_TIMEOUT, so by the drain's start,
    even by a worker with no client left to drain (it stops at once)."""
    from tornado.websocket import websocket_connect

    from helpers import FAST, package_copy, patch_module, wait_for

    root = package_copy(tmp_path)
    patch_module(root, "serving/handlers.py", "CATCH_UP_SECONDS = 1.0\n",
                 "CATCH_UP_SECONDS = 60.0\n")
    patch_module(root, "serving/broadcasts.py", "        self._waiters.append(entry)\n",
                 "        print('a handshake waits', file=__import__('sys').stderr, flush=True)\n")
    d = spawn(*FAST, "--workers", "2", "--drain-timeout", "60s",
              env={**QUICK, "PYTHONPATH": str(root)}, cwd=tmp_path)
    first = await websocket_connect(d.ws_url)
    welcome = await recv_json(first)
    kept: list[Any] = [first]
    waiting = [asyncio.ensure_future(handshake_status(d.ws_url + from_the_future(welcome),
                                                      kept)) for _ in range(6)]
    await asyncio.to_thread(wait_for, lambda: d.log_text().count("a handshake waits") == 6)
    d.signal(signal.SIGTERM)
    assert await asyncio.gather(*waiting) == [503] * 6
    for conn in kept:
        conn.close()
    assert await asyncio.to_thread(d.wait_exit) == 0


def test_the_command_line_client_says_when_it_could_not_resume(spawn):
    """A full restart loses an in-memory history: `ebbcast client --reconnect` comes
    back to the new daemon, says it could not resume, and goes on."""
    first = serve_on_a_port_of_its_own(spawn, "--admin-port", "0", "--drain-timeout", "60s",
                                       env=QUICK)
    client = subprocess.Popen(
        [sys.executable, "-m", "ebbcast", "client", first.ws_url, "--reconnect",
         "--listen", "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        welcome = json.loads(client.stdout.readline())
        first.signal(signal.SIGTERM)
        first.wait_for_log("drain started")
        first.signal(signal.SIGTERM)  # the second one closes the client now
        assert first.wait_exit() == 0
        port = first.ws_url.rsplit(":", 1)[1].split("/")[0]  # never handed out meanwhile
        spawn("--port", port, "--admin-port", "0", env=QUICK)
        lines = []
        while not any("resume" in line for line in lines):
            lines.append(json.loads(client.stdout.readline()))
        assert lines[-1] == {"resume": "not_recovered", "since": welcome["offset"],
                             "epoch": welcome["epoch"]}
        again = json.loads(client.stdout.readline())
        assert again["type"] == "welcome" and again["recovered"] is False
    finally:
        client.kill()
        client.communicate()  # reaps it and closes its stdout
