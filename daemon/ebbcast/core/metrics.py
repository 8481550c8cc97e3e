"""Prometheus metrics (docs/metrics.md), on an explicit registry.

Under ``ebbcast serve`` prometheus_client runs in its multiprocess mode, whatever
the number of workers (an upgrade adds processes to any daemon): every process
writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` (set, to a fresh
directory, before prometheus_client is imported; see ``ebbcast.cli``) and the
main process's ``/metrics`` merges them with ``MultiProcessCollector``.
Counters and the histogram add up over every process that ever ran; each gauge
declares how its per-process values combine (``multiprocess_mode``): the live
sum for connections, the live maximum for the drain gauges (the drain is the
same for all), the live minimum for ``ebbcast_backplane_up`` (1 only when every
process's backplane is connected). ``ebbcast_build_info`` is made by the main
process from the versions its serving processes report, and ``process_*`` are
the main process's own. A Daemon on its own (the in-process tests) uses a plain
registry, where the modes are ignored.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ebbcast import __version__

REJECT_REASONS = ("draining", "max_connections", "origin", "client_id", "auth")
DISCONNECT_REASONS = ("client", "ping_timeout", "slow_consumer", "too_big", "policy",
                      "drain_deadline", "forced", "error", "token_expired")
BROADCAST_SOURCES = ("client", "periodic", "admin")
UPGRADE_RESULTS = ("ok", "failed")
RESUME_RESULTS = ("recovered", "not_recovered")
SUBSCRIBE_REFUSALS = ("forbidden", "bad_channel", "too_many_channels")
BUILD_INFO = ("ebbcast_build_info", "Build information; always 1.")


def multiprocess_mode() -> bool:
    """Whether prometheus_client writes this process's values to files for a main
    process to merge (see ``ebbcast.cli``)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

#: Fan-out to one process's clients takes microseconds to tens of milliseconds.
_DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                     0.1, 0.25, 0.5, 1.0)


class Metrics:
    """Every ebbcast metric, registered on ``registry`` (a fresh one by default).

    Labelled series are created up front for every known label value, so a scrape
    shows each of them at 0 before the first event.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connections = Gauge("ebbcast_connections", "Open WebSocket connections.",
                                 registry=r, multiprocess_mode="livesum")
        self.accepted = Counter("ebbcast_connections_accepted_total",
                                "WebSocket handshakes completed.", registry=r)
        self.rejected = Counter("ebbcast_connections_rejected_total",
                                "WebSocket handshakes refused, by reason.", ["reason"],
                                registry=r)
        self.disconnections = Counter("ebbcast_disconnections_total",
                                      "WebSocket connections ended, by reason.", ["reason"],
                                      registry=r)
        self.received = Counter("ebbcast_messages_received_total",
                                "Frames received from clients.", registry=r)
        self.sent = Counter("ebbcast_messages_sent_total", "Frames written to clients.",
                            registry=r)
        self.broadcasts = Counter("ebbcast_broadcasts_total", "Broadcasts, by source.",
                                  ["source"], registry=r)
        self.broadcast_duration = Histogram(
            "ebbcast_broadcast_duration_seconds",
            "Time to hand one broadcast to every local connection.",
            buckets=_DURATION_BUCKETS, registry=r)
        self.draining = Gauge("ebbcast_draining", "1 while draining, else 0.", registry=r,
                              multiprocess_mode="livemax")
        self.drain_started = Gauge("ebbcast_drain_started_timestamp_seconds",
                                   "Unix time the drain began; 0 before.", registry=r,
                                   multiprocess_mode="livemax")
        self.drain_deadline = Gauge("ebbcast_drain_deadline_timestamp_seconds",
                                    "Unix time of the drain deadline; 0 before.", registry=r,
                                    multiprocess_mode="livemax")
        self.backplane_up = Gauge("ebbcast_backplane_up",
                                  "1 when the backplane is connected.", registry=r,
                                  multiprocess_mode="livemin")
        self.backplane_dropped = Counter(
            "ebbcast_backplane_dropped_total",
            "Frames not published to other instances (backplane down or backlogged); "
            "they were delivered locally.", registry=r)
        self.backplane_missed = Counter(
            "ebbcast_backplane_missed_total",
            "Frames other instances published that this one never received (gaps in "
            "their sequence numbers, e.g. while its subscription was down).", registry=r)
        self.backplane_buffered = Gauge(
            "ebbcast_backplane_buffered_bytes",
            "Bytes of frames waiting to be published to other instances (kept while "
            "Redis is away, up to backplane.outage_buffer per process).", registry=r,
            multiprocess_mode="livesum")
        self.backplane_failovers = Counter(
            "ebbcast_backplane_failovers_total",
            "Times the Redis backplane found a new master (Sentinel failover).",
            registry=r)
        self.generation = Gauge("ebbcast_generation", "Generation serving new clients: 1 at "
                                "start, +1 per successful upgrade.", registry=r,
                                multiprocess_mode="livemax")
        self.upgrades = Counter("ebbcast_upgrades_total", "Upgrades (SIGUSR2, POST /upgrade), "
                                "by result.", ["result"], registry=r)
        self.resumes = Counter("ebbcast_resumes_total", "Resumes (/ws?since=N&epoch=E), by "
                               "result.", ["result"], registry=r)
        self.resumed_messages = Counter("ebbcast_resumed_messages_total",
                                        "Broadcasts replayed to resuming clients.", registry=r)
        self.channels = Gauge("ebbcast_channels", "Distinct channels with a subscriber on "
                              "this instance.", registry=r, multiprocess_mode="livemax")
        self.subscriptions = Gauge("ebbcast_subscriptions", "Channel subscriptions of this "
                                   "instance's connections.", registry=r,
                                   multiprocess_mode="livesum")
        self.channel_messages = Counter("ebbcast_channel_messages_total",
                                        "Messages published to channels (counted where "
                                        "published).", registry=r)
        self.direct_messages = Counter("ebbcast_direct_messages_total",
                                       "Direct frames written to connections "
                                       "(POST /clients/{id}/send).", registry=r)
        self.subscribe_refused = Counter("ebbcast_subscribe_refused_total",
                                         "Subscriptions refused, by reason.", ["reason"],
                                         registry=r)
        ProcessCollector(registry=r)  # process_* (CPU, RSS, open fds) of this process
        if not multiprocess_mode():  # else the main process reports every live version
            build_info = Gauge(*BUILD_INFO, ["version"], registry=r)
            build_info.labels(__version__).set(1)
            self.generation.set(1)
        for result in UPGRADE_RESULTS:
            self.upgrades.labels(result)
        for result in RESUME_RESULTS:
            self.resumes.labels(result)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for reason in DISCONNECT_REASONS:
            self.disconnections.labels(reason)
        for source in BROADCAST_SOURCES:
            self.broadcasts.labels(source)
        for reason in SUBSCRIBE_REFUSALS:
            self.subscribe_refused.labels(reason)

    def drain_started_at(self, started_unix: float, deadline_unix: float) -> None:
        self.draining.set(1)
        self.drain_started.set(started_unix)
        self.drain_deadline.set(deadline_unix)

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class MergedMetrics:
    """The main process's view in multiprocess mode: every process's metrics,
    merged from the files in ``path`` (prometheus_client's documented recipe)."""

    def __init__(self, path: str, versions: Callable[[], Iterable[str]],
                 processes: Callable[[], Iterable[tuple[int, str, int]]] = tuple,
                 ready: Callable[[], bool] = lambda: True) -> None:
        from prometheus_client import multiprocess

        self._multiprocess = multiprocess
        self._path = path
        self.registry = CollectorRegistry()
        collector = multiprocess.MultiProcessCollector
        collector(self.registry, path=path)  # type: ignore[no-untyped-call]
        self.registry.register(BuildInfo(versions))
        self.registry.register(ServingProcesses(processes))
        self.registry.register(Readiness(ready))
        ProcessCollector(registry=self.registry)  # the main process's own process_*

    def mark_process_dead(self, pid: int) -> None:
        """Drop a finished process's live gauges (its counters still count)."""
        self._multiprocess.mark_process_dead(pid, self._path)  # type: ignore[no-untyped-call]

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Readiness:
    """``ebbcast_ready``: 1 when ``/readyz`` answers 200 (serving), else 0 (starting,
    draining or stopping), read when scraped."""

    def __init__(self, ready: Callable[[], bool]) -> None:
        self._ready = ready

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("ebbcast_ready", "1 while the daemon takes new clients "
                                   "(/readyz answers 200), else 0.")
        family.add_metric([], 1 if self._ready() else 0)
        yield family


class BuildInfo:
    """``ebbcast_build_info{version}`` for each version that serves clients now:
    two while a new generation takes over from an old one of another version."""

    def __init__(self, versions: Callable[[], Iterable[str]]) -> None:
        self._versions = versions

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(*BUILD_INFO, labels=["version"])
        for version in sorted(set(self._versions())):
            family.add_metric([version], 1)
        yield family


#: Clock ticks per second, for /proc/PID/stat's CPU times.
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class ServingProcesses:
    """Resident memory, CPU time and open descriptors of each serving process, read
    from /proc when scraped: the multiprocess mode cannot merge ``process_*``, and
    an operator must still see a worker that grows. ``processes()`` gives
    ``(generation, worker, pid)`` for each live one; one that has just exited is
    left out."""

    LABELS = ["generation", "worker", "pid"]

    def __init__(self, processes: Callable[[], Iterable[tuple[int, str, int]]]) -> None:
        self._processes = processes

    def collect(self) -> Iterator[Metric]:
        memory = GaugeMetricFamily("ebbcast_worker_resident_memory_bytes",
                                   "Resident memory of each serving process.",
                                   labels=self.LABELS)
        cpu = CounterMetricFamily("ebbcast_worker_cpu_seconds",
                                  "User and system CPU time of each serving process.",
                                  labels=self.LABELS)
        fds = GaugeMetricFamily("ebbcast_worker_open_fds",
                                "Open file descriptors of each serving process.",
                                labels=self.LABELS)
        for generation, worker, pid in self._processes():
            try:
                stat = _read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
                rss_pages = int(_read(f"/proc/{pid}/statm").split()[1])
                open_fds = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, IndexError, ValueError):
                continue  # it has just exited
            labels = [str(generation), worker, str(pid)]
            memory.add_metric(labels, rss_pages * _PAGE)
            cpu.add_metric(labels, (int(stat[11]) + int(stat[12])) / _TICKS)
            fds.add_metric(labels, open_fds)
        yield from (memory, cpu, fds)


def _read(path: str) -> str:
    with open(path) as file:
        return file.read()
