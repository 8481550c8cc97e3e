"""Broadcasts in one order: submitting, delivering and replaying them.

A broadcast that begins in this serving process (a client's frame, an admin
broadcast) is *submitted*. With the JSON envelope and a sequencer it goes to the
sequencer first (``Sequencing``: this process's own counter, the main process
over the relay link, or Redis) and is delivered here only when it comes back
with its offset, in offset order with every other process's broadcasts: every
client of every process sees one order. Without one (the raw envelope, or a
main process from before offsets) it is delivered here at once and published.

Each sequenced broadcast delivered is appended to the ``History`` first, then
handed to the fan-out, in one step on the loop; a resuming client's replay is
read from the history in the step that joins it to the fan-out, so the seam has
no gap and no repeat. The frame carries its offset in its text: the fan-out
still encodes it once for every client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ebbcast.backplane.base import Sequencing
from ebbcast.backplane.history import History, Kept, Replay, Resume, new_epoch, with_offset
from ebbcast.config import Config
from ebbcast.core import frames
from ebbcast.core.metrics import Metrics
from ebbcast.core.waits import within
from ebbcast.serving.fanout import Fanout, Recipient

log = logging.getLogger(__name__)

#: Broadcasts submitted here and not yet back from the sequencer that are
#: waited for; beyond this (the sequencer would have to be stuck) the oldest is
#: delivered here without an offset, with a warning.
IN_FLIGHT_LIMIT = 10_000


#: publish(payload, source): hand a broadcast to the backplane, for the other processes.
Publish = Callable[[str | bytes, str], None]


class Members(Protocol):
    """The connections of this process, as broadcasts count them."""

    def __len__(self) -> int: ...
    def __contains__(self, item: object) -> bool: ...


@dataclass
class Submitted:
    frame: str
    source: str
    exclude: Recipient | None


class InFlight:
    """Broadcasts submitted here, by token, until they come back sequenced. One
    that is no longer waited for when it comes back was delivered here already,
    without an offset (the sequencer was lost, or too slow): it is only recorded."""

    def __init__(self) -> None:
        self._last = 0
        self._waiting: OrderedDict[int, Submitted] = OrderedDict()
        self.overdue = 0

    def add(self, submitted: Submitted) -> int:
        self._last += 1
        self._waiting[self._last] = submitted
        return self._last

    def take(self, token: int) -> Submitted | None:
        return self._waiting.pop(token, None)

    def too_many(self) -> Submitted | None:
        """The oldest broadcast waited for, out, if more than IN_FLIGHT_LIMIT wait."""
        if len(self._waiting) <= IN_FLIGHT_LIMIT:
            return None
        _, oldest = self._waiting.popitem(last=False)
        self.overdue += 1
        if self.overdue in (1, 10, 100) or self.overdue % 1000 == 0:
            log.warning("%d broadcasts not back from the sequencer in time: delivered "
                        "here without an offset", self.overdue)
        return oldest

    def give_up(self) -> list[Submitted]:
        """Every broadcast still waiting, oldest first; they will be delivered here."""
        waiting = list(self._waiting.values())
        self._waiting.clear()
        return waiting


class Clock(Protocol):
    def __call__(self) -> float: ...


class Broadcasts:
    """Submits, delivers and replays the broadcasts of one serving process."""

    def __init__(self, history: History, fanout: Fanout, members: Members, metrics: Metrics,
                 config: Callable[[], Config], publish: Publish,
                 clock: Clock = time.monotonic) -> None:
        self.history = history
        self._clock = clock
        self._fanout = fanout
        self._members = members
        self._metrics = metrics
        self._config = config  # read when needed: a reload replaces it
        self._publish = publish
        self.sequencing: Sequencing | None = None
        self._in_flight = InFlight()
        #: Handshakes of clients ahead of this process, waiting (see ``caught_up``).
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def sequenced(self) -> bool:
        """Whether broadcasts get offsets now (the epoch known, the JSON envelope)."""
        return self.sequencing is not None and bool(self.history.epoch) and \
            self._config().broadcast.envelope == "json"

    def is_caught_up(self, resume: Resume) -> bool:
        """Whether a resuming client can be answered now (see ``caught_up()``)."""
        return resume.epoch != self.history.epoch or resume.since <= self.history.latest

    async def caught_up(self, resume: Resume, timeout: float) -> None:
        """Wait (at most ``timeout``) until this process has delivered the offset a
        client resuming in this epoch has seen already: another worker or instance
        may be ahead of this one by a broadcast or two."""
        if self.is_caught_up(resume):
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (resume.since, waiter)
        self._waiters.append(entry)
        try:
            await within(waiter, timeout)
        except asyncio.TimeoutError:
            pass
        finally:  # woken, timed out or cancelled: never left behind
            if entry in self._waiters:
                self._waiters.remove(entry)

    def release_waiting(self) -> None:
        """Let every waiting handshake go on now, caught up or not (a drain began:
        each is decided again, and refused)."""
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters = []

    @property
    def waiting(self) -> int:
        """Handshakes waiting for this process to catch up (see ``caught_up()``)."""
        return len(self._waiters)

    def _wake(self) -> None:
        latest = self.history.latest
        waiting = []
        for since, waiter in self._waiters:
            if since <= latest:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                waiting.append((since, waiter))
        self._waiters = waiting

    def submit(self, payload: str | bytes, source: str,
               exclude: Recipient | None = None) -> int:
        """A broadcast that begins here (counted here); how many local connections
        it is for (those of other processes not included)."""
        if self.sequencing is not None and isinstance(payload, str) and self.sequenced:
            self._metrics.broadcasts.labels(source).inc()
            token = self._in_flight.add(Submitted(payload, source, exclude))
            if (late := self._in_flight.too_many()) is not None:
                self._here_without_offset(late)
            if self.sequencing.submit(payload, source, token):
                members = self._members
                return len(members) - (exclude is not None and exclude in members)
            submitted = self._in_flight.take(token)
            assert submitted is not None  # added above: the sequencer is away
            return self._here_without_offset(submitted)
        recipients = self._fanout.broadcast(payload, source, exclude=exclude)
        self._publish(payload, source)
        return recipients

    def deliver(self, epoch: str, offset: int, frame: str, source: str, token: int,
                own: bool, now: float, repeat: bool = False) -> None:
        """A sequenced broadcast, in offset order (``own``: submitted here;
        ``repeat``: sent again by its publisher, so its clients had it)."""
        history = self.history
        if epoch != history.epoch:
            self.new_epoch(epoch, offset - 1)
        elif offset <= history.latest:
            return  # delivered already (a catch-up overlapping live frames)
        exclude = None
        if own and not repeat:
            submitted = self._in_flight.take(token)
            if submitted is None:  # no longer waited for: delivered here, with no offset
                repeat = True
            else:
                exclude = submitted.exclude
        history.append(offset, frame, now)
        if not repeat:
            self._fanout.broadcast(frame, source, exclude=exclude, relayed=True)
        if self._waiters:
            self._wake()

    def _here_without_offset(self, submitted: Submitted) -> int:
        """Delivered here now, with no offset (the history can no longer vouch for
        a resume across it); how many connections it is for."""
        self.history.hole()
        return self._fanout.broadcast(submitted.frame, submitted.source,
                                      exclude=submitted.exclude, relayed=True)

    def sequencing_lost(self) -> None:
        """The sequencer is gone (Redis down, a publish failed): what was submitted
        here and has not come back is delivered here now, without an offset, so
        local delivery never stops; one that comes back after all is not repeated."""
        waiting = self._in_flight.give_up()
        for submitted in waiting:
            self._here_without_offset(submitted)
        if waiting:
            log.info("%d broadcasts delivered here without an offset: the sequencer "
                     "is unreachable", len(waiting))

    # -- from a sequencer elsewhere (ebbcast.backplane.base.SequencedFeed) ---------

    def deliver_sequenced(self, epoch: str, offset: int, frame: str, source: str,
                          token: int, own: bool, repeat: bool = False) -> None:
        self.deliver(epoch, offset, frame, source, token, own, self._clock(), repeat)

    def recorded(self, entry: Kept) -> None:
        """A broadcast from before this process: history only, delivered to nobody."""
        self.history.append(entry.offset, entry.frame, self._clock() - entry.age)

    def sequenced_by(self, epoch: str, base: int, sequencing: Sequencing) -> None:
        self.history.reset(epoch, base)
        self.sequencing = sequencing

    def sequence_here(self) -> None:
        """This process gives its own broadcasts their offsets (alone, ``memory://``)."""
        self.history.reset(new_epoch(), 0)
        self.sequencing = LocalSequencing(self, self._clock)

    def position(self) -> tuple[str, int]:
        return self.history.epoch, self.history.latest

    def preload(self, epoch: str, base: int, entries: list[Kept]) -> None:
        """The history as the sequencer has it, at start."""
        now = self._clock()
        self.new_epoch(epoch, base)  # clients welcomed before it was known
        for entry in entries:
            self.history.append(entry.offset, entry.frame, now - entry.age)
        self.history.trim(now)

    def new_epoch(self, epoch: str, base: int) -> None:
        """The history was lost (``base``: the offset the new epoch goes on from);
        every client is told first, so it knows its offsets no longer count (with
        the JSON envelope: a raw one's clients get the relayed frames and nothing else)."""
        if len(self._members) and self._config().broadcast.envelope == "json":
            log.warning("history epoch %s -> %s: connected clients told",
                        self.history.epoch or "(none yet)", epoch)
            self._fanout.broadcast(frames.epoch(epoch, base), "epoch", relayed=True)
        self.history.reset(epoch, base)

    def replay(self, resume: Resume, now: float) -> Replay:
        """What a resuming client missed (counted), or not recovered: also when the
        replay would not fit in limits.client_queue_bytes, so that writing it does
        not make the client a slow consumer at once."""
        metrics = self._metrics
        replay = self.history.replay(resume, now) if self.sequenced else Replay(False)
        if sum(map(len, replay.frames)) > self._config().limits.client_queue_bytes:
            replay = Replay(False)
        metrics.resumes.labels("recovered" if replay.recovered else "not_recovered").inc()
        metrics.resumed_messages.inc(replay.missed)
        return replay


class LocalSequencing:
    """The sequencer of a serving process on its own: its history's next offset."""

    def __init__(self, broadcasts: Broadcasts, clock: Clock) -> None:
        self._broadcasts = broadcasts
        self._clock = clock

    def submit(self, frame: str, source: str, token: int) -> bool:
        history = self._broadcasts.history
        offset = history.latest + 1
        self._broadcasts.deliver(history.epoch, offset, with_offset(frame, offset), source,
                                 token, True, self._clock())
        return True
