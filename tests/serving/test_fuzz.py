"""Property tests (hypothesis): the config loader and inbound frames never crash.

- Any TOML document (and any text at all) either loads or fails with ConfigError,
  each problem naming a key; never another exception, which would be a traceback.
- Arbitrary text and binary payloads from a real client never crash the handler
  or leak a connection, in either envelope; arbitrary bytes after the handshake
  (malformed frames) never take the daemon down.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import string
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from helpers import STEP_TIMEOUT, DaemonProcess, _never_reading_client, http_json, server_frames
from ebbcast.config import SECTIONS, ConfigError, iter_keys, load_config

KNOWN = [key for key, _ in iter_keys()]

scalars = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False),
                    st.text(max_size=30), st.booleans(),
                    st.sampled_from(["10s", "250ms", "30m", "1h", "-1s", "ws", "/ws", "*",
                                     "memory://", "redis://h:1/0", "json", "raw"]))
values = st.one_of(scalars, st.lists(scalars, max_size=4),
                   st.dictionaries(st.text(min_size=1, max_size=8), scalars, max_size=3))
key_names = st.one_of(st.sampled_from([k.split(".")[1] for k in KNOWN]),
                      st.text(string.ascii_lowercase + "_", min_size=1, max_size=12))
section_names = st.one_of(st.sampled_from(list(SECTIONS)),
                          st.text(string.ascii_lowercase, min_size=1, max_size=10))
documents = st.dictionaries(section_names,
                            st.one_of(st.dictionaries(key_names, values, max_size=6), scalars),
                            max_size=6)


def load_or_problems(tmp_path, text: str) -> list[tuple[str, str]]:
    path = tmp_path / "fuzz.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(str(path), env={})
    except ConfigError as exc:
        return exc.problems
    return []


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(documents)
def test_any_toml_document_loads_or_names_its_problems(tmp_path, document):
    for key, reason in load_or_problems(tmp_path, tomli_w.dumps(document)):
        assert key and reason
        section = key.split(".")[0]
        assert section in SECTIONS or section in document or key.endswith(".toml")


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_any_text_loads_or_names_its_problems(tmp_path, text):
    for key, reason in load_or_problems(tmp_path, text):
        assert key and reason


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([f"EBBCAST_{k.replace('.', '_').upper()}"
                                        for k in KNOWN]), st.text(max_size=40), max_size=5))
def test_any_environment_loads_or_names_its_problems(env):
    try:
        load_config(env={k: v.replace("\0", "") for k, v in env.items()})
    except ConfigError as exc:
        assert all(key and reason for key, reason in exc.problems)


@pytest.mark.processes
def test_check_config_reports_a_bad_document_with_exit_2_not_a_traceback(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(tomli_w.dumps({"server": {"port": [1], "prot": {"a": 1}},
                                   "shutdown": {"close_code": 1005}}))
    done = subprocess.run([sys.executable, "-m", "ebbcast", "check-config", str(path)],
                          capture_output=True, text=True, timeout=STEP_TIMEOUT)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert {"server.port", "server.prot", "shutdown.close_code"} <= {
        line.split(": ")[2] for line in done.stderr.splitlines()}


# -- inbound frames --------------------------------------------------------------

@pytest.fixture(scope="module", params=["json", "raw"])
def daemon(request) -> Iterator[DaemonProcess]:
    env = {"EBBCAST_BROADCAST_ENVELOPE": request.param,
           "EBBCAST_LIMITS_MESSAGES_PER_SECOND": "0",
           "EBBCAST_BROADCAST_PERIODIC_INTERVAL": "0",
           "EBBCAST_SERVER_MAX_MESSAGE_BYTES": "4096"}
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EBBCAST_")}
    proc = DaemonProcess(["--port", "0", "--admin-port", "0"], env={**full_env, **env})
    proc.wait_serving()
    proc.envelope = request.param  # type: ignore[attr-defined]
    yield proc
    proc.signal(15)
    assert proc.wait_exit() == 0
    proc.kill()
    assert "Traceback" not in proc.log_text()


def connections(daemon: DaemonProcess) -> int:
    return int(http_json(daemon.admin_url + "/status")[1]["connections"])


payloads = st.one_of(st.text(max_size=300), st.binary(max_size=300))


@pytest.mark.processes
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(payloads, min_size=1, max_size=5))
def test_any_payloads_are_relayed_or_refused_cleanly(daemon, frames):
    raw = daemon.envelope == "raw"  # type: ignore[attr-defined]
    with connect(daemon.ws_url, open_timeout=STEP_TIMEOUT, max_size=None) as ws:
        if not raw:
            assert json.loads(ws.recv(timeout=STEP_TIMEOUT))["type"] == "welcome"
        for payload in frames:
            ws.send(payload)
            answer = ws.recv(timeout=STEP_TIMEOUT)
            if raw:
                assert answer == payload
            elif isinstance(payload, bytes):
                assert json.loads(answer) == {"type": "error", "error": "binary_not_supported"}
            else:
                assert json.loads(answer)["text"] == payload
    assert daemon.admin_json("/healthz") == (200, {"status": "ok"})
    assert_no_connection_left(daemon)


def fails_at_once(garbage: bytes) -> bool:
    """Whether the first frame's two header bytes (the server reads both before it
    looks) are invalid whatever follows: a reserved bit set, and no extension was
    negotiated (RFC 6455 5.2). (An unmasked frame fails too, with 1002, but only once
    it has been read whole, which garbage may never complete.)"""
    return len(garbage) >= 2 and bool(garbage[0] & 0x70)


def read_until_closed(sock: socket.socket) -> bytes:
    """What the server sends until it ends the connection (bounded by STEP_TIMEOUT)."""
    sock.settimeout(STEP_TIMEOUT)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def frames_in(received: bytes) -> list[tuple[int, bytes]]:
    """The server frames (opcode, payload) in ``received``, which must hold whole
    frames only."""
    stream = io.BytesIO(received)

    def read(n: int) -> bytes:
        data = stream.read(n)
        if len(data) < n:
            raise EOFError
        return data

    found: list[tuple[int, bytes]] = []
    with contextlib.suppress(EOFError):
        found.extend(server_frames(read))
    assert stream.tell() == len(received), "the server sent part of a frame"
    return found


@pytest.mark.processes
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=400))
def test_malformed_bytes_after_the_handshake_never_take_the_daemon_down(daemon, garbage):
    sock = _never_reading_client(daemon.ws_url)
    try:
        sock.sendall(garbage)
        if fails_at_once(garbage):
            # the connection is failed: what it was owed (the welcome), then closed
            # without a close frame (the protocol error was the client's)
            opcodes = [opcode for opcode, _ in frames_in(read_until_closed(sock))]
            welcomed = daemon.envelope == "json"  # type: ignore[attr-defined]
            assert opcodes == ([0x1] if welcomed else [])
    finally:
        sock.close()
    assert http_json(daemon.admin_url + "/healthz") == (200, {"status": "ok"})
    assert_no_connection_left(daemon)


def assert_no_connection_left(daemon: DaemonProcess) -> None:
    """Every connection of this example is gone from the daemon (it notices a closed
    socket at its own pace): none leaks, whatever ran before."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while connections(daemon) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert connections(daemon) == 0
