"""A daemon that stopped running for a while (SIGSTOP: a saturated or paused machine)
does not blame its clients for its own lateness.

Process test: ``python -m ebbcast`` as a subprocess, a raw client on a real socket.
"""

from __future__ import annotations

import os
import signal
import time

from helpers import (FAST, QUICK, STEP_TIMEOUT, _never_reading_client, exact_reader, metric,
                     server_frames)

PING, PONG, TEXT = 0x9, 0xA, 0x1


def masked(opcode: int, payload: bytes) -> bytes:
    """A client frame under 126 bytes, masked with a zero key (RFC 6455 5.3)."""
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\x00\x00\x00\x00" + payload


def test_a_pong_that_arrived_while_the_daemon_was_stopped_is_not_a_ping_timeout(spawn):
    """The client answers the ping at once, but the daemon is stopped (SIGSTOP) for
    three times the timeout. When it runs again its timeout check comes due in the
    same loop pass as the pong is read, before the pong is handled: the connection
    has bytes unread, so it is not closed; the broadcast posted afterwards reaches it."""
    d = spawn(*FAST, env={**QUICK, "EBBCAST_KEEPALIVE_PING_INTERVAL": "200ms",
                          "EBBCAST_KEEPALIVE_PING_TIMEOUT": "500ms"})
    sock = _never_reading_client(d.ws_url)
    try:
        sock.settimeout(STEP_TIMEOUT)
        frames = server_frames(exact_reader(sock))
        while next(frames)[0] != PING:  # the welcome first, then the first ping
            pass
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            sock.sendall(masked(PONG, b"pong"))  # answered at once, read late
            time.sleep(1.5)  # the stimulus: stopped for three timeouts
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        code, body = d.admin_json("/broadcast", "POST", b"after the pause",
                                  token="secret-token")
        assert code == 202, body
        seen = []
        for opcode, payload in frames:
            if opcode == PING:
                sock.sendall(masked(PONG, payload))  # keep answering
            seen.append(opcode)
            if opcode == TEXT and b"after the pause" in payload:
                break
        assert 0x8 not in seen  # no close frame came before the broadcast
        assert metric(d, 'ebbcast_disconnections_total{reason="ping_timeout"}') == 0
    finally:
        sock.close()
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
