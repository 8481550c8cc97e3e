"""What a serving process's loop acts on, beside the common events
(``ebbcast.core.events``): each a small typed record its loop matches on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class HandOver:
    """The main process tells a serving process: a new generation serves, drain as
    an upgrade (``ebbcast.backplane.records.HandOver``)."""


@dataclass(frozen=True)
class NoConnections:
    """The last client of a draining process has gone."""


@dataclass(frozen=True)
class FanoutBroken:
    """Broadcasts kept failing (``failures`` batches in a row): a bug, or a
    dependency that changed under us. The process gives up rather than serve
    broken."""

    failures: int


#: What a serving process's loop acts on, beside the common events.
ServingEvent = Union[HandOver, NoConnections, FanoutBroken]
