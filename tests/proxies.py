"""nginx and HAProxy, from the shipped deploy/ files, in front of a test daemon.

Each proxy runs in the foreground with its configuration rendered from
``deploy/nginx/ebbcast.conf`` or ``deploy/haproxy/ebbcast.cfg``: only the addresses
change (every replaced line must be in the shipped file, so a change there that a
test would no longer cover fails here). The proxy's listening socket is bound by
the test on port 0 and inherited by the proxy (nginx through its ``NGINX``
variable, HAProxy through ``bind fd@N``): no port is picked and reused later.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from helpers import REPO, STEP_TIMEOUT

NGINX_CONF = REPO / "deploy" / "nginx" / "ebbcast.conf"
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "ebbcast.cfg"


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, f"the shipped proxy configuration no longer has {old!r}"
    return text.replace(old, new)


def _hostport(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


def bound_listener() -> socket.socket:
    """A listening socket on a port of its own, for a proxy to inherit."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    return listener


class Proxy:
    """A proxy process in front of ebbcast instances, on a socket of its own: bound
    here, or bound first (``bound_listener``) when the instances must know the
    proxy's URL before it starts (``server.public_url``)."""

    name = ""

    def __init__(self, workdir: Path, ws_url: str | list[str], admin_url: str | list[str],
                 listener: socket.socket | None = None) -> None:
        binary = shutil.which(self.name, path=f"{os.environ.get('PATH', '')}:/usr/sbin")
        if binary is None:
            raise AssertionError(f"{self.name} is not installed: run `make test-deps`")
        self.binary = binary
        self.workdir = workdir
        self.listener = listener or bound_listener()
        self.port = self.listener.getsockname()[1]
        self.lines: list[str] = []
        publics = [ws_url] if isinstance(ws_url, str) else ws_url
        admins = [admin_url] if isinstance(admin_url, str) else admin_url
        self.proc = self._start([_hostport(url) for url in publics],
                                [_hostport(url) for url in admins])
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._wait_ready()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def _start(self, publics: list[str], admins: list[str]) -> subprocess.Popen[str]:
        """The proxy in front of the instances at ``publics`` (their admin listeners at
        ``admins``, in the same order)."""
        raise NotImplementedError

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def _wait_ready(self) -> None:
        """Until the page answers through the proxy (the proxy and the daemon serve)."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            try:
                if self.get("/")[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                self.stop()
                raise AssertionError(f"{self.name} exited:\n" + "\n".join(self.lines))
            assert time.monotonic() < deadline, "proxy not serving:\n" + "\n".join(self.lines)
            time.sleep(0.05)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=STEP_TIMEOUT) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STEP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STEP_TIMEOUT)
        self.listener.close()
        self._reader.join(STEP_TIMEOUT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class Nginx(Proxy):
    name = "nginx"

    def _start(self, publics: list[str], admins: list[str]) -> subprocess.Popen[str]:
        site = NGINX_CONF.read_text()
        site = _replace(site, "    server 127.0.0.1:8000 max_fails=1 fail_timeout=5s;\n", "".join(
            f"    server {public} max_fails=1 fail_timeout=5s;\n" for public in publics))
        site = _replace(site, "    server 127.0.0.1:8001;\n",
                        "".join(f"    server {admin};\n" for admin in admins))
        site = _replace(site, "listen 80;", f"listen 127.0.0.1:{self.port};")
        site = _replace(site, "/var/log/nginx/ebbcast.access.log",
                        str(self.workdir / "access.log"))
        (self.workdir / "ebbcast.conf").write_text(site)
        (self.workdir / "nginx.conf").write_text(
            f"pid {self.workdir}/nginx.pid;\nerror_log stderr notice;\n"
            "daemon off;\nworker_processes 1;\nevents { worker_connections 4096; }\n"
            f"http {{ include {self.workdir}/ebbcast.conf; }}\n")
        fd = self.listener.fileno()
        return subprocess.Popen(
            [self.binary, "-p", str(self.workdir), "-e", "stderr",
             "-c", str(self.workdir / "nginx.conf")],
            env={**os.environ, "NGINX": f"{fd};"}, pass_fds=[fd],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)


class HAProxy(Proxy):
    name = "haproxy"

    def _start(self, publics: list[str], admins: list[str]) -> subprocess.Popen[str]:
        cfg = HAPROXY_CFG.read_text()
        cfg = _replace(cfg, "    server ebbcast1 127.0.0.1:8000 check port 8001\n", "".join(
            f"    server ebbcast{n} {public} check port {admin.rsplit(':', 1)[1]}\n"
            for n, (public, admin) in enumerate(zip(publics, admins), 1)))
        fd = self.listener.fileno()
        cfg = _replace(cfg, "bind :80\n", f"bind fd@{fd}\n")
        cfg = _replace(cfg, "log /dev/log local0",
                       f"log stderr format raw local0\n    stats socket {self.stats_path}")
        # within this machine's descriptor limit (the shipped value needs 200,000)
        cfg = _replace(cfg, "maxconn 100000", "maxconn 4000")
        # quick health checks, so that a test sees the drain in a second or two
        cfg = _replace(cfg, "default-server inter 2s ", "default-server inter 200ms ")
        (self.workdir / "haproxy.cfg").write_text(cfg)
        return subprocess.Popen(
            [self.binary, "-db", "-f", str(self.workdir / "haproxy.cfg")], pass_fds=[fd],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)

    @property
    def stats_path(self) -> Path:
        return self.workdir / "stats.sock"

    def server_state(self, server: str = "ebbcast1") -> dict[str, str]:
        """A backend server's row of ``show stat``: status, check_status, ..."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(STEP_TIMEOUT)
            sock.connect(str(self.stats_path))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        header, *rows = data.decode().strip().splitlines()
        names = re.sub(r"^# ", "", header).split(",")
        for row in rows:
            values = dict(zip(names, row.split(",")))
            if values["svname"] == server:
                return values
        raise AssertionError(f"no server ebbcast1 in:\n{data.decode()}")


PROXIES = {"nginx": Nginx, "haproxy": HAProxy}
