"""The main process when ``server.workers`` is not 1 (SPEC section 8).

The main process binds the public and admin listeners, starts the workers and
supervises them, as gunicorn's arbiter does: signal handlers only record the
signal; the loop forwards it, reaps children, restarts a worker that dies while
serving (with a limit on restart storms), never one that dies while draining,
and returns once every worker has finished. It never serves WebSocket clients.

Listeners. The public address is bound once per worker with SO_REUSEPORT, so the
kernel spreads new connections evenly over the workers (a single shared socket
lets whichever process wakes first take a whole burst). The main process keeps
every bound socket: a restarted worker inherits the same one, and connections
waiting in its backlog meanwhile are served, not reset. The main process closes
its copies only when the drain starts. A later zero-downtime upgrade can pass
these same sockets to a successor instead of closing them.

Workers are fresh interpreters (``python -m ebbcast _worker``), not bare forks of
a process running an event loop. Each runs in its own session, so Ctrl+C in a
terminal (SIGINT to the foreground process group) reaches only the main process,
which forwards one SIGTERM: one Ctrl+C is one graceful drain. A second stop
signal is forwarded too and forces the stop, as it does for a single process.

systemd sees one service: only the main process speaks sd_notify (READY=1 once
every worker serves; STOPPING=1, STATUS= and EXTEND_TIMEOUT_USEC with the totals
while draining). Metrics use prometheus_client's multiprocess mode: the caller
sets ``PROMETHEUS_MULTIPROC_DIR`` to a fresh directory before prometheus_client
is imported (see ``ebbcast.cli``), and a finished worker is marked dead.
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
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_sockets

from ebbcast import __version__
from ebbcast.admin import ADMIN_MAX_BODY_BYTES, admin_application, build_status
from ebbcast.backplane import encode
from ebbcast.config import Config, is_reloadable, reload_config, render_toml
from ebbcast.daemon import (DEADLINE_CLOSE_GRACE, FORCED_CLOSE_GRACE, LISTEN_BACKLOG, BindError,
                            listener_url, tls_context)
from ebbcast.lifecycle import (HANDLED_SIGNALS, Lifecycle, State, StopReason, handle_signals,
                               unhandle_signals)
from ebbcast.logs import set_level
from ebbcast.metrics import MergedMetrics, Metrics
from ebbcast.notify import SystemdNotifier
from ebbcast.relay import COUNT, FRAME, INJECT, OTHERS, READY, Link

log = logging.getLogger(__name__)

#: A worker that dies this many times within RESTART_WINDOW seconds is not
#: restarted again: the main process drains the others and exits 1.
RESTART_LIMIT, RESTART_WINDOW = 5, 60.0
#: How long past a worker's own last resort the main process waits before SIGKILL.
KILL_MARGIN = 5.0
#: Cadence of the "connections on the other workers" updates sent to each worker.
OTHERS_INTERVAL = 0.25
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
    """At most ``limit`` restarts in any ``window`` seconds (``now`` is monotonic)."""

    def __init__(self, limit: int = RESTART_LIMIT, window: float = RESTART_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        """Whether one more restart is allowed at ``now``; if so it is counted."""
        while self._times and now - self._times[0] >= self.window:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True


def bind_public(host: str, port: int, count: int) -> list[list[socket.socket]]:
    """``count`` sets of listening sockets on one address, with SO_REUSEPORT.

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


@dataclass
class WorkerSlot:
    """One worker position: its sockets stay, its process is replaced on restart."""

    index: int
    public: list[socket.socket]
    process: subprocess.Popen[bytes] | None = None
    link: Link | None = None
    pidfd: int | None = None
    ready: bool = False
    connections: int = 0
    exits: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    @property
    def alive(self) -> bool:
        return self.process is not None


class Supervisor:
    """The main process over ``server.workers`` workers; ``run()`` returns the
    StopReason. It is also the admin listener's backend (``AdminBackend``).

    ``worker_args`` are the arguments that make a worker load its configuration
    the way the main process does on SIGHUP; ``rundir`` is a fresh private
    directory for this start (the effective configuration for workers).
    """

    def __init__(self, config: Config, reload: Callable[[], Config], rundir: str,
                 worker_args: Sequence[str], metrics_dir: str,
                 notifier: SystemdNotifier | None = None) -> None:
        tls_context(config)  # refuse an unreadable certificate here, not in every worker
        self.config = config
        self._reload_config = reload
        self._rundir = rundir
        self._worker_args = list(worker_args)
        self._notifier = notifier or SystemdNotifier()
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.lifecycle = Lifecycle()
        self.metrics = Metrics()
        self.metrics.backplane_up.set(1)
        self._merged = MergedMetrics(metrics_dir)
        self._budget = RestartBudget()
        self._slots: list[WorkerSlot] = []
        self._admin: HTTPServer | None = None
        self._timers: list[PeriodicCallback] = []
        self._started_mono = time.monotonic()
        self._next_tick = math.inf
        self._kill_at = math.inf
        self._forced = self._failed = False
        self._others_dirty = False
        self.urls: dict[str, str] = {}

    # -- AdminBackend ------------------------------------------------------------

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def total_connections(self) -> int:
        return sum(slot.connections for slot in self._slots if slot.alive)

    def status_report(self, now_mono: float) -> dict[str, Any]:
        workers = [(slot.pid, slot.connections) for slot in self._slots if slot.alive]
        return build_status(self.lifecycle, self._started_mono, now_mono, workers)

    def exposition(self) -> bytes:
        return self._merged.exposition()

    def broadcast(self, payload: str) -> int:
        """Hand an admin broadcast to one serving worker, which delivers it to its
        clients and publishes it on to the others (relay or Redis)."""
        for slot in self._slots:
            if slot.ready and slot.link is not None and \
                    slot.link.send(INJECT, encode("main", "admin", payload)):
                return self.total_connections
        return 0

    def request_drain(self, source: str) -> None:
        self._events.put_nowait(("drain", source))

    def record_signal(self, signum: int) -> None:
        """The signal handler: it records only; ``_supervise`` acts."""
        self._events.put_nowait(("signal", signum))

    # -- start-up ----------------------------------------------------------------

    async def run(self) -> StopReason:
        loop = asyncio.get_running_loop()
        handle_signals(loop, self.record_signal)
        try:
            self._start()
            await self._supervise()
        finally:
            self._teardown(loop)
        assert self.lifecycle.stop_reason is not None
        return self.lifecycle.stop_reason

    def _start(self) -> None:
        config = self.config
        count = worker_count(config.server.workers)
        sets = bind_public(config.server.host, config.server.port, count)
        try:
            admin = bind_sockets(config.admin.port, config.admin.host or None,
                                 backlog=LISTEN_BACKLOG)
        except OSError as exc:
            raise BindError(f"admin listener {config.admin.host}:{config.admin.port}",
                            exc) from exc
        self._admin = HTTPServer(admin_application(self), max_body_size=ADMIN_MAX_BODY_BYTES)
        self._admin.add_sockets(admin)
        scheme = "https" if config.tls_enabled else "http"
        self.urls = {
            "ws": ",".join(listener_url(scheme, s, config.server.ws_path) for s in sets[0]),
            "admin": ",".join(listener_url("http", s) for s in admin)}
        self._write_effective_config()
        log.info("ebbcast %s (pid %d) started: %d workers", __version__, os.getpid(), count)
        self._slots = [WorkerSlot(index, public) for index, public in enumerate(sets)]
        for slot in self._slots:
            self._spawn(slot)
        self._timers = [PeriodicCallback(self._send_others, OTHERS_INTERVAL * 1000)]
        if self._notifier.watchdog_interval:
            self._timers.append(PeriodicCallback(self._send_watchdog,
                                                 self._notifier.watchdog_interval * 1000))
        for timer in self._timers:
            timer.start()

    def _send_watchdog(self) -> None:
        self._notifier.watchdog()

    def _write_effective_config(self) -> None:
        path = os.path.join(self._rundir, "effective.toml")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write(render_toml(self.config, mask_secrets=False))

    def _spawn(self, slot: WorkerSlot) -> None:
        """Start the worker of ``slot`` with its sockets and a new relay link."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [s.fileno() for s in slot.public]
        command = [sys.executable, "-m", "ebbcast", "_worker", "--index", str(slot.index),
                   "--relay-fd", str(theirs.fileno()), "--listen-fds", ",".join(map(str, fds)),
                   "--effective-config", os.path.join(self._rundir, "effective.toml"),
                   *self._worker_args]
        env = {k: v for k, v in os.environ.items() if k not in _MAIN_ONLY_ENV}
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        # the worker starts with stop signals blocked until its handlers are in place
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            slot.process = subprocess.Popen(command, env=env, pass_fds=[*fds, theirs.fileno()],
                                            start_new_session=True, stdin=subprocess.DEVNULL)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            theirs.close()
        slot.ready, slot.connections = False, 0
        slot.link = Link(mine, lambda kind, body: self._on_record(slot, kind, body),
                         lambda: None)
        slot.link.start()
        slot.pidfd = os.pidfd_open(slot.process.pid)
        asyncio.get_running_loop().add_reader(slot.pidfd, self._reap, slot)
        log.debug("worker %d started (pid %d)", slot.index, slot.pid)

    # -- what workers report -----------------------------------------------------

    def _on_record(self, slot: WorkerSlot, kind: bytes, body: bytes) -> None:
        if kind == FRAME:
            for other in self._slots:
                if other is not slot and other.ready and other.link is not None:
                    if not other.link.send(FRAME, body):
                        self.metrics.backplane_dropped.inc()
        elif kind == COUNT:
            slot.connections = int(body)
            self._others_dirty = True
        elif kind == READY:
            slot.ready = True
            self._others_dirty = True
            self._events.put_nowait(("ready", slot))

    def _send_others(self) -> None:
        """Tell each worker how many connections the others have (for the
        ``connections`` of welcome and periodic frames)."""
        if not self._others_dirty:
            return
        self._others_dirty = False
        total = self.total_connections
        for slot in self._slots:
            if slot.ready and slot.link is not None:
                slot.link.send(OTHERS, str(total - slot.connections).encode())

    def _reap(self, slot: WorkerSlot) -> None:
        """The worker's pidfd became readable: it has exited."""
        assert slot.process is not None and slot.pidfd is not None
        returncode = slot.process.poll()
        if returncode is None:
            return
        asyncio.get_running_loop().remove_reader(slot.pidfd)
        os.close(slot.pidfd)
        if slot.link is not None:
            slot.link.close()
        pid = slot.pid
        self._merged.mark_process_dead(pid)
        slot.process, slot.link, slot.pidfd, slot.ready = None, None, None, False
        slot.connections = 0
        self._others_dirty = True
        self._events.put_nowait(("exited", (slot, pid, returncode)))

    # -- the loop ----------------------------------------------------------------

    async def _supervise(self) -> None:
        while not self._finished():
            wake = min(self._next_tick, self._kill_at)
            timeout = None if wake == math.inf else max(0.0, wake - time.monotonic())
            try:
                kind, detail = await asyncio.wait_for(self._events.get(), timeout)
            except asyncio.TimeoutError:
                kind, detail = "tick", None
            self._act(kind, detail, time.monotonic())

    def _finished(self) -> bool:
        if self.lifecycle.state in (State.STARTING, State.SERVING):
            return False
        if any(slot.alive for slot in self._slots):
            return False
        if self.lifecycle.state is State.DRAINING:
            self._end_drain(time.monotonic())
        return True

    def _act(self, kind: str, detail: Any, now: float) -> None:
        state = self.lifecycle.state
        if kind == "signal" and detail == signal.SIGHUP:
            self.reload()
        elif kind == "signal" and state is State.STARTING:
            log.info("%s during start-up: stopping", signal.Signals(detail).name)
            self.lifecycle.stop(StopReason.NORMAL)
            self._stop_workers(FORCED_CLOSE_GRACE)
        elif kind == "signal" and state in (State.DRAINING, State.STOPPING):
            log.info("%s during the drain: the workers close their clients now",
                     signal.Signals(detail).name)
            self._forced = True
            self._stop_workers(FORCED_CLOSE_GRACE)
        elif kind in ("signal", "drain") and state is State.SERVING:
            source = signal.Signals(detail).name if kind == "signal" else \
                "the admin API" if detail == "admin" else detail
            self._begin_drain(source, now)
        elif kind == "ready":
            self._on_ready(detail)
        elif kind == "exited":
            slot, pid, returncode = detail
            self._on_exited(slot, pid, returncode, now)
        if self.lifecycle.state is State.DRAINING:
            self._drain_step(now)
        if now >= self._kill_at:
            self._kill_stragglers()

    def _on_ready(self, slot: WorkerSlot) -> None:
        if self.lifecycle.state is not State.STARTING:
            log.info("worker %d (pid %d) restarted and serving", slot.index, slot.pid)
            if self.lifecycle.state is not State.SERVING:
                self._signal(slot, signal.SIGTERM)  # restarted just as the drain began
            return
        if all(s.ready for s in self._slots):
            self.lifecycle.serve()
            log.info("serving ws=%s admin=%s", self.urls["ws"], self.urls["admin"])
            self._notifier.ready(f"serving on {self.urls['ws'].split(',')[0]} with "
                                 f"{len(self._slots)} workers")

    def _on_exited(self, slot: WorkerSlot, pid: int, returncode: int, now: float) -> None:
        state = self.lifecycle.state
        what = f"worker {slot.index} (pid {pid}) {describe_exit(returncode)}"
        if state not in (State.STARTING, State.SERVING):
            log.log(logging.INFO if returncode == 0 else logging.WARNING, "%s", what)
            return
        if self._budget.allow(now):
            log.error("%s while serving; restarting it", what)
            self._spawn(slot)
            return
        log.error("%s; %d restarts in %ds: giving up, stopping the other workers", what,
                  self._budget.limit, int(self._budget.window))
        self._failed = True
        if state is State.SERVING:
            self._begin_drain("repeated worker failures", now)
        else:
            self.lifecycle.stop(StopReason.FAILED)
            self._stop_workers(FORCED_CLOSE_GRACE)

    # -- the drain ---------------------------------------------------------------

    def _begin_drain(self, source: str, now: float) -> None:
        plan = self.lifecycle.begin_drain(now, time.time(), self.config.shutdown.drain_timeout)
        if plan is None:
            return
        for slot in self._slots:  # with the workers' copies closed too, new
            for sock in slot.public:  # connections are refused by the kernel
                sock.close()
        self._stop_workers(plan.timeout + DEADLINE_CLOSE_GRACE)
        self.metrics.drain_started_at(plan.started_unix, plan.deadline_unix)
        log.info("drain started by %s: %d connections on %d workers, deadline in %ds (at %s)",
                 source, self.total_connections, sum(s.alive for s in self._slots),
                 math.ceil(plan.timeout),
                 time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(plan.deadline_unix)))
        status = self._drain_status(now)
        self._notifier.stopping(status)
        self._notifier.progress(status, self._extend_seconds())
        self._next_tick = plan.next_tick(now, self.config.shutdown.progress_interval)

    def _stop_workers(self, last_resort: float) -> None:
        """Forward SIGTERM to every worker; SIGKILL those left ``last_resort``
        (plus a margin) seconds from now."""
        for slot in self._slots:
            self._signal(slot, signal.SIGTERM)
        self._kill_at = time.monotonic() + last_resort + KILL_MARGIN

    def _signal(self, slot: WorkerSlot, signum: int) -> None:
        if slot.process is not None:
            try:
                os.kill(slot.process.pid, signum)
            except ProcessLookupError:
                pass  # it has just exited; its pidfd reports it

    def _kill_stragglers(self) -> None:
        for slot in self._slots:
            if slot.alive:
                log.error("worker %d (pid %d) did not stop in time: SIGKILL", slot.index,
                          slot.pid)
                self._signal(slot, signal.SIGKILL)
        self._kill_at = math.inf

    def _drain_status(self, now: float) -> str:
        plan = self.lifecycle.drain
        assert plan is not None
        return plan.status(self.total_connections, now)

    def _extend_seconds(self) -> float:
        return 3 * self.config.shutdown.progress_interval + DEADLINE_CLOSE_GRACE + KILL_MARGIN

    def _drain_step(self, now: float) -> None:
        if now < self._next_tick:
            return
        plan = self.lifecycle.drain
        assert plan is not None
        status = self._drain_status(now)
        if not plan.expired(now):
            log.info("%s", status)
        self._notifier.progress(status, self._extend_seconds())
        self._next_tick = plan.next_tick(now, self.config.shutdown.progress_interval) \
            if not plan.expired(now) else math.inf

    def _end_drain(self, now: float) -> None:
        plan = self.lifecycle.drain
        assert plan is not None
        if self._failed:
            reason = StopReason.FAILED
        elif self._forced:
            reason = StopReason.FORCED
        else:
            reason = StopReason.DEADLINE if plan.expired(now) else StopReason.DRAINED
        log.info("drain complete: every worker has finished")
        self.lifecycle.stop(reason)

    # -- reload ------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: apply the reloadable keys here and forward the signal."""
        reloaded = reload_config(self.config, self._reload_config)
        if reloaded is None:
            return
        self.config, changed = reloaded
        set_level(self.config.logging.level)
        self._write_effective_config()
        plan = self.lifecycle.drain
        if plan is not None and "shutdown.progress_interval" in changed:
            self._next_tick = plan.next_tick(time.monotonic(),
                                             self.config.shutdown.progress_interval)
        applied = [key for key in changed if is_reloadable(key)]
        log.info("config reloaded: %s; forwarded to the workers",
                 ", ".join(applied) if applied else "no change")
        for slot in self._slots:
            self._signal(slot, signal.SIGHUP)

    # -- teardown ----------------------------------------------------------------

    def _teardown(self, loop: asyncio.AbstractEventLoop) -> None:
        self.lifecycle.stop(StopReason.NORMAL)
        unhandle_signals(loop)
        for timer in self._timers:
            timer.stop()
        if self._admin is not None:
            self._admin.stop()
        for slot in self._slots:
            if slot.alive:  # only after a failure in this process
                self._signal(slot, signal.SIGKILL)
                assert slot.process is not None
                slot.process.wait()
            if slot.pidfd is not None:
                loop.remove_reader(slot.pidfd)
                os.close(slot.pidfd)
            if slot.link is not None:
                slot.link.close()
            for sock in slot.public:
                sock.close()
        log.info("stopped (%s)", self.lifecycle.stop_reason.value
                 if self.lifecycle.stop_reason else "normal")
        self._notifier.notify("STATUS=stopped")
        self._notifier.close()

