"""The order of each channel's messages in one instance, on Redis
(``ebbcast.backplane.redischannels``): what was delivered last, and what is held
while the channel's position is read, so that an answer and the live messages
meet without a gap or a repeat."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Held:
    """A channel's messages held while positions for it are read."""

    readers: int = 0
    messages: list[tuple[int, str]] | None = None



class Streams:
    """Each channel's order here: the epoch and offset last delivered, and the
    messages held while positions for the channel are read (``hold``). A message
    at or before the last delivered is not delivered again; ``deliver(channel,
    frame)`` sends one on to the members."""

    def __init__(self, deliver: Callable[[str, str], None]) -> None:
        self._send = deliver
        self._held: dict[str, _Held] = {}
        self.last: dict[str, tuple[str, int]] = {}

    def hold(self, channel: str) -> None:
        self._held.setdefault(channel, _Held()).readers += 1

    def arrived(self, channel: str, epoch: str, offset: int, frame: str) -> bool:
        """A message from the subscription: held, delivered, or (False) after a gap,
        held for the catch-up the caller asks for, from ``last``."""
        held = self._held.get(channel)
        if held is None:
            last = self.last.get(channel)
            if last is not None and (last[0] != epoch or offset > last[1] + 1):
                held = self._held[channel] = _Held()
                held.messages = [(offset, frame)]
                return False
            self.deliver(channel, epoch, offset, frame)
            return True
        if held.messages is None:
            held.messages = []
        held.messages.append((offset, frame))
        return True

    def deliver(self, channel: str, epoch: str, offset: int, frame: str) -> None:
        last = self.last.get(channel)
        if last is not None and last[0] == epoch and offset <= last[1]:
            return  # delivered already (a catch-up overlapping live messages)
        self.last[channel] = (epoch, offset)
        self._send(channel, frame)

    def release(self, channel: str, epoch: str, latest: int, before: bool) -> None:
        """Held messages of ``channel``: those up to ``latest`` (``before`` an
        answer), or, the last reader done, the rest."""
        held = self._held.get(channel)
        if held is None:
            return
        messages = held.messages or []
        if before:
            held.messages = [(o, f) for o, f in messages if o > latest]
            going = [(o, f) for o, f in messages if o <= latest]
        else:
            held.readers -= 1
            if held.readers > 0:
                return
            del self._held[channel]
            going = messages
        for offset, frame in going:
            self.deliver(channel, epoch, offset, frame)
