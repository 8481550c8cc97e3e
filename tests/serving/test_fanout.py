"""The coalescing fan-out: order, exclusions, private frames, one write per pass."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from ebbcast.serving.fanout import Fanout
from ebbcast.core.metrics import Metrics
from ebbcast.serving.registry import ConnectionRegistry
from ebbcast.serving.wire import encode_frame


class Recorder:
    """Stands in for a connection: records each write (a real one is a socket write)."""

    def __init__(self, name: str, closing: bool = False) -> None:
        self.name = name
        self.closing = closing
        self.writes: list[bytes] = []

    def send_frame(self, frame: bytes) -> bool:
        if self.closing:
            return False
        self.writes.append(frame)
        return True

    def received(self) -> bytes:
        return b"".join(self.writes)


def setup(*names: str, writes_per_pass: int = 0) -> tuple[Fanout, Metrics, list[Recorder]]:
    registry: ConnectionRegistry[Recorder] = ConnectionRegistry()
    metrics = Metrics(CollectorRegistry())
    if writes_per_pass:  # no time budget: each loop pass writes exactly this many
        fanout = Fanout(registry, metrics, 0.0, writes_per_pass)  # type: ignore[arg-type]
    else:
        fanout = Fanout(registry, metrics)  # type: ignore[arg-type]
    conns = [Recorder(name) for name in names]
    for conn in conns:
        registry.add(conn)
    return fanout, metrics, conns


def frames(*texts: str) -> bytes:
    return b"".join(encode_frame(t.encode()) for t in texts)


async def next_pass() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def all_written(fanout: Fanout) -> None:
    for _ in range(100):
        if fanout.idle:
            return
        await asyncio.sleep(0)
    raise AssertionError("the fan-out did not finish")


async def test_broadcasts_in_one_pass_go_out_as_one_write_per_connection(io_loop):
    fanout, metrics, (a, b) = setup("a", "b")
    for text in ("1", "2", "3"):
        assert fanout.broadcast(text, "client") == 2
    assert a.writes == [] and b.writes == []  # nothing written before the pass ends
    await next_pass()
    assert a.writes == [frames("1", "2", "3")] and b.writes == a.writes
    assert a.writes[0] is b.writes[0]  # joined once, shared
    assert metrics.sent._value.get() == 6
    assert metrics.broadcast_duration._sum.get() > 0
    fanout.broadcast("4", "client")
    await next_pass()
    assert a.writes[1] == frames("4")


async def test_private_frames_and_exclusions_keep_order(io_loop):
    fanout, metrics, (a, b, c) = setup("a", "b", "c")
    fanout.broadcast("1", "client")
    fanout.send_private(b, encode_frame(b"private-b"))
    fanout.broadcast("2", "client", exclude=c)
    fanout.broadcast("3", "client")
    await next_pass()
    assert a.received() == frames("1", "2", "3")
    assert b.received() == frames("1", "private-b", "2", "3")
    assert c.received() == frames("1", "3")
    assert all(len(conn.writes) == 1 for conn in (a, b, c))
    assert metrics.sent._value.get() == 3 + 4 + 2


async def test_a_connection_joining_mid_pass_gets_only_later_frames(io_loop):
    fanout, _, (a,) = setup("a")
    fanout.broadcast("before", "client")
    late = Recorder("late")
    fanout._registry.add(late)  # type: ignore[arg-type]
    fanout.joined(late)
    fanout.send_private(late, encode_frame(b"welcome"))
    fanout.broadcast("after", "client")
    await next_pass()
    assert a.received() == frames("before", "after")
    assert late.received() == frames("welcome", "after")


async def test_closing_connections_are_skipped(io_loop):
    fanout, metrics, (a, b) = setup("a", "b")
    b.closing = True
    fanout.broadcast("x", "admin")
    await next_pass()
    assert a.received() == frames("x") and b.writes == []
    assert metrics.sent._value.get() == 1
    assert metrics.broadcasts.labels("admin")._value.get() == 1


async def test_binary_payloads_become_binary_frames(io_loop):
    fanout, _, (a,) = setup("a")
    fanout.broadcast(b"\x00\x01", "client")
    await next_pass()
    assert a.received() == b"\x82\x02\x00\x01"


async def test_flush_is_sliced_and_later_broadcasts_wait_for_the_next_batch(io_loop):
    fanout, metrics, conns = setup(*"abcde", writes_per_pass=2)
    fanout.broadcast("1", "client")
    fanout.broadcast("2", "client")
    await asyncio.sleep(0)  # one pass: two connections written
    assert sum(1 for c in conns if c.writes) == 2
    fanout.broadcast("3", "client")  # arrives while batch 1 is being written
    await all_written(fanout)
    for conn in conns:
        assert conn.writes == [frames("1", "2"), frames("3")]
    assert metrics.sent._value.get() == 15
    assert metrics.broadcast_duration._sum.get() > 0


class Broken(Recorder):
    """A connection whose write raises: a bug in the fan-out's path, or a Tornado
    internal that changed."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.broken = True

    def send_frame(self, frame: bytes) -> bool:
        if self.broken:
            raise AttributeError("'IOStream' object has no attribute '_write_buffer'")
        return super().send_frame(frame)


async def test_failing_batches_are_reported_in_a_row_and_a_good_one_resets_the_count(io_loop):
    registry: ConnectionRegistry[Recorder] = ConnectionRegistry()
    failing: list[int] = []
    fanout = Fanout(registry, Metrics(CollectorRegistry()),  # type: ignore[arg-type]
                    on_failing=failing.append)
    broken = Broken("a")
    registry.add(broken)
    for n in range(3):
        fanout.broadcast(f"m{n}", "client")
        await all_written(fanout)  # the guard drops the batch; later ones still run
    assert failing == [1, 2, 3]
    broken.broken = False
    fanout.broadcast("works again", "client")
    await all_written(fanout)
    assert broken.received() == frames("works again")
    broken.broken = True
    fanout.broadcast("fails again", "client")
    await all_written(fanout)
    assert failing == [1, 2, 3, 1]  # counted afresh after the good batch
