"""Protocol edge cases of the fast path (ebbcast.serving.wire): what goes on the wire."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import socket
import struct
import subprocess
import sys

import pytest
import websockets
from tornado.iostream import IOStream

from ebbcast.serving.wire import input_unread, write_frame
from helpers import (STEP_TIMEOUT, exact_reader, never_reading_client, read_server_frames,
                     server_frames, wait_until)
from ebbcast.serving.wire import (INTERNALS, check_tornado, encode_frame,
                                  tornado_problem_report, valid_close_code)


def masked_close(code: int) -> bytes:
    """A client close frame (masked with a zero key, RFC 6455 5.3)."""
    return close_frame(struct.pack("!H", code))


def close_frame(payload: bytes) -> bytes:
    """A client close frame with any payload under 126 bytes, masked with a zero key."""
    return bytes([0x88, 0x80 | len(payload)]) + b"\x00\x00\x00\x00" + payload


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


#: Autobahn 7.5.1's close reason: UTF-8 that turns into a lone surrogate (ED A0 80).
NOT_UTF8 = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited"


@pytest.mark.parametrize("payload, answer", [
    # RFC 6455 7.4: codes a peer may not send (Tornado alone would echo them back)
    *[(struct.pack("!H", code), b"\x03\xeainvalid close code")
      for code in (0, 999, 1004, 1005, 1006, 1015, 2000, 2999, 5000, 65535)],
    (struct.pack("!H", 1000) + NOT_UTF8, b"\x03\xefclose reason is not UTF-8"),  # 8.1
    (struct.pack("!H", 4000) + b"\xff", b"\x03\xefclose reason is not UTF-8"),
    (b"\x03", b"\x03\xeaclose frame payload of one byte"),  # 5.5.1: a code is two bytes
])
async def test_a_bad_close_frame_fails_the_connection_at_once(start_daemon, payload, answer):
    """Our close frame says why (1002 or 1007), then the server closes TCP itself:
    the read ends with EOF, where a connection left open would time out."""
    d = await start_daemon(broadcast__envelope="raw")
    sock = await never_reading_client(d.ws_url)
    try:
        await wait_until(lambda: len(d.daemon.ctx.registry) == 1)
        sock.sendall(close_frame(payload))
        assert await read_rest(sock) == b"\x88" + bytes([len(answer)]) + answer
    finally:
        sock.close()
    await wait_until(lambda: len(d.daemon.ctx.registry) == 0)
    assert d.daemon.metrics.disconnections.labels("client")._value.get() == 1


@pytest.mark.parametrize("frames", [
    b"\x81\x05hello",  # a whole text message, unmasked
    b"\x01\x03hel",  # the first fragment of one, unmasked
    b"\x01\x83\x00\x00\x00\x00hel" + b"\x80\x02lo",  # a masked first, an unmasked last
    b"\x89\x00",  # a ping, unmasked
])
async def test_an_unmasked_client_frame_fails_the_connection_with_1002(start_daemon, frames):
    """RFC 6455 5.1: a server must close the connection on an unmasked client frame;
    Tornado reads it as if it were masked. Nothing of it is relayed: another client's
    next frame is the first the watcher gets."""
    d = await start_daemon(broadcast__envelope="raw")
    watcher = await d.connect()
    sock = await never_reading_client(d.ws_url)
    try:
        await wait_until(lambda: len(d.daemon.ctx.registry) == 2)
        sock.sendall(frames)
        assert await read_rest(sock) == b"\x88\x10\x03\xeaunmasked frame"
    finally:
        sock.close()
    talker = await d.connect()
    await talker.write_message("the first relayed")
    assert await asyncio.wait_for(watcher.read_message(), STEP_TIMEOUT) == "the first relayed"


@pytest.mark.parametrize("payload", [
    b"", struct.pack("!H", 1000), struct.pack("!H", 4000), struct.pack("!H", 1001) + b"bye",
    struct.pack("!H", 1000) + "κόσμε".encode()])
async def test_a_valid_close_frame_is_echoed_and_the_connection_closed(start_daemon, payload):
    d = await start_daemon(broadcast__envelope="raw")
    sock = await never_reading_client(d.ws_url)
    try:
        sock.sendall(close_frame(payload))
        assert await read_rest(sock) == b"\x88" + bytes([len(payload[:2])]) + payload[:2]
    finally:
        sock.close()


async def test_a_reader_that_fails_has_its_connection_closed_and_logged(start_daemon,
                                                                         monkeypatch, caplog):
    """One guard for every path out of the protocol's reader: an exception that
    escapes it (a bug, here planted) never leaves a client on an unread socket."""
    from ebbcast.serving.wire import EbbcastProtocol

    def broken(self, opcode, data):
        raise RuntimeError("a planted bug")

    d = await start_daemon(broadcast__envelope="raw")
    sock = await never_reading_client(d.ws_url)
    try:
        await wait_until(lambda: len(d.daemon.ctx.registry) == 1)
        monkeypatch.setattr(EbbcastProtocol, "_handle_message", broken)
        sock.sendall(b"\x81\x85\x00\x00\x00\x00hello")
        assert await read_rest(sock) == b""  # EOF: closed, no close frame to send
    finally:
        sock.close()
    await wait_until(lambda: len(d.daemon.ctx.registry) == 0)
    (record,) = [r for r in caplog.records if r.name == "ebbcast.serving.wire"]
    assert record.getMessage() == "a WebSocket reader failed: closing its connection"
    assert str(record.exc_info[1]) == "a planted bug"


@pytest.mark.parametrize("bad, then", [
    (b"\xf1\x80\x00\x00\x00\x00", b""),  # RSV1-3 set: dropped, no close frame
    (b"\x81\x02no", b"\x88\x10\x03\xeaunmasked frame"),
    (close_frame(b"\x03"), b"\x88\x21\x03\xeaclose frame payload of one byte"),
])
async def test_a_valid_frame_is_echoed_even_when_a_bad_one_follows_in_the_same_read(
        start_daemon, bad, then):
    """Autobahn 3.x/4.x/5.15: the echo queued for the valid frame is written before
    the connection is failed for the protocol error right behind it."""
    d = await start_daemon(broadcast__envelope="raw")
    sock = await never_reading_client(d.ws_url)
    try:
        await wait_until(lambda: len(d.daemon.ctx.registry) == 1)
        good = b"\x81\x85\x00\x00\x00\x00hello"
        sock.sendall(good + bad)
        assert await read_rest(sock) == b"\x81\x05hello" + then  # the echo first
    finally:
        sock.close()
    await wait_until(lambda: len(d.daemon.ctx.registry) == 0)


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A client frame with the length in the form its size needs, masked with a key
    that changes the bytes (the server must unmask each frame with its own key)."""
    key = bytes([0x37, 0xfa, 0x21, 0x3d])
    n = len(payload)
    length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n) \
        if n < 65536 else bytes([0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([(0x80 if fin else 0) | opcode]) + length + key + masked


async def test_frames_that_arrive_together_are_each_read_whole_and_in_order(start_daemon):
    """A client's frames in one write are read from the stream's buffer
    (``EbbcastProtocol._read_bytes``), each whole, unmasked and in order: lengths of
    7, 16 and 64 bits, and a message in fragments with a ping between them."""
    d = await start_daemon(broadcast__envelope="raw")
    sock = await never_reading_client(d.ws_url)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    messages = [b"a", b"m" * 300, b"frag-ment", bytes(range(256)) * 256]
    try:
        await wait_until(lambda: len(d.daemon.ctx.registry) == 1)
        sock.sendall(client_frame(0x1, messages[0]) + client_frame(0x1, messages[1])
                     + client_frame(0x1, b"frag-", fin=False) + client_frame(0x9, b"p")
                     + client_frame(0x0, b"ment") + client_frame(0x2, messages[3]))
        frames = server_frames(exact_reader(sock))
        got = [await asyncio.to_thread(next, frames) for _ in range(5)]
    finally:
        sock.close()
    assert [payload for opcode, payload in got if opcode in (0x1, 0x2)] == messages
    assert (0xA, b"p") in got  # the pong: written at once, before the echoes of a pass


async def test_client_sockets_send_at_once_with_a_modest_kernel_buffer(start_daemon):
    """TCP_NODELAY: the fan-out coalesces, so Nagle could only delay a lone small
    frame until the client's delayed ACK. SO_SNDBUF: see wire.configure_stream."""
    import socket

    from ebbcast.serving.wire import CLIENT_SNDBUF_BYTES

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


#: Run before the daemon in a fresh interpreter: take ``name`` away from Tornado's
#: ``owner`` as a release that changed it would (a method from the class in the MRO
#: that defines it, an instance attribute right after __init__ and any class-level
#: default of it, a module's name).
REMOVE = """
import importlib, sys
owner, name, kind = sys.argv[1:4]
if kind == "callable":
    delattr(importlib.import_module(owner), name)
else:
    module, _, cls_name = owner.rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)
    if kind == "method":
        delattr(next(c for c in cls.__mro__ if name in vars(c)), name)
    else:
        for owner_class in cls.__mro__:  # a class-level default too (Tornado 6.5's stream)
            if name in vars(owner_class) and owner_class is not object:
                delattr(owner_class, name)
        hook = "initialize" if hasattr(cls, "initialize") else "__init__"  # HTTPServer
        made = getattr(cls, hook)
        def without(self, *args, **kwargs):
            made(self, *args, **kwargs)
            if name in vars(self):
                delattr(self, name)
        setattr(cls, hook, without)
from ebbcast.cli import main
raise SystemExit(main(["serve", "--port", "0", "--admin-port", "0"]))
"""


@pytest.mark.processes
@pytest.mark.parametrize("internal", INTERNALS, ids=lambda internal: internal.label)
def test_the_daemon_refuses_to_start_without_each_internal_naming_it(tmp_path, internal):
    run = subprocess.run(
        [sys.executable, "-c", REMOVE, internal.owner, internal.name, internal.kind],
        capture_output=True, text=True, timeout=STEP_TIMEOUT, cwd=tmp_path,
        env={**os.environ, "RUNTIME_DIRECTORY": str(tmp_path)}, stdin=subprocess.DEVNULL)
    assert run.returncode == 1, run.stderr
    match = re.search(r"ERROR ebbcast\.cli\[\d+\]: Tornado 6\.\d+\.\d+ lacks what ebbcast "
                      r"relies on: (.*)$", run.stderr, re.M)
    assert match, run.stderr
    assert internal.label in match.group(1)
    assert "serving ws=" not in run.stderr


@pytest.mark.parametrize("size, header", [(0, b"\x81\x00"), (125, b"\x81\x7d"),
                                          (126, b"\x81\x7e\x00\x7e"),
                                          (65535, b"\x81\x7e\xff\xff"),
                                          (65536, b"\x81\x7f" + struct.pack("!Q", 65536))])
def test_encode_frame_uses_rfc6455_length_encodings(size, header):
    payload = b"a" * size
    assert encode_frame(payload) == header + payload
    assert encode_frame(b"\x00", binary=True) == b"\x82\x01\x00"


def test_valid_close_codes_follow_rfc6455_7_4():
    for code in (1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999):
        assert valid_close_code(code)
    for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000):
        assert not valid_close_code(code)


class _Protocol:
    """Stands in for the RFC 6455 protocol: its stream, open."""

    def __init__(self, stream: IOStream) -> None:
        self.stream = stream

    def is_closing(self) -> bool:
        return self.stream.closed()


async def test_a_send_to_a_client_gone_closes_its_stream_leaving_no_cycle(io_loop):
    """The fan-out's send to a socket whose peer is gone fails, and the stream is
    closed there: no second try through IOStream.write, whose failure keeps the error
    and its traceback in a reference cycle with the stream (10,000 clients leaving at
    once made 15,000 such objects per collection, and kept the connections too)."""
    mine, theirs = socket.socketpair()
    theirs.close()
    stream = IOStream(mine)
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        assert write_frame(_Protocol(stream), b"\x81\x01x", 1 << 20) is False
        assert stream.closed()
        assert gc.collect() == 0  # nothing that only the cyclic collector could free
    finally:
        if was_enabled:
            gc.enable()


async def test_input_unread_sees_bytes_in_the_kernel_and_in_the_streams_buffer(io_loop):
    """What the keepalive asks before closing for a ping timeout: bytes the client
    sent that this process has not handled, whether still in the kernel's receive
    queue or already read into the stream's buffer; none once they are handled."""
    mine, theirs = socket.socketpair()
    stream = IOStream(mine)
    try:
        protocol = _Protocol(stream)
        assert input_unread(protocol) is False
        theirs.sendall(b"\x8a\x80\x00\x00\x00\x00")  # a masked, empty pong
        assert input_unread(protocol) is True  # in the kernel
        await stream.read_bytes(1)  # Tornado reads all there is; one byte handled
        assert stream._read_buffer_size == 5 and input_unread(protocol) is True
        await stream.read_bytes(5)
        assert input_unread(protocol) is False
        stream.close()
        assert input_unread(protocol) is False  # a closed stream has nothing to read
    finally:
        stream.close()
        theirs.close()
