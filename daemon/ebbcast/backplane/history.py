"""Offsets and history: what lets a client resume without losing a broadcast.

With the JSON envelope every broadcast gets an *offset*, one number in one
total order for the whole cluster, and the cluster's *epoch* names the history
those offsets belong to (a new epoch: the history was lost, offsets start
again). A serving process keeps the latest broadcasts in a ``History`` (at most
history.size, none older than history.ttl) and answers a resume
(``/ws?since=N&epoch=E``) from it alone, on its own loop: the replay is taken
at the moment the client joins the fan-out, so the seam between the replay and
the live broadcasts has neither a gap nor a repeat.

Who hands out offsets (a ``Sequencer`` here: the serving process alone, or the
main process for all its workers; Redis with ``redis://``) is elsewhere; every
serving process receives the sequenced broadcasts in offset order and appends
each to its history as it delivers it. Nothing here reads a clock: ``now`` is an
argument (monotonic seconds).
"""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple


def new_epoch() -> str:
    """A fresh epoch: 16 hex digits, never reused in practice."""
    return secrets.token_hex(8)


def with_offset(frame: str, offset: int) -> str:
    """A JSON object frame with ``"offset":N`` added as its last field."""
    assert frame.endswith("}"), "a sequenced frame is one JSON object"
    return f'{frame[:-1]},"offset":{offset}}}'


class Entry(NamedTuple):
    """One broadcast of a history, as a History keeps it: its offset, its frame
    (the offset in its text), and when it was added (monotonic seconds)."""

    offset: int
    frame: str
    added: float


class Kept(NamedTuple):
    """One broadcast of a history, as it is handed on (to a worker, from Redis): the
    same fields in the same order, with its age in seconds instead of a time of
    this process's clock."""

    offset: int
    frame: str
    age: float


@dataclass(frozen=True)
class Resume:
    """What a client asked: the broadcasts after ``since`` of ``epoch``."""

    since: int
    epoch: str


@dataclass(frozen=True)
class Replay:
    """The answer to a resume: ``recovered`` with exactly the ``frames`` it
    missed, in order; or not recovered (``frames`` empty)."""

    recovered: bool
    frames: tuple[str, ...] = ()

    @property
    def missed(self) -> int:
        return len(self.frames)


class History:
    """The latest sequenced broadcasts of one epoch, oldest first."""

    def __init__(self, size: int, ttl: float, epoch: str = "", latest: int = 0) -> None:
        self.size = size
        self.ttl = ttl  # seconds; 0 = no age limit
        self.epoch = epoch
        self.latest = latest  # the last offset delivered (0: none yet)
        self._entries: deque[Entry] = deque()
        #: A resume from before this offset cannot be vouched for (see ``hole``).
        self._floor = 0

    def __len__(self) -> int:
        return len(self._entries)

    def reset(self, epoch: str, latest: int) -> None:
        """A new epoch (or a hole in this one): nothing before ``latest`` is kept."""
        self.epoch, self.latest = epoch, latest
        self._entries.clear()
        self._floor = 0

    def hole(self) -> None:
        """Broadcasts were delivered here without an offset (the sequencer was out
        of reach): a client that left before them cannot be told it missed nothing,
        so only a resume from after the next sequenced broadcast recovers."""
        self._entries.clear()
        self._floor = self.latest + 1

    def append(self, offset: int, frame: str, now: float) -> None:
        """Record the broadcast with ``offset``; they come in order. An offset
        that does not follow ``latest`` means some were never seen here: the
        history before it is no use for a resume across the hole, so it is dropped.
        """
        if offset != self.latest + 1:
            self._entries.clear()
        self.latest = offset
        if self.size > 0:
            self._entries.append(Entry(offset, frame, now))
        self.trim(now)

    def trim(self, now: float) -> None:
        entries = self._entries
        while len(entries) > self.size:
            entries.popleft()
        if self.ttl > 0:
            while entries and now - entries[0].added > self.ttl:
                entries.popleft()

    def replay(self, resume: Resume, now: float) -> Replay:
        """The broadcasts after ``resume.since``, if this history holds every one."""
        self.trim(now)
        since = resume.since
        if self.size == 0 or resume.epoch != self.epoch or not \
                self._floor <= since <= self.latest:
            return Replay(False)
        if since == self.latest:
            return Replay(True)
        entries = self._entries
        if not entries or entries[0].offset > since + 1:
            return Replay(False)
        skip = since + 1 - entries[0].offset
        return Replay(True, tuple(entries[i].frame for i in range(skip, len(entries))))

    def after(self, offset: int, now: float) -> list[Kept]:
        """Every kept broadcast after ``offset``, with its age at ``now``."""
        return [Kept(e.offset, e.frame, now - e.added) for e in self._entries if e.offset > offset]
