"""Both handshake readers give every request the same answer (hypothesis).

A handshake reaches the daemon one of two ways: already whole in the socket when
the connection is accepted (the fast path reads it with httptools), or in pieces
(Tornado's HTTP/1 reader). Requests are built from a valid handshake by mutation
(method, target, version, the spaces between them, headers dropped, repeated,
changed or added, a body, bare line ends) and each is handed to the public
server's ``handle_stream``, as an accepted connection is: once with the whole
request already in the socket, so the fast path reads it, and once with nothing in
it yet, so that Tornado's reader does, the bytes following in two pieces. The
status lines must be the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tornado.iostream import IOStream

from helpers import STEP_TIMEOUT

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
VALID = [("Host", "127.0.0.1:8000"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
         ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13")]



def mostly(usual: list[str], others: list[str]) -> st.SearchStrategy[str]:
    """One of ``usual`` two times in three, else one of ``others``: most requests
    then differ from a valid one in a few ways, and reach the later rules."""
    return st.one_of(st.sampled_from(usual), st.sampled_from(usual), st.sampled_from(others))


methods = mostly(["GET"], ["POST", "HEAD", "get", "OPTIONS"])
targets = mostly(["/ws", "/ws/bob", "/ws?since=0"], [
    "/ws/", "/ws#x", "/ws/bob#", "/ws?since=1", "/ws?since=1#f",
    "/ws?since=x", "/ws/admin", "/ws/a%20b", "//ws", "/wsx", "/", "/ws?#", "*",
    "http://127.0.0.1:8000/ws", "/ws/" + "a" * 65, "/ws?epoch=&since=0", "/ws/é"])
versions = mostly(["HTTP/1.1"], ["HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "http/1.1", "HTTP/1.1 "])
values = st.sampled_from([
    "", " ", "websocket", "WebSocket", "websocket, h2c", "Upgrade", "upgrade, keep-alive",
    "keep-alive", "13", "8", " 13 ", "13, 8", KEY, "not a key", "x\tx", "é", "a\r\n b",
    "127.0.0.1:8000", "https://evil.example", "http://127.0.0.1:8000", "same-origin",
    "cross-site"])
names = st.sampled_from([
    "Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Origin",
    "Sec-Fetch-Site", "host", "UPGRADE", "X-Anything", "Content-Length",
    "Transfer-Encoding", "Expect", "Authorization", "X-Forwarded-For"])

extras = st.one_of(st.tuples(names, values), st.sampled_from([
    ("Origin", "https://evil.example"), ("Origin", "http://127.0.0.1:8000"),
    ("Sec-Fetch-Site", "cross-site"), ("Host", "127.0.0.1:8000"), ("Content-Length", "0")]))


@st.composite
def requests(draw: Any) -> bytes:
    fields = list(VALID)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "repeat", "change", "add", "rename"]))
        if op == "add" or not fields:
            fields.insert(draw(st.integers(0, len(fields))), draw(extras))
            continue
        at = draw(st.integers(0, len(fields) - 1))
        name, value = fields[at]
        if op == "drop":
            del fields[at]
        elif op == "repeat":
            fields.insert(at, (name, value))
        elif op == "change":
            fields[at] = (name, draw(values))
        else:
            fields[at] = (draw(st.sampled_from([name.lower(), name.upper(), name + " "])),
                          value)
    body = draw(mostly([""], ["content-length", "chunked"]))
    if body == "content-length":
        fields.append(("Content-Length", "3"))
    elif body == "chunked":
        fields.append(("Transfer-Encoding", "chunked"))
    end = draw(mostly(["\r\n"], ["\n"]))
    spaces = mostly([" "], ["  ", "\t", " \t"])
    head = f"{draw(methods)}{draw(spaces)}{draw(targets)}{draw(spaces)}{draw(versions)}{end}"
    head += "".join(f"{name}: {value}{end}" for name, value in fields) + end
    tail = {"": "", "content-length": "abc", "chunked": "0\r\n\r\n"}[body]
    return (head + tail).encode()


def handshake(line: str = "GET /ws HTTP/1.1", extra: str = "", body: str = "") -> bytes:
    head = f"{line}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in VALID)
    return f"{head}{extra}\r\n{body}".encode()


async def status_line(client: socket.socket) -> bytes:
    """The first line the server answers, or b"closed" if it closes first."""
    loop = asyncio.get_running_loop()
    received = b""
    while b"\r\n" not in received:
        chunk = await asyncio.wait_for(loop.sock_recv(client, 4096), STEP_TIMEOUT)
        if not chunk:
            return b"closed"
        received += chunk
    return received.split(b"\r\n", 1)[0]


async def answered(server: Any, data: bytes, whole: bool, cut: int) -> bytes:
    server_side, client = socket.socketpair()
    client.setblocking(False)
    try:
        if whole:
            client.sendall(data)  # all there when the connection is handed over
            server.handle_stream(IOStream(server_side), ("127.0.0.1", 0))
        else:
            server.handle_stream(IOStream(server_side), ("127.0.0.1", 0))  # nothing yet
            client.sendall(data[:cut])
            await asyncio.sleep(0)  # Tornado's reader may see the first piece alone
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                client.sendall(data[cut:])  # unless it has answered and closed
        return await status_line(client)
    finally:
        client.close()


def test_both_readers_answer_every_request_alike(io_loop, start_daemon):
    d = io_loop.run_sync(start_daemon)
    server = d.daemon.servers["public"]
    seen: set[bytes] = set()

    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(requests(), st.floats(0, 1))
    @example(handshake("GET /ws#x HTTP/1.1"), 0.5)  # the reproductions, always tried
    @example(handshake("GET /ws HTTP/1.0"), 0.5)
    @example(handshake(extra="Host: 127.0.0.1:8000\r\n"), 0.5)
    @example(handshake(extra="Content-Length: 3\r\n", body="abc"), 0.5)
    @example(handshake(extra="Origin: https://evil.example\r\n"), 0.5)
    @example(handshake().replace(b"Version: 13", b"Version: 8"), 0.5)
    @example(handshake("GET /nowhere HTTP/1.1"), 0.5)
    @example(handshake("GET  /ws HTTP/1.1"), 0.5)
    @example(handshake(), 0.5)
    def both_ways(data: bytes, where: float) -> None:
        cut = min(len(data) - 1, max(1, int(len(data) * where)))
        whole = io_loop.run_sync(lambda: answered(server, data, True, cut))
        pieces = io_loop.run_sync(lambda: answered(server, data, False, cut))
        assert whole == pieces, data
        seen.add(whole.split(b" ")[1] if b" " in whole else whole)

    both_ways()
    assert {b"101", b"400", b"403", b"404", b"426"} <= seen, seen  # each way was tried
