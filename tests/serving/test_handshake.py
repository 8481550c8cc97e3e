"""The opening handshake: its rules (pure), the request reader, and both ways a
handshake reaches the daemon (answered at once, or through Tornado's reader)."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from tornado.httputil import HTTPHeaders
from tornado.iostream import IOStream

from helpers import STEP_TIMEOUT, wait_until
from ebbcast.serving.handshake import (MAX_HEADER_BLOCK, Acceptance, Refusal, Terms,
                                       accept_value, answer, decide, match_path,
                                       origin_allowed, read_upgrade, request)
from ebbcast.backplane.history import Resume
from ebbcast.serving.wire import open_http_connections

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3's sample
OPEN = Terms(accepting=True, full=False, allowed_origins=())


def upgrade_headers(**changes: str | None) -> dict[str, str]:
    """A valid handshake's headers (lower-case names), with ``changes`` applied
    (None removes one)."""
    headers = {"host": "example.com:8000", "upgrade": "websocket", "connection": "Upgrade",
               "sec-websocket-key": KEY, "sec-websocket-version": "13"}
    for name, value in changes.items():
        name = name.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return headers


def request_bytes(path: str = "/ws", host: str = "example.com:8000", extra: str = "") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


# -- the rules ----------------------------------------------------------------------------

def test_rfc_6455_sample_key_gets_the_sample_accept_value():
    assert accept_value(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    answer = decide(None, "", upgrade_headers(), OPEN)
    assert answer == Acceptance(None, None, b"HTTP/1.1 101 Switching Protocols\r\n"
                                b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                                b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")


@pytest.mark.parametrize("client_id, query, changes, terms, status, counted_as", [
    ("a b", "", {}, OPEN, 400, "client_id"),
    ("", "", {}, OPEN, 400, "client_id"),
    ("a" * 65, "", {}, OPEN, 400, "client_id"),
    ("admin", "", {}, OPEN, 400, "client_id"),  # reserved: the admin API's "from"
    (None, "", {}, Terms(False, False, ()), 503, "draining"),
    (None, "", {}, Terms(True, True, ()), 503, "max_connections"),
    (None, "since=-1", {}, OPEN, 400, None),
    (None, "since=1e3", {}, OPEN, 400, None),
    (None, "since=" + "9" * 19, {}, OPEN, 400, None),
    (None, "", {"upgrade": None}, OPEN, 400, None),
    (None, "", {"upgrade": "h2c"}, OPEN, 400, None),
    (None, "", {"connection": "keep-alive"}, OPEN, 400, None),
    (None, "", {"origin": "https://evil.example"}, OPEN, 403, "origin"),
    (None, "", {"sec-websocket-version": "8"}, OPEN, 426, None),
    (None, "", {"sec-websocket-version": None}, OPEN, 426, None),
    (None, "", {"host": None}, OPEN, 400, None),
    (None, "", {"sec-websocket-key": None}, OPEN, 400, None),
    (None, "", {"sec-websocket-key": "c2hvcnQ="}, OPEN, 400, None),  # 5 bytes, not 16
    (None, "", {"sec-websocket-key": "!" * 24}, OPEN, 400, None),
])
def test_each_rule_refuses_a_request_that_is_valid_but_for_it(client_id, query, changes, terms,
                                                              status, counted_as):
    assert isinstance(decide(None, "", upgrade_headers(), OPEN), Acceptance)
    answer = decide(client_id, query, upgrade_headers(**changes), terms)
    assert isinstance(answer, Refusal)
    assert (answer.status, answer.counted_as) == (status, counted_as)


def test_a_token_may_not_name_the_client_admin():
    """A token without ``sub`` leaves the id to the path (admin is refused there); one
    whose ``sub`` is admin is refused as a token."""
    from ebbcast.serving.auth import Grant

    class Verifier:
        def __init__(self, sub: str | None) -> None:
            self.sub = sub

        def verify(self, token: str | None, now: float) -> Grant:
            return Grant(self.sub, True, now + 60)

    def terms(sub: str | None) -> Terms:
        return Terms(True, False, (), tokens=Verifier(sub), now=1000.0)  # type: ignore

    refused = decide(None, "token=t", upgrade_headers(), terms("admin"))
    assert isinstance(refused, Refusal) and (refused.status, refused.counted_as) == (401, "auth")
    assert refused.text == "unauthorized: a token may not name the client admin\n"
    assert decide(None, "token=t", upgrade_headers(), terms("alice")).client_id == "alice"
    without_sub = decide("admin", "token=t", upgrade_headers(), terms(None))
    assert isinstance(without_sub, Refusal) and without_sub.status == 400


def test_refusals_carry_their_headers():
    assert decide(None, "", upgrade_headers(), Terms(False, False, ())).headers == (
        ("Retry-After", "1"),)
    assert decide(None, "", upgrade_headers(sec_websocket_version="7"), OPEN).headers == (
        ("Sec-WebSocket-Version", "13"),)


def test_a_resume_is_read_from_the_query_and_a_chosen_id_from_the_path():
    answer = decide("alice", "since=42&epoch=e1", upgrade_headers(), OPEN)
    assert isinstance(answer, Acceptance)
    assert (answer.client_id, answer.resume) == ("alice", Resume(42, "e1"))


def test_tornado_headers_work_as_well_as_lower_case_dicts():
    headers = HTTPHeaders({"Host": "h", "Upgrade": "WebSocket",
                           "Connection": "keep-alive, Upgrade", "Sec-WebSocket-Key": KEY,
                           "Sec-WebSocket-Version": "13"})
    assert isinstance(decide(None, "", headers, OPEN), Acceptance)


@pytest.mark.parametrize("site, origin, allowed, served", [
    (None, None, (), True),                                   # not a browser
    ("cross-site", None, (), False),                          # a browser naming no origin
    ("same-origin", "https://evil.example", (), True),        # the browser vouches
    ("none", None, (), True),
    (None, "http://example.com:8000", (), True),              # the Host asked for
    ("cross-site", "http://EXAMPLE.com:8000/", (), True),
    (None, "https://app.example", ("https://app.example",), True),
    ("same-site", "https://app.example/", ("https://APP.example",), True),
    (None, "https://other.example", ("https://app.example",), False),
    ("cross-site", "https://any.example", ("*",), True),
])
def test_origin_rules(site, origin, allowed, served):
    headers = upgrade_headers(sec_fetch_site=site, origin=origin)
    assert origin_allowed(headers, allowed) is served


def test_paths_of_the_endpoint():
    assert match_path("/ws", "/ws") == (True, None)
    assert match_path("/ws/bob", "/ws") == (True, "bob")
    assert match_path("/ws/", "/ws") == (True, "")
    assert match_path("/wsx", "/ws") == (False, None)
    assert match_path("/", "/ws") == (False, None)


# -- reading a request --------------------------------------------------------------------

def test_a_complete_upgrade_request_is_read_with_its_length():
    data = request_bytes("/ws/bob?since=3", extra="Connection: keep-alive\r\n")
    upgrade = read_upgrade(data + b"\x81\x80")  # a frame right behind it is not read
    assert upgrade is not None
    read = upgrade.request
    assert (read.method, read.target, read.version) == ("GET", "/ws/bob?since=3", "HTTP/1.1")
    assert upgrade.length == len(data)
    assert read.headers["connection"] == "Upgrade,keep-alive"
    assert read.headers["sec-websocket-key"] == KEY
    assert (read.hosts, read.body) == (1, False)
    assert read.size == len(data) - 2  # the request line and fields, as sent


@pytest.mark.parametrize("data", [
    request_bytes()[:-2],                                             # incomplete
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",                              # no upgrade
    b"NOT HTTP AT ALL\r\n\r\n",
])
def test_anything_else_is_left_to_tornado(data):
    assert read_upgrade(data) is None


def test_the_reader_keeps_what_the_rules_need_to_refuse():
    """What the fast path once declined by itself it now reads as sent, so that the
    one set of rules (answer) refuses it, as it does when Tornado reads it."""
    def read(data: bytes):
        upgrade = read_upgrade(data)
        assert upgrade is not None
        return upgrade.request

    assert read(request_bytes().replace(b"HTTP/1.1", b"HTTP/1.0", 1)).version == "HTTP/1.0"
    assert read(request_bytes("/ws#x")).target == "/ws#x"
    assert read(request_bytes(extra="Host: other\r\n")).hosts == 2
    assert read(request_bytes(extra="Content-Length: 0\r\n")).body is True
    assert read(request_bytes(extra="X-Blank:  \t padded \t\r\n")).headers["x-blank"] == "padded"


def handshake(target: str = "/ws", version: str = "HTTP/1.1", method: str = "GET",
              extra: tuple[tuple[str, str], ...] = ()) -> object:
    fields = [("Host", "example.com:8000"), ("Upgrade", "websocket"),
              ("Connection", "Upgrade"), ("Sec-WebSocket-Key", KEY),
              ("Sec-WebSocket-Version", "13"), *extra]
    return request(method, target, version, fields)


@pytest.mark.parametrize("read, status, text", [
    (handshake("/ws#x"), 400, "no #fragment"),
    (handshake("/ws/bob?since=1#x"), 400, "no #fragment"),
    (handshake(version="HTTP/1.0"), 400, "HTTP/1.1"),
    (handshake(extra=(("Host", "example.com:8000"),)), 400, "one Host"),
    (handshake(extra=(("Content-Length", "0"),)), 400, "no body"),
    (handshake(extra=(("Transfer-Encoding", "chunked"),)), 400, "no body"),
    (handshake(extra=(("X-Padding", "x" * MAX_HEADER_BLOCK),)), 431, "headers over"),
    (handshake("/index.html", extra=(("X-Padding", "x" * MAX_HEADER_BLOCK),)), 431,
     "headers over"),
])
def test_one_set_of_rules_refuses_what_no_handshake_may_be(read, status, text):
    refused = answer(read, "/ws", OPEN)
    assert isinstance(refused, Refusal)
    assert (refused.status, refused.counted_as) == (status, None)
    assert text in refused.text


def test_a_well_formed_handshake_is_decided_and_anything_else_passed_on():
    assert isinstance(answer(handshake("/ws/bob?since=1"), "/ws", OPEN), Acceptance)
    just_under = MAX_HEADER_BLOCK - handshake().size - len("X-Padding: ") - 2
    padded = handshake(extra=(("X-Padding", "x" * just_under),))
    assert padded.size == MAX_HEADER_BLOCK
    assert isinstance(answer(padded, "/ws", OPEN), Acceptance)
    assert answer(handshake("/"), "/ws", OPEN) is None
    assert answer(handshake("/wsx#x"), "/ws", OPEN) is None
    assert answer(handshake(method="POST"), "/ws", OPEN) is None
    assert answer(handshake("http://example.com/ws"), "/ws", OPEN) is None  # as Tornado routes it


# -- both ways in -------------------------------------------------------------------------

async def test_a_handshake_already_in_the_socket_is_answered_at_once(start_daemon):
    d = await start_daemon()
    router = d.daemon.servers["public"].router
    server_side, client_side = socket.socketpair()
    client_side.settimeout(STEP_TIMEOUT)
    pipelined = b"\x81\x82\x00\x00\x00\x00hi"  # a text frame sent right behind the request
    client_side.sendall(request_bytes() + pipelined)
    try:
        assert router.upgrade_at_once(IOStream(server_side), "test") is True
        received = b""
        while received.count(b'"type":"message"') == 0:
            received += await asyncio.to_thread(client_side.recv, 65536)
        head, _, frames = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
        length = frames[1]
        welcome = json.loads(frames[2:2 + length])
        assert welcome["type"] == "welcome" and welcome["connections"] == 1
        assert b'"text":"hi"' in frames[2 + length:]  # the pipelined frame was read
    finally:
        client_side.close()
    await wait_until(lambda: len(d.daemon.ctx.registry) == 0)


async def test_a_refusal_is_left_unread_for_tornado_to_answer(start_daemon):
    d = await start_daemon()
    router = d.daemon.servers["public"].router
    server_side, client_side = socket.socketpair()
    data = request_bytes(extra="Origin: https://evil.example\r\n")
    client_side.sendall(data)
    try:
        assert router.upgrade_at_once(IOStream(server_side), "test") is False
        assert server_side.recv(65536) == data  # nothing was consumed
        assert d.daemon.metrics.rejected.labels("origin")._value.get() == 0  # not yet counted
    finally:
        client_side.close()
        server_side.close()


async def test_a_handshake_arriving_in_pieces_goes_through_tornados_reader(start_daemon):
    d = await start_daemon()
    host, port = d.ws_url.split("/")[2].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    data = request_bytes(host=f"{host}:{port}")
    writer.write(data[:40])
    await wait_until(lambda: open_http_connections(d.daemon.servers["public"]) == 1)
    writer.write(data[40:])
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP_TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    opcode, length = await reader.readexactly(2)
    assert opcode == 0x81 and json.loads(await reader.readexactly(length))["type"] == "welcome"
    await wait_until(lambda: open_http_connections(d.daemon.servers["public"]) == 0)
    writer.close()
    await writer.wait_closed()


@pytest.mark.parametrize("request_line, extra, status, body", [
    ("POST /ws HTTP/1.1", "Content-Length: 0\r\n", 405, b""),
    ("GET /ws HTTP/1.1", "Sec-WebSocket-Version: 8\r\n", 426, b"WebSocket version 13 only"),
    ("GET /ws/no%20pe HTTP/1.1", "", 400, b"invalid client id"),
    ("GET /nowhere HTTP/1.1", "", 404, b""),
    ("GET /ws#x HTTP/1.1", "", 400, b"no #fragment"),
    ("GET /ws HTTP/1.0", "", 400, b"an HTTP/1.1 request"),
    ("GET /ws HTTP/1.1", "Host: example.com\r\n", 400, b"one Host header"),
    ("GET /ws HTTP/1.1", "Content-Length: 3\r\n", 400, b"no body"),
    ("GET /ws HTTP/1.1", f"X-Padding: {'x' * MAX_HEADER_BLOCK}\r\n", 431, b"headers over"),
    ("GET / HTTP/1.1", f"X-Padding: {'x' * MAX_HEADER_BLOCK}\r\n", 431, b"headers over"),
])
async def test_http_answers_on_the_public_listener(start_daemon, request_line, extra, status,
                                                   body):
    d = await start_daemon()
    host, port = d.ws_url.split("/")[2].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    data = request_bytes(host=f"{host}:{port}").replace(b"GET /ws HTTP/1.1", request_line.encode())
    if extra.startswith("Sec-WebSocket-Version"):
        data = data.replace(b"Sec-WebSocket-Version: 13\r\n", extra.encode())
    else:
        data = data.replace(b"\r\n\r\n", f"\r\n{extra}\r\n".encode())
    writer.write(data)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP_TIMEOUT)
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert body in await reader.readexactly(length)
    if status == 426:
        assert b"sec-websocket-version: 13\r\n" in head.lower()
    writer.close()
    await writer.wait_closed()
