"""The daemon's event loop takes at most so many I/O events per pass
(ebbcast.core.eventloop), and every ready descriptor still gets its turn."""

from __future__ import annotations

import asyncio
import selectors
import socket
from collections.abc import Iterator

import pytest

from ebbcast.core import eventloop


@pytest.fixture
def ready_sockets() -> Iterator[list[socket.socket]]:
    """Ten connected pairs, each with a byte waiting to be read at one end."""
    pairs = [socket.socketpair() for _ in range(10)]
    for _, far in pairs:
        far.send(b"x")
    yield [near for near, _ in pairs]
    for pair in pairs:
        for sock in pair:
            sock.close()


def test_a_pass_takes_at_most_the_cap_and_the_rest_come_in_turn(
        ready_sockets: list[socket.socket]) -> None:
    selector = eventloop.CappedEpollSelector(cap=3)
    try:
        for sock in ready_sockets:
            selector.register(sock, selectors.EVENT_READ)
        seen: list[socket.socket] = []
        for _ in range(4):  # 3 + 3 + 3 + 1
            ready = selector.select(0)
            assert 1 <= len(ready) <= 3
            for key, events in ready:
                assert events == selectors.EVENT_READ
                key.fileobj.recv(1)  # type: ignore[union-attr]
                seen.append(key.fileobj)  # type: ignore[arg-type]
        assert sorted(s.fileno() for s in seen) == sorted(s.fileno() for s in ready_sockets)
        assert selector.select(0) == []  # nothing read twice, nothing left
    finally:
        selector.close()


def test_descriptors_still_ready_are_not_passed_over(ready_sockets: list[socket.socket]) -> None:
    """None is read: each stays ready, and epoll still hands every one out within
    ceil(10 / 3) passes (its ready list in turn), not the same three each time."""
    selector = eventloop.CappedEpollSelector(cap=3)
    try:
        for sock in ready_sockets:
            selector.register(sock, selectors.EVENT_READ)
        handed = {key.fd for _ in range(4) for key, _ in selector.select(0)}
        assert handed == {sock.fileno() for sock in ready_sockets}
    finally:
        selector.close()


def test_the_daemon_runs_its_coroutine_on_the_capped_loop() -> None:
    async def which() -> object:
        return asyncio.get_running_loop()._selector  # type: ignore[attr-defined]

    assert isinstance(eventloop.run(which()), eventloop.CappedEpollSelector)


def test_a_cap_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        eventloop.CappedEpollSelector(cap=0)
