"""SIGHUP end to end: every reloadable key, each change observed from outside the
process (the admin API, a client's frames, the log, the metrics).

Reloadable: broadcast.*, limits.*, keepalive.*, auth.* (tests/serving/test_secrets.py),
logging.level, admin.token, admin.token_file and
shutdown.progress_interval.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

from helpers import (FAST, STEP_TIMEOUT, DaemonProcess, _never_reading_client, close_all, dial,
                     exact_reader, http_json, metric, recv_frame, recv_kinds, server_frames,
                     wait_for)



def reload(d: DaemonProcess, path: Path, text: str, applied: str) -> None:
    """Write the config file, SIGHUP, and wait until the main process and then the
    serving process (which acts on its own SIGHUP a moment later) say they applied
    ``applied``. The serving process says so at DEBUG: the daemon runs with
    ``--log-level debug``, or this reload makes it so."""
    path.write_text(text)
    mark = len(d.lines)
    d.signal(signal.SIGHUP)
    d.wait_for_log(rf"config reloaded: .*{applied}", start=mark)
    d.wait_for_log(rf"reload applied by this serving process: .*{applied}", start=mark)


def post(d: DaemonProcess, token: str, text: str) -> int:
    return http_json(d.admin_url + "/broadcast", "POST", text.encode(), token)[0]


def test_admin_token_echo_and_periodic_frames_change_on_sighup(spawn, tmp_path):
    path = tmp_path / "ebbcast.toml"
    path.write_text('[admin]\ntoken = "tok-one-7f"\n[broadcast]\nperiodic_interval = 0\n')
    d = spawn("--config", str(path), *FAST, "--log-level", "debug")
    ws = dial(d.ws_url)
    recv_frame(ws, "welcome")
    assert post(d, "tok-one-7f", "x") == 202 and post(d, "tok-two-7f", "x") == 401
    ws.send("echoed")
    assert recv_frame(ws)["text"] == "x" and recv_frame(ws)["text"] == "echoed"
    reload(d, path, '[admin]\ntoken = "tok-two-7f"\n[broadcast]\nperiodic_interval = "100ms"\n'
                    'periodic_text = "now periodic"\necho_to_sender = false\n',
           "admin.token")
    assert post(d, "tok-one-7f", "x") == 401 and post(d, "tok-two-7f", "after") == 202
    ws.send("not echoed any more")  # then a later frame: the echo would come before it
    assert post(d, "tok-two-7f", "later") == 202
    texts = [f.get("text") for f in (json.loads(ws.recv(timeout=STEP_TIMEOUT))
                                     for _ in range(6)) if f["type"] == "message"]
    assert texts[:2] == ["after", "later"]
    assert recv_frame(ws, "periodic")["text"] == "now periodic"
    assert "tok-two-7f" not in d.log_text()  # the token is never logged
    ws.close()


def test_rate_limits_and_the_client_queue_change_on_sighup(spawn, tmp_path):
    path = tmp_path / "ebbcast.toml"
    config = '[admin]\ntoken = "t"\n[broadcast]\nperiodic_interval = 0\n[limits]\n'
    path.write_text(config + "messages_per_second = 0\n")
    d = spawn("--config", str(path), *FAST, "--log-level", "debug")
    ws = dial(d.ws_url)
    recv_frame(ws, "welcome")
    for n in range(30):
        ws.send(f"unlimited {n}")
    assert [recv_frame(ws)["text"] for _ in range(30)] == [f"unlimited {n}" for n in range(30)]
    # one frame in a burst, then one every 1000 s: "second" is over the limit however
    # long a busy machine takes between the two (at 1 a second, a 1 s stall let it in)
    reload(d, path, config + "messages_per_second = 0.001\nburst = 1\n"
                             "client_queue_bytes = 4096\n", "limits.burst")
    ws.send("first")
    ws.send("second, over the limit")
    got = recv_kinds(ws, 2)
    assert got["message"]["text"] == "first"
    assert got["error"] == {"type": "error", "error": "rate_limited"}
    ws.close()
    # a client that never reads is cut off once 4 KiB (no longer 1 MiB) wait for it:
    # well within 300 kB of broadcasts (the kernel's buffers take the first ~70 kB)
    silent = _never_reading_client(d.ws_url)
    try:
        wait_for(lambda: http_json(d.admin_url + "/status")[1]["connections"] == 1)
        for _ in range(300):
            assert post(d, "t", "k" * 1000) == 202
            if http_json(d.admin_url + "/status")[1]["connections"] == 0:
                break
        assert metric(d, 'ebbcast_disconnections_total{reason="slow_consumer"}') == 1
    finally:
        silent.close()


def test_keepalive_logging_and_progress_change_on_sighup(spawn, tmp_path):
    path = tmp_path / "ebbcast.toml"
    path.write_text('[broadcast]\nperiodic_interval = 0\n')
    d = spawn("--config", str(path), *FAST, "--drain-timeout", "60s")
    quiet = dial(d.ws_url + "/before")
    recv_frame(quiet, "welcome")
    assert "client before connected" not in d.log_text()  # info: no per-client lines
    # connected before the reload, and never answering a ping
    silent = _never_reading_client(d.ws_url)
    silent.settimeout(STEP_TIMEOUT)
    wait_for(lambda: http_json(d.admin_url + "/status")[1]["connections"] == 2)
    reload(d, path, '[broadcast]\nperiodic_interval = 0\n[logging]\nlevel = "debug"\n'
                    '[keepalive]\nping_interval = "200ms"\nping_timeout = "300ms"\n',
           "keepalive.ping_interval")
    loud = dial(d.ws_url + "/after")
    d.wait_for_log("client after connected")
    # pings every 200 ms now, for the connections made before the reload too: within
    # STEP_TIMEOUT, where the old 20 s interval would send none; and a client that
    # never answers them is closed for it
    frames = server_frames(exact_reader(silent))
    assert next(frames)[0] == 0x1  # the welcome
    assert next(frames)[0] == 0x9  # a ping, well before the old 20 s interval
    wait_for(lambda: metric(d, 'ebbcast_disconnections_total{reason="ping_timeout"}') == 1)
    silent.close()
    close_all([quiet])
    d.signal(signal.SIGTERM)
    d.wait_for_log("drain started by SIGTERM")
    reload(d, path, '[broadcast]\nperiodic_interval = 0\n[logging]\nlevel = "debug"\n'
                    '[keepalive]\nping_interval = "200ms"\nping_timeout = "300ms"\n'
                    '[shutdown]\nprogress_interval = "100ms"\n', "shutdown.progress_interval")
    mark = len(d.lines)  # with the 10 s default, none would come before the client leaves
    d.wait_for_log(r"draining: 1 connections remain", start=mark)
    d.wait_for_log(r"draining: 1 connections remain", start=len(d.lines))
    loud.close()
    assert d.wait_exit() == 0
