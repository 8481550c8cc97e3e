"""Hostile clients against the real daemon process: each test tries the attack."""

from __future__ import annotations

import json
import socket
import threading
import time
from functools import partial
from pathlib import Path

import pytest
from websockets.exceptions import WebSocketException
from websockets.sync.client import connect

from helpers import (FAST, STEP_TIMEOUT, _never_reading_client, http_json, read_server_frames,
                     set_open_files_limit)

TOKEN = "s3cr3t-t0ken-never-logged"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_oversized_handshake_headers_are_refused_and_harmless(spawn):
    d = spawn(*FAST)
    host, port = d.ws_url.split("/")[2].rsplit(":", 1)

    def handshake(junk: int) -> bytes:
        """A valid upgrade request with a ``junk``-byte header; what comes back."""
        with socket.create_connection((host, int(port)), timeout=STEP_TIMEOUT) as sock:
            sock.sendall(f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                         "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                         f"Sec-WebSocket-Version: 13\r\nX-Junk: {'a' * junk}\r\n\r\n".encode())
            answer = b""
            try:
                while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
                    answer += chunk
            except ConnectionResetError:
                pass
            return answer

    # over the 16 KiB cap on request headers: 431; over what is read at all
    # (64 KiB): closed, nothing sent
    assert handshake(40_000).startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert handshake(70_000) == b""
    assert http_json(d.admin_url + "/status")[1]["connections"] == 0
    # the same request under the cap is a valid handshake: the size was the reason
    assert handshake(15_000).startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert http_json(d.admin_url + "/healthz")[0] == 200


def read_response(sock: socket.socket, buffered: bytearray) -> tuple[bytes, bytes]:
    """(status line and headers, body) of the next response on ``sock``; what is
    read beyond it stays in ``buffered``."""
    while b"\r\n\r\n" not in buffered:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {bytes(buffered)!r}"
        buffered += chunk
    head, _, rest = bytes(buffered).partition(b"\r\n\r\n")
    fields = head.lower().split(b"content-length: ")
    length = int(fields[1].split(b"\r\n")[0]) if len(fields) > 1 else 0
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed in a response body"
        rest += chunk
    buffered[:] = rest[length:]
    return head, rest[:length]


BIG = 2 * 1024 * 1024  # over the admin listener's 1 MiB of body


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["alone", "workers"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_admin_body_over_1_mib_gets_413_json_and_the_connection_goes_on(spawn, workers,
                                                                          framing):
    """The whole body is sent, as a client that does not wait for an answer does: the
    413 comes (JSON, as any admin error), the rest of the body is read and dropped,
    and the same connection then serves the next request."""
    d = spawn(*FAST, *workers, env={"EBBCAST_ADMIN_TOKEN": TOKEN})
    host, port = d.admin_url.split("/")[2].rsplit(":", 1)
    head = f"POST /broadcast HTTP/1.1\r\nHost: ebbcast\r\nAuthorization: Bearer {TOKEN}\r\n"
    if framing == "content-length":
        request = f"{head}Content-Length: {BIG}\r\n\r\n".encode() + b"x" * BIG
    else:
        chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        request = f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + \
            chunk * (BIG // 0x10000) + b"0\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=STEP_TIMEOUT) as sock:
        sock.sendall(request + b"GET /healthz HTTP/1.1\r\nHost: ebbcast\r\n\r\n")
        buffered = bytearray()
        status, body = read_response(sock, buffered)
        assert status.startswith(b"HTTP/1.1 413 Content Too Large\r\n")
        assert b"content-type: application/json" in status.lower()
        assert json.loads(body) == {"error": "body over 1048576 bytes"}
        status, body = read_response(sock, buffered)
        assert status.startswith(b"HTTP/1.1 200 ") and json.loads(body) == {"status": "ok"}


@pytest.mark.parametrize("extra", [
    f"Content-Length: {65 * 1024 * 1024}\r\n",  # more than is worth reading
    f"Content-Length: {BIG}\r\nTransfer-Encoding: chunked\r\n",  # framed two ways
], ids=["over 64 MiB", "length and chunked"])
def test_an_admin_body_not_worth_reading_gets_413_alone_and_the_connection_closes(spawn,
                                                                                  extra):
    d = spawn(*FAST, env={"EBBCAST_ADMIN_TOKEN": TOKEN})
    host, port = d.admin_url.split("/")[2].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=STEP_TIMEOUT) as sock:
        sock.sendall(f"POST /broadcast HTTP/1.1\r\nHost: ebbcast\r\n{extra}\r\n".encode())
        buffered = bytearray()
        status, body = read_response(sock, buffered)
        assert status.startswith(b"HTTP/1.1 413 Content Too Large\r\n")
        assert json.loads(body) == {"error": "body over 1048576 bytes"}
        while chunk := sock.recv(65536):  # nothing after it (no bare 400), then closed
            buffered += chunk
        assert buffered == b""


def test_a_content_length_of_other_digits_is_refused_without_a_traceback(spawn):
    """"²" is a digit to str.isdigit() but no number to int()."""
    d = spawn(*FAST, env={"EBBCAST_ADMIN_TOKEN": TOKEN})
    host, port = d.admin_url.split("/")[2].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=STEP_TIMEOUT) as sock:
        sock.sendall("POST /broadcast HTTP/1.1\r\nHost: ebbcast\r\n"
                     "Content-Length: \u00b2\r\n\r\n".encode("latin-1"))
        assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
    assert http_json(d.admin_url + "/healthz") == (200, {"status": "ok"})
    assert "Traceback" not in d.log_text() and "Uncaught" not in d.log_text()


def test_an_admin_client_that_waits_for_100_continue_gets_413_and_no_100(spawn):
    d = spawn(*FAST, env={"EBBCAST_ADMIN_TOKEN": TOKEN})
    host, port = d.admin_url.split("/")[2].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=STEP_TIMEOUT) as sock:
        sock.sendall(f"POST /broadcast HTTP/1.1\r\nHost: ebbcast\r\nExpect: 100-continue\r\n"
                     f"Content-Length: {BIG}\r\n\r\n".encode())
        status, body = read_response(sock, bytearray())
        assert status.startswith(b"HTTP/1.1 413 Content Too Large\r\n")
        assert json.loads(body) == {"error": "body over 1048576 bytes"}
        assert sock.recv(65536) == b""  # and closed: the body it held back is not wanted


def test_the_admin_token_never_appears_in_the_logs(spawn):
    d = spawn(*FAST, "--log-level", "debug", env={"EBBCAST_ADMIN_TOKEN": TOKEN})
    with connect(d.ws_url) as ws:
        ws.recv(timeout=STEP_TIMEOUT)
        assert http_json(d.admin_url + "/broadcast", "POST", b"x", token="wrong")[0] == 401
        assert http_json(d.admin_url + "/broadcast", "POST", b"x", token=TOKEN)[0] == 202
        assert http_json(d.admin_url + "/drain", "POST", b"", token=TOKEN)[0] == 202
    assert d.wait_exit() == 0
    assert TOKEN not in d.log_text()
    assert "POST /broadcast" in d.log_text()  # the requests were logged, without it


def test_a_client_that_never_reads_is_cut_off_without_growing_the_daemon(spawn):
    """While one client never reads and a publisher floods, the daemon's RSS stays
    within a small multiple of limits.client_queue_bytes, and a reading client gets
    every frame in order."""
    cap = 1024 * 1024
    d = spawn(*FAST, env={"EBBCAST_LIMITS_CLIENT_QUEUE_BYTES": str(cap),
                          "EBBCAST_LIMITS_MESSAGES_PER_SECOND": "0",
                          "EBBCAST_BROADCAST_ENVELOPE": "raw",
                          "EBBCAST_BROADCAST_ECHO_TO_SENDER": "false",  # it never reads
                          "EBBCAST_BROADCAST_PERIODIC_INTERVAL": "0"})
    sleeper = _never_reading_client(d.ws_url)
    count, size = 4000, 1000
    received: list[bytes | str] = []
    peak = [0]
    baseline = rss_bytes(d.proc.pid)
    try:
        with connect(d.ws_url, max_size=None) as reader, connect(d.ws_url) as publisher:
            def read_all() -> None:
                while len(received) < count:
                    received.append(reader.recv(timeout=STEP_TIMEOUT))
                    if len(received) % 200 == 0:
                        peak[0] = max(peak[0], rss_bytes(d.proc.pid) - baseline)

            thread = threading.Thread(target=read_all)
            thread.start()
            for i in range(count):
                publisher.send(f"{i:08d}".ljust(size, "x"))
                if i % 200 == 0:
                    peak[0] = max(peak[0], rss_bytes(d.proc.pid) - baseline)
                while i - len(received) > 300 and thread.is_alive():
                    time.sleep(0.001)  # this Python reader must not itself fall behind
            thread.join(STEP_TIMEOUT * 3)
        assert [int(str(m)[:8]) for m in received] == list(range(count))
        metrics = d.metrics_text()
    finally:
        sleeper.close()
    assert peak[0] < 4 * cap, f"RSS grew by {peak[0]} bytes"
    assert 'ebbcast_disconnections_total{reason="slow_consumer"} 1.0' in metrics


def test_running_out_of_descriptors_sheds_connections_without_a_log_flood(spawn):
    d = spawn(*FAST, preexec_fn=partial(set_open_files_limit, 64, 64))
    host, port = d.ws_url.split("/")[2].rsplit(":", 1)
    flood = []
    try:
        for _ in range(120):  # more than the daemon can hold
            flood.append(socket.create_connection((host, int(port)), timeout=STEP_TIMEOUT))
        d.wait_for_log(r"out of file descriptors .*closing new connections at once")
    finally:
        for sock in flood:
            sock.close()
    # once the daemon has noticed the flood is gone, it serves new clients again
    deadline = time.monotonic() + STEP_TIMEOUT
    while True:
        try:
            with connect(d.ws_url, open_timeout=STEP_TIMEOUT) as ws:
                assert '"welcome"' in ws.recv(timeout=STEP_TIMEOUT)
            break
        except (OSError, WebSocketException):  # shed: closed before or after the upgrade
            assert time.monotonic() < deadline, "never served again"
            time.sleep(0.05)
    assert http_json(d.admin_url + "/healthz") == (200, {"status": "ok"})
    assert "Traceback" not in d.log_text()
    assert d.log_text().count("out of file descriptors") == 1


#: Every request timeout at 1 s: a stalled connection still open after STEP_TIMEOUT
#: was not timed out at all.
SHORT_TIMEOUTS = {"EBBCAST_SERVER_HEADER_TIMEOUT": "1s", "EBBCAST_SERVER_BODY_TIMEOUT": "1s",
                  "EBBCAST_ADMIN_REQUEST_TIMEOUT": "1s"}
STALLED_BODY = (b"POST / HTTP/1.1\r\nHost: ebbcast\r\nContent-Length: 65536\r\n\r\nab")


def stall(url: str, request: bytes) -> socket.socket:
    """A connection to the listener of ``url`` that sends ``request`` and then nothing."""
    host, port = url.split("/")[2].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=STEP_TIMEOUT)
    sock.sendall(request)
    return sock


def closed_by_the_daemon(sock: socket.socket) -> bool:
    """The daemon ended the connection (EOF or a reset) within STEP_TIMEOUT, with no
    answer: what a timeout (or shedding) does. A timeout here is a connection the
    daemon kept open."""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["alone", "workers"])
def test_requests_that_stall_are_closed_by_their_timeouts(spawn, workers):
    d = spawn(*FAST, *workers, env=SHORT_TIMEOUTS)
    stalled = {
        "public: a body that stops": stall(d.ws_url, STALLED_BODY),
        "public: headers that stop": stall(d.ws_url, b"GET / HTTP/1.1\r\nHost: e"),
        "public: nothing at all": stall(d.ws_url, b""),
        "admin: a body that stops": stall(d.admin_url, STALLED_BODY.replace(
            b"POST /", b"POST /broadcast")),
        "admin: headers that stop": stall(d.admin_url, b"GET /status HTTP/1.1\r\n"),
        "admin: nothing at all": stall(d.admin_url, b""),
    }
    assert {what: closed_by_the_daemon(sock) for what, sock in stalled.items()} == \
        {what: True for what in stalled}
    assert http_json(d.admin_url + "/healthz") == (200, {"status": "ok"})


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["alone", "workers"])
def test_out_of_descriptors_stalled_connections_time_out_and_a_client_gets_in(spawn, workers):
    """ulimit -n 256 and 300 connections that never finish a request, on both
    listeners: each is closed (by its timeout, or shed while none is left), and then
    a normal client is served (with workers, each has the same limit)."""
    d = spawn(*FAST, *workers, env=SHORT_TIMEOUTS,
              preexec_fn=partial(set_open_files_limit, 256, 256))
    stalled = [stall(d.ws_url, STALLED_BODY) for _ in range(150)]
    stalled += [stall(d.admin_url, b"") for _ in range(150)]
    assert all(closed_by_the_daemon(sock) for sock in stalled)
    with connect(d.ws_url, open_timeout=STEP_TIMEOUT) as ws:
        assert '"welcome"' in ws.recv(timeout=STEP_TIMEOUT)
    assert http_json(d.admin_url + "/healthz") == (200, {"status": "ok"})
    assert "Traceback" not in d.log_text()


HANDSHAKE_HEAD = ("Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["alone", "workers"])
def test_the_malformed_handshakes_get_their_answers_from_any_serving_process(spawn, workers):
    """The reproductions, against the daemon as it runs (alone, or its two workers
    sharing the port): each is refused with its status and reason; the same
    request without the fault is upgraded (the fault was the reason); an unmasked
    frame, or a close frame of one byte, after a valid handshake is failed with 1002."""
    d = spawn(*FAST, *workers)
    host, port = d.ws_url.split("/")[2].rsplit(":", 1)

    def answer(line: str = "GET /ws HTTP/1.1", extra: str = "", body: str = "",
               then: bytes = b"") -> bytes:
        with socket.create_connection((host, int(port)), timeout=STEP_TIMEOUT) as sock:
            sock.sendall(f"{line}\r\nHost: {host}:{port}\r\n{HANDSHAKE_HEAD}{extra}\r\n"
                         f"{body}".encode() + then)
            if not then:
                head, body_read = read_response(sock, bytearray())
                return head + b"\r\n\r\n" + body_read
            head = b""
            while not head.endswith(b"\r\n\r\n"):  # the head alone: frames follow
                head += sock.recv(1)
            frames = read_server_frames(sock)
            assert frames[-1][0] == 0x8, frames  # a close frame
            return head + frames[-1][1]

    refused = {
        "fragment": (answer("GET /ws#x HTTP/1.1"), b"400", b"no #fragment"),
        "HTTP/1.0": (answer("GET /ws HTTP/1.0"), b"400", b"an HTTP/1.1 request"),
        "two Hosts": (answer(extra="Host: other\r\n"), b"400", b"one Host header"),
        "a body": (answer(extra="Content-Length: 2\r\n", body="ab"), b"400", b"no body"),
        "headers": (answer(extra=f"X-Junk: {'a' * 20_000}\r\n"), b"431", b"headers over"),
        "admin id": (answer("GET /ws/admin HTTP/1.1"), b"400", b"admin is reserved"),
    }
    for what, (received, status, reason) in refused.items():
        assert received.startswith(b"HTTP/1.1 " + status + b" "), (what, received)
        assert reason in received, what
    assert answer().startswith(b"HTTP/1.1 101 ")
    unmasked = answer(then=b"\x81\x02hi")
    assert unmasked.startswith(b"HTTP/1.1 101 ")
    close = unmasked.partition(b"\r\n\r\n")[2]
    assert close == (1002).to_bytes(2, "big") + b"unmasked frame"
    one_byte_close = answer(then=b"\x88\x81\x00\x00\x00\x00\x03")  # masked, 1 byte
    assert one_byte_close.partition(b"\r\n\r\n")[2][:2] == (1002).to_bytes(2, "big")
    assert "Traceback" not in d.log_text()

