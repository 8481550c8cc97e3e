"""One loop shape for both processes: record signals, act on events, tick, wind down.

A serving process (``ebbcast.serving.process``) and the main process
(``ebbcast.process.supervisor``) each run a ``Loop`` over themselves, a
``LoopOwner``: the loop installs the signal handlers (which only record), starts
the owner, hands it every event in order (and a Tick at the time it asks), lets it
wind down once it has finished, and always tears it down, signal handlers first.
What an event means is the owner's; ``common_step`` says what the events every
process shares ask for in each state, so both read them alike. ``Progress`` is the
drain's reporting cadence, which both keep.
"""

from __future__ import annotations

import asyncio
import enum
import math
import signal
from typing import Generic, Protocol, TypeVar

from ebbcast.core.events import Common, DrainRequested, EventQueue, SignalReceived
from ebbcast.core.lifecycle import (
    DEADLINE_CLOSE_GRACE,
    UPGRADE_SIGNAL,
    DrainPlan,
    Lifecycle,
    State,
    StopReason,
    handle_signals,
    unhandle_signals,
)

E = TypeVar("E")
E_contra = TypeVar("E_contra", contravariant=True)


class LoopOwner(Protocol[E_contra]):
    """A process, as its loop drives it."""

    lifecycle: Lifecycle

    def start(self) -> None: ...
    def act(self, event: E_contra | Common, now: float) -> None: ...
    def wake_at(self) -> float:
        """The monotonic time of the next Tick (``math.inf``: none)."""
    def finished(self) -> bool: ...
    async def wind_down(self) -> None:
        """After the last event: what is left to finish before the teardown."""
    async def teardown(self) -> None:
        """Always, last (also when starting or acting failed)."""


class Loop(Generic[E]):
    """The events of one process, and the loop that hands them to its owner.

    ``takes_signals``: the kernel's signals are this process's (not so for the
    serving process inside the main process, whose signals come from its loop).
    """

    def __init__(self, takes_signals: bool) -> None:
        self.events: EventQueue[E] = EventQueue()
        self._takes_signals = takes_signals

    def put(self, event: E | Common) -> None:
        self.events.put(event)

    def record_signal(self, signum: int) -> None:
        """The signal handler: it records only; the loop acts."""
        self.events.record_signal(signum)

    async def run(self, owner: LoopOwner[E]) -> StopReason:
        loop = asyncio.get_running_loop()
        if self._takes_signals:
            handle_signals(loop, self.record_signal)
        try:
            owner.start()
            await self.events.run(owner.act, owner.wake_at, owner.finished)
            await owner.wind_down()
        finally:
            if self._takes_signals:
                unhandle_signals(loop)
            await owner.teardown()
        assert owner.lifecycle.stop_reason is not None
        return owner.lifecycle.stop_reason


class Step(enum.Enum):
    """What a common event asks of a process in its state (``common_step``)."""

    RELOAD = "reload"  # SIGHUP
    UPGRADE = "upgrade"  # SIGUSR2: the main process's business
    STOP_NOW = "stop now"  # a stop before serving
    DRAIN = "drain"  # a stop while serving
    STOP_SIGNAL_AGAIN = "stop signal again"  # draining or stopping: force
    NOTHING = "nothing"  # a Tick, or a drain asked for once one runs


def common_step(event: Common, state: State) -> Step:
    match event:
        case SignalReceived(signal.SIGHUP):
            return Step.RELOAD
        case SignalReceived(signum) if signum == UPGRADE_SIGNAL:
            return Step.UPGRADE
        case SignalReceived() | DrainRequested() if state is State.STARTING:
            return Step.STOP_NOW
        case SignalReceived() | DrainRequested() if state is State.SERVING:
            return Step.DRAIN
        case SignalReceived():
            return Step.STOP_SIGNAL_AGAIN
    return Step.NOTHING


class Progress:
    """When the drain's next progress report is due (``progress_interval`` apart,
    on the drain's grid, none past its deadline)."""

    def __init__(self) -> None:
        self.next_at = math.inf

    def schedule(self, plan: DrainPlan, now: float, interval: float) -> None:
        self.next_at = plan.next_tick(now, interval)

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def stop(self) -> None:
        self.next_at = math.inf

    def reloaded(self, lifecycle: Lifecycle, changed: list[str], now: float,
                 interval: float) -> None:
        """A reload that changed ``shutdown.progress_interval`` moves the next report."""
        if lifecycle.drain is not None and "shutdown.progress_interval" in changed:
            self.schedule(lifecycle.drain, now, interval)


def extend_seconds(interval: float, margin: float = 0.0) -> float:
    """How long systemd should wait beyond now while draining: past the next
    report, with room for the deadline's close (``margin``: and for the main
    process to kill what is left)."""
    return 3 * interval + DEADLINE_CLOSE_GRACE + margin
