"""The main process (workers, systemd, upgrades): every ``ebbcast serve`` runs one.

It binds the public and admin listeners, starts the serving processes and
supervises them, as gunicorn's arbiter does: signal handlers only record the
signal; the loop (``ebbcast.core.events``) forwards it, reaps children, restarts a
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
import math
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union

from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback

from ebbcast import __version__
from ebbcast.backplane import records
from ebbcast.backplane.base import Envelope
from ebbcast.backplane.records import Record, pack
from ebbcast.backplane.sequencer import Sequencer
from ebbcast.config import Config, ConfigError, changed_keys, reload_config, render_toml
from ebbcast.core.events import Common, DrainRequested, EventQueue, SignalReceived, who_asked
from ebbcast.core.lifecycle import (
    DEADLINE_CLOSE_GRACE,
    FORCED_CLOSE_GRACE,
    UPGRADE_SIGNAL,
    Lifecycle,
    State,
    StopReason,
    handle_signals,
    unhandle_signals,
)
from ebbcast.core.logs import set_level
from ebbcast.core.metrics import MergedMetrics, Metrics
from ebbcast.core.sockets import Spare, listener_url, tls_context
from ebbcast.process.admin import admin_server, build_status
from ebbcast.process.generations import (
    Generation,
    UpgradeRequested,
    UpgradeStatus,
    assign_sets,
)
from ebbcast.process.listener import BindError, bind_idle_like, bind_listener, bind_public
from ebbcast.process.notify import SystemdNotifier
from ebbcast.process.workers import (
    ChildWorker,
    LocalRun,
    LocalWorker,
    Worker,
    WorkerExited,
    WorkerReady,
    describe_exit,
    worker_count,
)

log = logging.getLogger(__name__)

#: How long past a worker's own last resort the main process waits before SIGKILL.
KILL_MARGIN = 2.0
#: Cadence of the "connections on the other workers" updates and health checks.
HOUSEKEEPING_INTERVAL = 0.25
#: Keys an upgrade cannot apply: the listening sockets are handed over as they are.
HANDED_OVER_KEYS = ("server.host", "server.port", "admin.host", "admin.port")

#: Builds the serving process that runs inside this one: (relay, public, config,
#: metrics) -> an ``ebbcast.serving.process.Daemon`` (given by ``ebbcast.cli``).
ServeHere = Callable[[socket.socket, list[socket.socket], Config, Metrics], LocalRun]


#: What the main process's loop acts on, beside the common events.
MainEvent = Union[UpgradeRequested, WorkerReady, WorkerExited]


class DirectSequencing:
    """How the serving process inside the main process has its broadcasts
    sequenced (``ebbcast.backplane.base.Sequencing``): by a call, no relay link."""

    def __init__(self, supervisor: Supervisor, worker: Worker) -> None:
        self._supervisor = supervisor
        self._worker = worker

    def submit(self, frame: str, source: str, token: int) -> bool:
        self._supervisor.sequence(self._worker, "local", source, frame, token)
        return True


class Supervisor:
    """The main process; ``run()`` returns the StopReason. It is also the admin
    listener's backend (``AdminBackend``).

    ``worker_args`` are the arguments that make a worker load its configuration
    the way this process does on SIGHUP; ``rundir`` is a fresh private directory
    for this start (each generation's effective configuration).
    """

    def __init__(self, config: Config, reload: Callable[[], Config], rundir: str,
                 worker_args: Sequence[str], metrics_dir: str,
                 notifier: SystemdNotifier | None = None,
                 serve_here: ServeHere | None = None) -> None:
        tls_context(config)  # refuse an unreadable certificate here, not in every worker
        self.config = config
        self._reload_config = reload
        self._rundir = rundir
        self._worker_args = list(worker_args)
        self._notifier = notifier or SystemdNotifier()
        self._serve_here = serve_here
        self._events: EventQueue[MainEvent] = EventQueue()
        self.lifecycle = Lifecycle()
        self.metrics = Metrics()
        self.metrics.backplane_up.set(1)
        self.metrics.generation.set(1)
        self._merged = MergedMetrics(metrics_dir, self._versions, self._serving_processes,
                                     lambda: self.lifecycle.state is State.SERVING)
        self._sets: list[list[socket.socket]] = []
        self._current = Generation(1, [])
        self._previous: list[Generation] = []
        self._next: Generation | None = None
        self._leaving: list[Worker] = []  # of a failed upgrade, stopping
        self._next_config = config
        self._idle_sets: list[list[socket.socket]] = []  # bound for the new generation
        self._upgrade = UpgradeStatus()
        self._spare = Spare()  # a descriptor in reserve, see ebbcast.core.sockets
        self._admin: HTTPServer | None = None
        self._timers: list[PeriodicCallback] = []
        self._started_mono = time.monotonic()
        self._next_tick = math.inf
        self._kill_at = math.inf
        self._others_dirty = False
        self.urls: dict[str, str] = {}
        self._sequencer: Sequencer | None = None
        if config.backplane.url == "memory://":  # with Redis, Redis gives the offsets
            self._sequencer = Sequencer(config.history.size, config.history.ttl)

    def _workers(self) -> Iterator[Worker]:
        """Every worker of every generation, the current one first."""
        yield from self._current.workers
        for generation in self._previous:
            yield from generation.workers
        if self._next is not None:
            yield from self._next.workers
        yield from self._leaving

    def _serving_processes(self) -> list[tuple[int, str, int]]:
        return [(w.generation, str(w.index), w.pid) for w in self._workers() if w.alive]

    def _versions(self) -> list[str]:
        return [w.version for w in self._workers() if w.alive and w.ready and w.version]

    # -- AdminBackend ------------------------------------------------------------

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def total_connections(self) -> int:
        return sum(w.connections for w in self._workers() if w.alive)

    def status_report(self, now_mono: float) -> dict[str, Any]:
        workers = [(w.pid, w.connections) for w in self._current.workers if w.alive]
        report = build_status(self.lifecycle, self._started_mono, now_mono, workers,
                              self.total_connections)
        report["generation"] = self._current.number
        report["upgrade"] = self._upgrade.report()
        report["previous"] = [
            {"generation": g.number, "connections": g.connections,
             "deadline": round(g.deadline_unix or 0.0, 3)} for g in self._previous]
        return report

    def exposition(self) -> bytes:
        return self._merged.exposition()

    def broadcast(self, payload: str) -> int:
        """An admin broadcast: sequenced here and sent to every worker (``memory://``
        and the JSON envelope); else handed to one serving worker of the current
        generation, which delivers it to its clients and publishes it on."""
        if self._sequencer is not None and self.config.broadcast.envelope == "json":
            self.metrics.broadcasts.labels("admin").inc()
            self.sequence(None, "main", "admin", payload, 0)
            return self.total_connections
        for worker in self._current.workers:
            if worker.ready and worker.link is not None and \
                    worker.link.send(records.Inject(Envelope("main", "admin", 0, payload))):
                return self.total_connections
        return 0

    def request_drain(self, source: str) -> None:
        self._events.put(DrainRequested(source))

    def request_upgrade(self, source: str) -> str | None:
        """Queue an upgrade; or the reason it is refused now (answered 409)."""
        refusal = self._upgrade_refusal()
        if refusal is None:
            self._upgrade.queue()
            self._events.put(UpgradeRequested(source))
        return refusal

    def record_signal(self, signum: int) -> None:
        """The signal handler: it records only; the loop acts."""
        self._events.record_signal(signum)

    # -- start-up ----------------------------------------------------------------

    async def run(self) -> StopReason:
        loop = asyncio.get_running_loop()
        handle_signals(loop, self.record_signal)
        try:
            self._start()
            await self._events.run(self._act, self._wake_at, self._finished)
            if self.lifecycle.state is State.DRAINING:
                log.info("drain complete: every worker has finished")
                self.lifecycle.finish_drain(time.monotonic())
        finally:
            self._teardown(loop)
        assert self.lifecycle.stop_reason is not None
        return self.lifecycle.stop_reason

    def _start(self) -> None:
        config = self.config
        count = worker_count(config.server.workers)
        self._sets = bind_public(config.server.host, config.server.port, count)
        admin = bind_listener("admin listener", config.admin.host, config.admin.port,
                              self._spare)
        self._admin = admin_server(self)
        self._admin.add_sockets(admin)
        scheme = "https" if config.tls_enabled else "http"
        self.urls = {
            "ws": ",".join(listener_url(scheme, s, config.server.ws_path)
                           for s in self._sets[0]),
            "admin": ",".join(listener_url("http", s) for s in admin)}
        self._write_effective_config(1, config)
        log.info("ebbcast %s (pid %d) started%s", __version__, os.getpid(),
                 f": {count} workers" if count > 1 else "")
        if count == 1 and self._serve_here is not None:
            serve_here = self._serve_here
            workers: list[Worker] = [LocalWorker(
                0, self._sets[0],
                lambda relay, public: serve_here(relay, public, self.config, self.metrics))]
        else:
            workers = [ChildWorker(i, public) for i, public in enumerate(self._sets)]
        self._current = Generation(1, workers)
        for worker in workers:
            self._start_worker(worker)
        self._timers = [PeriodicCallback(self._housekeeping, HOUSEKEEPING_INTERVAL * 1000)]
        if self._notifier.watchdog_interval:
            self._timers.append(PeriodicCallback(self._send_watchdog,
                                                 self._notifier.watchdog_interval * 1000))
        for timer in self._timers:
            timer.start()

    def _send_watchdog(self) -> None:
        self._notifier.watchdog()

    def _effective_config(self, generation: int) -> str:
        return os.path.join(self._rundir, f"effective-{generation}.toml")

    def _write_effective_config(self, generation: int, config: Config) -> None:
        """The configuration a generation's workers start with, replaced atomically
        (a worker starting during a reload reads the old file or the new, never
        half)."""
        path = self._effective_config(generation)
        partial = path + ".new"
        with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write(render_toml(config, mask_secrets=False))
        os.replace(partial, path)

    def _start_worker(self, worker: Worker, hold: bool = False) -> None:
        """Start ``worker``; a failure (out of descriptors, say) counts as a death,
        so it is retried within the worker's restart budget."""
        worker.restart = None
        if self.lifecycle.state not in (State.STARTING, State.SERVING):
            return
        args = ["--effective-config", self._effective_config(worker.generation),
                *self._worker_args]
        try:
            worker.start(args, lambda record: self._on_record(worker, record),
                         lambda: self._reap(worker), time.monotonic(), hold=True)
        except OSError as exc:
            self._events.put(WorkerExited(
                worker, f"{worker.name} could not be started ({exc})", True))
            return
        log.debug("%s started (pid %d)", worker.name, worker.pid)
        self._introduce(worker, hold)

    def _introduce(self, worker: Worker, hold: bool) -> None:
        """A worker's first records: the sequencer and its history, then ACCEPT,
        unless it is held for an upgrade (it is always started held, so it knows
        before its first client whether broadcasts are sequenced). The serving
        process inside this one is told by calls, and sequences by calls too."""
        link = worker.link
        assert link is not None
        if self._sequencer is not None:
            history, now = self._sequencer.history, time.monotonic()
            history.trim(now)
            kept = history.after(0, now)
            base = kept[0].offset - 1 if kept else history.latest
            local = worker.local_run()
            if local is not None:
                local.feed.sequenced_by(history.epoch, base, DirectSequencing(self, worker))
                for entry in kept:
                    local.feed.recorded(entry)
            else:
                link.send(records.Sequencer(history.epoch, base))
                for entry in kept:
                    link.send(records.History(entry))
        if not hold:
            link.send(records.Accept())

    # -- what workers report -----------------------------------------------------

    def _on_record(self, worker: Worker, record: Record) -> None:
        worker.last_heard = time.monotonic()
        match record:
            case records.Sequence(envelope):
                if self._sequencer is not None and isinstance(envelope.payload, str):
                    self.sequence(worker, envelope.node, envelope.source, envelope.payload,
                                  envelope.seq)
            case records.Frame():  # to every other worker, ready or still starting
                packed = pack(record)
                for other in self._workers():
                    if other is not worker and other.link is not None:
                        if not other.link.send_packed(packed):
                            self.metrics.backplane_dropped.inc()
            case records.Capabilities(names):
                worker.sequenced = records.OFFSETS in names
            case records.Count(connections):
                worker.connections = connections
                self._others_dirty = True
            case records.Ready(version):
                worker.ready = True
                worker.version = version
                self._others_dirty = True
                self._events.put(WorkerReady(worker))

    def sequence(self, origin: Worker | None, node: str, source: str, frame: str,
                 token: int) -> None:
        """Give ``frame`` the next offset and hand it to every worker in that order
        (``origin`` sent it, with ``token``)."""
        assert self._sequencer is not None
        offset, sequenced = self._sequencer.sequence(frame, time.monotonic())
        record = b""
        for worker in self._workers():
            local = worker.local_run()
            if local is not None:
                local.feed.deliver_sequenced(self._sequencer.epoch, offset, sequenced, source,
                                             token, worker is origin)
                continue
            if worker.link is None:
                continue
            record = record or pack(records.Ordered(offset, Envelope(node, source, token,
                                                                     sequenced)))
            if not worker.link.send_packed(record):
                self.metrics.backplane_dropped.inc()

    def _housekeeping(self) -> None:
        """Tell each worker how many connections the others have (for the
        ``connections`` of welcome and periodic frames); kill a stuck worker."""
        now = time.monotonic()
        for worker in self._workers():
            if worker.alive and worker.silent_for(now) > self.config.server.worker_timeout:
                log.error("%s (pid %d) sent nothing for %ds: killing it", worker.name,
                          worker.pid, int(worker.silent_for(now)))
                worker.signal(signal.SIGKILL)
                worker.last_heard = now  # once; its exit is reported
        if not self._others_dirty:
            return
        self._others_dirty = False
        total = self.total_connections
        for worker in self._workers():
            if worker.ready and worker.link is not None:
                worker.link.send(records.Others(total - worker.connections))

    def _reap(self, worker: Worker) -> None:
        """The worker has exited (its pidfd became readable, or its task ended)."""
        pid, lost = worker.pid, worker.connections
        returncode = worker.reap()
        if returncode is None:
            return
        if pid != os.getpid():
            self._merged.mark_process_dead(pid)
        if lost:  # its clients' connections ended with it, uncounted by the worker
            self.metrics.disconnections.labels("error").inc(lost)
        self._others_dirty = True
        what = f"{worker.name} (pid {pid}) {describe_exit(returncode)}"
        self._events.put(WorkerExited(worker, what, returncode != 0))

    # -- the loop ----------------------------------------------------------------

    def _wake_at(self) -> float:
        return min(self._next_tick, self._kill_at, self._upgrade.ready_by)

    def _finished(self) -> bool:
        """Stopping or draining, with every worker gone and every event handled."""
        return self.lifecycle.state not in (State.STARTING, State.SERVING) and \
            not any(w.alive for w in self._workers()) and self._events.empty()

    def _act(self, event: MainEvent | Common, now: float) -> None:
        state = self.lifecycle.state
        match event:
            case SignalReceived(signal.SIGHUP):
                self.reload()
            case SignalReceived(signum) if signum == UPGRADE_SIGNAL:
                self._begin_upgrade("SIGUSR2", now)
            case UpgradeRequested(source):
                self._upgrade.dequeue()
                self._begin_upgrade(source, now)
            case SignalReceived() | DrainRequested() if state is State.STARTING:
                log.info("%s during start-up: stopping", who_asked(event))
                self.lifecycle.stop(StopReason.NORMAL)
                self._stop_workers(FORCED_CLOSE_GRACE)
            case SignalReceived(name=name) if state in (State.DRAINING, State.STOPPING):
                log.info("%s during the drain: the workers close their clients now", name)
                self.lifecycle.record(StopReason.FORCED)
                self._stop_workers(FORCED_CLOSE_GRACE)
            case SignalReceived() | DrainRequested() if state is State.SERVING:
                self._begin_drain(who_asked(event), now)
            case WorkerReady(worker):
                self._on_ready(worker, now)
            case WorkerExited(worker, what, failed):
                self._on_exited(worker, what, failed, now)
        if self._upgrade.overdue(now):
            self._fail_upgrade("the new generation was not serving within "
                               f"{self._upgrade.timeout:g}s", now)
        if self.lifecycle.state is State.DRAINING:
            self._drain_step(now)
        if now >= self._kill_at:
            self._kill_stragglers()

    def _on_ready(self, worker: Worker, now: float) -> None:
        if self._next is not None and worker in self._next.workers:
            if self._sequencer is not None and not worker.sequenced:
                self._fail_upgrade(f"its release ({worker.version}) does not take offsets "
                                   "from this main process: going back to a release "
                                   "without offsets takes a restart", now)
            elif self._next.ready:
                self._switch(now)
            return
        if worker.starts > 1:
            log.info("%s (pid %d) restarted and serving", worker.name, worker.pid)
        if self.lifecycle.state is State.STARTING and self._current.ready:
            self.lifecycle.serve()
            log.info("serving ws=%s admin=%s", self.urls["ws"], self.urls["admin"])
            count = len(self._current.workers)
            self._notifier.ready(f"serving on {self.urls['ws'].split(',')[0]}" +
                                 (f" with {count} workers" if count > 1 else ""))

    def _on_exited(self, worker: Worker, what: str, failed: bool, now: float) -> None:
        """A worker is gone: restart it while serving (within its budget, after a
        growing delay), never while draining; a new generation's failing is a
        failed upgrade; an old generation's is the end of its hand-over."""
        if self._next is not None and worker in self._next.workers:
            self._fail_upgrade(f"{what} before serving", now)
            return
        if worker in self._leaving:
            self._leaving.remove(worker)
            log.debug("%s", what)
            return
        if worker not in self._current.workers:  # an old generation's: never restarted
            log.log(logging.WARNING if failed else logging.INFO, "%s", what)
            for generation in [g for g in self._previous if not g.alive]:
                self._previous.remove(generation)
                log.info("generation %d has finished", generation.number)
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
                delay, self._start_worker, worker)
            return
        log.error("%s; %d restarts in %ds: giving up, stopping the other workers", what,
                  worker.budget.limit, int(worker.budget.window))
        self.lifecycle.record(StopReason.FAILED)
        if state is State.SERVING:
            self._begin_drain("repeated worker failures", now)
        else:
            self.lifecycle.stop(StopReason.FAILED)
            self._stop_workers(FORCED_CLOSE_GRACE)

    # -- upgrades (ebbcast.process.generations) ------------------------------------------

    def _upgrade_refusal(self) -> str | None:
        if self.lifecycle.state is not State.SERVING:
            return f"the daemon is {self.lifecycle.state.value}"
        if self._upgrade.under_way:
            return "an upgrade is already under way"
        return None

    def _begin_upgrade(self, source: str, now: float) -> None:
        refusal = self._upgrade_refusal()
        if refusal is not None:
            log.warning("upgrade requested by %s refused: %s", source, refusal)
            return
        number = self._current.number + 1
        log.info("upgrade requested by %s: starting generation %d", source, number)
        self._upgrade.begin(now, self.config.shutdown.upgrade_timeout)
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._notifier.notify("RELOADING=1", f"STATUS=upgrading to generation {number}",
                              f"MONOTONIC_USEC={monotonic_usec}")
        try:
            config = self._upgrade_config()
            count = worker_count(config.server.workers)
            while len(self._sets) < count:  # bound now, listening once the new one accepts
                self._idle_sets.append(bind_idle_like(self._sets[0]))
                self._sets.append(self._idle_sets[-1])
        except ConfigError as exc:
            for key, reason in exc.problems:
                log.error("upgrade: config error: %s: %s", key, reason)
            self._fail_upgrade("invalid configuration: " + "; ".join(
                f"{key}: {reason}" for key, reason in exc.problems), now)
            return
        except BindError as exc:
            self._fail_upgrade(str(exc), now)
            return
        self._next_config = config
        self._write_effective_config(number, config)
        self._next = Generation(number, [ChildWorker(i, public, number) for i, public in
                                         enumerate(assign_sets(self._sets, count))])
        for worker in self._next.workers:
            self._start_worker(worker, hold=True)

    def _upgrade_config(self) -> Config:
        """The configuration as it is on disk now; ConfigError if it is not valid."""
        config = self._reload_config()
        tls_context(config)
        for key in changed_keys(self.config, config):
            if key in HANDED_OVER_KEYS:
                log.warning("upgrade: %s changed; the listening sockets are handed over as "
                            "they are, so it needs a restart to apply", key)
        return config

    def _switch(self, now: float) -> None:
        """Every worker of the new generation is ready: it accepts, and the old one
        hands over, in one step."""
        new, old = self._next, self._current
        assert new is not None
        for worker in new.workers:
            if worker.link is not None:
                worker.link.send(records.Accept())
        for worker in old.workers:
            if worker.restart is not None:
                worker.restart.cancel()
                worker.restart = None
            if worker.link is not None:
                worker.link.send(records.HandOver())
        old.deadline_unix = time.time() + self.config.shutdown.drain_timeout
        if old.alive:
            self._previous.append(old)
        self._current, self._next = new, None
        self._idle_sets = []
        self.config = self._next_config
        set_level(self.config.logging.level)
        self._upgrade.end(None)
        self.metrics.upgrades.labels("ok").inc()
        self.metrics.generation.set(new.number)
        self._others_dirty = True
        log.info("generation %d serving (%s); generation %d hands over %d connections",
                 new.number, ", ".join(f"pid {w.pid}" for w in new.workers), old.number,
                 old.connections)
        self._notifier.notify("READY=1", f"STATUS=serving generation {new.number} on "
                              f"{self.urls['ws'].split(',')[0]}")

    def _fail_upgrade(self, error: str, now: float) -> None:
        """The new generation could not start: stop what started of it (it has no
        clients: it never accepted) and go on as before."""
        new, self._next = self._next, None
        if new is not None:
            for worker in new.workers:
                if worker.alive:
                    worker.signal(signal.SIGTERM)
                    self._leaving.append(worker)
            self._kill_at = min(self._kill_at, now + FORCED_CLOSE_GRACE + KILL_MARGIN)
        for idle in self._idle_sets:  # never listened on: closing them loses nothing
            self._sets.remove(idle)
            for sock in idle:
                sock.close()
        self._idle_sets = []
        self._upgrade.end(error)
        self.metrics.upgrades.labels("failed").inc()
        log.error("upgrade to generation %d failed: %s; generation %d goes on serving",
                  self._current.number + 1, error, self._current.number)
        self._notifier.notify("READY=1", f"STATUS=upgrade failed: {error}")

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
        if self._upgrade.starting:
            self._fail_upgrade(f"the drain started by {source}", now)
        for sockets in self._sets:  # with the workers' copies closed too, new
            for sock in sockets:  # connections are refused by the kernel
                sock.close()
        self._stop_workers(plan.timeout + DEADLINE_CLOSE_GRACE)
        status = self._drain_status(now)
        self._notifier.stopping(status)
        self._notifier.progress(status, self._extend_seconds())
        self._next_tick = plan.next_tick(now, self.config.shutdown.progress_interval)

    def _stop_workers(self, last_resort: float) -> None:
        """Forward SIGTERM to every worker; SIGKILL those left ``last_resort``
        (plus a margin) seconds from now. A restart not yet due is cancelled."""
        for worker in self._workers():
            worker.signal(signal.SIGTERM)
            if worker.restart is not None:
                worker.restart.cancel()
                worker.restart = None
        self._kill_at = time.monotonic() + last_resort + KILL_MARGIN

    def _kill_stragglers(self) -> None:
        """SIGKILL what should have stopped by now: while serving, only what a
        failed upgrade left; once stopping, every worker."""
        serving = self.lifecycle.state in (State.STARTING, State.SERVING)
        for worker in list(self._leaving) if serving else self._workers():
            if worker.alive:
                log.error("%s (pid %d) did not stop in time: SIGKILL", worker.name,
                          worker.pid)
                worker.signal(signal.SIGKILL)
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

    # -- reload ------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: apply the reloadable keys here and forward the signal."""
        reloaded = reload_config(self.config, self._reload_config,
                                 note="; forwarded to the workers")
        if reloaded is None:
            return
        self.config, changed = reloaded
        set_level(self.config.logging.level)
        self._write_effective_config(self._current.number, self.config)
        plan = self.lifecycle.drain
        if plan is not None and "shutdown.progress_interval" in changed:
            self._next_tick = plan.next_tick(time.monotonic(),
                                             self.config.shutdown.progress_interval)
        for worker in self._workers():
            worker.signal(signal.SIGHUP)

    # -- teardown ----------------------------------------------------------------

    def _teardown(self, loop: asyncio.AbstractEventLoop) -> None:
        self.lifecycle.stop(StopReason.NORMAL)
        unhandle_signals(loop)
        for timer in self._timers:
            timer.stop()
        if self._admin is not None:
            self._admin.stop()
        for worker in self._workers():
            if worker.restart is not None:
                worker.restart.cancel()
            if worker.alive:  # only when this process fails: let the worker drain alone
                log.warning("%s (pid %d) left to drain on its own", worker.name, worker.pid)
                worker.signal(signal.SIGTERM)
            if isinstance(worker, ChildWorker) and worker.pidfd is not None:
                loop.remove_reader(worker.pidfd)
                os.close(worker.pidfd)
            if worker.link is not None:
                worker.link.close()
        for sockets in self._sets:
            for sock in sockets:
                sock.close()
        log.info("stopped (%s)", self.lifecycle.stop_reason.value
                 if self.lifecycle.stop_reason else "normal")
        self._notifier.notify("STATUS=stopped")
        self._notifier.close()
        self._spare.close()
