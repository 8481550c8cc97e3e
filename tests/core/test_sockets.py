"""The public listener's accept(): a few connections per pass of the event loop."""

from __future__ import annotations

import asyncio
import socket

from ebbcast.core.sockets import ACCEPTS_PER_PASS, ShedOnExhaustion, Spare


async def test_a_listener_accepts_at_most_its_share_per_pass_of_the_loop(io_loop: object) -> None:
    """A connect storm does not hold the loop: within one pass accept() gives at
    most ACCEPTS_PER_PASS connections, then says "none waiting"; the next pass
    takes the next share, and the backlog is emptied in turn."""
    plain = socket.create_server(("127.0.0.1", 0), backlog=1024)
    spare = Spare()
    listener = ShedOnExhaustion.adopt(plain, spare)
    listener.setblocking(False)
    waiting = ACCEPTS_PER_PASS * 2 + 3
    clients = [socket.create_connection(listener.getsockname()[:2]) for _ in range(waiting)]
    per_pass: list[int] = []

    def accept_all() -> int:
        accepted = 0
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return accepted
            conn.close()
            accepted += 1

    loop = asyncio.get_running_loop()
    try:
        while sum(per_pass) < waiting:  # one call_soon callback: within one pass
            assert len(per_pass) < 10, per_pass
            done: asyncio.Future[None] = loop.create_future()
            loop.call_soon(lambda: (per_pass.append(accept_all()), done.set_result(None)))
            await done
    finally:
        for client in clients:
            client.close()
        listener.close()
        spare.close()
    assert per_pass == [ACCEPTS_PER_PASS, ACCEPTS_PER_PASS, 3]


def test_outside_a_running_loop_accept_is_not_capped() -> None:
    plain = socket.create_server(("127.0.0.1", 0), backlog=1024)
    spare = Spare()
    listener = ShedOnExhaustion.adopt(plain, spare)
    clients = [socket.create_connection(listener.getsockname()[:2])
               for _ in range(ACCEPTS_PER_PASS + 1)]
    try:
        for _ in range(ACCEPTS_PER_PASS + 1):
            listener.accept()[0].close()
    finally:
        for client in clients:
            client.close()
        listener.close()
        spare.close()
