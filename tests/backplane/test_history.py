"""Offsets and history (ebbcast.backplane.history): units, and a property test of resumes
against a model of the stream."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from ebbcast.client import Session, follow_nodes
from ebbcast.backplane.history import History, Kept, Replay, Resume, with_offset
from ebbcast.backplane.sequencer import Sequencer


def frame(n: int) -> str:
    return with_offset(json.dumps({"type": "message", "text": str(n)}), n)


def filled(size: int, ttl: float, count: int, now: float = 0.0) -> History:
    history = History(size, ttl, "e1")
    for n in range(1, count + 1):
        history.append(n, frame(n), now)
    return history


def test_with_offset_adds_the_field_last() -> None:
    assert with_offset('{"type":"message","text":"a"}', 7) == \
        '{"type":"message","text":"a","offset":7}'
    assert json.loads(with_offset('{"a":{"b":1}}', 1)) == {"a": {"b": 1}, "offset": 1}


def test_replay_gives_exactly_what_came_after_since() -> None:
    history = filled(10, 0, 5)
    assert history.replay(Resume(2, "e1"), 0) == Replay(True, (frame(3), frame(4), frame(5)))
    assert history.replay(Resume(5, "e1"), 0) == Replay(True)  # missed nothing
    assert history.replay(Resume(0, "e1"), 0).missed == 5


def test_not_recovered_for_another_epoch_a_future_offset_or_one_trimmed_away() -> None:
    history = filled(3, 0, 5)  # keeps 3, 4, 5
    assert history.replay(Resume(2, "other"), 0) == Replay(False)
    assert history.replay(Resume(6, "e1"), 0) == Replay(False)
    assert history.replay(Resume(1, "e1"), 0) == Replay(False)  # 2 is gone
    assert history.replay(Resume(2, "e1"), 0).missed == 3


def test_ttl_drops_old_broadcasts_by_the_clock_it_is_given() -> None:
    history = History(100, 10.0, "e1")
    history.append(1, frame(1), now=0.0)
    history.append(2, frame(2), now=5.0)
    assert history.replay(Resume(0, "e1"), now=9.0).missed == 2
    assert history.replay(Resume(0, "e1"), now=10.5) == Replay(False)  # 1 expired
    assert history.replay(Resume(1, "e1"), now=10.5).missed == 1
    assert history.replay(Resume(1, "e1"), now=15.5) == Replay(False)
    assert history.replay(Resume(2, "e1"), now=99.0) == Replay(True)  # nothing missed


def test_size_zero_keeps_nothing_and_never_recovers() -> None:
    history = filled(0, 0, 3)
    assert len(history) == 0 and history.latest == 3
    assert history.replay(Resume(3, "e1"), 0) == Replay(False)


def test_a_hole_in_the_offsets_drops_what_came_before_it() -> None:
    history = filled(10, 0, 3)
    history.append(6, frame(6), 0)  # 4 and 5 were never seen here
    assert history.replay(Resume(2, "e1"), 0) == Replay(False)
    assert history.replay(Resume(5, "e1"), 0) == Replay(True, (frame(6),))


def test_after_a_hole_only_a_resume_from_after_it_recovers() -> None:
    history = filled(10, 0, 3)
    history.hole()  # broadcasts went out here without offsets after 3
    assert history.replay(Resume(2, "e1"), 0) == Replay(False)
    assert history.replay(Resume(3, "e1"), 0) == Replay(False)  # it may have missed them
    history.append(4, frame(4), 0)
    history.append(5, frame(5), 0)
    assert history.replay(Resume(3, "e1"), 0) == Replay(False)
    assert history.replay(Resume(4, "e1"), 0) == Replay(True, (frame(5),))
    history.reset("e2", 0)  # a new epoch forgets the hole
    assert history.replay(Resume(0, "e2"), 0) == Replay(True)


def test_sequencer_numbers_from_one_and_keeps_what_it_numbered() -> None:
    sequencer = Sequencer(10, 0, epoch="e9")
    assert sequencer.sequence('{"t":1}', 0) == (1, '{"t":1,"offset":1}')
    assert sequencer.sequence('{"t":2}', 0) == (2, '{"t":2,"offset":2}')
    assert sequencer.history.after(1, now=3.0) == [Kept(2, '{"t":2,"offset":2}', 3.0)]
    assert (sequencer.epoch, sequencer.latest) == ("e9", 2)


# -- the property: any run of publishes, disconnects and resumes ---------------------

operations = st.lists(st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 5)),
    st.tuples(st.just("disconnect"), st.integers(0, 2)),
    st.tuples(st.just("resume"), st.integers(0, 2)),
    st.tuples(st.just("wait"), st.floats(0, 4)),
    st.tuples(st.just("restart"), st.just(0)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(size=st.integers(0, 8), ttl=st.sampled_from([0.0, 5.0]), ops=operations)
# every run takes each branch of a resume at least once, whatever hypothesis draws:
@example(size=4, ttl=0.0, ops=[("disconnect", 0), ("publish", 2), ("resume", 0)])  # replayed
@example(size=2, ttl=0.0, ops=[("disconnect", 0), ("publish", 3), ("resume", 0)])  # too many
@example(size=8, ttl=5.0, ops=[("disconnect", 1), ("publish", 1), ("wait", 6.0),
                               ("resume", 1)])  # kept too long ago
@example(size=8, ttl=0.0, ops=[("disconnect", 2), ("restart", 0), ("publish", 1),
                               ("resume", 2)])  # another epoch
def test_every_client_sees_a_gap_free_run_or_is_told_it_did_not_recover(
        size: int, ttl: float, ops: list[tuple[str, float]]) -> None:
    """Three clients against one history: connected ones get every broadcast
    live; a resume replays exactly the offsets missed, so each client's view is a
    run of consecutive offsets with no repeat, or says not recovered (and the
    client starts a new run); and it recovers exactly when the model says every
    missed broadcast is still kept (within size and ttl, in the same epoch).
    ``restart`` is a full stop: a new epoch."""
    history = History(size, ttl, "epoch-0")
    published: list[float] = []  # when each offset of this epoch was published
    restarts, now = 0, 0.0
    connected = [True, True, True]
    last = [0, 0, 0]  # offset each client has seen last
    epoch_of = ["epoch-0"] * 3
    runs: list[list[list[int]]] = [[[]], [[]], [[]]]  # per client: runs of offsets
    for op, arg in ops:
        if op == "publish":
            for _ in range(int(arg)):
                offset = history.latest + 1
                history.append(offset, frame(offset), now)
                published.append(now)
                for c in range(3):
                    if connected[c]:
                        runs[c][-1].append(offset)
                        last[c] = offset
        elif op == "disconnect":
            connected[int(arg)] = False
        elif op == "wait":
            now += arg
        elif op == "restart":
            restarts += 1
            history = History(size, ttl, f"epoch-{restarts}")
            published = []
            connected = [False] * 3
        elif op == "resume" and not connected[int(arg)]:
            c = int(arg)
            replay = history.replay(Resume(last[c], epoch_of[c]), now)
            assert replay.recovered == kept_in_model(
                size, ttl, published, last[c], epoch_of[c] == history.epoch, now)
            event("resume recovered" if replay.recovered else "resume not recovered")
            if replay.recovered:
                runs[c][-1].extend(json.loads(f)["offset"] for f in replay.frames)
            else:
                runs[c].append([])  # the application reloads: a new run starts
            connected[c], last[c], epoch_of[c] = True, history.latest, history.epoch
    for client_runs in runs:
        for run in client_runs:
            assert run == list(range(run[0], run[0] + len(run))) if run else True


def kept_in_model(size: int, ttl: float, published: list[float], since: int,
                  same_epoch: bool, now: float) -> bool:
    """Whether every broadcast after ``since`` is still kept: the model's answer."""
    latest = len(published)
    if size == 0 or not same_epoch or since > latest:
        return False
    if since == latest:
        return True
    within_size = since + 1 > latest - size
    return within_size and (ttl == 0 or now - published[since] <= ttl)


# -- the command-line client's resume bookkeeping ------------------------------------

class FakeConnection:
    close_code: int | None = None

    def close(self, code: int) -> None:
        self.close_code = code


def test_reconnecting_client_prints_each_broadcast_once_across_a_move() -> None:
    session = Session("ws://h/ws?x=1", reconnect=True)
    old, new = FakeConnection(), FakeConnection()
    session.current = old  # type: ignore[assignment]
    welcome = {"type": "welcome", "epoch": "e", "offset": 4}
    assert session.on_frame(old, json.dumps(welcome))  # type: ignore[arg-type]
    assert session.resume_url() == "ws://h/ws?x=1&since=4&epoch=e"
    session.opening[new] = 4  # type: ignore[index]
    message = {"type": "message", "text": "x"}
    assert session.on_frame(old, json.dumps({**message, "offset": 5}))  # type: ignore
    resumed = {**welcome, "offset": 6, "recovered": True, "missed": 2}
    assert session.on_frame(new, json.dumps(resumed))  # type: ignore[arg-type]
    assert session.current is new and old.close_code == 1000  # made, then broken
    assert not session.on_frame(new, json.dumps({**message, "offset": 5}))  # type: ignore
    assert session.on_frame(new, json.dumps({**message, "offset": 6}))  # type: ignore
    assert session.resume_url() == "ws://h/ws?x=1&since=6&epoch=e"
    assert not session.on_frame(old, json.dumps({**message, "offset": 7}))  # type: ignore
    assert session.position.offset == 6  # nothing from the connection it moved away from


def test_reconnecting_client_never_goes_back_in_an_epoch() -> None:
    session = Session("ws://h/ws", reconnect=True)
    conn, lagging = FakeConnection(), FakeConnection()
    session.current = conn  # type: ignore[assignment]
    welcome = {"type": "welcome", "epoch": "e", "offset": 9}
    session.on_frame(conn, json.dumps(welcome))  # type: ignore[arg-type]
    session.opening[lagging] = 9  # type: ignore[index]
    session.on_frame(lagging, json.dumps(  # type: ignore[arg-type]
        {"type": "welcome", "epoch": "e", "offset": 8, "recovered": False}))
    assert (session.position.epoch, session.position.offset) == ("e", 9)  # 9 is not shown again
    session.opening[conn] = 9  # type: ignore[index]
    session.on_frame(conn, json.dumps(  # type: ignore[arg-type]
        {"type": "welcome", "epoch": "f", "offset": 2, "recovered": False}))
    assert (session.position.epoch, session.position.offset) == ("f", 2)  # a new epoch starts anew


@pytest.mark.parametrize("frame, url", [
    ({"reason": "draining", "nodes": ["wss://b:9/ws"]}, "wss://b:9/ws/alice?token=t"),
    ({"reason": "draining", "nodes": []}, "ws://a:8/ws/alice?token=t"),
    ({"reason": "draining"}, "ws://a:8/ws/alice?token=t"),
    ({"reason": "draining", "nodes": "ws://b:9/ws"}, "ws://a:8/ws/alice?token=t"),
    ({"reason": "draining", "nodes": ["http://b:9/ws"]}, "ws://a:8/ws/alice?token=t"),
    ({"reason": "upgrade", "nodes": ["ws://b:9/ws"]}, "ws://a:8/ws/alice?token=t"),
])
def test_a_drain_that_names_other_instances_moves_the_session_there(
        frame: dict[str, object], url: str) -> None:
    """The path (client id) and query (token) stay; only the address changes, and
    only for a drain: an upgrade's new generation serves the same address."""
    assert follow_nodes("ws://a:8/ws/alice?token=t", frame, random.Random(1)) == url


def test_the_main_processs_history_takes_an_upgrades_history_settings():
    """With memory:// the main process's history outlives the generations: an upgrade
    (Switchboard.configured) resizes it, larger or smaller, from the next broadcast."""
    sequencer = Sequencer(2, 0, epoch="e")
    for n in range(5):
        sequencer.sequence(f'{{"n":{n}}}', now=float(n))
    assert [kept.offset for kept in sequencer.history.after(0, 5.0)] == [4, 5]
    sequencer.keep(100, 0)
    for n in range(5, 10):
        sequencer.sequence(f'{{"n":{n}}}', now=float(n))
    assert [kept.offset for kept in sequencer.history.after(0, 10.0)] == list(range(4, 11))
    sequencer.keep(3, 3.5)  # fewer, and none older than 3.5 s
    sequencer.sequence('{"n":10}', now=12.0)
    assert [kept.offset for kept in sequencer.history.after(0, 12.0)] == [10, 11]
