"""The main process (workers, systemd, upgrades): every ``ebbcast serve`` runs one.

It binds the public and admin listeners, starts the serving processes and
supervises them, as gunicorn's arbiter does: signal handlers only record the
signal; the loop (``ebbcast.core.loop``) forwards it, reaps children, restarts a
worker that dies while serving (after a growing delay, at most 5 times a minute
per worker, see ``ebbcast.process.workers``), kills one that has gone silent, never
restarts one while draining, and returns once every serving process has
finished. It keeps the same PID for the daemon's whole life, so systemd's
MainPID never moves.

Serving processes. With ``server.workers = 1`` (the default) the first generation
serves inside this process (``LocalWorker``): the daemon is one process. Otherwise,
and for every generation after an upgrade, they are fresh interpreters
(``python -m ebbcast _worker``), each in its own session, so Ctrl+C in a terminal
reaches only this process, which forwards one SIGTERM.

Listeners. The public address is bound once per worker with SO_REUSEPORT, so the
kernel spreads new connections evenly over the workers. This process keeps every
bound socket: a restarted worker, and every new generation, inherits the same
ones, so connections waiting in a backlog are served, not reset. It closes its
copies only when the drain starts.

Upgrades (SIGUSR2, ``POST /upgrade``; ``ebbcast.process.generations``): a new generation
starts held on the same sockets; once all of it is ready it accepts and the old
one hands over and drains. A failure leaves the old generation as it was.

Offsets (``memory://``). This process is the sequencer: a worker
sends each broadcast that begins on it (a client's frame) here, this process
gives it the next offset, keeps it in its history and sends it to every worker
of every generation, the sender's included, so every worker delivers in one
order. It outlives the generations, and so do the epoch and the history: a new
worker starts with the history as it is (``ebbcast.backplane.relay``).

systemd sees one service: only this process speaks sd_notify (READY=1 once every
worker serves; RELOADING=1 ... READY=1 around an upgrade; STOPPING=1, STATUS= and
EXTEND_TIMEOUT_USEC with the totals while draining). Metrics use
prometheus_client's multiprocess mode (``ebbcast.cli`` sets it up); a finished
worker is marked dead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union

from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback

from ebbcast import __version__
from ebbcast.backplane.sequencer import Sequencer
from ebbcast.config import Config, reload_config
from ebbcast.core.events import Common, DrainRequested, SignalReceived, Tick, who_asked
from ebbcast.core.lifecycle import (
    DEADLINE_CLOSE_GRACE,
    FORCED_CLOSE_GRACE,
    Lifecycle,
    State,
    StopReason,
)
from ebbcast.core.logs import set_level
from ebbcast.core.loop import Loop, Progress, Step, common_step, extend_seconds
from ebbcast.core.metrics import MergedMetrics, Metrics
from ebbcast.core.sockets import Spare, listener_url, say_if_unadvertised, tls_context
from ebbcast.process.admin import admin_server, build_status
from ebbcast.process.generations import (
    EffectiveConfigs,
    Generation,
    Generations,
    UpgradeRequested,
)
from ebbcast.process.listener import bind_listener, bind_public
from ebbcast.process.notify import SystemdNotifier
from ebbcast.process.switchboard import Switchboard
from ebbcast.process.channeldesk import ChannelDesk
from ebbcast.process.workers import (LocalRun, Stopping, Worker, WorkerExited, WorkerReady,
                                     describe_exit, first_workers, kill_silent, let_go,
                                     worker_count)

log = logging.getLogger(__name__)

#: How long past a worker's own last resort the main process waits before SIGKILL.
KILL_MARGIN = 2.0
#: Cadence of the "connections on the other workers" updates and health checks.
HOUSEKEEPING_INTERVAL = 0.25

#: Builds the serving process that runs inside this one: (relay, public, config,
#: metrics) -> an ``ebbcast.serving.process.Daemon`` (given by ``ebbcast.cli``).
ServeHere = Callable[[socket.socket, list[socket.socket], Config, Metrics], LocalRun]

#: What the main process's loop acts on, beside the common events.
MainEvent = Union[UpgradeRequested, WorkerReady, WorkerExited]


class Supervisor:
    """The main process; ``run()`` returns the StopReason. It is also the admin
    listener's backend (``AdminBackend``) and the ``Arbiter`` its generations ask.
    ``worker_args`` make a worker load its configuration as this process does on
    SIGHUP; ``rundir`` is a fresh private directory for this start (each
    generation's effective configuration); ``instance``: the daemon's id."""

    def __init__(self, config: Config, reload: Callable[[], Config], rundir: str,
                 worker_args: Sequence[str], metrics_dir: str,
                 notifier: SystemdNotifier | None = None,
                 serve_here: ServeHere | None = None, instance: str = "") -> None:
        tls_context(config)  # refuse an unreadable certificate here, not in every worker
        self.config = config
        self._reload_config = reload
        self._worker_args = list(worker_args)
        self._notifier = notifier or SystemdNotifier()
        self._serve_here = serve_here
        self._loop: Loop[MainEvent] = Loop(takes_signals=True)
        self.lifecycle = Lifecycle()
        self.metrics = Metrics()
        self.metrics.backplane_up.set(1)
        self.metrics.generation.set(1)
        self._merged = MergedMetrics(metrics_dir, lambda: self._generations.versions(),
                                     lambda: self._generations.serving_processes(),
                                     lambda: self.lifecycle.state is State.SERVING)
        # with Redis, Redis gives the offsets
        sequencer = Sequencer(config.history.size, config.history.ttl) \
            if config.backplane.url == "memory://" else None
        self._generations = Generations(self, reload, EffectiveConfigs(rundir),
                                        sequenced=sequencer is not None)
        self.channels = ChannelDesk(self._workers, self.metrics, config, instance)
        self._switchboard = Switchboard(self._workers, self.metrics, sequencer,
                                        lambda worker: self._loop.put(WorkerReady(worker)),
                                        self.channels)
        self._spare = Spare()  # a descriptor in reserve, see ebbcast.core.sockets
        self._admin: HTTPServer | None = None
        self._housekeeping_timer: PeriodicCallback | None = None
        self._started_mono = time.monotonic()
        self._progress = Progress()
        self._stopping = Stopping()
        self.urls: dict[str, str] = {}

    def _workers(self) -> Iterator[Worker]:
        return self._generations.workers()

    # -- AdminBackend ------------------------------------------------------------

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def total_connections(self) -> int:
        return self._generations.connections()

    def status_report(self, now_mono: float) -> dict[str, Any]:
        workers = [(w.pid, w.connections) for w in self._generations.current.workers
                   if w.alive]
        report = build_status(self.lifecycle, self._started_mono, now_mono, workers,
                              self.total_connections)
        report.update(self._generations.report())
        return report

    def exposition(self) -> bytes:
        return self._merged.exposition()

    def broadcast(self, payload: str) -> int:
        """An admin broadcast: sequenced here and sent to every worker (``memory://``
        and the JSON envelope); else handed to one serving worker of the current
        generation, which delivers it to its clients and publishes it on."""
        if self._switchboard.sequencer is not None and \
                self.config.broadcast.envelope == "json":
            self.metrics.broadcasts.labels("admin").inc()
            self._switchboard.sequence(None, "main", "admin", payload, 0)
            return self.total_connections
        if self._switchboard.inject(self._generations.current.workers, payload):
            return self.total_connections
        return 0

    def request_drain(self, source: str) -> None:
        self._loop.put(DrainRequested(source))

    def request_upgrade(self, source: str) -> str | None:
        """Queue an upgrade; or the reason it is refused now (answered 409)."""
        refusal = self._generations.refusal(self.lifecycle.state)
        if refusal is None:
            self._generations.upgrade.queue()
            self._loop.put(UpgradeRequested(source))
        return refusal

    def record_signal(self, signum: int) -> None:
        """The signal handler: it records only; the loop acts."""
        self._loop.record_signal(signum)

    # -- what its generations ask (ebbcast.process.generations.Arbiter) -----------

    def start_worker(self, worker: Worker, hold: bool = False) -> None:
        """Start ``worker``; a failure (out of descriptors, say) counts as a death,
        so it is retried within the worker's restart budget."""
        worker.restart = None
        if self.lifecycle.state not in (State.STARTING, State.SERVING):
            return
        args = ["--effective-config", self._generations.effective.path(worker.generation),
                *self._worker_args]
        try:
            worker.start(args, lambda record: self._switchboard.on_record(worker, record),
                         lambda: self._reap(worker), time.monotonic(), hold=True)
        except OSError as exc:
            self._loop.put(WorkerExited(
                worker, f"{worker.name} could not be started ({exc})", True))
            return
        log.debug("%s started (pid %d)", worker.name, worker.pid)
        self._switchboard.introduce(worker, hold)

    def notify(self, *lines: str) -> None:
        self._notifier.notify(*lines)

    def kill_by(self, when: float) -> None:
        self._stopping.kill_by(when + KILL_MARGIN)

    def upgraded(self, config: Config, generation: int) -> None:
        self.config = config
        set_level(config.logging.level)
        self.metrics.upgrades.labels("ok").inc()
        self.metrics.generation.set(generation)
        self._switchboard.configured(config)
        self._switchboard.counts_changed()

    # -- the loop (ebbcast.core.loop.LoopOwner) -----------------------------------

    async def run(self) -> StopReason:
        return await self._loop.run(self)

    def start(self) -> None:
        config = self.config
        count = worker_count(config.server.workers)
        self._generations.sets = bind_public(config.server.host, config.server.port, count)
        admin = bind_listener("admin listener", config.admin.host, config.admin.port,
                              self._spare)
        self._admin = admin_server(self)
        self._admin.add_sockets(admin)
        scheme = "https" if config.tls_enabled else "http"
        self.urls = {"ws": ",".join(listener_url(scheme, s, config.server.ws_path)
                                    for s in self._generations.sets[0]),
                     "admin": ",".join(listener_url("http", s) for s in admin)}
        self._generations.effective.write(1, config)
        log.info("ebbcast %s (pid %d) started%s", __version__, os.getpid(),
                 f": {count} workers" if count > 1 else "")
        serve_here = self._serve_here
        workers = first_workers(self._generations.sets, None if serve_here is None else (
            lambda relay, public: serve_here(relay, public, self.config, self.metrics)))
        self._generations.current = Generation(1, workers)
        for worker in workers:
            self.start_worker(worker)
        self._housekeeping_timer = PeriodicCallback(self._housekeeping,
                                                    HOUSEKEEPING_INTERVAL * 1000)
        self._housekeeping_timer.start()
        self.channels.plane.start()
        self._notifier.start_watchdog()

    def wake_at(self) -> float:
        return min(self._progress.next_at, self._stopping.kill_at,
                   self._generations.upgrade.ready_by)

    def finished(self) -> bool:
        """Stopping or draining, with every worker gone and every event handled."""
        return self.lifecycle.state not in (State.STARTING, State.SERVING) and \
            not any(w.alive for w in self._workers()) and self._loop.events.empty()

    def act(self, event: MainEvent | Common, now: float) -> None:
        match event:
            case SignalReceived() | DrainRequested() | Tick():
                self._common(event, now)
            case UpgradeRequested(source):
                self._generations.upgrade.dequeue()
                self._generations.begin(source, self.lifecycle.state, now)
            case WorkerReady(worker):
                self._on_ready(worker, now)
            case WorkerExited(worker, what, failed):
                self._on_exited(worker, what, failed, now)
        upgrade = self._generations.upgrade
        if upgrade.overdue(now):
            self._generations.fail("the new generation was not serving within "
                                   f"{upgrade.timeout:g}s", now)
        if self.lifecycle.state is State.DRAINING:
            self._drain_step(now)
        if self._stopping.due(now):  # while serving, only what a failed upgrade left
            serving = self.lifecycle.state in (State.STARTING, State.SERVING)
            self._stopping.kill(list(self._generations.leaving) if serving
                                else self._workers())

    def _common(self, event: Common, now: float) -> None:
        step = common_step(event, self.lifecycle.state)
        if step is Step.RELOAD:
            self.reload()
        elif step is Step.UPGRADE:
            self._generations.begin("SIGUSR2", self.lifecycle.state, now)
        elif step in (Step.STOP_NOW, Step.DRAIN):
            assert isinstance(event, (SignalReceived, DrainRequested))
            if step is Step.DRAIN:
                self._begin_drain(who_asked(event), now)
            else:
                log.info("%s during start-up: stopping", who_asked(event))
                self.lifecycle.stop(StopReason.NORMAL)
                self._stop_workers(FORCED_CLOSE_GRACE)
        elif step is Step.STOP_SIGNAL_AGAIN and isinstance(event, SignalReceived):
            log.info("%s during the drain: the workers close their clients now", event.name)
            self.lifecycle.record(StopReason.FORCED)
            self._stop_workers(FORCED_CLOSE_GRACE)

    async def wind_down(self) -> None:
        if self.lifecycle.state is State.DRAINING:
            log.info("drain complete: every worker has finished")
            self.lifecycle.finish_drain(time.monotonic())

    async def teardown(self) -> None:
        self.lifecycle.stop(StopReason.NORMAL)
        loop = asyncio.get_running_loop()
        if self._housekeeping_timer is not None:
            self._housekeeping_timer.stop()
        if self._admin is not None:
            self._admin.stop()
        for worker in self._workers():
            let_go(worker, loop)
        self._generations.close_sets()
        log.info("stopped (%s)", self.lifecycle.stop_reason.value
                 if self.lifecycle.stop_reason else "normal")
        self._notifier.notify("STATUS=stopped")
        self._notifier.close()
        self._spare.close()
        await self.channels.plane.stop()

    # -- the workers -------------------------------------------------------------

    def _on_ready(self, worker: Worker, now: float) -> None:
        if self._generations.ready(worker, now, self.urls["ws"].split(",")[0]):
            return
        if worker.starts > 1:
            log.info("%s (pid %d) restarted and serving", worker.name, worker.pid)
        current = self._generations.current
        if self.lifecycle.state is State.STARTING and current.ready:
            self.lifecycle.serve()
            log.info("serving ws=%s admin=%s", self.urls["ws"], self.urls["admin"])
            say_if_unadvertised(self.config, self.urls["ws"].split(",")[0])
            count = len(current.workers)
            self._notifier.ready(f"serving on {self.urls['ws'].split(',')[0]}" +
                                 (f" with {count} workers" if count > 1 else ""))

    def _on_exited(self, worker: Worker, what: str, failed: bool, now: float) -> None:
        """A worker is gone: restart it while serving (within its budget, after a
        growing delay), never while draining; a new generation's failing is a
        failed upgrade; an old generation's is the end of its hand-over."""
        if self._generations.exited(worker, what, failed, now):
            return
        state = self.lifecycle.state
        if state not in (State.STARTING, State.SERVING):
            log.log(logging.WARNING if failed else logging.INFO, "%s", what)
            return
        delay = worker.budget.allow(now)
        if delay is not None:
            log.error("%s while %s; restarting it%s", what, state.value,
                      f" in {delay:g}s" if delay else "")
            worker.restart = asyncio.get_running_loop().call_later(
                delay, self.start_worker, worker)
            return
        log.error("%s; %d restarts in %ds: giving up, stopping the other workers", what,
                  worker.budget.limit, int(worker.budget.window))
        self.lifecycle.record(StopReason.FAILED)
        if state is State.SERVING:
            self._begin_drain("repeated worker failures", now)
        else:
            self.lifecycle.stop(StopReason.FAILED)
            self._stop_workers(FORCED_CLOSE_GRACE)

    def _housekeeping(self) -> None:
        """Kill a stuck worker; tell each worker how many connections the others
        have (for the ``connections`` of welcome and periodic frames)."""
        kill_silent(self._workers(), time.monotonic(), self.config.server.worker_timeout)
        self._switchboard.tell_counts()

    def _reap(self, worker: Worker) -> None:
        """The worker has exited (its pidfd became readable, or its task ended). Its
        last count is counted lost unless it exited 0 (it counted its own closes)."""
        pid, lost, returncode = worker.pid, worker.connections, worker.reap()
        if returncode is None:
            return
        if pid != os.getpid():
            self._merged.mark_process_dead(pid)
        if lost and returncode != 0:
            self.metrics.disconnections.labels("error").inc(lost)
        self._switchboard.worker_gone(worker)
        what = f"{worker.name} (pid {pid}) {describe_exit(returncode)}"
        self._loop.put(WorkerExited(worker, what, returncode != 0))

    def _stop_workers(self, last_resort: float) -> None:
        """Forward SIGTERM to every worker; SIGKILL those left ``last_resort``
        (plus a margin) seconds from now."""
        self._stopping.stop(self._workers(), time.monotonic() + last_resort + KILL_MARGIN)

    # -- the drain ---------------------------------------------------------------

    def _begin_drain(self, source: str, now: float) -> None:
        plan = self.lifecycle.begin_drain(now, time.time(), self.config.shutdown.drain_timeout)
        if plan is None:
            return
        # said before it is done, so the log's order is the order of events
        log.info("drain started by %s: %d connections on %d workers, %s", source,
                 self.total_connections, sum(w.alive for w in self._workers()),
                 plan.deadline_text())
        self.metrics.drain_started_at(plan.started_unix, plan.deadline_unix)
        if self._generations.upgrade.starting:
            self._generations.fail(f"the drain started by {source}", now)
        self._generations.close_sets()  # with the workers' copies closed too, new connections
        self._stop_workers(plan.timeout + DEADLINE_CLOSE_GRACE)  # are refused by the kernel
        interval = self.config.shutdown.progress_interval
        status = plan.status(self.total_connections, now)
        self._notifier.stopping(status)
        self._notifier.progress(status, extend_seconds(interval, KILL_MARGIN))
        self._progress.schedule(plan, now, interval)

    def _drain_step(self, now: float) -> None:
        if not self._progress.due(now):
            return
        plan = self.lifecycle.drain
        assert plan is not None
        interval = self.config.shutdown.progress_interval
        status = plan.status(self.total_connections, now)
        if not plan.expired(now):
            log.info("%s", status)
        self._notifier.progress(status, extend_seconds(interval, KILL_MARGIN))
        if plan.expired(now):
            self._progress.stop()
        else:
            self._progress.schedule(plan, now, interval)

    # -- reload ------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: apply the reloadable keys here and forward the signal."""
        reloaded = reload_config(self.config, self._reload_config,
                                 note="; forwarded to the workers")
        if reloaded is None:
            return
        self.config, changed = reloaded
        set_level(self.config.logging.level)
        self._generations.effective.write(self._generations.current.number, self.config)
        self._progress.reloaded(self.lifecycle, changed, time.monotonic(),
                                self.config.shutdown.progress_interval)
        for worker in self._workers():
            worker.signal(signal.SIGHUP)
