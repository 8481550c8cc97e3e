"""Keepalive rounds (pure: a fake clock and fake connections, steps called by hand)."""

from __future__ import annotations

from helpers import test_config
from ebbcast.serving.keepalive import (PING_FRAME, PING_STEP_SECONDS, Keepalive, overdue,
                                       round_share)
from ebbcast.serving.registry import ConnectionRegistry


class FakeConn:
    def __init__(self, writable: bool = True) -> None:
        self.writable = writable
        self.written: list[bytes] = []
        self.ping_sent_at = self.last_pong = 0.0
        self.unread = False
        self.ended: list[str] = []

    def input_unread(self) -> bool:
        return self.unread

    def send_frame(self, frame: bytes) -> bool:
        if self.writable:
            self.written.append(frame)
        return self.writable

    def end(self, reason: str, code: int, text: str | None = None) -> None:
        self.ended.append(reason)


def keepalive_over(conns: list[FakeConn], interval: str = "3s") -> Keepalive[FakeConn]:
    registry: ConnectionRegistry[FakeConn] = ConnectionRegistry()
    for conn in conns:
        registry.add(conn)
    config = test_config(keepalive__ping_interval=interval)
    return Keepalive(registry, lambda: config)


def test_a_round_pings_everyone_once_in_even_shares_within_the_interval():
    conns = [FakeConn() for _ in range(1000)]
    keepalive = keepalive_over(conns, "3s")
    steps = int(3 / PING_STEP_SECONDS)
    now, pinged_per_step = 100.0, []
    for _ in range(steps):
        before = sum(len(c.written) for c in conns)
        delay = keepalive.ping_step(now)
        pinged_per_step.append(sum(len(c.written) for c in conns) - before)
        now += delay
    assert all(c.written == [PING_FRAME] for c in conns)
    assert max(pinged_per_step) == round_share(1000, 3.0) == 34  # never all at once
    assert now <= 100.0 + 3.0 + 1e-9  # the next round is due at 103.0, not before
    keepalive.ping_step(now)
    assert sum(len(c.written) for c in conns) == 1000 + 34  # a new round has begun


def test_a_round_that_runs_late_still_ends_before_the_next_begins():
    """A busy loop fires the steps late: the round's tail (the newest connections)
    must still be pinged, not skipped by a new round starting over."""
    conns = [FakeConn() for _ in range(300)]
    keepalive = keepalive_over(conns, "1s")
    now = 50.0
    keepalive.ping_step(now)  # the round is due to end at 51.0
    for _ in range(2):
        now += 0.45  # each step fires 0.35 s late
        keepalive.ping_step(now)
    assert all(c.written == [PING_FRAME] for c in conns)  # everyone, each once
    keepalive.ping_step(51.0)  # the next round begins on time
    assert sum(len(c.written) for c in conns) == 300 + 30


def test_the_oldest_unanswered_ping_is_kept_and_a_closed_connection_skipped():
    answered, silent, closed = FakeConn(), FakeConn(), FakeConn(writable=False)
    keepalive = keepalive_over([answered, silent, closed], "0.1s")  # one step a round
    keepalive.ping_step(10.0)
    assert answered.ping_sent_at == silent.ping_sent_at == 10.0 and closed.ping_sent_at == 0
    answered.last_pong = 10.05
    keepalive.ping_step(10.1)
    assert (answered.ping_sent_at, silent.ping_sent_at) == (10.1, 10.0)
    assert overdue((answered, silent, closed), 13.0, 3.0) == [silent]


def test_no_pings_when_the_interval_is_zero():
    conn = FakeConn()
    keepalive = keepalive_over([conn], "0s")
    assert keepalive.ping_step(1.0) is None and conn.written == []


def test_keepalive_overdue_picks_connections_with_an_old_unanswered_ping():
    from types import SimpleNamespace

    from ebbcast.serving.keepalive import overdue

    answered = SimpleNamespace(ping_sent_at=10.0, last_pong=10.5)
    silent = SimpleNamespace(ping_sent_at=10.0, last_pong=9.0)
    written_late = SimpleNamespace(ping_sent_at=29.5, last_pong=9.0)  # busy daemon
    never_pinged = SimpleNamespace(ping_sent_at=0.0, last_pong=0.0)
    conns = (answered, silent, written_late, never_pinged)
    assert overdue(conns, now=30.0, timeout=20.0) == [silent]
    assert overdue(conns, now=49.5, timeout=20.0) == [silent, written_late]


async def test_a_connection_whose_bytes_wait_unread_is_not_closed_for_a_ping_timeout(
        io_loop):
    """A saturated process reads late: the pong may be among the bytes waiting for
    it. Overdue and silent: closed as ping_timeout. Overdue with bytes unread: left
    for the next check, which closes it if it has still said nothing by then."""
    silent, behind = FakeConn(), FakeConn()
    behind.unread = True
    now = [100.0]
    registry: ConnectionRegistry[FakeConn] = ConnectionRegistry()
    for conn in (silent, behind):
        registry.add(conn)
        conn.ping_sent_at = 90.0
    config = test_config(keepalive__ping_timeout="5s")
    keepalive = Keepalive(registry, lambda: config, clock=lambda: now[0])
    keepalive._check_round()
    assert (silent.ended, behind.ended) == (["ping_timeout"], [])
    behind.unread = False  # read now, and it held no pong
    keepalive._check_round()
    assert behind.ended == ["ping_timeout"]
    keepalive.stop()
