"""Offsets and history per channel, where one sequencer gives them out (with
``memory://``, the main process): each channel has its own epoch, its own counter
and its own history, as the global stream has.

At most ``max_channels`` channels keep theirs (``history.max_channels``): a publish
to one more forgets the channel published to least recently, whose next publish
then starts a new epoch, so that a client resuming into it is answered "not
recovered" rather than told it missed nothing.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ebbcast.backplane.history import History, Replay, Resume, new_epoch, with_offset

CHANNEL_NAME = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")


def valid_channel(name: object) -> bool:
    """A channel name: 1 to 128 characters of ``[A-Za-z0-9_.:@-]``."""
    return isinstance(name, str) and CHANNEL_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class Ask:
    """A subscription, as a member asks for it: ``request`` is the member's own
    number for the answer; ``resume``, when the client resumes the channel."""

    request: int
    channel: str
    client_id: str
    resume: Resume | None = None


@dataclass(frozen=True)
class Answer:
    """The channel's epoch and latest offset at the moment of the subscription;
    after a resume, whether it ``recovered`` and exactly the ``frames`` missed."""

    request: int
    channel: str
    epoch: str
    offset: int
    recovered: bool | None = None
    frames: tuple[str, ...] = ()


@dataclass(frozen=True)
class PresenceChange:
    """A subscription began (``joined``) or ended, for the channel's presence."""

    channel: str
    client_id: str
    joined: bool


@dataclass(frozen=True)
class Sequenced:
    """One channel message given its place: the channel's epoch, its offset, and the
    frame carrying the offset."""

    epoch: str
    offset: int
    frame: str


class ChannelSequencers:
    """Every channel's sequence in one place, the least recently published first."""

    def __init__(self, size: int, ttl: float, max_channels: int,
                 make_epoch: Callable[[], str] = new_epoch) -> None:
        self.size, self.ttl, self.max_channels = size, ttl, max_channels
        self._make_epoch = make_epoch
        self._histories: OrderedDict[str, History] = OrderedDict()

    def __len__(self) -> int:
        return len(self._histories)

    def keep(self, size: int, ttl: float, max_channels: int) -> None:
        """history.size, history.ttl and history.max_channels from now on (an
        upgrade's): what no longer fits goes as each channel is next published."""
        self.size, self.ttl, self.max_channels = size, ttl, max_channels
        for history in self._histories.values():
            history.size, history.ttl = size, ttl
        while len(self._histories) > max_channels:
            self._histories.popitem(last=False)

    def sequence(self, channel: str, frame: str, now: float) -> Sequenced:
        """Give ``frame`` (a JSON object) the next offset of ``channel``."""
        history = self._histories.get(channel)
        if history is None:
            history = self._histories[channel] = History(self.size, self.ttl,
                                                         self._make_epoch())
            while len(self._histories) > self.max_channels:
                self._histories.popitem(last=False)
        else:
            self._histories.move_to_end(channel)
        offset = history.latest + 1
        sequenced = with_offset(frame, offset)
        history.append(offset, sequenced, now)
        return Sequenced(history.epoch, offset, sequenced)

    def open(self, channel: str, now: float) -> tuple[str, int]:
        """``channel``'s epoch and latest offset, giving it a history (a new epoch)
        if it has none: a client subscribing before the first publish can resume
        from offset 0 of that epoch."""
        if channel not in self._histories:
            self._histories[channel] = History(self.size, self.ttl, self._make_epoch())
            while len(self._histories) > self.max_channels:
                self._histories.popitem(last=False)
        return self.position(channel)

    def position(self, channel: str) -> tuple[str, int]:
        """``channel``'s epoch and latest offset; ("", 0) for one with no history
        (never published to, or forgotten)."""
        history = self._histories.get(channel)
        return (history.epoch, history.latest) if history is not None else ("", 0)

    def replay(self, channel: str, resume: Resume, now: float) -> Replay:
        """What a client resuming into ``channel`` missed, if every message is kept."""
        history = self._histories.get(channel)
        if history is None:
            return Replay(False)
        return history.replay(resume, now)
