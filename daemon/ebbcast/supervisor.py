"""The main process when ``server.workers`` is not 1 (SPEC section 8).

The main process binds the public and admin listeners, starts the workers and
supervises them, as gunicorn's arbiter does: signal handlers only record the
signal; the loop forwards it, reaps children, restarts a worker that dies while
serving (after a growing delay, at most 5 times a minute per worker, see
``ebbcast.workers``), kills one that has gone silent, never restarts one while
draining, and returns once every worker has finished. It never serves WebSocket
clients itself.

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
import time
from collections.abc import Callable, Sequence
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback

from ebbcast import __version__
from ebbcast.admin import ADMIN_MAX_BODY_BYTES, admin_application, build_status
from ebbcast.backplane import encode
from ebbcast.config import Config, reload_config, render_toml
from ebbcast.daemon import (DEADLINE_CLOSE_GRACE, FORCED_CLOSE_GRACE, bind_listener,
                            listener_url, tls_context)
from ebbcast.listener import Spare
from ebbcast.lifecycle import (Lifecycle, State, StopReason, handle_signals, stop_request,
                               unhandle_signals)
from ebbcast.logs import set_level
from ebbcast.metrics import MergedMetrics, Metrics
from ebbcast.notify import SystemdNotifier
from ebbcast.relay import COUNT, FRAME, INJECT, OTHERS, READY, pack
from ebbcast.workers import (WORKER_TIMEOUT, WorkerSlot, bind_public, describe_exit,
                             worker_count)

log = logging.getLogger(__name__)

#: How long past a worker's own last resort the main process waits before SIGKILL.
KILL_MARGIN = 2.0
#: Cadence of the "connections on the other workers" updates and health checks.
HOUSEKEEPING_INTERVAL = 0.25


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
        self._slots: list[WorkerSlot] = []
        self._spare = Spare()  # a descriptor in reserve, see ebbcast.listener
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
        admin = bind_listener("admin listener", config.admin.host, config.admin.port,
                              self._spare)
        self._admin = HTTPServer(admin_application(self), max_body_size=ADMIN_MAX_BODY_BYTES)
        self._admin.add_sockets(admin)
        scheme = "https" if config.tls_enabled else "http"
        self.urls = {
            "ws": ",".join(listener_url(scheme, s, config.server.ws_path) for s in sets[0]),
            "admin": ",".join(listener_url("http", s) for s in admin)}
        self._write_effective_config()
        log.info("ebbcast %s (pid %d) started: %d worker%s", __version__, os.getpid(), count,
                 "" if count == 1 else "s")
        self._slots = [WorkerSlot(index, public) for index, public in enumerate(sets)]
        for slot in self._slots:
            self._start_worker(slot)
        self._timers = [PeriodicCallback(self._housekeeping, HOUSEKEEPING_INTERVAL * 1000)]
        if self._notifier.watchdog_interval:
            self._timers.append(PeriodicCallback(self._send_watchdog,
                                                 self._notifier.watchdog_interval * 1000))
        for timer in self._timers:
            timer.start()

    def _send_watchdog(self) -> None:
        self._notifier.watchdog()

    @property
    def _effective_config(self) -> str:
        return os.path.join(self._rundir, "effective.toml")

    def _write_effective_config(self) -> None:
        """The configuration workers start with, replaced atomically (a worker
        starting during a reload reads the old file or the new, never half)."""
        path = self._effective_config
        partial = path + ".new"
        with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write(render_toml(self.config, mask_secrets=False))
        os.replace(partial, path)

    def _start_worker(self, slot: WorkerSlot) -> None:
        """Start the worker of ``slot``; a failure (out of descriptors, say) counts
        as a death, so it is retried within the slot's restart budget."""
        slot.restart = None
        if self.lifecycle.state not in (State.STARTING, State.SERVING):
            return
        args = ["--effective-config", self._effective_config, *self._worker_args]
        try:
            slot.start(args, lambda kind, body: self._on_record(slot, kind, body),
                       lambda: self._reap(slot), time.monotonic())
        except OSError as exc:
            self._on_exited(slot, f"worker {slot.index} could not be started ({exc})",
                            failed=True, now=time.monotonic())
            return
        log.debug("worker %d started (pid %d)", slot.index, slot.pid)

    # -- what workers report -----------------------------------------------------

    def _on_record(self, slot: WorkerSlot, kind: bytes, body: bytes) -> None:
        slot.last_heard = time.monotonic()
        if kind == FRAME:  # to every other worker, ready or still starting
            record = pack(FRAME, body)
            for other in self._slots:
                if other is not slot and other.link is not None:
                    if not other.link.send_packed(record):
                        self.metrics.backplane_dropped.inc()
        elif kind == COUNT:
            slot.connections = int(body)
            self._others_dirty = True
        elif kind == READY:
            slot.ready = True
            self._others_dirty = True
            self._events.put_nowait(("ready", slot))

    def _housekeeping(self) -> None:
        """Tell each worker how many connections the others have (for the
        ``connections`` of welcome and periodic frames); kill a stuck worker."""
        now = time.monotonic()
        for slot in self._slots:
            if slot.alive and slot.silent_for(now) > WORKER_TIMEOUT:
                log.error("worker %d (pid %d) sent nothing for %ds: killing it", slot.index,
                          slot.pid, int(slot.silent_for(now)))
                slot.signal(signal.SIGKILL)
                slot.last_heard = now  # once; its pidfd reports the death
        if not self._others_dirty:
            return
        self._others_dirty = False
        total = self.total_connections
        for slot in self._slots:
            if slot.ready and slot.link is not None:
                slot.link.send(OTHERS, str(total - slot.connections).encode())

    def _reap(self, slot: WorkerSlot) -> None:
        """The worker's pidfd became readable: it has exited."""
        pid, lost = slot.pid, slot.connections
        returncode = slot.reap()
        if returncode is None:
            return
        self._merged.mark_process_dead(pid)
        if lost:  # its clients' connections ended with it, uncounted by the worker
            self.metrics.disconnections.labels("error").inc(lost)
        self._others_dirty = True
        what = f"worker {slot.index} (pid {pid}) {describe_exit(returncode)}"
        self._events.put_nowait(("exited", (slot, what, returncode != 0)))

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
        if self.lifecycle.state is State.DRAINING:
            self._end_drain(time.monotonic())

    def _finished(self) -> bool:
        """Stopping or draining, with every worker gone and every event handled."""
        return self.lifecycle.state not in (State.STARTING, State.SERVING) and \
            not any(slot.alive for slot in self._slots) and self._events.empty()

    def _act(self, kind: str, detail: Any, now: float) -> None:
        state = self.lifecycle.state
        if kind == "signal" and detail == signal.SIGHUP:
            self.reload()
        elif kind in ("signal", "drain") and state is State.STARTING:
            log.info("%s during start-up: stopping", stop_request(kind, detail))
            self.lifecycle.stop(StopReason.NORMAL)
            self._stop_workers(FORCED_CLOSE_GRACE)
        elif kind == "signal" and state in (State.DRAINING, State.STOPPING):
            log.info("%s during the drain: the workers close their clients now",
                     signal.Signals(detail).name)
            self._forced = True
            self._stop_workers(FORCED_CLOSE_GRACE)
        elif kind in ("signal", "drain") and state is State.SERVING:
            self._begin_drain(stop_request(kind, detail), now)
        elif kind == "ready":
            self._on_ready(detail)
        elif kind == "exited":
            slot, what, failed = detail
            self._on_exited(slot, what, failed, now)
        if self.lifecycle.state is State.DRAINING:
            self._drain_step(now)
        if now >= self._kill_at:
            self._kill_stragglers()

    def _on_ready(self, slot: WorkerSlot) -> None:
        if slot.starts > 1:
            log.info("worker %d (pid %d) restarted and serving", slot.index, slot.pid)
        if self.lifecycle.state is State.STARTING and all(s.ready for s in self._slots):
            self.lifecycle.serve()
            log.info("serving ws=%s admin=%s", self.urls["ws"], self.urls["admin"])
            self._notifier.ready(f"serving on {self.urls['ws'].split(',')[0]} with "
                                 f"{len(self._slots)} workers")

    def _on_exited(self, slot: WorkerSlot, what: str, failed: bool, now: float) -> None:
        """A worker is gone: restart it while serving (within its budget, after a
        growing delay), never while draining."""
        state = self.lifecycle.state
        if state not in (State.STARTING, State.SERVING):
            log.log(logging.WARNING if failed else logging.INFO, "%s", what)
            return
        delay = slot.budget.allow(now)
        if delay is not None:
            log.error("%s while %s; restarting it%s", what, state.value,
                      f" in {delay:g}s" if delay else "")
            slot.restart = asyncio.get_running_loop().call_later(
                delay, self._start_worker, slot)
            return
        log.error("%s; %d restarts in %ds: giving up, stopping the other workers", what,
                  slot.budget.limit, int(slot.budget.window))
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
        log.info("drain started by %s: %d connections on %d workers, %s", source,
                 self.total_connections, sum(s.alive for s in self._slots),
                 plan.deadline_text())
        status = self._drain_status(now)
        self._notifier.stopping(status)
        self._notifier.progress(status, self._extend_seconds())
        self._next_tick = plan.next_tick(now, self.config.shutdown.progress_interval)

    def _stop_workers(self, last_resort: float) -> None:
        """Forward SIGTERM to every worker; SIGKILL those left ``last_resort``
        (plus a margin) seconds from now. A restart not yet due is cancelled."""
        for slot in self._slots:
            slot.signal(signal.SIGTERM)
            if slot.restart is not None:
                slot.restart.cancel()
                slot.restart = None
        self._kill_at = time.monotonic() + last_resort + KILL_MARGIN

    def _kill_stragglers(self) -> None:
        for slot in self._slots:
            if slot.alive:
                log.error("worker %d (pid %d) did not stop in time: SIGKILL", slot.index,
                          slot.pid)
                slot.signal(signal.SIGKILL)
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
        reloaded = reload_config(self.config, self._reload_config,
                                 note="; forwarded to the workers")
        if reloaded is None:
            return
        self.config, changed = reloaded
        set_level(self.config.logging.level)
        self._write_effective_config()
        plan = self.lifecycle.drain
        if plan is not None and "shutdown.progress_interval" in changed:
            self._next_tick = plan.next_tick(time.monotonic(),
                                             self.config.shutdown.progress_interval)
        for slot in self._slots:
            slot.signal(signal.SIGHUP)

    # -- teardown ----------------------------------------------------------------

    def _teardown(self, loop: asyncio.AbstractEventLoop) -> None:
        self.lifecycle.stop(StopReason.NORMAL)
        unhandle_signals(loop)
        for timer in self._timers:
            timer.stop()
        if self._admin is not None:
            self._admin.stop()
        for slot in self._slots:
            if slot.restart is not None:
                slot.restart.cancel()
            if slot.alive:  # only when this process fails: let the worker drain alone
                log.warning("worker %d (pid %d) left to drain on its own", slot.index,
                            slot.pid)
                slot.signal(signal.SIGTERM)
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
        self._spare.close()
