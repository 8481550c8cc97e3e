"""Unit: drain arithmetic, registry, rate limiting, frames, metrics, wire, client output."""

from __future__ import annotations

import json
import struct

import pytest
from prometheus_client import CollectorRegistry

from helpers import wait_until
from ebbcast import frames
from ebbcast.client import frame_as_json_line
from ebbcast.lifecycle import DrainPlan, Lifecycle, State, StopReason
from ebbcast.metrics import Metrics
from ebbcast.ratelimit import TokenBucket
from ebbcast.registry import ConnectionRegistry
from ebbcast.wire import encode_frame, valid_close_code


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


async def test_registry_tracks_members_snapshot_and_emptiness(io_loop):
    counts: list[int] = []
    registry: ConnectionRegistry[str] = ConnectionRegistry(counts.append)
    await registry.wait_empty()  # empty at once
    registry.add("a")
    registry.add("b")
    registry.add("a")  # twice is once
    snap = registry.snapshot()
    assert snap == ("a", "b") and registry.snapshot() is snap  # cached while unchanged
    assert registry.discard("a") and not registry.discard("a")
    assert snap == ("a", "b") and registry.snapshot() == ("b",)
    assert len(registry) == 1 and "b" in registry
    registry.discard("b")
    await registry.wait_empty()
    assert counts == [1, 2, 1, 0]


def test_token_bucket_allows_burst_then_rate():
    bucket = TokenBucket(burst=3, now=0.0)
    assert [bucket.allow(0.0, 2.0, 3) for _ in range(4)] == [True, True, True, False]
    assert not bucket.allow(0.4, 2.0, 3)        # 0.8 tokens
    assert bucket.allow(0.5, 2.0, 3)            # 1.0 token
    assert bucket.allow(100.0, 2.0, 3) and bucket.allow(100.0, 2.0, 3)
    assert bucket.allow(100.0, 2.0, 3) and not bucket.allow(100.0, 2.0, 3)  # capped at 3
    assert all(bucket.allow(100.0, 0, 3) for _ in range(100))  # 0 = unlimited


def test_frames_are_compact_json_with_spec_fields():
    assert json.loads(frames.welcome("c1", "node", 3)) == {
        "type": "welcome", "client_id": "c1", "server": "node", "connections": 3}
    message = frames.message("alice", "hi ☃", 1700000000.1234)
    assert json.loads(message) == {"type": "message", "from": "alice", "text": "hi ☃",
                                   "ts": 1700000000.123}
    assert " " not in frames.periodic(1, "x", 1.0, 2)
    assert json.loads(frames.shutdown(1700001800.0, 1500)) == {
        "type": "shutdown", "reason": "draining", "deadline": 1700001800.0,
        "reconnect_after_ms": 1500}
    assert json.loads(frames.error("rate_limited")) == {"type": "error",
                                                        "error": "rate_limited"}


@pytest.mark.parametrize("size, header", [(0, b"\x81\x00"), (125, b"\x81\x7d"),
                                          (126, b"\x81\x7e\x00\x7e"),
                                          (65535, b"\x81\x7e\xff\xff"),
                                          (65536, b"\x81\x7f" + struct.pack("!Q", 65536))])
def test_encode_frame_uses_rfc6455_length_encodings(size, header):
    payload = b"a" * size
    assert encode_frame(payload) == header + payload
    assert encode_frame(b"\x00", binary=True) == b"\x82\x01\x00"


def test_valid_close_codes_follow_rfc6455_7_4():
    for code in (1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999):
        assert valid_close_code(code)
    for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000):
        assert not valid_close_code(code)


def test_metrics_on_a_fresh_registry_start_at_zero_with_every_label():
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    assert metrics.registry is registry
    text = metrics.exposition().decode()
    for reason in ("client", "ping_timeout", "slow_consumer", "too_big", "policy",
                   "drain_deadline", "forced", "error"):
        assert f'ebbcast_disconnections_total{{reason="{reason}"}} 0.0' in text
    metrics.drain_started_at(100.0, 1900.0)
    assert registry.get_sample_value("ebbcast_draining") == 1
    assert registry.get_sample_value("ebbcast_drain_deadline_timestamp_seconds") == 1900.0
    Metrics()  # a second instance on its own registry does not clash


def test_client_prints_each_frame_as_one_json_line():
    assert json.loads(frame_as_json_line('{"type": "welcome"}')) == {"type": "welcome"}
    assert json.loads(frame_as_json_line("plain")) == {"text": "plain"}
    assert json.loads(frame_as_json_line("[1]")) == {"text": "[1]"}
    assert json.loads(frame_as_json_line(b"\x00\xff")) == {"binary_base64": "AP8="}
    assert "\n" not in frame_as_json_line('{"a":\n1}')


def test_keepalive_overdue_picks_connections_with_an_old_unanswered_ping():
    from types import SimpleNamespace

    from ebbcast.keepalive import overdue

    answered = SimpleNamespace(ping_sent_at=10.0, last_pong=10.5)
    silent = SimpleNamespace(ping_sent_at=10.0, last_pong=9.0)
    written_late = SimpleNamespace(ping_sent_at=29.5, last_pong=9.0)  # busy daemon
    never_pinged = SimpleNamespace(ping_sent_at=0.0, last_pong=0.0)
    conns = (answered, silent, written_late, never_pinged)
    assert overdue(conns, now=30.0, timeout=20.0) == [silent]
    assert overdue(conns, now=49.5, timeout=20.0) == [silent, written_late]


async def test_collector_policy_freezes_newcomers_and_unfreezes_on_stop(io_loop):
    import gc

    from ebbcast.gcpolicy import CollectorPolicy

    policy = CollectorPolicy(lambda: 0, every=0.01)
    policy.start()
    try:
        assert gc.get_freeze_count() > 0  # start-up's objects are frozen at once
        before = gc.get_freeze_count()
        newcomers = [[] for _ in range(1000)]  # GC-tracked, like a connection's objects
        await wait_until(lambda: gc.get_freeze_count() >= before + 900)  # the next tick
        del newcomers
    finally:
        policy.stop()
    assert gc.get_freeze_count() == 0


def test_the_full_collection_waits_for_a_reconnect_storm_to_pass():
    from ebbcast.gcpolicy import collect_now

    assert not collect_now(1900, 1900, 0)  # not yet doubled from the 1,000 floor
    assert not collect_now(2500, 2100, 0)  # doubled, but still growing: a storm
    assert collect_now(2500, 2500, 0)  # steady: now
    assert collect_now(2400, 2500, 0)  # shrinking: now
    assert not collect_now(9000, 9000, 5000) and collect_now(10_001, 10_001, 5000)
    assert not collect_now(2500, 2500, 0, quiet=False)  # a broadcast is being written
