"""Channels through the main process (SPEC 14), with ``ebbcast serve --workers N``:
one order per channel for every worker, presence and ``GET /channels`` for the
whole daemon, a direct message to a client id on another worker, unsubscribe, a
resume per channel on another worker than the one the client left (and one into an
epoch no worker knows), the token's claims and the limits on each worker, the
handshake's refusals, and the metrics."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import jwt
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection

from helpers import (
    STEP_TIMEOUT,
    close_all,
    dial,
    http_json,
    metric,
    one_client_per_worker,
    recv_frame,
    start_workers,
    wait_for,
)

pytestmark = pytest.mark.processes
TOKEN = "secret-token"


def command(ws: ClientConnection, **fields: Any) -> None:
    ws.send(json.dumps(fields))


def subscribe(ws: ClientConnection, channel: str, **options: Any) -> dict[str, Any]:
    command(ws, type="subscribe", channel=channel, **options)
    return recv_frame(ws, "subscribed")


@pytest.mark.parametrize("workers", [1, 2])
def test_channels_are_one_conversation_across_workers(spawn: Any, workers: int) -> None:
    d = start_workers(spawn, workers)
    opened: list[ClientConnection] = []
    try:
        clients = one_client_per_worker(d, workers, opened)
        (first_id, first), (last_id, last) = clients[0], clients[-1]
        if workers == 1:  # a second client on the one worker
            last_id, last = "other", dial(f"{d.ws_url}/other")
            opened.append(last)
            recv_frame(last, "welcome")
        positions = {subscribe(first, "room", presence=True)["epoch"]}
        assert recv_frame(first, "join")["client_id"] == first_id
        positions.add(subscribe(last, "room")["epoch"])
        assert len(positions) == 1  # one epoch for the channel, whichever worker
        assert recv_frame(first, "join")["client_id"] == last_id
        command(last, type="publish", channel="room", text="hello")
        for ws in (first, last):
            got = recv_frame(ws, "message")
            assert (got["channel"], got["from"], got["offset"]) == ("room", last_id, 1)
        code, room = http_json(f"{d.admin_url}/channels/room", token=TOKEN)
        assert (code, room) == (200, {"channel": "room", "subscribers": 2,
                                      "clients": sorted([first_id, last_id])})
        code, sent = http_json(f"{d.admin_url}/clients/{first_id}/send", "POST", b"psst",
                               token=TOKEN)
        assert (code, sent) == (202, {"delivered": 1})
        assert recv_frame(first, "direct")["text"] == "psst"
        wait_for(lambda: metric(d, "ebbcast_subscriptions") == 2)
        assert metric(d, "ebbcast_channels") == 1
        command(last, type="unsubscribe", channel="room")
        assert recv_frame(last, "unsubscribed") == {"type": "unsubscribed", "channel": "room",
                                                    "reason": "client"}
        assert recv_frame(first, "leave")["client_id"] == last_id
        command(first, type="publish", channel="room", text="after")
        assert recv_frame(first, "message")["offset"] == 2
        command(last, type="unsubscribe", channel="room")
        while (frame := json.loads(last.recv(timeout=STEP_TIMEOUT)))["type"] != "error":
            assert frame.get("channel") != "room", frame  # "after" never reached it
        assert frame == {"type": "error", "error": "not_subscribed", "channel": "room"}
    finally:
        close_all(opened)


@pytest.mark.parametrize("workers", [2])
def test_a_channel_resumes_on_another_worker_with_nothing_lost_or_repeated(
        spawn: Any, workers: int) -> None:
    d = start_workers(spawn, workers)
    opened: list[ClientConnection] = []
    try:
        (_, here), (_, there) = one_client_per_worker(d, workers, opened)
        epoch = subscribe(here, "c")["epoch"]
        command(there, type="publish", channel="c", text="m1")
        assert recv_frame(here, "message")["offset"] == 1
        here.close()
        for n in (2, 3):
            command(there, type="publish", channel="c", text=f"m{n}")
        code, _ = http_json(f"{d.admin_url}/broadcast?channel=c", "POST", b"m4", token=TOKEN)
        assert code == 202
        answer = subscribe(there, "c", since=1, epoch=epoch)
        assert (answer["recovered"], answer["missed"], answer["offset"]) == (True, 3, 4)
        replayed = [recv_frame(there, "message") for _ in range(3)]
        assert [m["offset"] for m in replayed] == [2, 3, 4]
        # the admin's publish may be sequenced before the worker's reach the main process
        texts = [m["text"] for m in replayed]
        assert sorted(texts) == ["m2", "m3", "m4"] and texts.index("m2") < texts.index("m3")
        command(there, type="publish", channel="c", text="m5")
        assert recv_frame(there, "message")["offset"] == 5
        late = dial(f"{d.ws_url}/late")  # on either worker: an epoch no worker knows
        opened.append(late)
        recv_frame(late, "welcome")
        wrong = subscribe(late, "c", since=0, epoch="another")
        assert (wrong["recovered"], wrong["epoch"], wrong["offset"]) == (False, epoch, 5)
        assert "missed" not in wrong
        command(there, type="publish", channel="c", text="m6")
        assert recv_frame(late, "message")["offset"] == 6  # nothing replayed before it
    finally:
        close_all(opened)


def test_the_command_line_client_subscribes_and_publishes(spawn: Any) -> None:
    d = start_workers(spawn, 2)
    done = subprocess.run(
        [sys.executable, "-m", "ebbcast", "client", f"{d.ws_url}/cli", "--subscribe", "a",
         "--subscribe", "b", "--publish", "b", "to b", "--count", "4"],
        capture_output=True, text=True, timeout=STEP_TIMEOUT * 2)
    assert done.returncode == 0, done.stderr
    frames = [json.loads(line) for line in done.stdout.splitlines()]
    assert [f["type"] for f in frames] == ["welcome", "subscribed", "subscribed", "message"]
    assert [f["channel"] for f in frames[1:]] == ["a", "b", "b"]
    assert (frames[3]["from"], frames[3]["text"], frames[3]["offset"]) == ("cli", "to b", 1)


def test_the_tokens_claims_and_the_limits_hold_on_every_worker(spawn: Any) -> None:
    key = "k" * 40
    d = start_workers(spawn, 2, EBBCAST_AUTH_MODE="jwt", EBBCAST_AUTH_JWT_KEY=key,
                      EBBCAST_CHANNELS_MAX_PER_CONNECTION="1")
    opened: list[ClientConnection] = []
    try:
        def token(n: int) -> str:
            return "?token=" + jwt.encode(
                {"sub": f"c{n}", "exp": time.time() + 60, "channels": ["scores.*"],
                 "publish": ["scores.a"]}, key.encode(), algorithm="HS256")

        found = [ws for _, ws in one_client_per_worker(d, 2, opened, path=token)]
        for ws in found:  # the same answers on either worker
            command(ws, type="subscribe", channel="news")
            assert recv_frame(ws, "error") == {"type": "error", "error": "forbidden",
                                               "channel": "news"}
            assert subscribe(ws, "scores.a")["channel"] == "scores.a"
            command(ws, type="subscribe", channel="scores.b")
            assert recv_frame(ws, "error") == {"type": "error", "error": "too_many_channels",
                                               "channel": "scores.b"}
            command(ws, type="publish", channel="scores.b", text="no")
            assert recv_frame(ws, "error")["error"] == "forbidden"
            ws.send("global text")
            assert recv_frame(ws, "error")["error"] == "read_only"
        first, second = found
        command(first, type="publish", channel="scores.a", text="goal")
        for ws in (first, second):
            assert recv_frame(ws, "message")["text"] == "goal"
    finally:
        close_all(opened)


def test_channels_max_and_the_handshakes_refusals_hold_on_every_worker(spawn: Any) -> None:
    """``channels.max`` counts each worker's own channels; a handshake naming a
    channel it cannot have is refused for that channel's reason, on whichever
    worker takes it (each case tried often enough to reach both)."""
    key = "k" * 40
    d = start_workers(spawn, 2, EBBCAST_AUTH_MODE="jwt", EBBCAST_AUTH_JWT_KEY=key,
                      EBBCAST_CHANNELS_MAX="1", EBBCAST_CHANNELS_MAX_PER_CONNECTION="2")
    fan = jwt.encode({"sub": "fan", "exp": time.time() + 60, "channels": ["scores.*"]},
                     key.encode(), algorithm="HS256")
    opened: list[ClientConnection] = []
    try:
        found = one_client_per_worker(d, 2, opened, path=lambda n: f"?token={fan}")
        for n, (_, ws) in enumerate(found):  # one channel each: the limit is a worker's
            assert subscribe(ws, f"scores.w{n}")["channel"] == f"scores.w{n}"
            command(ws, type="subscribe", channel="scores.more")  # 1 of 2 on the connection
            assert recv_frame(ws, "error") == {"type": "error", "error": "too_many_channels",
                                               "channel": "scores.more"}
        cases = [("scores.w0,bad%20name", 400, "invalid channel: 'bad name'"),
                 ("scores.a,scores.b,scores.c", 400, "too many channels: scores.c"),
                 ("news", 403, "forbidden channel: news"),
                 ("scores.new", 400, "too_many_channels: scores.new")]  # channels.max
        for _ in range(8):
            for channels, status, reason in cases:
                with pytest.raises(InvalidStatus) as refused:
                    opened.append(dial(f"{d.ws_url}?channels={channels}&token={fan}"))
                response = refused.value.response
                assert response.status_code == status, response.body
                assert reason in response.body.decode()
    finally:
        close_all(opened)


def every_worker_told(d: Any, pattern: str, start: int, workers: int = 2) -> None:
    """Each worker has logged ``pattern`` (a record from the main process reached it)
    from log line ``start`` on."""
    for _ in range(workers):
        start = d.wait_for_log_index(pattern, start=start) + 1


def test_while_redis_is_away_a_workers_client_is_told_its_publish_did_not_go(
        spawn: Any, redis_server: Any) -> None:
    """The main process tells its workers when its channels cannot publish (Redis
    away): a worker's client then gets the ``unavailable`` error, as a client of a
    process on its own does, instead of a publish lost on the way without a word."""
    d = start_workers(spawn, 2, EBBCAST_BACKPLANE_URL=redis_server.url)
    d.wait_for_log(r"channels: connected to")
    opened: list[ClientConnection] = []
    try:
        clients = one_client_per_worker(d, 2, opened)
        for _, ws in clients:
            subscribe(ws, "room")
        redis_server.stop()
        lost = d.wait_for_log_index(r"channels: lost 127\.0\.0\.1:\d+")
        every_worker_told(d, r"channels: publishes are refused", start=lost)
        for _, ws in clients:
            command(ws, type="publish", channel="room", text="during")
            assert recv_frame(ws, "error") == {"type": "error", "error": "unavailable",
                                               "channel": "room"}
        redis_server.start()
        back = d.wait_for_log_index(r"channels: connected to", start=lost)
        every_worker_told(d, r"channels: publishes go out again", start=back)
        command(clients[0][1], type="publish", channel="room", text="after")
        for _, ws in clients:  # "during" never went: "after" is the first message
            assert recv_frame(ws, "message")["text"] == "after"
    finally:
        close_all(opened)


def test_a_worker_started_while_redis_is_away_refuses_channel_publishes(spawn: Any) -> None:
    """A worker starts out assuming its main process's channels can publish; one that
    starts while they cannot is told so at once, and its clients get ``unavailable``."""
    import socket

    with socket.socket() as held:  # a port where no Redis will ever answer
        held.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{held.getsockname()[1]}/0"
        d = start_workers(spawn, 2, EBBCAST_BACKPLANE_URL=url)
        opened: list[ClientConnection] = []
        try:
            for _, ws in one_client_per_worker(d, 2, opened):
                command(ws, type="publish", channel="room", text="never")
                assert recv_frame(ws, "error") == {"type": "error", "error": "unavailable",
                                                   "channel": "room"}
        finally:
            close_all(opened)
