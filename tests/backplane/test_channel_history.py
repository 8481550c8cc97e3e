"""Offsets and history per channel (ebbcast.backplane.channels): each channel its own
epoch and counter, resumes per channel, and at most history.max_channels channels
keeping theirs, the least recently published forgotten first."""

from __future__ import annotations

import itertools
import json

from ebbcast.backplane.channels import ChannelSequencers
from ebbcast.backplane.history import Replay, Resume


def sequencers(max_channels: int = 10, size: int = 100) -> ChannelSequencers:
    epochs = (f"e{n}" for n in itertools.count(1))
    return ChannelSequencers(size, 0, max_channels, lambda: next(epochs))


def message(text: str) -> str:
    return json.dumps({"type": "message", "channel": "c", "text": text})


def test_each_channel_counts_its_own_offsets_in_its_own_epoch() -> None:
    table = sequencers()
    a1, b1, a2 = (table.sequence(c, message(c), 0.0) for c in ("a", "b", "a"))
    assert [(s.epoch, s.offset) for s in (a1, b1, a2)] == [("e1", 1), ("e2", 1), ("e1", 2)]
    assert json.loads(a2.frame)["offset"] == 2
    assert table.position("a") == ("e1", 2) and table.position("never") == ("", 0)


def test_a_resume_into_a_channel_replays_exactly_what_it_missed() -> None:
    table = sequencers()
    frames = [table.sequence("a", message(str(n)), 0.0).frame for n in range(5)]
    table.sequence("b", message("other"), 0.0)
    assert table.replay("a", Resume(2, "e1"), 0.0) == Replay(True, tuple(frames[2:]))
    assert table.replay("a", Resume(5, "e1"), 0.0) == Replay(True)
    assert table.replay("a", Resume(2, "e2"), 0.0) == Replay(False)  # another's epoch
    assert table.replay("never", Resume(0, "e1"), 0.0) == Replay(False)


def test_the_least_recently_published_channel_is_forgotten_first() -> None:
    table = sequencers(max_channels=2)
    table.sequence("a", message("1"), 0.0)
    table.sequence("b", message("1"), 0.0)
    table.sequence("a", message("2"), 0.0)  # a is now the more recent
    table.sequence("c", message("1"), 0.0)  # one too many: b goes
    assert (len(table), table.position("b")) == (2, ("", 0))
    assert table.replay("b", Resume(1, "e2"), 0.0) == Replay(False)
    again = table.sequence("b", message("2"), 0.0)  # back, in a new epoch
    assert (again.epoch, again.offset) == ("e4", 1)
    assert table.position("a") == ("", 0)  # and a, now the least recent, went
