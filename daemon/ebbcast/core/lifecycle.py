"""The daemon's lifecycle state and the drain's time arithmetic.

This module is the only place where the state changes. The state moves forward
only: STARTING -> SERVING -> DRAINING -> STOPPING (STARTING may go straight to
STOPPING when start-up fails). Deadlines are kept on the monotonic clock; unix
times exist only to be reported (status JSON, metrics, the shutdown frame).
Every function that needs the time takes it as an argument.
"""

from __future__ import annotations

import asyncio
import enum
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

#: SIGTERM and SIGINT start the drain (a second one forces the stop); SIGHUP reloads;
#: SIGUSR2 starts an upgrade (a new generation takes the listening sockets).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
UPGRADE_SIGNAL = signal.SIGUSR2
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP, UPGRADE_SIGNAL)

#: How long clients closed at the deadline get to finish their close handshake
#: (below Tornado's own 5 s, so that ebbcast, not Tornado, ends the wait).
DEADLINE_CLOSE_GRACE = 3.0
#: The same after a second stop signal, which asks for a prompt exit.
FORCED_CLOSE_GRACE = 2.0


def handle_signals(loop: asyncio.AbstractEventLoop, record: Callable[[int], None]) -> None:
    """Have ``record(signum)`` called on the loop for each handled signal, then let
    them through (``ebbcast.cli`` blocks them during start-up)."""
    for sig in HANDLED_SIGNALS:
        loop.add_signal_handler(sig, record, sig)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)


def unhandle_signals(loop: asyncio.AbstractEventLoop) -> None:
    for sig in HANDLED_SIGNALS:
        loop.remove_signal_handler(sig)


class State(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPING = "stopping"


class StopReason(enum.Enum):
    """Why the daemon stopped (None while it has not)."""

    NORMAL = "normal"          # stopped before it served, or after serving with no drain
    DRAINED = "drained"        # the last client left during the drain
    DEADLINE = "deadline"      # the drain deadline closed the remaining clients
    FORCED = "forced"          # a second stop signal closed them at once
    FAILED = "failed"          # workers kept dying: the main process gave up


class DrainCause(enum.Enum):
    """Why a drain began: a stop (signal, ``POST /drain``) or an upgrade, where a
    new generation has taken the listening sockets and this one hands over."""

    STOP = "stop"
    UPGRADE = "upgrade"


def whole_seconds(seconds: float) -> int:
    """Seconds rounded up, after the clock arithmetic's float noise is rounded off: a
    60 s deadline read at its start is "60s", though (start + 60) - start may be
    60.000000000002."""
    return math.ceil(round(seconds, 6))


@dataclass(frozen=True)
class DrainPlan:
    """When a drain started and when it must end, on both clocks."""

    started_mono: float
    started_unix: float
    timeout: float

    @property
    def deadline_mono(self) -> float:
        return self.started_mono + self.timeout

    @property
    def deadline_unix(self) -> float:
        return self.started_unix + self.timeout

    def seconds_left(self, now_mono: float) -> float:
        """Seconds until the deadline, never negative."""
        return max(0.0, self.deadline_mono - now_mono)

    def deadline_text(self) -> str:
        """"deadline in 1800s (at 2026-11-26 18:00:00 UTC)", for the drain's first log line."""
        at = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.deadline_unix))
        return f"deadline in {whole_seconds(self.timeout)}s (at {at})"

    def status(self, remaining: int, now_mono: float) -> str:
        """The progress line, logged and sent to systemd as STATUS=."""
        return (f"draining: {remaining} connections remain, "
                f"{whole_seconds(self.seconds_left(now_mono))}s left")

    def expired(self, now_mono: float) -> bool:
        return now_mono >= self.deadline_mono

    def next_tick(self, now_mono: float, interval: float) -> float:
        """Monotonic time of the next progress tick after ``now_mono``.

        Ticks fall on whole multiples of ``interval`` after the start, so a late
        wake-up does not shift every later tick; none falls after the deadline.
        """
        elapsed = max(0.0, now_mono - self.started_mono)
        ticks_done = int(elapsed // interval)
        return min(self.started_mono + (ticks_done + 1) * interval, self.deadline_mono)


class IllegalTransition(RuntimeError):
    pass


class Lifecycle:
    """Holds the state, the drain plan and why it drains and stops; the only code
    that changes any of them."""

    def __init__(self) -> None:
        self._state = State.STARTING
        self._drain: DrainPlan | None = None
        self._cause: DrainCause | None = None
        self._pending: StopReason | None = None  # FORCED or FAILED, once decided
        self.stop_reason: StopReason | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def drain(self) -> DrainPlan | None:
        """The drain plan, once a drain has begun."""
        return self._drain

    @property
    def drain_cause(self) -> DrainCause | None:
        return self._cause

    @property
    def accepting(self) -> bool:
        """Whether WebSocket handshakes are completed. While handing over to a new
        generation, a handshake on a connection this process had already accepted
        completes too (the client is then told to move), so an upgrade refuses
        nobody; a stop refuses them."""
        return self._state is State.SERVING or (
            self._state is State.DRAINING and self._cause is DrainCause.UPGRADE)

    def serve(self) -> None:
        if self._state is not State.STARTING:
            raise IllegalTransition(f"cannot serve from {self._state.value}")
        self._state = State.SERVING

    def begin_drain(self, now_mono: float, now_unix: float, timeout: float,
                    cause: DrainCause = DrainCause.STOP) -> DrainPlan | None:
        """Enter DRAINING and fix the deadline.

        Idempotent: returns the new plan the first time, None when a drain (or the
        stop) is already under way, so that repeated requests change nothing.
        """
        if self._state is not State.SERVING:
            return None
        self._drain = DrainPlan(started_mono=now_mono, started_unix=now_unix, timeout=timeout)
        self._state = State.DRAINING
        self._cause = cause
        return self._drain

    def escalate(self) -> bool:
        """A stop requested while handing over to a new generation: the drain goes
        on (same deadline) as a stop's, so the next stop request forces it. True if
        this changed the cause."""
        if self._state is State.DRAINING and self._cause is DrainCause.UPGRADE:
            self._cause = DrainCause.STOP
            return True
        return False

    def record(self, reason: StopReason) -> None:
        """Decide how the stop will be reported before it happens: FAILED outranks
        FORCED, which outranks how the drain ends by itself."""
        if reason is StopReason.FAILED or self._pending is None:
            self._pending = reason

    def finish_drain(self, now_mono: float) -> None:
        """Enter STOPPING at the end of a drain: with the reason recorded, else
        DEADLINE if it expired, else DRAINED."""
        plan = self._drain
        expired = plan is not None and plan.expired(now_mono)
        self.stop(self._pending or (StopReason.DEADLINE if expired else StopReason.DRAINED))

    def stop(self, reason: StopReason) -> None:
        """Enter STOPPING; the first reason given is kept (a recorded one first)."""
        if self._state is State.STOPPING:
            return
        self._state = State.STOPPING
        self.stop_reason = self._pending or reason
