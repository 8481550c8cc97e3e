"""The lifecycle (ebbcast.core.lifecycle): drain arithmetic, forward-only states."""

from __future__ import annotations


from ebbcast.core.lifecycle import DrainPlan, Lifecycle, State, StopReason


def test_drain_plan_arithmetic_on_both_clocks():
    plan = DrainPlan(started_mono=100.0, started_unix=1_700_000_000.0, timeout=1800.0)
    assert plan.deadline_mono == 1900.0 and plan.deadline_unix == 1_700_001_800.0
    assert plan.seconds_left(100.0) == 1800.0
    assert plan.seconds_left(1000.5) == 899.5
    assert plan.seconds_left(5000.0) == 0.0
    assert not plan.expired(1899.999) and plan.expired(1900.0)


def test_the_status_line_rounds_seconds_up_but_not_the_clocks_float_noise():
    started = 16383.97271808145  # (started + 60) - started == 60.00000000000182
    plan = DrainPlan(started_mono=started, started_unix=0.0, timeout=60.0)
    assert plan.seconds_left(started) > 60.0
    assert plan.status(1, started) == "draining: 1 connections remain, 60s left"
    assert plan.status(1, started + 0.5) == "draining: 1 connections remain, 60s left"
    assert plan.status(1, started + 59.5) == "draining: 1 connections remain, 1s left"
    assert plan.status(0, started + 61.0) == "draining: 0 connections remain, 0s left"


def test_progress_ticks_stay_on_the_grid_and_stop_at_the_deadline():
    plan = DrainPlan(started_mono=0.0, started_unix=0.0, timeout=25.0)
    assert plan.next_tick(0.0, 10.0) == 10.0
    assert plan.next_tick(10.3, 10.0) == 20.0    # a late wake-up does not shift the grid
    assert plan.next_tick(19.99, 10.0) == 20.0
    assert plan.next_tick(20.0, 10.0) == 25.0    # never past the deadline


def test_lifecycle_moves_forward_only_and_drain_is_idempotent():
    life = Lifecycle()
    assert life.state is State.STARTING and not life.accepting
    life.serve()
    assert life.accepting
    plan = life.begin_drain(5.0, 1000.0, 60.0)
    assert plan is not None and life.state is State.DRAINING and not life.accepting
    assert life.begin_drain(6.0, 1001.0, 60.0) is None and life.drain is plan
    life.stop(StopReason.DRAINED)
    life.stop(StopReason.NORMAL)
    assert life.state is State.STOPPING and life.stop_reason is StopReason.DRAINED
    assert life.begin_drain(7.0, 1002.0, 60.0) is None
