"""Worker processes as the main process sees them: sockets, start, exit, health.

A ``Worker`` is one worker position in a generation. Its listening sockets are
bound by the main process and kept for its whole life; the process is replaced
when it dies. A ``ChildWorker`` starts a fresh interpreter (``python -m ebbcast
_worker``) in its own session with the sockets and its end of a new relay
socketpair (``ebbcast.backplane.relay``); its exit is noticed through a pidfd (Linux 5.3+)
on the event loop, with no SIGCHLD handler. A ``LocalWorker`` serves inside the
main process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ebbcast.backplane import records
from ebbcast.backplane.base import ChannelFeed, ChannelRoute, Envelope, SequencedFeed, Sequencing
from ebbcast.backplane.history import Kept
from ebbcast.backplane.records import Received
from ebbcast.backplane.relay import Link, feed_channel_record
from ebbcast.core.lifecycle import HANDLED_SIGNALS, StopReason

log = logging.getLogger(__name__)

#: A slot whose worker dies this many times within RESTART_WINDOW seconds is not
#: restarted again: the main process drains the others and exits 1.
RESTART_LIMIT, RESTART_WINDOW = 5, 60.0
#: Delay before a restart: none after the first death, then doubling, capped.
RESTART_DELAY_FIRST, RESTART_DELAY_MAX = 0.25, 5.0
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


def worker_environment() -> dict[str, str]:
    """The main process's environment, minus what is systemd's business, with this
    package importable whatever the current directory."""
    env = {k: v for k, v in os.environ.items() if k not in _MAIN_ONLY_ENV}
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", ""))
                                        if p)
    return env


class Worker:
    """One serving process as the main process sees it. Its sockets stay with its
    position; the process itself is replaced when it dies (``start`` again).

    ``ChildWorker`` is a process of its own; ``LocalWorker`` runs inside the main
    process (the single serving process of ``server.workers = 1``), so that the
    default daemon stays one process until its first upgrade.
    """

    def __init__(self, index: int, public: list[socket.socket], generation: int = 1) -> None:
        self.index = index
        self.public = public
        self.generation = generation
        self.budget = RestartBudget()
        self.link: Link | None = None
        self.ready = False
        self.version = ""
        self.sequenced = False  # it said it takes offsets from this process
        self.connections = 0
        self.starts = 0
        self.last_heard = 0.0
        self.restart: asyncio.TimerHandle | None = None

    @property
    def name(self) -> str:
        return f"worker {self.index}" if self.generation == 1 else \
            f"worker {self.index} of generation {self.generation}"

    @property
    def pid(self) -> int:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    def start(self, args: Sequence[str], on_record: Callable[[Received], None],
              on_exit: Callable[[], None], now: float, hold: bool = False) -> None:
        raise NotImplementedError

    def reap(self) -> int | None:
        """The exit status once the worker has exited (then it is empty), else None."""
        raise NotImplementedError

    def signal(self, signum: int) -> None:
        raise NotImplementedError

    def silent_for(self, now: float) -> float:
        """Seconds since the serving worker last sent anything (0 if not serving)."""
        return now - self.last_heard if self.ready else 0.0

    def take_sequencer(self, epoch: str, base: int, kept: list[Kept],
                       direct: Callable[[], Sequencing]) -> None:
        """The main process gives the offsets: its epoch, the offset its history
        ``kept`` goes on from, and that history."""
        if self.link is not None:
            self.link.send(records.Sequencer(epoch, base))
            for entry in kept:
                self.link.send(records.History(entry))

    def take_ordered(self, epoch: str, offset: int, envelope: Envelope, own: bool,
                     packed: Callable[[], bytes]) -> bool:
        """One sequenced broadcast (``packed()``: its Ordered record, packed once for
        every worker); False if it was dropped."""
        return self.link is None or self.link.send_packed(packed())

    def take_channels(self, direct: Callable[[], ChannelRoute]) -> None:
        """The main process decides this worker's channels: over the link (its
        records), or, inside the main process, by calls (``direct()``)."""

    def take_channel(self, record: records.Record, packed: Callable[[], bytes]) -> bool:
        """A channel record for this worker (``packed()``: packed once for every
        worker); False if it was dropped."""
        return self.link is not None and self.link.send_packed(packed())

    def _started(self, link: Link, now: float) -> None:
        self.ready, self.connections, self.version = False, 0, ""
        self.sequenced = False
        self.starts += 1
        self.last_heard = now
        self.link = link
        link.start()

    def _emptied(self) -> None:
        if self.link is not None:
            self.link.close()
        self.link, self.ready, self.connections = None, False, 0


@dataclass(frozen=True)
class WorkerReady:
    """A worker said it is ready (its READY record)."""

    worker: Worker


@dataclass(frozen=True)
class WorkerExited:
    worker: Worker
    description: str  # "worker 0 (pid 4242) was killed by SIGKILL"
    failed: bool


class ChildWorker(Worker):
    """A worker in a fresh interpreter (``python -m ebbcast _worker``), in its own
    session, with its sockets and its end of a new relay socketpair; its exit is
    noticed through a pidfd (Linux 5.3+) on the event loop."""

    def __init__(self, index: int, public: list[socket.socket], generation: int = 1) -> None:
        super().__init__(index, public, generation)
        self.process: subprocess.Popen[bytes] | None = None
        self.pidfd: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    @property
    def alive(self) -> bool:
        return self.process is not None

    def start(self, args: Sequence[str], on_record: Callable[[Received], None],
              on_exit: Callable[[], None], now: float, hold: bool = False) -> None:
        """Start the worker. Raises OSError (with nothing left open) if it cannot be
        started."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [s.fileno() for s in self.public]
        command = [sys.executable, "-m", "ebbcast", "_worker", "--index", str(self.index),
                   "--generation", str(self.generation), "--relay-fd", str(theirs.fileno()),
                   "--listen-fds", ",".join(map(str, fds)), *(["--hold"] if hold else []),
                   *args]
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
        self.process = process
        self._started(Link(mine, on_record, lambda: None), now)
        try:
            self.pidfd = os.pidfd_open(process.pid)
            asyncio.get_running_loop().add_reader(self.pidfd, on_exit)
        except OSError:
            self.signal(signal.SIGKILL)
            process.wait()
            self._close_pidfd()
            self.process = None
            self._emptied()
            raise

    def reap(self) -> int | None:
        if self.process is None:
            return None
        returncode = self.process.poll()
        if returncode is None:
            return None
        self._close_pidfd()
        self.process = None
        self._emptied()
        return returncode

    def _close_pidfd(self) -> None:
        if self.pidfd is not None:
            asyncio.get_running_loop().remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None

    def signal(self, signum: int) -> None:
        if self.process is not None:
            try:
                os.kill(self.process.pid, signum)
            except ProcessLookupError:
                pass  # it has just exited; its pidfd reports it


#: Builds the serving process a LocalWorker runs: ``(relay, public)`` -> it.
MakeLocalRun = Callable[[socket.socket, list[socket.socket]], "LocalRun"]


class LocalRun(Protocol):
    """The serving process a LocalWorker runs (an ``ebbcast.serving.process.Daemon``); the
    main process hands its ``feed`` sequenced broadcasts by calls (where a worker of
    its own gets ``Sequencer``, ``History`` and ``Ordered`` records)."""

    def record_signal(self, signum: int) -> None: ...
    def run(self) -> Coroutine[Any, Any, object]: ...
    @property
    def feed(self) -> SequencedFeed: ...
    @property
    def channels(self) -> ChannelFeed: ...
    def route_channels(self, route: ChannelRoute) -> None:
        """Channels go to ``route`` from now on (calls, not the link)."""


class LocalWorker(Worker):
    """The one serving process of a single-process daemon, inside the main
    process: same link records, same events, no second interpreter. Signals
    reach it from the main process's loop; it cannot be killed or go silent
    alone (a stuck loop is the main process's, which the watchdog catches)."""

    def __init__(self, index: int, public: list[socket.socket], serve_here: MakeLocalRun) -> None:
        super().__init__(index, public)
        self._serve_here = serve_here
        self._daemon: LocalRun | None = None
        self._task: asyncio.Task[object] | None = None

    @property
    def pid(self) -> int:
        return os.getpid() if self._task is not None else 0

    @property
    def alive(self) -> bool:
        return self._task is not None

    def start(self, args: Sequence[str], on_record: Callable[[Received], None],
              on_exit: Callable[[], None], now: float, hold: bool = False) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # copies, so that its server closing them leaves the main process's open
        self._daemon = self._serve_here(theirs, [sock.dup() for sock in self.public])
        self._started(Link(mine, on_record, lambda: None), now)
        self._task = asyncio.ensure_future(self._daemon.run())
        self._task.add_done_callback(lambda _: on_exit())

    def reap(self) -> int | None:
        if self._task is None or not self._task.done():
            return None
        task, self._task, self._daemon = self._task, None, None
        self._emptied()
        if task.cancelled():
            return 1
        failure = task.exception()
        if failure is not None:
            log.error("the serving process failed", exc_info=failure)
            return 1
        return 1 if task.result() is StopReason.FAILED else 0

    def take_sequencer(self, epoch: str, base: int, kept: list[Kept],
                       direct: Callable[[], Sequencing]) -> None:
        """By calls: this serving process also sequences by calls (``direct``)."""
        if self._daemon is not None:
            self._daemon.feed.sequenced_by(epoch, base, direct())
            for entry in kept:
                self._daemon.feed.recorded(entry)

    def take_ordered(self, epoch: str, offset: int, envelope: Envelope, own: bool,
                     packed: Callable[[], bytes]) -> bool:
        if self._daemon is not None:
            self._daemon.feed.deliver_sequenced(epoch, offset, envelope.text,
                                                envelope.source, envelope.seq, own)
        return True

    def take_channels(self, direct: Callable[[], ChannelRoute]) -> None:
        if self._daemon is not None:
            self._daemon.route_channels(direct())

    def take_channel(self, record: records.Record, packed: Callable[[], bytes]) -> bool:
        """By calls, but a direct message, which is answered over the link."""
        if self._daemon is None:
            return False
        return feed_channel_record(self._daemon.channels, record) or \
            super().take_channel(record, packed)

    def signal(self, signum: int) -> None:
        if self._daemon is not None and signum != signal.SIGKILL:
            self._daemon.record_signal(signum)

    def silent_for(self, now: float) -> float:
        return 0.0


class Stopping:
    """Workers told to stop, and when those still there are killed (SIGKILL)."""

    def __init__(self) -> None:
        self.kill_at = math.inf

    def stop(self, workers: Iterable[Worker], kill_at: float) -> None:
        """SIGTERM to each of ``workers`` now (a restart not yet due is cancelled);
        SIGKILL to those left at ``kill_at``."""
        for worker in workers:
            worker.signal(signal.SIGTERM)
            if worker.restart is not None:
                worker.restart.cancel()
                worker.restart = None
        self.kill_at = kill_at

    def kill_by(self, when: float) -> None:
        self.kill_at = min(self.kill_at, when)

    def due(self, now: float) -> bool:
        return now >= self.kill_at

    def kill(self, workers: Iterable[Worker]) -> None:
        """SIGKILL those of ``workers`` that should have stopped by now."""
        for worker in workers:
            if worker.alive:
                log.error("%s (pid %d) did not stop in time: SIGKILL", worker.name,
                          worker.pid)
                worker.signal(signal.SIGKILL)
        self.kill_at = math.inf


def kill_silent(workers: Iterable[Worker], now: float, timeout: float) -> None:
    """SIGKILL each worker that has sent nothing (not even a heartbeat) for
    ``timeout`` seconds: its loop is stuck. Its exit is then reported as any other."""
    for worker in workers:
        if worker.alive and worker.silent_for(now) > timeout:
            log.error("%s (pid %d) sent nothing for %ds: killing it", worker.name,
                      worker.pid, int(worker.silent_for(now)))
            worker.signal(signal.SIGKILL)
            worker.last_heard = now  # once


def let_go(worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
    """The main process is ending: a worker still running (only when the main
    process fails) is left to drain on its own; its pidfd and link are closed."""
    if worker.restart is not None:
        worker.restart.cancel()
    if worker.alive:
        log.warning("%s (pid %d) left to drain on its own", worker.name, worker.pid)
        worker.signal(signal.SIGTERM)
    if isinstance(worker, ChildWorker) and worker.pidfd is not None:
        loop.remove_reader(worker.pidfd)
        os.close(worker.pidfd)
    if worker.link is not None:
        worker.link.close()


def first_workers(sets: list[list[socket.socket]],
                  serve_here: MakeLocalRun | None) -> list[Worker]:
    """Generation 1: one worker per socket set; a single one runs inside the main
    process when it can (``serve_here``), so that the default daemon is one process."""
    if len(sets) == 1 and serve_here is not None:
        return [LocalWorker(0, sets[0], serve_here)]
    return [ChildWorker(i, public) for i, public in enumerate(sets)]
