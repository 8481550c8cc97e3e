"""The relay's records (ebbcast.backplane.records): typed, and byte for byte what
earlier releases send and read, since two releases talk over the link during an
upgrade."""

from __future__ import annotations

import asyncio
import socket

import pytest

from ebbcast.backplane import records
from ebbcast.backplane.base import Envelope
from ebbcast.backplane.channels import Answer, Ask, PresenceChange
from ebbcast.backplane.history import Kept, Resume
from ebbcast.backplane.relay import RECORDS_PER_STEP, Link, Unpacker
from helpers import wait_until


def wire(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body


#: Each record and its bytes on the link, as releases before the typed records wrote them.
ON_THE_WIRE = [
    (records.Frame(b"w/1\nclient\n0\nthi"), wire(b"F", b"w/1\nclient\n0\nthi")),
    (records.Inject(Envelope("main", "admin", 0, "hi")), wire(b"I", b"main\nadmin\n0\nthi")),
    (records.Sequence(Envelope("w/1", "client", 7, '{"t":1}')),
     wire(b"S", b'w/1\nclient\n7\nt{"t":1}')),
    (records.Ready("0.1.0"), wire(b"R", b"0.1.0")),
    (records.Capabilities(("offsets",)), wire(b"K", b"offsets")),
    (records.Count(12), wire(b"C", b"12")),
    (records.Others(3), wire(b"T", b"3")),
    (records.Heartbeat(), wire(b"H", b"")),
    (records.Accept(), wire(b"A", b"")),
    (records.HandOver(), wire(b"U", b"")),
    (records.Sequencer("e9", 41), wire(b"E", b"e9\n41")),
    (records.History(Kept(42, '{"t":1,"offset":42}', 1.5)),
     wire(b"Y", b'42\n1.500\n{"t":1,"offset":42}')),
    (records.Ordered(43, Envelope("w/1", "client", 7, '{"t":2,"offset":43}')),
     wire(b"O", b'43\nw/1\nclient\n7\nt{"t":2,"offset":43}')),
]


#: The channel records (SPEC 14), first written by this release.
CHANNEL_RECORDS = [
    (records.Subscribe(Ask(3, "scores", "alice")), wire(b"B", b'[3, "scores", "alice", null]')),
    (records.Subscribe(Ask(4, "a:b", "bob", Resume(7, "e1"))),
     wire(b"B", b'[4, "a:b", "bob", [7, "e1"]]')),
    (records.Subscribed(Answer(4, "a:b", "e1", 9, True, ('{"offset":8}', '{"offset":9}'))),
     wire(b"D", b'[4, "a:b", "e1", 9, true, ["{\\"offset\\":8}", "{\\"offset\\":9}"]]')),
    (records.Subscribed(Answer(5, "c", "e2", 0)), wire(b"D", b'[5, "c", "e2", 0, null, []]')),
    (records.Unsubscribe("scores", "alice"), wire(b"X", b"scores\nalice")),
    (records.ChannelPublish("c", '{"t":"a\nb"}'), wire(b"P", b'c\n{"t":"a\nb"}')),
    (records.ChannelMessage("c", '{"offset":1}'), wire(b"Q", b'c\n{"offset":1}')),
    (records.Presence(PresenceChange("c", "bob", True)), wire(b"J", b"c\nbob\n1")),
    (records.Presence(PresenceChange("c", "bob", False)), wire(b"J", b"c\nbob\n0")),
    (records.Direct(8, "bob", '{"type":"direct"}'), wire(b"M", b'8\nbob\n{"type":"direct"}')),
    (records.Delivered(8, 2), wire(b"N", b"8\n2")),
    (records.ChannelsUp(False), wire(b"V", b"0")),
    (records.ChannelsUp(True), wire(b"V", b"1")),
]


@pytest.mark.parametrize("record, packed", ON_THE_WIRE + CHANNEL_RECORDS,
                         ids=lambda x: type(x).__name__)
def test_each_record_has_the_bytes_earlier_releases_use_and_reads_back(record, packed):
    assert records.pack(record) == packed
    (kind, body), = Unpacker().feed(packed)
    assert records.parse(kind, body) == record


def test_a_kind_this_release_does_not_know_is_read_as_unknown_not_an_error():
    assert records.parse(b"Z", b"from a newer release") == \
        records.Unknown(b"Z", b"from a newer release")


def test_a_body_that_is_not_what_its_kind_says_is_an_error():
    with pytest.raises(ValueError):
        records.parse(b"C", b"twelve")


def test_a_frame_crosses_the_main_process_without_being_read():
    frame = records.Frame.of(Envelope("w/1", "client", 0, b"\x00\n\xff"))
    assert records.parse(b"F", frame.body()) == frame
    assert frame.envelope == Envelope("w/1", "client", 0, b"\x00\n\xff")


def test_records_survive_any_split_of_the_stream():
    stream = b"".join(records.pack(r) for r in (records.Frame(b"x" * 70_000),
                                                 records.Ready(""),
                                                 records.Frame("é\n".encode())))
    for step in (1, 3, 4, 5, 4096, len(stream)):
        unpacker = Unpacker()
        found = []
        for start in range(0, len(stream), step):
            found += [records.parse(kind, body)
                      for kind, body in unpacker.feed(stream[start:start + step])]
        assert found == [records.Frame(b"x" * 70_000), records.Ready(""),
                         records.Frame("é\n".encode())]


async def test_the_link_hands_on_what_it_cannot_read_so_its_sender_counts_as_heard(io_loop):
    """The main process takes any record as a sign of life (a worker that sends
    nothing for server.worker_timeout is killed): one of a newer release's kinds, or
    one it cannot read (logged), still reaches it, as Unknown."""
    mine, theirs = socket.socketpair()
    got: list[records.Received] = []
    link = Link(mine, got.append, lambda: None)
    link.start()
    try:
        theirs.sendall(wire(b"Z", b"new") + wire(b"C", b"twelve") + wire(b"C", b"3"))
        await wait_until(lambda: len(got) == 3)
    finally:
        link.close()
        theirs.close()
    assert got == [records.Unknown(b"Z", b"new"), records.Unknown(b"C", b"twelve"),
                   records.Count(3)]


async def test_a_burst_of_records_lets_the_loop_run_between_its_batches(io_loop):
    """Thousands of records in one read (10,000 clients leaving at once) are handled
    RECORDS_PER_STEP at a time, in order, with the loop's other callbacks between."""
    mine, theirs = socket.socketpair()
    order: list[str] = []

    def on_record(record: records.Received) -> None:
        assert isinstance(record, records.Count)
        if record.connections == 1:  # the first: something else asks for the loop now
            asyncio.get_running_loop().call_soon(order.append, "other")
        order.append(str(record.connections))

    link = Link(mine, on_record, lambda: None)
    total = 4 * RECORDS_PER_STEP
    try:
        theirs.sendall(b"".join(wire(b"C", str(n).encode()) for n in range(1, total + 1)))
        link.start()
        await wait_until(lambda: len(order) == total + 1)
    finally:
        link.close()
        theirs.close()
    assert [entry for entry in order if entry != "other"] == [str(n) for n in range(1, total + 1)]
    assert order.index("other") == RECORDS_PER_STEP  # after the first batch, not the last
