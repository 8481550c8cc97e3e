"""What an instance has yet to publish to the others: its outbox.

While Redis is up the outbox holds a batch or two; while Redis is away (an outage,
a Sentinel failover) it keeps what this instance's clients sent, in order, up to
``backplane.outage_buffer`` bytes, and the backplane publishes it once Redis, or
the new master, is back. Only what does not fit is refused, for the caller to
count as dropped. While Redis is up the bound is at least ``BACKLOG`` bytes
(Redis slower than the clients for a moment), whatever the outage buffer. A batch
whose publish failed is put back in front, in order, to be tried again: the
receivers drop what had crossed already by its number.

Each frame is counted at its length plus ``ENTRY_COST``, about what Python keeps
beside it (the entry, its string's header), so a bound in bytes bounds memory.
Nothing here does I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

#: Bytes counted for each frame beside its own length.
ENTRY_COST = 128
#: Bytes the outbox may hold while Redis is up, at least.
BACKLOG = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One frame for the other instances: its ``number`` is the publisher's
    sequence number of a raw frame (``sequenced`` False) or the token of a
    broadcast to be sequenced by Redis (``sequenced`` True)."""

    payload: str | bytes
    source: str
    number: int
    sequenced: bool

    @property
    def cost(self) -> int:
        return len(self.payload) + ENTRY_COST


class Outbox:
    """Frames waiting to be published, oldest first, at most ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self._waiting: deque[Outgoing] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def fits(self, cost: int, redis_up: bool) -> bool:
        limit = max(self.limit, BACKLOG) if redis_up else self.limit
        return self.bytes + cost <= limit

    def put(self, frame: Outgoing) -> None:
        """Keep ``frame`` (the caller checked that it ``fits``)."""
        self._waiting.append(frame)
        self.bytes += frame.cost

    def take(self, most: int) -> list[Outgoing]:
        """The oldest ``most`` frames (fewer if fewer wait), out of the outbox."""
        waiting = self._waiting
        batch = [waiting.popleft() for _ in range(min(most, len(waiting)))]
        self.bytes -= sum(frame.cost for frame in batch)
        return batch

    def put_back(self, batch: Iterable[Outgoing]) -> None:
        """A batch taken and not published: in front again, in its order. It is
        kept even past the limit (by one batch at most): it was accepted once."""
        for frame in reversed(list(batch)):
            self._waiting.appendleft(frame)
            self.bytes += frame.cost

    def clear(self) -> list[Outgoing]:
        """Everything still waiting, and the outbox empty (at a stop)."""
        waiting = list(self._waiting)
        self._waiting.clear()
        self.bytes = 0
        return waiting
