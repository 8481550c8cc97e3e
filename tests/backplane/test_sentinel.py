"""The Redis backplane through Sentinel: a failover costs a gap of seconds, never a
lost, repeated or reordered message, nor a reused offset.

Real processes: a Redis master, its replica and a sentinel (tests/sentinels.py),
two ebbcast instances with ``redis+sentinel://`` URLs, ``websockets`` clients that
record every frame. The master is SIGKILLed; the sentinel promotes the replica.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ebbcast.values import SentinelURL, parse_sentinel_url
from helpers import (QUICK, STEP_TIMEOUT, DaemonProcess, port_below_ephemeral_range, dial, metric,
                     recv_frame, wait_for)
from sentinels import (FAILOVER_BOUND, MASTER_NAME, Cluster, Publisher, Recorder,
                       assert_honest, fail_over)


# -- the URL -------------------------------------------------------------------------

def test_a_sentinel_url_names_the_sentinels_the_master_the_db_and_the_password() -> None:
    assert parse_sentinel_url("redis+sentinel://:s3cret@10.0.0.1:26379,h2:26380/main/3") == \
        SentinelURL((("10.0.0.1", 26379), ("h2", 26380)), "main", 3, None, "s3cret", None)
    assert parse_sentinel_url("redis+sentinel://h:1/m?sentinel_password=x") == \
        SentinelURL((("h", 1),), "m", 0, None, None, "x")
    assert parse_sentinel_url("redis+sentinel://user:pw@[::1]:1/m").username == "user"


@pytest.mark.parametrize("url, reason", [
    ("redis+sentinel://h/m", "each sentinel must be HOST:PORT"),
    ("redis+sentinel://h:1", "the path must be /MASTER_NAME"),
    ("redis+sentinel://h:1/m/db", "the database must be a number"),
    ("redis+sentinel://h:99999/m", "each sentinel must be HOST:PORT"),
    ("redis+sentinel://h:1/m?password=x", "unknown query parameter(s): password"),
])
def test_a_bad_sentinel_url_is_refused_naming_why(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_sentinel_url(url)


# -- failovers -----------------------------------------------------------------------

@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path)
    yield made
    made.stop()


def instances(spawn: Any, cluster: Cluster) -> tuple[DaemonProcess, DaemonProcess]:
    env = {**QUICK, "EBBCAST_BACKPLANE_URL": cluster.url}
    one = spawn("--port", "0", "--admin-port", "0", env=env)
    two = spawn("--port", "0", "--admin-port", "0", "--workers", "2", env=env)
    for d in (one, two):
        wait_for(lambda: metric(d, "ebbcast_backplane_up") == 1)
    return one, two


def test_a_failover_resumes_cross_instance_delivery_with_honest_offsets(spawn, cluster):
    one, two = instances(spawn, cluster)
    publisher, near, far = Publisher(one.ws_url), Recorder(one.ws_url), Recorder(two.ws_url)
    resuming = dial(two.ws_url)
    welcome = recv_frame(resuming, "welcome")
    wait_for(lambda: len(far.numbers()) >= 20)
    before = recv_frame(resuming)  # a message with its offset, before the failover
    resuming.close()
    gap = fail_over(cluster, publisher, far)
    print(f"\nSIGKILL of the master: no cross-instance delivery for {gap:.2f} s")
    assert gap < FAILOVER_BOUND
    for d in (one, two):
        wait_for(lambda: metric(d, "ebbcast_backplane_up") == 1)
        wait_for(lambda: metric(d, "ebbcast_backplane_failovers_total") == 1)
        d.wait_for_log(r"backplane: Redis failover: the master is now 127\.0\.0\.1:\d+")
    last = publisher.stop()
    for recorder in (publisher, near, far):
        wait_for(lambda: last in recorder.numbers())
    print(f"published {last}; received across: {len(far.numbers())}")
    assert_honest([publisher, near, far])
    # what instance one could not sequence while there was no master was kept, and
    # crossed once the new master was named: every client has every number, once
    for recorder in (publisher, near, far):  # near and far joined after the first few
        numbers = recorder.numbers()
        assert numbers == list(range(numbers[0], last + 1))
    assert publisher.numbers()[0] == 1
    for d in (one, two):
        assert metric(d, "ebbcast_backplane_dropped_total") == 0
        assert metric(d, "ebbcast_backplane_missed_total") == 0
    # the promoted replica may lack what the old master handed out: a new epoch,
    # which every connected client was told of
    for recorder in (near, far):
        assert len(set(recorder.epochs())) == 2, recorder.epochs()
    # a client that left before the failover resumes: never "recovered" with a gap
    back = dial(f"{two.ws_url}?since={before['offset']}&epoch={welcome['epoch']}")
    resumed = recv_frame(back, "welcome")
    if resumed["recovered"]:
        replay = [recv_frame(back) for _ in range(resumed["missed"])]
        assert [m["offset"] for m in replay] == list(
            range(before["offset"] + 1, before["offset"] + 1 + resumed["missed"]))
    else:
        assert resumed["epoch"] != welcome["epoch"]
    back.close()
    for recorder in (publisher, near, far):
        recorder.close()


def test_the_old_master_returns_as_a_replica_and_a_second_failover_goes_back(spawn,
                                                                            cluster):
    one, two = instances(spawn, cluster)
    publisher, far = Publisher(one.ws_url), Recorder(two.ws_url)
    wait_for(lambda: len(far.numbers()) >= 10)
    first = cluster.current_master()
    fail_over(cluster, publisher, far)
    first.args = ["--replicaof", "127.0.0.1", str(cluster.current_master().port)]
    first.start()  # on its port again, as a replica of the new master
    wait_for(lambda: cluster.sentinel.replicas_in_sync() == 1, timeout=STEP_TIMEOUT * 2)
    gap = fail_over(cluster, publisher, far, kill=False)
    print(f"\nmanual failover back to the first master: no cross-instance delivery for "
          f"{gap:.2f} s")
    assert gap < FAILOVER_BOUND
    assert cluster.current_master() is first
    for d, processes in ((one, 1), (two, 2)):
        wait_for(lambda: metric(d, "ebbcast_backplane_failovers_total") == 2)
        wait_for(lambda: sum(f"the master is now 127.0.0.1:{first.port}" in line
                             for line in d.lines) == processes)
    # every process has moved: from now on, everything crosses (a message sequenced
    # on the old master while it was still writable, just before an instance moved,
    # reaches only that instance's clients: see docs/operations.md)
    settled = publisher.sent
    wait_for(lambda: far.first_after(settled + 5) is not None)
    last = publisher.stop()
    for recorder in (publisher, far):
        wait_for(lambda: last in recorder.numbers())
    assert_honest([publisher, far])
    assert len(set(far.epochs())) == 3  # one per master
    for recorder in (publisher, far):
        recorder.close()


def test_sentinels_all_down_at_start_are_logged_once_served_locally_and_retried(
        spawn, tmp_path):
    port = port_below_ephemeral_range()  # where the sentinel will be, later
    url = f"redis+sentinel://127.0.0.1:{port}/{MASTER_NAME}"
    d = spawn("--port", "0", "--admin-port", "0",
              env={**QUICK, "EBBCAST_BACKPLANE_URL": url})
    d.wait_for_log(r"backplane unreachable: master 'mymaster' of sentinels 127\.0\.0\.1:\d+")
    ws = dial(d.ws_url)
    recv_frame(ws, "welcome")
    ws.send("local")
    assert recv_frame(ws)["text"] == "local"  # local delivery, without the backplane
    assert metric(d, "ebbcast_backplane_up") == 0
    cluster = Cluster(tmp_path, sentinel_port=port)
    try:
        d.wait_for_log(r"backplane connected: master 'mymaster'", timeout=STEP_TIMEOUT * 2)
        wait_for(lambda: metric(d, "ebbcast_backplane_up") == 1)
        assert sum("backplane unreachable" in line for line in d.lines) == 1
    finally:
        cluster.stop()
        ws.close()
