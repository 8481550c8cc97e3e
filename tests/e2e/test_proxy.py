"""ebbcast behind the real Debian nginx and HAProxy, configured by the shipped
deploy/ files: clients connect and chat through each; a drain's shutdown frame and
an upgrade's move reach them; the proxy's health check sees /readyz turn 503; a
connection hammer through the proxy during an upgrade is never refused; with two
instances behind one proxy, a drain sends every client back through it to the
other; and the address a proxy forwards is believed only from
server.trusted_proxies."""

from __future__ import annotations

import re
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.sync.client import ClientConnection

from ebbcast.serving.forwarded import TrustedProxies
from helpers import (QUICK, DaemonProcess, close_all, dial, recv_frame, status, wait_for)
from proxies import PROXIES, HAProxy, Proxy, bound_listener

#: The daemon trusts only 127.0.0.1 (where the proxies connect from); the tests'
#: clients connect from another loopback address, so their own headers are
#: those of an untrusted peer.
CLIENT_ADDRESS = "127.0.0.5"
PROXY_ENV = {**QUICK, "EBBCAST_SERVER_TRUSTED_PROXIES": "127.0.0.1",
             "EBBCAST_SHUTDOWN_UPGRADE_SPREAD": "1s", "EBBCAST_LOGGING_LEVEL": "debug"}


# -- the rule, called directly -----------------------------------------------------

@pytest.mark.parametrize("peer, headers, client", [
    ("127.0.0.1", {"x-forwarded-for": "203.0.113.7"}, "203.0.113.7"),
    ("127.0.0.1", {"x-forwarded-for": "198.51.100.1, 203.0.113.7"}, "203.0.113.7"),
    ("127.0.0.1", {"x-forwarded-for": "203.0.113.7, 10.1.2.3"}, "203.0.113.7"),
    ("127.0.0.1", {"x-forwarded-for": "10.1.2.3, 127.0.0.1"}, "10.1.2.3"),
    ("127.0.0.1", {"x-real-ip": "203.0.113.7"}, "203.0.113.7"),
    ("127.0.0.1", {"x-forwarded-for": "2001:db8::1"}, "2001:db8::1"),
    ("127.0.0.1", {"x-forwarded-for": "unknown, 203.0.113.7"}, "203.0.113.7"),
    ("127.0.0.1", {"x-forwarded-for": "203.0.113.7, garbage"}, "127.0.0.1"),
    ("127.0.0.1", {"x-real-ip": "garbage"}, "127.0.0.1"),
    ("127.0.0.1", {}, "127.0.0.1"),
    ("::ffff:127.0.0.1", {"x-real-ip": "203.0.113.7"}, "203.0.113.7"),
    ("198.51.100.9", {"x-forwarded-for": "203.0.113.7"}, "198.51.100.9"),
    ("198.51.100.9", {"x-real-ip": "203.0.113.7"}, "198.51.100.9"),
])
def test_the_forwarded_address_counts_only_from_a_trusted_proxy(
        peer: str, headers: dict[str, str], client: str) -> None:
    proxies = TrustedProxies(["127.0.0.1", "10.0.0.0/8"])
    assert proxies.client_address(peer, headers) == client


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    assert TrustedProxies([]).client_address("127.0.0.1", {"x-real-ip": "1.2.3.4"}) == \
        "127.0.0.1"


# -- through real proxies ----------------------------------------------------------

@pytest.fixture(params=sorted(PROXIES))
def behind(request: Any, spawn: Any, tmp_path: Any) -> Iterator[tuple[DaemonProcess, Proxy]]:
    """A daemon and the proxy of the test's parameter in front of it."""
    d = spawn("--port", "0", "--admin-port", "0", env=PROXY_ENV)
    proxy = PROXIES[request.param](tmp_path, d.ws_url, d.admin_url)
    yield d, proxy
    proxy.stop()


def client_socket(url: str) -> socket.socket:
    """A TCP connection to ``url``'s address, from CLIENT_ADDRESS."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((CLIENT_ADDRESS, 0))
    sock.connect((host, int(port)))
    return sock


def through(proxy: Proxy, path: str = "", **headers: str) -> ClientConnection:
    url = proxy.ws_url + path
    return dial(url, sock=client_socket(url), additional_headers=headers or None)


def test_clients_chat_through_the_proxy_and_the_log_names_them(
        behind: tuple[DaemonProcess, Proxy]) -> None:
    d, proxy = behind
    alice = through(proxy, "/alice", **{"X-Forwarded-For": "203.0.113.7"})
    bob = through(proxy, "/bob")
    assert recv_frame(alice, "welcome")["client_id"] == "alice"
    recv_frame(bob, "welcome")
    alice.send("hello through " + proxy.name)
    for ws in (alice, bob):
        frame = recv_frame(ws)
        assert (frame["from"], frame["text"]) == ("alice", "hello through " + proxy.name)
    # the proxy is trusted: the client is the address it forwarded, which is where
    # the client connected from, not what the client claimed
    d.wait_for_log(rf"client alice connected from {CLIENT_ADDRESS.replace('.', '[.]')}$")
    # straight to the daemon, the same claim comes from an untrusted peer: ignored
    direct = dial(d.ws_url + "/carol", sock=client_socket(d.ws_url),
                  additional_headers={"X-Forwarded-For": "203.0.113.7",
                                      "X-Real-IP": "203.0.113.8"})
    recv_frame(direct, "welcome")
    d.wait_for_log(rf"client carol connected from {CLIENT_ADDRESS.replace('.', '[.]')}$")
    assert "203.0.113" not in d.log_text()
    close_all([alice, bob, direct])


def test_a_drain_reaches_clients_through_the_proxy_and_its_health_check_sees_503(
        behind: tuple[DaemonProcess, Proxy]) -> None:
    d, proxy = behind
    ws = through(proxy)
    recv_frame(ws, "welcome")
    assert proxy.get("/readyz")[0] == 200
    if isinstance(proxy, HAProxy):
        wait_for(lambda: proxy.server_state()["status"] == "UP")
    d.signal(signal.SIGTERM)
    shutdown = recv_frame(ws, "shutdown")
    assert shutdown["reason"] == "draining"
    ws.send("still served")  # the tunnel stays up through the drain
    assert recv_frame(ws)["text"] == "still served"
    if isinstance(proxy, HAProxy):  # its own check of /readyz, then its own /readyz
        wait_for(lambda: proxy.server_state()["status"] == "DOWN")
        state = proxy.server_state()
        assert (state["check_status"], state["check_code"]) == ("L7STS", "503")
    assert proxy.get("/readyz")[0] == 503
    ws.close()
    assert d.wait_exit() == 0


def test_an_upgrade_moves_clients_through_the_proxy_and_a_hammer_is_never_refused(
        behind: tuple[DaemonProcess, Proxy]) -> None:
    d, proxy = behind
    clients = [through(proxy) for _ in range(5)]
    old = {recv_frame(ws, "welcome")["server"] for ws in clients}
    results = {"ok": 0, "failed": 0}
    errors: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                ws = through(proxy)
                recv_frame(ws, "welcome")
                ws.close()
                results["ok"] += 1
            except Exception as exc:  # every failure counts, whatever it is
                results["failed"] += 1
                errors.append(repr(exc))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: results["ok"] >= 20)
    before = results["ok"]
    d.signal(signal.SIGUSR2)
    moved = []
    for ws in clients:  # each is told to move, and moves through the proxy
        assert recv_frame(ws, "shutdown")["reason"] == "upgrade"
        new = through(proxy)
        moved.append(new)
        assert recv_frame(new, "welcome")["server"] not in old
        ws.close()
    wait_for(lambda: status(d).get("generation") == 2 and not status(d).get("previous"))
    wait_for(lambda: results["ok"] >= before + 20)
    stop.set()
    for thread in threads:
        thread.join()
    assert results["failed"] == 0, errors[:5]
    assert proxy.get("/readyz")[0] == 200
    close_all(moved)


# -- several instances behind one proxy ------------------------------------------------

@pytest.mark.parametrize("name", sorted(PROXIES))
def test_a_drain_behind_the_proxy_sends_every_client_back_through_it(
        name: str, spawn: Any, redis_server: Any, tmp_path: Any) -> None:
    """Two instances on Redis behind one proxy, each with the proxy's URL as its
    server.public_url: the draining one's shutdown frame names that URL (the other
    instance is live, though its URL is the same), and every one of its clients
    moves through the proxy to the other, none refused."""
    listener = bound_listener()
    public = f"ws://127.0.0.1:{listener.getsockname()[1]}/ws"
    env = {**PROXY_ENV, "EBBCAST_SERVER_PUBLIC_URL": public,
           "EBBCAST_BACKPLANE_URL": redis_server.url, "EBBCAST_SHUTDOWN_DRAIN_TIMEOUT": "60s"}
    draining, staying = (spawn("--port", "0", "--admin-port", "0", env=env) for _ in range(2))
    for d in (draining, staying):  # each has read the other's node key
        d.wait_for_log(rf"backplane: other instances at: {re.escape(public)}$")
    proxy = PROXIES[name](tmp_path, [draining.ws_url, staying.ws_url],
                          [draining.admin_url, staying.admin_url], listener)
    try:
        if isinstance(proxy, HAProxy):
            wait_for(lambda: all(proxy.server_state(server)["status"] == "UP"
                                 for server in ("ebbcast1", "ebbcast2")))
        node = {d: f"{socket.gethostname()}:{d.proc.pid}" for d in (draining, staying)}
        clients: dict[str, list[ClientConnection]] = {node[draining]: [], node[staying]: []}
        while len(clients[node[draining]]) < 10:  # the proxy spreads them over both
            ws = through(proxy)
            clients[recv_frame(ws, "welcome")["server"]].append(ws)
        draining.signal(signal.SIGTERM)
        moved = []
        for ws in clients[node[draining]]:
            shutdown = recv_frame(ws, "shutdown")
            assert (shutdown["reason"], shutdown["nodes"]) == ("draining", [public])
            new = dial(shutdown["nodes"][0], sock=client_socket(shutdown["nodes"][0]))
            assert recv_frame(new, "welcome")["server"] == node[staying]
            moved.append(new)
            ws.close()  # make before break
        assert draining.wait_exit() == 0
        moved[0].send("all moved")
        for ws in moved + clients[node[staying]]:
            assert recv_frame(ws)["text"] == "all moved"
        close_all(moved + clients[node[staying]])
        assert "refused WebSocket handshake" not in staying.log_text()
    finally:
        proxy.stop()
