"""Worker processes as the main process sees them: sockets, start, exit, health.

A ``WorkerSlot`` is one worker position. Its listening sockets are bound once and
kept for the life of the main process; the process in the slot is replaced when
it dies. Each start is a fresh interpreter (``python -m ebbcast _worker``), in its
own session, with the slot's sockets and its end of a new relay socketpair
(``ebbcast.relay``); its exit is noticed through a pidfd (Linux 5.3+) on the
event loop, with no SIGCHLD handler.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tornado.netutil import bind_sockets

from ebbcast.daemon import LISTEN_BACKLOG, BindError
from ebbcast.lifecycle import HANDLED_SIGNALS
from ebbcast.relay import Link

log = logging.getLogger(__name__)

#: A slot whose worker dies this many times within RESTART_WINDOW seconds is not
#: restarted again: the main process drains the others and exits 1.
RESTART_LIMIT, RESTART_WINDOW = 5, 60.0
#: Delay before a restart: none after the first death, then doubling, capped.
RESTART_DELAY_FIRST, RESTART_DELAY_MAX = 0.25, 5.0
#: A serving worker that sends nothing (it sends a heartbeat every
#: ``relay.HEARTBEAT_SECONDS``) for this long is stuck: it is killed and restarted.
#: The same figure as gunicorn's default worker timeout.
WORKER_TIMEOUT = 30.0
#: Environment a worker must not inherit: only the main process talks to systemd.
_MAIN_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                  "LISTEN_PID", "LISTEN_FDNAMES")


def worker_count(configured: int) -> int:
    """``server.workers``, with 0 meaning one per CPU this process may run on."""
    if configured > 0:
        return configured
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def describe_exit(returncode: int) -> str:
    """``Popen.returncode`` in words: "exited with status 1", "was killed by SIGKILL"."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


class RestartBudget:
    """At most ``limit`` restarts in any ``window`` seconds (``now`` is monotonic),
    each after a delay that grows with the restarts already in the window."""

    def __init__(self, limit: int = RESTART_LIMIT, window: float = RESTART_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._times: deque[float] = deque()

    def allow(self, now: float) -> float | None:
        """The delay before one more restart at ``now`` (counted), or None if the
        budget is spent."""
        while self._times and now - self._times[0] >= self.window:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return None
        recent = len(self._times)
        self._times.append(now)
        if recent == 0:
            return 0.0
        return min(RESTART_DELAY_FIRST * 2.0 ** (recent - 1), RESTART_DELAY_MAX)


def bind_public(host: str, port: int, count: int) -> list[list[socket.socket]]:
    """``count`` sets of listening sockets on one address, with SO_REUSEPORT, so
    the kernel spreads new connections over the workers.

    Port 0 picks a free port for the first set; the others use the same one. A
    given port is first bound once without SO_REUSEPORT and released: otherwise a
    second ebbcast with workers on the same port would quietly share it, taking
    part of the first one's connections, instead of failing with exit 3.
    """
    try:
        if port:
            for sock in bind_sockets(port, host or None):
                sock.close()
        first = bind_sockets(port, host or None, backlog=LISTEN_BACKLOG, reuse_port=True)
        port = first[0].getsockname()[1]
        rest = [bind_sockets(port, host or None, backlog=LISTEN_BACKLOG, reuse_port=True)
                for _ in range(count - 1)]
    except OSError as exc:
        raise BindError(f"public listener {host}:{port}", exc) from exc
    return [first, *rest]


def worker_environment() -> dict[str, str]:
    """The main process's environment, minus what is systemd's business, with this
    package importable whatever the current directory."""
    env = {k: v for k, v in os.environ.items() if k not in _MAIN_ONLY_ENV}
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", ""))
                                        if p)
    return env


@dataclass
class WorkerSlot:
    """One worker position: its sockets stay, its process is replaced on restart."""

    index: int
    public: list[socket.socket]
    budget: RestartBudget = field(default_factory=RestartBudget)
    process: subprocess.Popen[bytes] | None = None
    link: Link | None = None
    pidfd: int | None = None
    ready: bool = False
    connections: int = 0
    starts: int = 0
    last_heard: float = 0.0
    restart: asyncio.TimerHandle | None = None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    @property
    def alive(self) -> bool:
        return self.process is not None

    def start(self, args: Sequence[str], on_record: Callable[[bytes, bytes], None],
              on_exit: Callable[[], None], now: float) -> None:
        """Start this slot's worker. Raises OSError (with nothing left open) if it
        cannot be started."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [s.fileno() for s in self.public]
        command = [sys.executable, "-m", "ebbcast", "_worker", "--index", str(self.index),
                   "--relay-fd", str(theirs.fileno()),
                   "--listen-fds", ",".join(map(str, fds)), *args]
        # the worker starts with stop signals blocked until its handlers are in place
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            process = subprocess.Popen(command, env=worker_environment(),
                                       pass_fds=[*fds, theirs.fileno()],
                                       start_new_session=True, stdin=subprocess.DEVNULL)
        except OSError:
            mine.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            theirs.close()
        self.process, self.ready, self.connections = process, False, 0
        self.starts += 1
        self.last_heard = now
        self.link = Link(mine, on_record, lambda: None)
        self.link.start()
        try:
            self.pidfd = os.pidfd_open(process.pid)
            asyncio.get_running_loop().add_reader(self.pidfd, on_exit)
        except OSError:
            self.signal(signal.SIGKILL)
            self.reap(wait=True)
            raise

    def reap(self, wait: bool = False) -> int | None:
        """The worker's exit status once it has exited (then the slot is empty),
        else None."""
        if self.process is None:
            return None
        returncode = self.process.wait() if wait else self.process.poll()
        if returncode is None:
            return None
        if self.pidfd is not None:
            asyncio.get_running_loop().remove_reader(self.pidfd)
            os.close(self.pidfd)
        if self.link is not None:
            self.link.close()
        self.process, self.link, self.pidfd, self.ready = None, None, None, False
        self.connections = 0
        return returncode

    def signal(self, signum: int) -> None:
        if self.process is not None:
            try:
                os.kill(self.process.pid, signum)
            except ProcessLookupError:
                pass  # it has just exited; its pidfd reports it

    def silent_for(self, now: float) -> float:
        """Seconds since the serving worker last sent anything (0 if not serving)."""
        return now - self.last_heard if self.ready else 0.0
