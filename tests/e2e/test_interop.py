"""Interoperability: clients nobody on this team wrote connect, chat and see a drain.

The `websockets` package (Python) and Node's `ws` (the package the benchmark's
reference server uses, installed by `make test` under bench/servers/node_ws).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

from websockets.sync.client import connect

from helpers import REPO, STEP_TIMEOUT, recv_frame

NODE_MODULES = REPO / "bench" / "servers" / "node_ws" / "node_modules"


def test_websockets_clients_chat_and_see_the_drain_end_to_end(spawn):
    d = spawn("--port", "0", "--admin-port", "0", "--drain-timeout", "60s")
    with connect(d.ws_url + "/py-a") as a, connect(d.ws_url + "/py-b") as b:
        recv_frame(a, "welcome")
        recv_frame(b, "welcome")
        a.send("hi b")
        assert recv_frame(b, "message")["text"] == "hi b"
        d.signal(signal.SIGTERM)
        assert recv_frame(a, "shutdown")["reason"] == "draining"
        recv_frame(b, "shutdown")
        b.send("bye a")  # still served during the drain
        message = recv_frame(a, "message")
        assert (message["from"], message["text"]) == ("py-b", "bye a")
    assert d.wait_exit() == 0


def test_node_ws_client_chats_and_sees_the_drain(spawn):
    node = shutil.which("node")
    assert node, "node is missing: make test-deps installs it"
    assert (NODE_MODULES / "ws").is_dir(), "ws is missing: make test installs it"
    d = spawn("--port", "0", "--admin-port", "0", "--drain-timeout", "60s")
    client = subprocess.Popen([node, str(REPO / "tests" / "interop" / "node_client.js"),
                               d.ws_url + "/node"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "NODE_PATH": str(NODE_MODULES)})
    try:
        assert client.stdout is not None
        first = json.loads(client.stdout.readline())
        assert first["type"] == "welcome" and first["client_id"] == "node"
        echo = json.loads(client.stdout.readline())
        assert (echo["type"], echo["from"], echo["text"]) == ("message", "node",
                                                              "hello from node")
        d.signal(signal.SIGTERM)
        lines = [json.loads(line) for line in client.stdout]
        assert client.wait(STEP_TIMEOUT) == 0
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(STEP_TIMEOUT)
        if client.stdout is not None:
            client.stdout.close()
    kinds = [frame.get("type") for frame in lines]
    assert kinds[0] == "shutdown" and "message" in kinds  # still served after it
    assert lines[-1] == {"closed": 1000}
    assert d.wait_exit() == 0
