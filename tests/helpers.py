"""Helpers the tests share: an in-process daemon on real sockets, the daemon as a
subprocess, a real redis-server, and ``websockets`` clients of a subprocess with its
status and metrics read from the admin listener. Fixtures are in conftest.py."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.websocket import WebSocketClientConnection, websocket_connect
from websockets.sync.client import ClientConnection, connect

from ebbcast.config import Config, load_config
from ebbcast.serving.process import Daemon
from ebbcast.core.lifecycle import StopReason
from ebbcast.core.waits import within

REPO = Path(__file__).resolve().parent.parent
#: Every await in a test is bounded by this, so a broken daemon fails, never hangs.
STEP_TIMEOUT = 10.0

#: Settings that keep tests quiet and quick unless a test overrides them.
TEST_DEFAULTS = {
    "server.port": "0",
    "admin.port": "0",
    "broadcast.periodic_interval": "0",
    "admin.token": "secret-token",
}


def test_config(**overrides: str) -> Config:
    """A Config on free ports; keyword names use ``__`` for the dot."""
    values = dict(TEST_DEFAULTS)
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, env={}, overrides=values)


test_config.__test__ = False  # type: ignore[attr-defined]  # not a test function


@dataclass
class RunningDaemon:
    daemon: Daemon
    task: asyncio.Task[StopReason]
    http: AsyncHTTPClient = field(default_factory=AsyncHTTPClient)
    clients: list[WebSocketClientConnection] = field(default_factory=list)

    @property
    def ws_url(self) -> str:
        return self.daemon.urls["ws"].replace("http", "ws", 1)

    @property
    def admin_url(self) -> str:
        return self.daemon.urls["admin"]

    async def connect(self, path: str = "", **kwargs: Any) -> WebSocketClientConnection:
        conn = await within(
            websocket_connect(HTTPRequest(self.ws_url + path, **kwargs)), STEP_TIMEOUT)
        self.clients.append(conn)
        return conn

    async def connect_welcomed(self, path: str = "") -> tuple[WebSocketClientConnection,
                                                               dict[str, Any]]:
        conn = await self.connect(path)
        welcome = await recv_json(conn)
        assert welcome["type"] == "welcome"
        return conn, welcome

    async def admin(self, path: str, method: str = "GET", body: str | None = None,
                    token: str | None = None) -> HTTPResponse:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        request = HTTPRequest(self.admin_url + path, method=method, body=body,
                              headers=headers, request_timeout=STEP_TIMEOUT)
        try:
            return await self.http.fetch(request)
        except HTTPClientError as exc:
            assert exc.response is not None
            return exc.response

    async def stopped(self) -> StopReason:
        return await within(asyncio.shield(self.task), STEP_TIMEOUT)


async def recv(conn: Any) -> str | bytes | None:
    """The next frame of a Tornado client or of a ``websockets`` asyncio one."""
    read = conn.read_message if hasattr(conn, "read_message") else conn.recv
    return await within(read(), STEP_TIMEOUT)  # type: ignore[no-any-return]


async def recv_json(conn: Any) -> dict[str, Any]:
    frame = await recv(conn)
    assert isinstance(frame, str), f"expected a text frame, got {frame!r}"
    return json.loads(frame)  # type: ignore[no-any-return]


async def recv_until(conn: Any, frame_type: str = "message") -> dict[str, Any]:
    """Skip frames until one of ``frame_type`` arrives (an asyncio client's
    ``recv_frame``)."""
    while True:
        frame = await recv_json(conn)
        if frame["type"] == frame_type:
            return frame


async def wait_until(predicate: Callable[[], bool], timeout: float = STEP_TIMEOUT) -> None:
    """Poll a cheap in-process condition on the event loop until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def never_reading_client(ws_url: str) -> socket.socket:
    """See _never_reading_client; the blocking handshake runs in a thread."""
    return await asyncio.to_thread(_never_reading_client, ws_url)


def _never_reading_client(ws_url: str) -> socket.socket:
    """A raw TCP client that completes the WebSocket handshake, then never reads.

    Its receive buffer is made small, so what the daemon sends it piles up in the
    daemon: the slow consumer that limits.client_queue_bytes is there for.
    """
    host, port = ws_url.split("/")[2].rsplit(":", 1)
    path = "/" + ws_url.split("/", 3)[3]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(STEP_TIMEOUT)
    sock.connect((host, int(port)))
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)  # byte by byte: leave every frame unread
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def exact_reader(sock: socket.socket) -> Callable[[int], bytes]:
    """``read(n)``: exactly n bytes from ``sock``, however they arrive."""
    buffer = bytearray()

    def read(n: int) -> bytes:
        while len(buffer) < n:
            chunk = sock.recv(65536)
            assert chunk, "connection ended without a close frame"
            buffer.extend(chunk)
        data = bytes(buffer[:n])
        del buffer[:n]
        return data

    return read


def server_frames(read: Callable[[int], bytes]) -> Iterator[tuple[int, bytes]]:
    """Unmasked server frames (RFC 6455 5.2) as ``(opcode, payload)``, as they come;
    ``read(n)`` gives exactly n bytes (``exact_reader``, or a binary file's read)."""
    while True:
        head, length = read(2)
        if length == 126:
            length = int.from_bytes(read(2), "big")
        elif length == 127:
            length = int.from_bytes(read(8), "big")
        yield head & 0x0F, read(length)


def read_server_frames(sock: socket.socket) -> list[tuple[int, bytes]]:
    """Read unmasked server frames until a close frame; return them all."""
    frames: list[tuple[int, bytes]] = []
    for opcode, payload in server_frames(exact_reader(sock)):
        frames.append((opcode, payload))
        if opcode == 0x8:
            return frames
    return frames


# -- the daemon as a subprocess ---------------------------------------------------

def patch_module(root: Path, module: str, after: str, code: str) -> None:
    """Insert ``code`` after the line ``after`` of ebbcast/``module`` in a package
    copy; the line must be there (a patch that no longer applies fails loudly)."""
    path = root / "ebbcast" / module
    text = path.read_text()
    assert text.count(after) == 1, f"{module} no longer has {after!r}"
    path.write_text(text.replace(after, after + code))


def package_copy(tmp_path: Path) -> Path:
    """A copy of the ebbcast package to run from (PYTHONPATH), to change in place: a
    new release for an upgrade, or a bug put there on purpose."""
    root = tmp_path / "site"
    install_package(root)
    return root


def install_package(root: Path) -> None:
    """This tree's package as ``root``/ebbcast, replacing what is there (as
    `pip install -U` does under a running daemon)."""
    import shutil

    shutil.rmtree(root / "ebbcast", ignore_errors=True)
    shutil.copytree(REPO / "daemon" / "ebbcast", root / "ebbcast",
                    ignore=shutil.ignore_patterns("__pycache__"))



SERVING_RE = re.compile(r"serving ws=([^\s\"]+) admin=([^\s\"]+)")  # text or JSON logs


class DaemonProcess:
    """``python -m ebbcast serve ...`` with its stderr collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 cwd: Path | None = None, preexec_fn: Callable[[], Any] | None = None) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("EBBCAST_")}
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ebbcast", *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
            cwd=cwd, preexec_fn=preexec_fn)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ws_url = ""
        self.admin_url = ""

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<EOF>")
            self._cond.notify_all()

    def wait_for_log(self, pattern: str, timeout: float = STEP_TIMEOUT,
                     start: int = 0) -> re.Match[str]:
        """The first log line from index ``start`` on that matches ``pattern``."""
        return self._find_line(pattern, timeout, start)[1]

    def wait_for_log_index(self, pattern: str, timeout: float = STEP_TIMEOUT,
                           start: int = 0) -> int:
        """The index of the first log line from ``start`` on that matches ``pattern``."""
        return self._find_line(pattern, timeout, start)[0]

    def _find_line(self, pattern: str, timeout: float,
                   start: int) -> tuple[int, re.Match[str]]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self.lines):
                    match = regex.search(self.lines[index])
                    if match:
                        return index, match
                    if self.lines[index] == "<EOF>":
                        raise AssertionError(f"exited before logging {pattern!r}:\n"
                                             + self.log_text())
                    index += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no log line {pattern!r} in {timeout}s:\n"
                                         + self.log_text())
                self._cond.wait(left)

    def wait_serving(self) -> DaemonProcess:
        match = self.wait_for_log(SERVING_RE.pattern)
        self.ws_url = match.group(1).replace("http", "ws", 1)
        self.admin_url = match.group(2)
        return self

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = STEP_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def admin_json(self, path: str, method: str = "GET", body: bytes | None = None,
                   token: str | None = None) -> tuple[int, Any]:
        return http_json(self.admin_url + path, method, body, token)

    def children(self) -> list[int]:
        """Pids of the main process's children (its workers)."""
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def metrics_text(self) -> str:
        """The admin listener's Prometheus exposition."""
        with urllib.request.urlopen(self.admin_url + "/metrics", timeout=STEP_TIMEOUT) as resp:
            return resp.read().decode()  # type: ignore[no-any-return]

    def kill(self) -> None:
        """SIGKILL the process and its workers (in their own sessions, they would
        otherwise outlive a killed main process for as long as they drain)."""
        workers = self.children()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STEP_TIMEOUT)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reader.join(STEP_TIMEOUT)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def http_json(url: str, method: str = "GET", body: bytes | None = None,
              token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=STEP_TIMEOUT) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"null")


# -- a real redis-server ----------------------------------------------------------

class RedisServer:
    """``redis-server`` on a loopback port, no persistence, in a working directory of
    its own (``workdir``: no dump file is read from or written to anywhere else, a
    replica's copy of its master included); stop() and start() again on the same
    port to simulate an outage.

    redis-server cannot be handed a bound socket, and its port 0 means "no TCP", so
    the port is chosen here: below the kernel's ephemeral range, which port 0 binds
    and outgoing connections never take, so no other test's socket can hold it;
    and if something bound it all the same, redis-server exits and another is
    tried. A Redis answering on the port counts only if its ``process_id`` is the
    one started here: never another run's. Only a restart must have the same port:
    it fails, naming why, if the port was taken meanwhile.

    ``url`` (what a daemon is given) logs in as the user docs/operations.md tells
    operators to make, with the commands it lists and only ``prefixes``' keys and
    channels; ``client()`` (what a test inspects Redis with) as the default user.
    """

    def __init__(self, workdir: Path, tls_dir: Path | None = None,
                 args: tuple[str, ...] = (), prefixes: tuple[str, ...] = ("ebbcast",)) -> None:
        import shutil

        binary = shutil.which("redis-server")
        assert binary, "redis-server is missing: install Debian's redis-server (make test-deps)"
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.tls_dir = tls_dir
        self.args = list(args)  # more redis-server arguments, e.g. ("--replicaof", ...)
        self.acl = ["--user", ACL_USER, *documented_acl(prefixes)]
        if tls_dir is not None:  # TLS only (port 0 turns plain TCP off), from a test CA
            import trustme

            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1")
            ca.cert_pem.write_to_path(str(tls_dir / "ca.pem"))
            cert.cert_chain_pems[0].write_to_path(str(tls_dir / "redis.crt"))
            cert.private_key_pem.write_to_path(str(tls_dir / "redis.key"))

    @property
    def url(self) -> str:
        login = f"{ACL_USER}:{ACL_PASSWORD}@"
        if self.tls_dir is not None:
            return (f"rediss://{login}127.0.0.1:{self.port}/0"
                    f"?ssl_ca_certs={self.tls_dir / 'ca.pem'}")
        return f"redis://{login}127.0.0.1:{self.port}/0"

    def client(self, port: int | None = None, timeout: float = STEP_TIMEOUT) -> Any:
        """A redis-py client of this server (or of whatever answers on ``port``)."""
        import redis

        tls: dict[str, Any] = {}
        if self.tls_dir is not None:
            tls = {"ssl": True, "ssl_ca_certs": str(self.tls_dir / "ca.pem")}
        return redis.Redis(host="127.0.0.1", port=port or self.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout, decode_responses=True, **tls)

    def start(self) -> None:
        if self.port:
            assert self._run(self.port), f"port {self.port} was taken while Redis was down"
            return
        for _ in range(10):
            port = port_below_ephemeral_range()
            if self._run(port):
                self.port = port
                return
        raise AssertionError("redis-server found no free port in 10 tries")

    def _run(self, port: int) -> bool:
        """Start redis-server on ``port``; False if it exited (the port was in use)."""
        listen = ["--port", str(port)]
        if self.tls_dir is not None:
            listen = ["--port", "0", "--tls-port", str(port),
                      "--tls-cert-file", str(self.tls_dir / "redis.crt"),
                      "--tls-key-file", str(self.tls_dir / "redis.key"),
                      "--tls-ca-cert-file", str(self.tls_dir / "ca.pem"),
                      "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen(
            [self.binary, *listen, "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--loglevel", "warning",
             *self.acl, *self.args],
            cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        if wait_for_own_redis(self.proc, lambda: self.client(port, timeout=1)):
            return True
        self.proc = None
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(STEP_TIMEOUT)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: what a crashed host looks like to its clients and sentinels."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(STEP_TIMEOUT)
        self.proc = None


ACL_USER, ACL_PASSWORD = "ebbcast", "acl-test-password"


def documented_acl(prefixes: tuple[str, ...]) -> list[str]:
    """The rules of the ``ACL SETUSER ebbcast ...`` line in docs/operations.md, with
    this password and ``prefixes``' keys and channels in place of ebbcast's."""
    line = next(text for text in (REPO / "docs" / "operations.md").read_text().splitlines()
                if text.strip().startswith(f"ACL SETUSER {ACL_USER} "))
    rules: list[str] = []
    for rule in line.split()[3:]:
        if rule == ">PASSWORD":
            rules.append(f">{ACL_PASSWORD}")
        elif rule in ("~ebbcast:*", "&ebbcast:*"):
            rules += [f"{rule[0]}{prefix}:*" for prefix in prefixes]
        else:
            rules.append(rule)
    return rules


def wait_for_own_redis(proc: subprocess.Popen[Any], client: Callable[[], Any]) -> bool:
    """Until the Redis (or sentinel) that ``client()`` reaches is ``proc`` itself, by
    its ``INFO server`` process_id: True; False once ``proc`` has exited (its port
    was taken). Another process answering on the port is never taken for ours."""
    import redis

    deadline = time.monotonic() + STEP_TIMEOUT
    while proc.poll() is None:
        try:
            with client() as conn:
                if conn.info("server")["process_id"] == proc.pid:
                    return True
        except (redis.RedisError, OSError):
            pass
        assert time.monotonic() < deadline, f"redis-server (pid {proc.pid}) did not start"
        time.sleep(0.02)
    return False


def set_open_files_limit(soft: int | None = None, hard: int | None = None) -> None:
    """This process's open files limit (RLIMIT_NOFILE): ``hard`` (default: as it is)
    and ``soft`` (default: the hard limit, as many sockets as allowed). As a
    ``preexec_fn``, with functools.partial, a daemon's limit at its start."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1] if hard is None else hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if soft is None else soft, hard))


def port_below_ephemeral_range() -> int:
    """A random port under net.ipv4.ip_local_port_range (never handed out by the
    kernel for port 0 or an outgoing connection)."""
    import random

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return random.randrange(max(1024, low - 10_000), low)


def serve_on_a_port_of_its_own(spawn: Any, *args: str, **kwargs: Any) -> DaemonProcess:
    """A daemon whose public port is below the ephemeral range, for a test where
    another daemon takes the same port after this one has exited: no port-0 bind or
    outgoing connection can take it in between. Another port if it was taken (the
    daemon exits 3)."""
    for _ in range(10):
        d = spawn("--port", str(port_below_ephemeral_range()), *args, wait=False, **kwargs)
        try:
            return d.wait_serving()  # type: ignore[no-any-return]
        except AssertionError:
            if d.wait_exit() != 3:
                raise
    raise AssertionError("no free port below the ephemeral range in 10 tries")


#: Both listeners on ports the OS picks (read back from the "serving" line).
FAST = ("--port", "0", "--admin-port", "0")

QUICK = {"EBBCAST_BROADCAST_PERIODIC_INTERVAL": "0", "EBBCAST_ADMIN_TOKEN": "secret-token",
         "EBBCAST_LIMITS_MESSAGES_PER_SECOND": "0"}


#: websockets 17.1+ warns when connect() is not a context manager unless told this.
_DIRECT = {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}


def closed_code(ws: ClientConnection) -> int:
    """Read until the server closes the connection; the code of its close frame."""
    from websockets.exceptions import ConnectionClosed

    try:
        while True:
            ws.recv(timeout=STEP_TIMEOUT)
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, "closed without a close frame"
        return closed.rcvd.code


def dial(url: str, **kwargs: Any) -> ClientConnection:
    """A client that the test closes itself (not in a ``with`` block)."""
    return connect(url, **_DIRECT, **kwargs)


def start_workers(spawn: Any, workers: int = 2, *args: str, **env: str) -> DaemonProcess:
    return spawn("--port", "0", "--admin-port", "0", "--workers", str(workers), *args,
                 env={**QUICK, **env})


def recv_frame(ws: ClientConnection, frame_type: str = "message") -> dict[str, Any]:
    """The next frame of ``frame_type``, skipping others (periodic frames), from a
    ``websockets`` sync client (``recv_until`` for an asyncio one)."""
    while True:
        frame = json.loads(ws.recv(timeout=STEP_TIMEOUT))
        if frame["type"] == frame_type:
            return frame


def recv_kinds(ws: ClientConnection, count: int) -> dict[str, dict[str, Any]]:
    """The next ``count`` frames, by type. An error frame answers a client's frame
    at once, while its broadcast comes back from the sequencer: their order is
    not fixed."""
    got: dict[str, dict[str, Any]] = {}
    for _ in range(count):
        frame = json.loads(ws.recv(timeout=STEP_TIMEOUT))
        got[frame["type"]] = frame
    return got


def one_client_per_worker(d: DaemonProcess, workers: int, opened: list[ClientConnection],
                          name: str = "c", path: Callable[[int], str] | None = None
                          ) -> list[tuple[str, ClientConnection]]:
    """A client on each worker of ``d``, each ``/<name><n>`` (its client id) or
    ``path(n)`` (a path and query of its own), in the order of the workers' pids;
    every connection made is added to ``opened``."""
    found: dict[int, tuple[str, ClientConnection]] = {}
    for n in range(200):
        if len(found) == workers:
            return [found[pid] for pid in sorted(found)]
        ws = dial(d.ws_url + (path(n) if path is not None else f"/{name}{n}"))
        opened.append(ws)
        found.setdefault(pid_of(recv_frame(ws, "welcome")), (f"{name}{n}", ws))
    raise AssertionError(f"no client on each of {workers} workers")


def pid_of(welcome: dict[str, Any]) -> int:
    """The pid of the process that sent a welcome frame (its ``server`` field)."""
    return int(welcome["server"].rsplit(":", 1)[1])


def clients_on_every_worker(d: DaemonProcess, workers: int, each: int = 1,
                            opened: list[ClientConnection] | None = None,
                            **dial_args: Any) -> dict[int, list[ClientConnection]]:
    """Connect until each of ``workers`` pids has ``each`` clients (the kernel spreads
    connections over the workers' sockets by a hash, so it takes a few tries);
    extra connections are closed. Keyed by worker pid, from the welcome frame."""
    by_pid: dict[int, list[ClientConnection]] = defaultdict(list)
    for _ in range(200):
        if len(by_pid) == workers and all(len(c) >= each for c in by_pid.values()):
            return dict(by_pid)
        ws = dial(d.ws_url, **dial_args)
        pid = pid_of(recv_frame(ws, "welcome"))
        if len(by_pid[pid]) < each:
            by_pid[pid].append(ws)
            if opened is not None:
                opened.append(ws)
        else:
            ws.close()
    raise AssertionError(f"connections did not reach all {workers} workers: "
                         f"{ {p: len(c) for p, c in by_pid.items()} }")


def promtool(*args: str, stdin: str | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Debian's promtool (package prometheus) with ``args``."""
    import shutil

    path = shutil.which("promtool")
    assert path, "promtool is missing: install Debian's prometheus package (make test-deps)"
    return subprocess.run([path, *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd, timeout=30)


def promtool_accepts(exposition: str) -> None:
    """``promtool check metrics`` finds nothing to say about ``exposition``."""
    checked = promtool("check", "metrics", stdin=exposition)
    assert checked.returncode == 0 and checked.stdout + checked.stderr == "", \
        checked.stdout + checked.stderr


def status(d: DaemonProcess) -> dict[str, Any]:
    code, body = d.admin_json("/status")
    assert code == 200
    return body


def sample(text: str, name: str) -> float:
    """The value of the sample ``name`` (with its labels) in an exposition."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in the exposition:\n{text}"
    return float(match.group(1))


def metric(d: DaemonProcess, name: str) -> float:
    """The value of the sample ``name`` in a daemon's metrics now."""
    return sample(d.metrics_text(), name)


def wait_for(predicate: Any, timeout: float = STEP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def close_all(conns: list[ClientConnection]) -> None:
    for ws in conns:
        ws.close()


def notifications(sock: socket.socket, wanted: str) -> list[tuple[int, dict[str, str]]]:
    """(sender pid, assignments) of each datagram up to the first containing ``wanted``."""
    got = []
    while True:
        data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = next(struct.unpack("3i", cmsg[2])[0] for cmsg in ancillary
                   if cmsg[1] == socket.SCM_CREDENTIALS)
        lines = data.decode().splitlines()
        got.append((pid, dict(line.split("=", 1) for line in lines)))
        if wanted in lines:
            return got
