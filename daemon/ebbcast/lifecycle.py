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
from typing import Any

#: SIGTERM and SIGINT start the drain (a second one forces the stop); SIGHUP reloads.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)


def handle_signals(loop: asyncio.AbstractEventLoop, record: Callable[[int], None]) -> None:
    """Have ``record(signum)`` called on the loop for each handled signal, then let
    them through (``ebbcast.cli`` blocks them during start-up)."""
    for sig in HANDLED_SIGNALS:
        loop.add_signal_handler(sig, record, sig)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)


def stop_request(kind: str, detail: Any) -> str:
    """Who asked for a stop, for the log: a ("signal", signum) event names the
    signal; a ("drain", who) event already names who (e.g. "the admin API")."""
    return signal.Signals(detail).name if kind == "signal" else str(detail)


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
        return f"deadline in {math.ceil(self.timeout)}s (at {at})"

    def status(self, remaining: int, now_mono: float) -> str:
        """The progress line, logged and sent to systemd as STATUS= (SPEC section 5)."""
        return (f"draining: {remaining} connections remain, "
                f"{math.ceil(self.seconds_left(now_mono))}s left")

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
    """Holds the state and the drain plan; the only code that changes either."""

    def __init__(self) -> None:
        self._state = State.STARTING
        self._drain: DrainPlan | None = None
        self.stop_reason: StopReason | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def drain(self) -> DrainPlan | None:
        """The drain plan, once a drain has begun."""
        return self._drain

    @property
    def accepting(self) -> bool:
        """Whether new WebSocket connections are welcome."""
        return self._state is State.SERVING

    def serve(self) -> None:
        if self._state is not State.STARTING:
            raise IllegalTransition(f"cannot serve from {self._state.value}")
        self._state = State.SERVING

    def begin_drain(self, now_mono: float, now_unix: float, timeout: float) -> DrainPlan | None:
        """Enter DRAINING and fix the deadline.

        Idempotent: returns the new plan the first time, None when a drain (or the
        stop) is already under way, so that repeated requests change nothing.
        """
        if self._state is not State.SERVING:
            return None
        self._drain = DrainPlan(started_mono=now_mono, started_unix=now_unix, timeout=timeout)
        self._state = State.DRAINING
        return self._drain

    def stop(self, reason: StopReason) -> None:
        """Enter STOPPING; the first reason given is kept."""
        if self._state is State.STOPPING:
            return
        self._state = State.STOPPING
        self.stop_reason = reason
