"""Integration: real WebSocket clients against an in-process daemon on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from tornado.httpclient import HTTPClientError
from tornado.websocket import WebSocketClosedError

from helpers import (never_reading_client, read_server_frames, recv, recv_json, recv_until,
                      wait_until)
from ebbcast.core.lifecycle import StopReason


async def test_welcome_names_client_server_and_count(start_daemon):
    d = await start_daemon()
    first, welcome1 = await d.connect_welcomed()
    second, welcome2 = await d.connect_welcomed("/alice.1")
    assert welcome1["connections"] == 1 and welcome2["connections"] == 2
    assert welcome2["client_id"] == "alice.1"
    assert len(welcome1["client_id"]) >= 8 and welcome1["client_id"] != "alice.1"
    assert welcome1["server"] == d.daemon.ctx.node_id
    first.close()
    second.close()


async def test_text_frame_is_broadcast_to_everyone_with_sender_id(start_daemon):
    d = await start_daemon()
    alice, _ = await d.connect_welcomed("/alice")
    bob, _ = await d.connect_welcomed("/bob")
    before = time.time()
    await alice.write_message("hello ☃")
    for conn in (alice, bob):
        frame = await recv_json(conn)
        assert frame["type"] == "message" and frame["from"] == "alice"
        assert frame["text"] == "hello ☃"
        assert before - 1 <= frame["ts"] <= time.time() + 1
    await wait_until(lambda: d.daemon.metrics.received._value.get() == 1)


async def test_echo_to_sender_false_skips_the_sender(start_daemon):
    d = await start_daemon(broadcast__echo_to_sender="false")
    alice, _ = await d.connect_welcomed("/alice")
    bob, _ = await d.connect_welcomed("/bob")
    await alice.write_message("one")
    await bob.write_message("two")
    got = await recv_json(alice)
    assert (got["from"], got["text"]) == ("bob", "two")  # never its own "one"
    assert (await recv_json(bob))["text"] == "one"


async def test_periodic_frames_count_up_and_report_connections(start_daemon):
    d = await start_daemon(broadcast__periodic_interval="50ms",
                           broadcast__periodic_text="tick")
    conn, _ = await d.connect_welcomed()
    first = await recv_until(conn, "periodic")
    second = await recv_until(conn, "periodic")
    assert first["text"] == "tick" and first["connections"] == 1
    assert second["seq"] == first["seq"] + 1
    assert 0 <= second["ts"] - first["ts"] < 1


async def test_binary_frame_in_json_mode_gets_error_frame_and_stays_open(start_daemon):
    d = await start_daemon()
    conn, _ = await d.connect_welcomed()
    await conn.write_message(b"\x00\x01", binary=True)
    assert await recv_json(conn) == {"type": "error", "error": "binary_not_supported"}
    await conn.write_message("still here")
    assert (await recv_json(conn))["text"] == "still here"


async def test_raw_envelope_relays_text_and_binary_verbatim(start_daemon):
    d = await start_daemon(broadcast__envelope="raw")
    a = await d.connect()
    b = await d.connect()
    await wait_until(lambda: len(d.daemon.ctx.registry) == 2)
    await a.write_message("not json {")
    await a.write_message(b"\xff\x00binary", binary=True)
    for conn in (a, b):  # no welcome frame in raw mode: the first frame is the relay
        assert await recv(conn) == "not json {"
        assert await recv(conn) == b"\xff\x00binary"


async def test_raw_envelope_clients_are_never_sent_an_epoch_frame(start_daemon):
    """The raw envelope relays frames verbatim and nothing else: a new history epoch
    (as when a Redis backplane's first catch-up comes after a client is in) is not
    told to its clients; the next frame they get is the next relay."""
    d = await start_daemon(broadcast__envelope="raw")
    conn = await d.connect()
    await wait_until(lambda: len(d.daemon.ctx.registry) == 1)
    d.daemon.broadcasts.new_epoch("another-epoch", 0)
    await conn.write_message("after the new epoch")
    assert await recv(conn) == "after the new epoch"


async def test_oversized_frame_is_closed_with_1009_and_counted(start_daemon):
    d = await start_daemon(server__max_message_bytes="100")
    conn, _ = await d.connect_welcomed()
    other, _ = await d.connect_welcomed()
    await conn.write_message("x" * 101)
    assert await recv(conn) is None
    assert conn.close_code == 1009
    await wait_until(lambda: len(d.daemon.ctx.registry) == 1)
    assert d.daemon.metrics.disconnections.labels("too_big")._value.get() == 1
    await other.write_message("x" * 100)  # exactly the limit is fine
    assert (await recv_json(other))["text"] == "x" * 100


async def test_rate_limit_sends_error_then_closes_1008(start_daemon):
    d = await start_daemon(limits__messages_per_second="1", limits__burst="2")
    conn, _ = await d.connect_welcomed()
    for i in range(20):
        try:
            await conn.write_message(f"m{i}")
        except WebSocketClosedError:
            break
    frames = []
    while (frame := await recv(conn)) is not None:
        frames.append(json.loads(frame))
    assert [f["text"] for f in frames if f["type"] == "message"] == ["m0", "m1"]
    assert {"type": "error", "error": "rate_limited"} in frames
    assert conn.close_code == 1008
    await wait_until(lambda: d.daemon.metrics.disconnections.labels("policy")._value.get()
                     == 1)


async def test_max_connections_answers_503_and_counts(start_daemon):
    d = await start_daemon(server__max_connections="1")
    conn, _ = await d.connect_welcomed()
    with pytest.raises(HTTPClientError) as refused:
        await d.connect()
    assert refused.value.code == 503
    assert d.daemon.metrics.rejected.labels("max_connections")._value.get() == 1
    conn.close()
    await wait_until(lambda: len(d.daemon.ctx.registry) == 0)
    again, _ = await d.connect_welcomed()
    again.close()


async def test_foreign_origin_is_refused_403_same_origin_allowed(start_daemon):
    d = await start_daemon()
    with pytest.raises(HTTPClientError) as refused:
        await d.connect(headers={"Origin": "https://evil.example"})
    assert refused.value.code == 403
    assert d.daemon.metrics.rejected.labels("origin")._value.get() == 1
    host = d.ws_url.split("/")[2]
    conn = await d.connect(headers={"Origin": f"http://{host}"})
    assert (await recv_json(conn))["type"] == "welcome"


async def test_allowed_origins_opens_named_origins(start_daemon):
    d = await start_daemon(server__allowed_origins="https://app.example")
    conn = await d.connect(headers={"Origin": "https://app.example"})
    assert (await recv_json(conn))["type"] == "welcome"
    with pytest.raises(HTTPClientError) as refused:
        await d.connect(headers={"Origin": "https://other.example"})
    assert refused.value.code == 403


async def test_slow_consumer_is_aborted_and_others_keep_receiving(start_daemon):
    """A client that never reads is cut off once client_queue_bytes is exceeded."""
    d = await start_daemon(limits__client_queue_bytes="65536")
    reader, _ = await d.connect_welcomed()
    sleeper = await never_reading_client(d.ws_url)
    try:
        await wait_until(lambda: len(d.daemon.ctx.registry) == 2)
        payload = "y" * 8000
        sent = 0
        while len(d.daemon.ctx.registry) == 2:
            assert sent < 1000, "the never-reading client was not aborted"
            d.daemon.ctx.fanout.broadcast(payload, "admin")
            sent += 1
            assert await recv(reader) == payload  # the reader gets each one, on time
        assert d.daemon.metrics.disconnections.labels("slow_consumer")._value.get() == 1
        # it was cut off once the cap and the modest kernel buffers were full
        assert 65536 < sent * 8004 < 65536 + 1024 * 1024
    finally:
        sleeper.close()


async def test_closing_connections_are_skipped_by_the_fanout(start_daemon):
    d = await start_daemon()
    a, _ = await d.connect_welcomed()
    b, _ = await d.connect_welcomed()
    server_side = d.daemon.ctx.registry.snapshot()
    server_side[0].close(1000)  # closing, but still registered until the handshake ends
    sent_before = d.daemon.metrics.sent._value.get()
    d.daemon.ctx.fanout.broadcast("x", "admin")
    assert await recv(b) == "x"
    assert d.daemon.metrics.sent._value.get() == sent_before + 1
    assert await recv(a) is None  # the closing one got its close frame and nothing more


async def test_ping_timeout_closes_a_client_that_never_pongs(start_daemon):
    d = await start_daemon(keepalive__ping_interval="100ms", keepalive__ping_timeout="100ms")
    silent = await never_reading_client(d.ws_url)  # reads, but never answers a ping
    try:
        frames = await asyncio.to_thread(read_server_frames, silent)
    finally:
        silent.close()
    opcodes = [opcode for opcode, _ in frames]
    assert 0x9 in opcodes, "no ping was sent"
    assert frames[-1] == (0x8, b"\x03\xe8ping timed out")  # close 1000, with the reason
    await wait_until(lambda: d.daemon.metrics.disconnections.labels("ping_timeout")
                     ._value.get() == 1)


async def test_page_is_served_with_ws_path(start_daemon):
    d = await start_daemon(server__ws_path="/live")
    response = await d.http.fetch(d.daemon.urls["page"])
    html = response.body.decode()
    assert response.headers["Content-Type"].startswith("text/html")
    assert 'const WS_PATH = "/live";' in html
    assert "__EBBCAST_WS_PATH__" not in html
    conn = await d.connect()
    assert "/live" in d.ws_url and (await recv_json(conn))["type"] == "welcome"
    assert 'import { EbbcastClient } from "./ebbcast.js";' in html  # the page uses the module


async def test_the_client_module_is_served_for_any_page(start_daemon):
    d = await start_daemon()
    response = await d.http.fetch(d.daemon.urls["page"] + "ebbcast.js")
    assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert b"export class EbbcastClient extends EventTarget" in response.body


async def test_tls_serves_wss_and_https(start_daemon, tmp_path):
    import ssl

    import trustme
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    d = await start_daemon(server__tls_cert=str(tmp_path / "server.pem"),
                           server__tls_key=str(tmp_path / "server.pem"))
    assert d.daemon.urls["ws"].startswith("https://")
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)
    page = await d.http.fetch(HTTPRequest(d.daemon.urls["page"], ssl_options=client_ssl))
    assert b"ebbcast" in page.body
    url = d.daemon.urls["ws"].replace("https", "wss", 1)
    conn = await websocket_connect(HTTPRequest(url, ssl_options=client_ssl))
    d.clients.append(conn)
    assert (await recv_json(conn))["type"] == "welcome"
    await conn.write_message("over tls")
    assert (await recv_json(conn))["text"] == "over tls"


async def test_clients_that_answer_pings_stay_connected(start_daemon):
    d = await start_daemon(keepalive__ping_interval="50ms", keepalive__ping_timeout="50ms")
    conn, _ = await d.connect_welcomed()  # Tornado's client answers pings itself
    server_side = d.daemon.ctx.registry.snapshot()[0]
    first_pong = server_side.last_pong
    await wait_until(lambda: server_side.last_pong > first_pong + 0.2)  # several rounds
    assert len(d.daemon.ctx.registry) == 1
    assert d.daemon.metrics.disconnections.labels("ping_timeout")._value.get() == 0


async def test_a_ping_timeout_of_zero_never_closes_a_silent_client(start_daemon):
    d = await start_daemon(keepalive__ping_interval="30ms", keepalive__ping_timeout="0",
                           broadcast__envelope="raw")
    silent = await never_reading_client(d.ws_url)
    try:
        def pings() -> int:
            from helpers import STEP_TIMEOUT
            silent.settimeout(STEP_TIMEOUT)
            seen, buffer = 0, b""
            while seen < 4:
                buffer += silent.recv(2)
                while len(buffer) >= 2:  # only empty pings arrive (raw mode, no traffic)
                    assert buffer[:2] == b"\x89\x00", buffer
                    buffer, seen = buffer[2:], seen + 1
            return seen
        assert await asyncio.to_thread(pings) == 4
        assert len(d.daemon.ctx.registry) == 1
    finally:
        silent.close()


async def test_a_fanout_that_keeps_failing_closes_everyone_and_stops_failed(start_daemon,
                                                                           monkeypatch):
    from ebbcast.serving.process import FANOUT_FAILURE_LIMIT
    from ebbcast.serving.fanout import Fanout

    d = await start_daemon()
    conn, _ = await d.connect_welcomed()

    def broken(self: Fanout, flush: object, budget: int) -> bool:
        raise AttributeError("'IOStream' object has no attribute '_write_buffer'")

    monkeypatch.setattr(Fanout, "_write_some", broken)
    fanout = d.daemon.ctx.fanout
    for n in range(FANOUT_FAILURE_LIMIT):  # one batch each (frames in one pass coalesce)
        await conn.write_message(f"frame {n}")
        await wait_until(lambda: fanout._failures_in_a_row == n + 1 or d.task.done())
    assert await d.stopped() is StopReason.FAILED
    while await recv(conn) is not None:
        pass
    assert conn.close_code == 1011


async def test_invalid_client_ids_are_refused_400_and_counted(start_daemon):
    d = await start_daemon()
    for bad in ("two%20words", "a" * 65, "caf%C3%A9", "a/b", "semi;colon"):
        with pytest.raises(HTTPClientError) as refused:
            await d.connect("/" + bad)
        assert refused.value.code == 400, bad
        assert b"invalid client id" in refused.value.response.body
    assert d.daemon.metrics.rejected.labels("client_id")._value.get() == 5
    conn, welcome = await d.connect_welcomed("/" + "a" * 64)  # the longest valid one
    assert welcome["client_id"] == "a" * 64
    conn.close()
