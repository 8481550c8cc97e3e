"""Protocol edge cases of the fast path (ebbcast.wire): what goes on the wire."""

from __future__ import annotations

import asyncio
import os
import re
import struct
import subprocess
import sys

import pytest
import websockets

from helpers import STEP_TIMEOUT, never_reading_client, read_server_frames, wait_until
from ebbcast.wire import check_tornado, tornado_problem_report


def masked_close(code: int) -> bytes:
    """A client close frame (masked with a zero key, RFC 6455 5.3)."""
    return b"\x88\x82\x00\x00\x00\x00" + struct.pack("!H", code)


async def read_rest(sock) -> bytes:
    """Everything the server sends until it closes the TCP connection."""
    def read() -> bytes:
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data
    return await asyncio.to_thread(read)


async def test_compression_offer_is_declined_and_frames_stay_plain(start_daemon):
    d = await start_daemon()
    async with websockets.connect(d.ws_url, compression="deflate") as ws:
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
        assert '"welcome"' in await asyncio.wait_for(ws.recv(), 10)
        await ws.send("plain")
        assert '"text":"plain"' in await asyncio.wait_for(ws.recv(), 10)


async def test_no_frame_follows_the_close_when_a_client_closes_mid_broadcast(start_daemon):
    d = await start_daemon(broadcast__envelope="raw")
    sock = await never_reading_client(d.ws_url)
    try:
        await wait_until(lambda: len(d.daemon.ctx.registry) == 1)
        for i in range(50):
            d.daemon.ctx.fanout.broadcast(f"m{i}", "admin")
        sock.sendall(masked_close(1000))  # races the queued broadcasts
        for i in range(50, 100):
            d.daemon.ctx.fanout.broadcast(f"m{i}", "admin")
            await asyncio.sleep(0)
        frames = await asyncio.to_thread(read_server_frames, sock)
        assert frames[-1] == (0x8, struct.pack("!H", 1000))  # the echo of our close
        texts = [payload.decode() for opcode, payload in frames if opcode == 0x1]
        assert texts == [f"m{i}" for i in range(len(texts))]  # in order, no gaps
        assert await read_rest(sock) == b""  # and nothing after the close frame
    finally:
        sock.close()


async def test_no_frame_follows_a_server_close_queued_behind_broadcasts(start_daemon):
    d = await start_daemon(broadcast__envelope="raw")
    sock = await never_reading_client(d.ws_url)
    try:
        await wait_until(lambda: len(d.daemon.ctx.registry) == 1)
        (conn,) = d.daemon.ctx.registry.snapshot()
        d.daemon.ctx.fanout.broadcast("before", "admin")
        conn.end("forced", 1001, "bye")  # closes before the fan-out's flush runs
        d.daemon.ctx.fanout.broadcast("after", "admin")
        frames = await asyncio.to_thread(read_server_frames, sock)
        assert frames == [(0x8, struct.pack("!H", 1001) + b"bye")]
        sock.sendall(masked_close(1001))
        assert await read_rest(sock) == b""
    finally:
        sock.close()
    await wait_until(lambda: len(d.daemon.ctx.registry) == 0)


async def test_invalid_close_code_from_a_client_is_answered_with_1002(start_daemon):
    """RFC 6455 7.4: Tornado alone would echo 1005 or 999 back; ebbcast refuses it."""
    d = await start_daemon(broadcast__envelope="raw")
    for code in (999, 1005, 1006, 2000, 5000):
        sock = await never_reading_client(d.ws_url)
        try:
            sock.sendall(masked_close(code))
            frames = await asyncio.to_thread(read_server_frames, sock)
            assert frames[-1][0] == 0x8
            assert struct.unpack("!H", frames[-1][1][:2])[0] == 1002, code
        finally:
            sock.close()
    sock = await never_reading_client(d.ws_url)
    try:
        sock.sendall(masked_close(4000))  # a valid application code is echoed
        frames = await asyncio.to_thread(read_server_frames, sock)
        assert frames[-1] == (0x8, struct.pack("!H", 4000))
    finally:
        sock.close()


async def test_a_valid_frame_is_echoed_even_when_a_bad_one_follows_in_the_same_read(
        start_daemon):
    """Autobahn 3.x/4.x/5.15: the echo queued for the valid frame is written before
    the connection is failed for the protocol error right behind it."""
    d = await start_daemon(broadcast__envelope="raw")
    sock = await never_reading_client(d.ws_url)
    try:
        await wait_until(lambda: len(d.daemon.ctx.registry) == 1)
        good = b"\x81\x85\x00\x00\x00\x00hello"
        reserved_bits = b"\xf1\x80\x00\x00\x00\x00"  # RSV1-3 set: fail the connection
        sock.sendall(good + reserved_bits)
        assert await read_rest(sock) == b"\x81\x05hello"  # the echo, then the end
    finally:
        sock.close()
    await wait_until(lambda: len(d.daemon.ctx.registry) == 0)


async def test_client_sockets_send_at_once_with_a_modest_kernel_buffer(start_daemon):
    """TCP_NODELAY: the fan-out coalesces, so Nagle could only delay a lone small
    frame until the client's delayed ACK. SO_SNDBUF: see wire.configure_stream."""
    import socket

    from ebbcast.wire import CLIENT_SNDBUF_BYTES

    d = await start_daemon()
    await d.connect_welcomed()
    (conn,) = d.daemon.ctx.registry.snapshot()
    sock = conn.protocol.stream.socket
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) <= 2 * CLIENT_SNDBUF_BYTES


# -- the start-up check of what wire.py relies on ---------------------------------------


def test_the_installed_tornado_has_everything_ebbcast_relies_on():
    assert check_tornado() == []


def test_a_tornado_that_changed_is_named_change_by_change(monkeypatch):
    import tornado.websocket

    monkeypatch.delattr(tornado.websocket.WebSocketProtocol, "_abort")
    monkeypatch.delattr(tornado.websocket, "_WebSocketParams")
    problems = check_tornado()
    assert "WebSocketProtocol13._abort()" in problems
    assert any(p.startswith("tornado.websocket._WebSocketParams") for p in problems)
    report = tornado_problem_report(problems)
    assert report.startswith(f"Tornado {tornado.version} lacks what ebbcast relies on: ")


@pytest.mark.processes
def test_the_daemon_refuses_to_serve_on_a_tornado_that_changed(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", "import tornado.websocket as w; del w.WebSocketProtocol._abort; "
         "from ebbcast.cli import main; raise SystemExit(main(['serve', '--port', '0', "
         "'--admin-port', '0']))"],
        capture_output=True, text=True, timeout=STEP_TIMEOUT, cwd=tmp_path,
        env={**os.environ, "RUNTIME_DIRECTORY": str(tmp_path)}, stdin=subprocess.DEVNULL)
    assert run.returncode == 1
    assert re.search(r"ERROR ebbcast\.cli\[\d+\]: Tornado 6\.\d+\.\d+ lacks what ebbcast relies "
                     r"on: WebSocketProtocol13\._abort\(\)\.", run.stderr), run.stderr
    assert "serving ws=" not in run.stderr
