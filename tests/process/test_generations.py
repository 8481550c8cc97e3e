"""Units of the upgrade bookkeeping, the lifecycle's drain causes and stop reasons,
and the event loop every process runs."""

from __future__ import annotations

import asyncio
import math
import socket
from dataclasses import dataclass

import pytest

from ebbcast.process.generations import Generation, UpgradeStatus, assign_sets
from ebbcast.core.lifecycle import DrainCause, Lifecycle, State, StopReason


def test_every_socket_set_keeps_a_worker_whatever_the_new_worker_count():
    sets = [[socket.socket()] for _ in range(3)]
    try:
        assert assign_sets(sets, 3) == sets
        assert assign_sets(sets, 2) == [sets[0] + sets[2], sets[1]]
        assert assign_sets(sets, 1) == [sets[0] + sets[1] + sets[2]]
        with pytest.raises(AssertionError):
            assign_sets(sets, 4)  # the main process binds more sets first
    finally:
        for group in sets:
            group[0].close()


def test_upgrade_status_reports_the_last_result_and_times_out():
    status = UpgradeStatus()
    assert status.report() == {"state": "idle", "last_result": None, "last_error": None}
    status.queue()  # POST /upgrade: under way from the answer on, a second is refused
    assert status.under_way and status.report()["state"] == "starting"
    status.dequeue()
    assert not status.under_way
    assert not status.overdue(math.inf) and status.ready_by == math.inf
    status.begin(100.0, 60.0)
    assert status.report()["state"] == "starting"
    assert not status.overdue(159.999)
    assert status.overdue(160.0)
    status.end("worker 0 exited with status 1 before serving")
    assert status.report() == {"state": "idle", "last_result": "failed",
                               "last_error": "worker 0 exited with status 1 before serving"}
    status.begin(200.0, 60.0)
    status.end(None)
    assert status.report() == {"state": "idle", "last_result": "ok", "last_error": None}
    assert not status.overdue(math.inf)


@dataclass
class FakeWorker:
    alive: bool
    ready: bool
    connections: int


def test_a_generation_counts_only_its_live_workers():
    generation = Generation(2, [FakeWorker(True, True, 3), FakeWorker(False, False, 7)])
    assert generation.alive and not generation.ready and generation.connections == 3
    generation.workers[1] = FakeWorker(True, True, 1)
    assert generation.ready and generation.connections == 4


def serving() -> Lifecycle:
    lifecycle = Lifecycle()
    lifecycle.serve()
    return lifecycle


def test_handing_over_completes_accepted_handshakes_and_a_stop_turns_it_into_a_drain():
    lifecycle = serving()
    plan = lifecycle.begin_drain(10.0, 1000.0, 60.0, DrainCause.UPGRADE)
    assert plan is not None and lifecycle.state is State.DRAINING
    assert lifecycle.drain_cause is DrainCause.UPGRADE and lifecycle.accepting
    assert lifecycle.begin_drain(11.0, 1001.0, 60.0) is None  # idempotent: same plan
    assert lifecycle.escalate()  # a stop signal while handing over
    assert lifecycle.drain_cause is DrainCause.STOP and not lifecycle.accepting
    assert lifecycle.drain is plan  # same deadline
    assert not lifecycle.escalate()  # the next stop signal forces instead


def test_a_stop_drain_refuses_handshakes():
    lifecycle = serving()
    lifecycle.begin_drain(10.0, 1000.0, 60.0)
    assert lifecycle.drain_cause is DrainCause.STOP and not lifecycle.accepting
    assert not lifecycle.escalate()


@pytest.mark.parametrize("recorded, expired, expected", [
    ([], False, StopReason.DRAINED),
    ([], True, StopReason.DEADLINE),
    ([StopReason.FORCED], False, StopReason.FORCED),
    ([StopReason.FORCED, StopReason.FAILED], False, StopReason.FAILED),
    ([StopReason.FAILED, StopReason.FORCED], True, StopReason.FAILED),
])
def test_the_stop_reason_recorded_outranks_how_the_drain_ended(recorded, expired, expected):
    lifecycle = serving()
    lifecycle.begin_drain(10.0, 1000.0, 60.0)
    for reason in recorded:
        lifecycle.record(reason)
    lifecycle.finish_drain(70.0 if expired else 20.0)
    assert lifecycle.state is State.STOPPING and lifecycle.stop_reason is expected
    lifecycle.stop(StopReason.NORMAL)  # the first reason is kept
    assert lifecycle.stop_reason is expected


@dataclass
class ExitedWorker:
    alive: bool = False
    ready: bool = False
    connections: int = 0
    restart: object = None


def test_old_generation_workers_reaped_together_are_never_restarted(tmp_path):
    """Both of an old generation's workers exit before either exit is handled:
    the first handling ends the generation, the second must still not restart."""
    from ebbcast.config import Config
    from ebbcast.process.notify import SystemdNotifier
    from ebbcast.process.supervisor import Supervisor

    async def scenario() -> Supervisor:
        main = Supervisor(Config(), Config, str(tmp_path), [], str(tmp_path),
                          notifier=SystemdNotifier(env={}))
        main.lifecycle.serve()
        first, second = ExitedWorker(), ExitedWorker()
        generations = main._generations
        generations.current = Generation(2, [ExitedWorker(alive=True, ready=True)])
        generations.previous = [Generation(1, [first, second])]
        main._on_exited(first, "worker 0 exited with status 0", False, 100.0)
        main._on_exited(second, "worker 1 exited with status 0", False, 100.0)
        assert first.restart is None and second.restart is None
        return main

    main = asyncio.run(scenario())
    assert main._generations.previous == [] and main.lifecycle.state is State.SERVING
