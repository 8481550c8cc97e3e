"""The garbage collector policy (ebbcast.serving.gcpolicy)."""

from __future__ import annotations

from helpers import wait_until




async def test_collector_policy_freezes_newcomers_and_unfreezes_on_stop(io_loop):
    import gc

    from ebbcast.serving.gcpolicy import CollectorPolicy

    policy = CollectorPolicy(lambda: 0, every=0.01)
    policy.start()
    try:
        assert gc.get_freeze_count() > 0  # start-up's objects are frozen at once
        before = gc.get_freeze_count()
        newcomers = [[] for _ in range(1000)]  # GC-tracked, like a connection's objects
        await wait_until(lambda: gc.get_freeze_count() >= before + 900)  # the next tick
        del newcomers
    finally:
        policy.stop()
    assert gc.get_freeze_count() == 0


def test_the_full_collection_waits_for_a_reconnect_storm_to_pass():
    from ebbcast.serving.gcpolicy import collect_now

    assert not collect_now(1900, 1900, 0)  # not yet doubled from the 1,000 floor
    assert not collect_now(2500, 2100, 0)  # doubled, but still growing: a storm
    assert collect_now(2500, 2500, 0)  # steady: now
    assert collect_now(2400, 2500, 0)  # shrinking: now
    assert not collect_now(9000, 9000, 5000) and collect_now(10_001, 10_001, 5000)
    assert not collect_now(2500, 2500, 0, quiet=False)  # a broadcast is being written
