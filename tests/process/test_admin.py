"""Integration: the admin listener and the drain, in process, over real sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time

import pytest

from helpers import (STEP_TIMEOUT, promtool_accepts, recv, recv_json, recv_until, sample,
                     wait_until)
from ebbcast.core.lifecycle import StopReason

TOKEN = "secret-token"


async def test_healthz_readyz_status_while_serving(start_daemon):
    d = await start_daemon()
    conn, _ = await d.connect_welcomed()
    health = await d.admin("/healthz")
    assert (health.code, json.loads(health.body)) == (200, {"status": "ok"})
    ready = await d.admin("/readyz")
    assert ready.code == 200
    status = json.loads((await d.admin("/status")).body)
    assert status["state"] == "serving" and status["connections"] == 1
    assert status["workers"] == [{"pid": os.getpid(), "connections": 1}]  # in-process
    running_for = time.monotonic() - d.daemon.ctx.started_mono
    # /status rounds to milliseconds; rounding is monotonic, so compare rounded values
    assert 0 < status["uptime_seconds"] <= round(running_for, 3) and "drain" not in status


async def test_metrics_exposes_every_spec_metric(start_daemon):
    d = await start_daemon()
    conn, _ = await d.connect_welcomed()
    await conn.write_message("hi")
    await recv_json(conn)
    response = await d.admin("/metrics")
    text = response.body.decode()
    assert response.headers["Content-Type"].startswith("text/plain")
    for name in ("ebbcast_connections 1.0", "ebbcast_connections_accepted_total 1.0",
                 'ebbcast_connections_rejected_total{reason="draining"} 0.0',
                 'ebbcast_disconnections_total{reason="slow_consumer"} 0.0',
                 "ebbcast_messages_received_total 1.0",
                 "ebbcast_messages_sent_total 2.0",  # the welcome and the echo
                 'ebbcast_broadcasts_total{source="client"} 1.0',
                 "ebbcast_broadcast_duration_seconds_count 1.0",
                 "ebbcast_draining 0.0", "ebbcast_drain_started_timestamp_seconds 0.0",
                 "ebbcast_drain_deadline_timestamp_seconds 0.0", "ebbcast_backplane_up 1.0",
                 'ebbcast_build_info{version="'):
        assert name in text, name


async def test_post_broadcast_reaches_every_client_with_token_only(start_daemon):
    d = await start_daemon()
    a, _ = await d.connect_welcomed()
    b, _ = await d.connect_welcomed()
    assert (await d.admin("/broadcast", "POST", "x")).code == 401
    assert (await d.admin("/broadcast", "POST", "x", token="wrong")).code == 401
    accepted = await d.admin("/broadcast", "POST", "deploy at 5", token=TOKEN)
    assert (accepted.code, json.loads(accepted.body)) == (202, {"recipients": 2})
    for conn in (a, b):
        frame = await recv_json(conn)
        assert (frame["type"], frame["from"], frame["text"]) == ("message", "admin",
                                                                 "deploy at 5")
    assert d.daemon.metrics.broadcasts.labels("admin")._value.get() == 1


async def test_an_empty_broadcast_is_refused_and_reaches_no_one(start_daemon):
    d = await start_daemon()
    a, _ = await d.connect_welcomed()
    empty = await d.admin("/broadcast", "POST", "", token=TOKEN)
    assert (empty.code, json.loads(empty.body)) == (400, {"error": "empty body: nothing "
                                                                   "to broadcast"})
    assert (await d.admin("/broadcast", "POST", "then this", token=TOKEN)).code == 202
    assert (await recv_json(a))["text"] == "then this"  # the first frame a gets
    assert d.daemon.metrics.broadcasts.labels("admin")._value.get() == 1


async def test_no_client_can_speak_as_the_admin(start_daemon):
    """/ws/admin is refused: a client's frames would read as a POST /broadcast."""
    from tornado.httpclient import HTTPClientError

    d = await start_daemon()
    with pytest.raises(HTTPClientError) as caught:
        await d.connect("/admin")
    assert (caught.value.code, caught.value.response.body) == (
        400, b"invalid client id: admin is reserved\n")
    assert d.daemon.metrics.rejected.labels("client_id")._value.get() == 1
    await d.connect_welcomed("/administrator")  # only that one id


async def test_admin_actions_are_404_without_a_token(start_daemon):
    d = await start_daemon(admin__token="")
    assert (await d.admin("/broadcast", "POST", "x", token="")).code == 404
    assert (await d.admin("/drain", "POST", "", token="anything")).code == 404
    assert (await d.admin("/upgrade", "POST", "", token="anything")).code == 404
    assert (await d.admin("/readyz")).code == 200  # still serving


async def test_every_admin_action_needs_the_token(start_daemon):
    """/broadcast, /drain and /upgrade, as the docs list them: 401 without the right
    token, before anything is done (the daemon still serves, generation 1)."""
    d = await start_daemon()
    for path in ("/broadcast", "/drain", "/upgrade"):
        for token in (None, "wrong"):
            assert (await d.admin(path, "POST", "x", token=token)).code == 401, path
    status = json.loads((await d.admin("/status")).body)
    assert status["state"] == "serving"


async def test_drain_refuses_new_clients_notifies_and_keeps_serving(start_daemon):
    d = await start_daemon(shutdown__drain_timeout="60s", shutdown__progress_interval="50ms")
    a, _ = await d.connect_welcomed("/a")
    b, _ = await d.connect_welcomed("/b")
    before = time.time()
    accepted = await d.admin("/drain", "POST", "", token=TOKEN)
    assert (accepted.code, json.loads(accepted.body)) == (202, {"state": "draining"})
    for conn in (a, b):
        frame = await recv_json(conn)
        assert frame["type"] == "shutdown" and frame["reason"] == "draining"
        assert before + 59 <= frame["deadline"] <= time.time() + 61
        assert 0 < frame["reconnect_after_ms"] <= 60000
    assert (await d.admin("/readyz")).code == 503
    status = json.loads((await d.admin("/status")).body)
    assert status["state"] == "draining"
    assert status["drain"]["remaining"] == 2 and 0 < status["drain"]["seconds_left"] <= 60
    assert (await d.admin("/drain", "POST", "", token=TOKEN)).code == 202  # idempotent
    metrics = (await d.admin("/metrics")).body.decode()
    assert sample(metrics, "ebbcast_draining") == 1
    deadline = sample(metrics, "ebbcast_drain_deadline_timestamp_seconds")
    assert abs(deadline - status["drain"]["deadline"]) < 0.01
    with pytest.raises(ConnectionRefusedError):  # the listener is closed
        await d.connect()
    await a.write_message("still chatting")  # the clients keep being served
    assert (await recv_json(b))["text"] == "still chatting"
    a.close()
    await wait_until(lambda: len(d.daemon.ctx.registry) == 1)
    ticked = d.daemon._progress.next_at
    await wait_until(lambda: d.daemon._progress.next_at > ticked)  # a drain step has run since
    assert d.daemon.lifecycle.state.value == "draining" and not d.task.done()
    b.close()
    assert await d.stopped() is StopReason.DRAINED


async def test_drain_deadline_closes_clients_with_close_code(start_daemon):
    d = await start_daemon(shutdown__drain_timeout="300ms", shutdown__close_code="4000")
    conn, _ = await d.connect_welcomed()
    d.daemon.record_signal(signal.SIGTERM)
    await recv_until(conn, "shutdown")
    assert await recv(conn) is None
    assert conn.close_code == 4000
    assert await d.stopped() is StopReason.DEADLINE
    assert d.daemon.metrics.disconnections.labels("drain_deadline")._value.get() == 1


async def test_second_signal_closes_clients_now_with_1001(start_daemon):
    # 1001 whatever shutdown.close_code says: that code is for the deadline
    d = await start_daemon(shutdown__drain_timeout="60s", shutdown__close_code="4000")
    conn, _ = await d.connect_welcomed()
    d.daemon.record_signal(signal.SIGINT)
    await recv_until(conn, "shutdown")
    d.daemon.record_signal(signal.SIGTERM)
    assert await recv(conn) is None
    assert conn.close_code == 1001
    assert await d.stopped() is StopReason.FORCED
    assert d.daemon.metrics.disconnections.labels("forced")._value.get() == 1


async def test_periodic_continues_during_drain(start_daemon):
    d = await start_daemon(broadcast__periodic_interval="50ms")
    conn, _ = await d.connect_welcomed()
    d.daemon.record_signal(signal.SIGTERM)
    await recv_until(conn, "shutdown")
    first = await recv_until(conn, "periodic")
    second = await recv_until(conn, "periodic")
    assert first["connections"] == 1 and second["seq"] == first["seq"] + 1
    assert d.daemon.lifecycle.state.value == "draining"


async def test_upgrade_on_a_kept_alive_connection_is_refused_503_while_draining(start_daemon):
    """The listener is closed, but an HTTP/1.1 connection opened before may still ask."""
    d = await start_daemon(shutdown__drain_timeout="60s")
    host, port = d.ws_url.split("/")[2].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    assert (await d.admin("/drain", "POST", "", token=TOKEN)).code == 202
    writer.write((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert answer.startswith(b"HTTP/1.1 503")
    assert d.daemon.metrics.rejected.labels("draining")._value.get() == 1
    writer.close()


@pytest.mark.processes
async def test_metrics_pass_promtool_check(start_daemon):
    """The exposition is valid for Prometheus, including during a drain."""
    d = await start_daemon(shutdown__drain_timeout="60s")
    conn, _ = await d.connect_welcomed()
    await conn.write_message("x")
    await recv_json(conn)
    d.daemon.record_signal(signal.SIGTERM)
    await recv_until(conn, "shutdown")
    exposition = (await d.admin("/metrics")).body
    assert b"ebbcast_draining 1.0" in exposition
    promtool_accepts(exposition.decode())


async def test_admin_broadcast_larger_than_a_client_queue_reaches_everyone(start_daemon):
    """One big frame is not a slow client: it goes to a client with nothing queued."""
    d = await start_daemon(server__max_message_bytes="300000",
                           limits__client_queue_bytes="65536")
    a, _ = await d.connect_welcomed()
    b, _ = await d.connect_welcomed()
    body = '"' * 120000  # 240 kB once JSON-escaped
    assert (await d.admin("/broadcast", "POST", body, token=TOKEN)).code == 202
    for conn in (a, b):
        assert (await recv_json(conn))["text"] == body
    assert d.daemon.metrics.disconnections.labels("slow_consumer")._value.get() == 0
    too_big = await d.admin("/broadcast", "POST", "x" * 300001, token=TOKEN)
    assert too_big.code == 413 and b"max_message_bytes" in too_big.body


async def test_second_signal_during_the_deadline_close_aborts_at_once(start_daemon,
                                                                     monkeypatch, caplog):
    from helpers import STEP_TIMEOUT, never_reading_client

    # the grace for clients to answer the deadline's close frame, made far longer than
    # any wait here: the daemon aborts a connection that is still closing only if the
    # second signal cuts the grace short (else Tornado's own 5 s close timer ends it)
    monkeypatch.setattr("ebbcast.serving.process.DEADLINE_CLOSE_GRACE", 10 * STEP_TIMEOUT)
    caplog.set_level(logging.INFO, logger="ebbcast.serving.process")
    d = await start_daemon(shutdown__drain_timeout="100ms")
    silent = await never_reading_client(d.ws_url)  # will never answer the close frame
    try:
        await wait_until(lambda: len(d.daemon.ctx.registry) == 1)
        d.daemon.record_signal(signal.SIGTERM)
        await wait_until(lambda: d.daemon.lifecycle.state.value == "stopping")
        d.daemon.record_signal(signal.SIGTERM)
        assert await d.stopped() is StopReason.DEADLINE
        assert "aborting 1 connections that did not finish closing" in caplog.messages
        assert len(d.daemon.ctx.registry) == 0
    finally:
        silent.close()


async def test_the_close_grace_ends_when_the_last_client_has_answered(start_daemon,
                                                                       monkeypatch, caplog):
    # the grace made far longer than any wait here: the daemon stops within the
    # step only because the client's close answer ends it
    monkeypatch.setattr("ebbcast.serving.process.DEADLINE_CLOSE_GRACE", 10 * STEP_TIMEOUT)
    caplog.set_level(logging.INFO, logger="ebbcast.serving.process")
    d = await start_daemon(shutdown__drain_timeout="100ms")
    await d.connect_welcomed()  # a Tornado client: it answers the close frame
    d.daemon.record_signal(signal.SIGTERM)
    assert await d.stopped() is StopReason.DEADLINE
    assert not any(m.startswith("aborting") for m in caplog.messages)


async def test_a_forced_stop_gives_closing_clients_the_shorter_grace(start_daemon,
                                                                    monkeypatch, caplog):
    from helpers import never_reading_client

    monkeypatch.setattr("ebbcast.serving.process.DEADLINE_CLOSE_GRACE", 10 * STEP_TIMEOUT)
    monkeypatch.setattr("ebbcast.serving.process.FORCED_CLOSE_GRACE", 0.2)
    caplog.set_level(logging.INFO, logger="ebbcast.serving.process")
    d = await start_daemon()
    silent = await never_reading_client(d.ws_url)  # will never answer the close frame
    try:
        await wait_until(lambda: len(d.daemon.ctx.registry) == 1)
        d.daemon.record_signal(signal.SIGTERM)
        await wait_until(lambda: d.daemon.lifecycle.state.value == "draining")
        d.daemon.record_signal(signal.SIGTERM)  # closes it with 1001 now: forced
        assert await d.stopped() is StopReason.FORCED
        assert "aborting 1 connections that did not finish closing" in caplog.messages
    finally:
        silent.close()


async def test_frames_from_a_client_the_server_is_closing_are_not_relayed(start_daemon):
    from helpers import never_reading_client

    d = await start_daemon()
    listener, _ = await d.connect_welcomed("/listener")
    closing = await never_reading_client(d.ws_url)
    try:
        await wait_until(lambda: len(d.daemon.ctx.registry) == 2)
        (server_side,) = [c for c in d.daemon.ctx.registry.snapshot()
                          if c.client_id != "listener"]
        server_side.end("policy", 1008, "go away")
        # a masked text frame (zero key) sent after the server's close frame
        # then the client's close frame: once the daemon has read that (the connection
        # leaves the registry), it has read the frame before it
        closing.sendall(b"\x81\x85\x00\x00\x00\x00late!" + b"\x88\x82\x00\x00\x00\x00\x03\xe8")
        await wait_until(lambda: len(d.daemon.ctx.registry) == 1)
        d.daemon.ctx.fanout.broadcast("marker", "admin")
        assert await recv(listener) == "marker"  # and not "late!" before it
    finally:
        closing.close()
