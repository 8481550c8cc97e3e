"""Per-connection inbound rate limiting (a token bucket)."""

from __future__ import annotations


class TokenBucket:
    """A token bucket that refills at ``rate`` tokens a second up to ``burst``.

    The rate and burst are passed to every call, so a configuration reload applies
    to open connections at once. A rate of 0 means unlimited. ``now`` is a
    monotonic time in seconds, passed in so that tests control the clock.
    """

    __slots__ = ("_tokens", "_last")

    def __init__(self, burst: float, now: float) -> None:
        self._tokens = float(burst)
        self._last = now

    def allow(self, now: float, rate: float, burst: float) -> bool:
        """Take one token if there is one; False means the frame is over the limit."""
        if rate <= 0:
            return True
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._tokens = min(float(burst), self._tokens + elapsed * rate)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
