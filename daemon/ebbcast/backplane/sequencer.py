"""The counter that hands out offsets, and the history of what it handed out.

Used by the main process for every worker of every generation (``memory://``);
Redis is the sequencer with ``redis://`` (``ebbcast.backplane.redis``).
"""

from __future__ import annotations

from ebbcast.backplane.history import History, new_epoch, with_offset


class Sequencer:
    """Hands out offsets (a counter) and keeps the history of what it handed out:
    the serving process on its own, or the main process for every worker of every
    generation (its history outlives the generations)."""

    def __init__(self, size: int, ttl: float, epoch: str | None = None) -> None:
        self.history = History(size, ttl, epoch or new_epoch())

    @property
    def epoch(self) -> str:
        return self.history.epoch

    def keep(self, size: int, ttl: float) -> None:
        """Keep ``size`` broadcasts for ``ttl`` from now on (an upgrade's history.*):
        what no longer fits goes as the next broadcast is recorded."""
        self.history.size, self.history.ttl = size, ttl

    @property
    def latest(self) -> int:
        return self.history.latest

    def sequence(self, frame: str, now: float) -> tuple[int, str]:
        """The next offset and ``frame`` carrying it, recorded in the history."""
        offset = self.history.latest + 1
        sequenced = with_offset(frame, offset)
        self.history.append(offset, sequenced, now)
        return offset, sequenced
