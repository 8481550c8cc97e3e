"""The connection registry (ebbcast.serving.registry) and the client rate limit
(ebbcast.serving.ratelimit)."""

from __future__ import annotations

from ebbcast.serving.ratelimit import TokenBucket
from ebbcast.serving.registry import ConnectionRegistry


async def test_registry_tracks_members_snapshot_and_emptiness(io_loop):
    counts: list[int] = []
    registry: ConnectionRegistry[str] = ConnectionRegistry(counts.append)
    await registry.wait_empty()  # empty at once
    registry.add("a")
    registry.add("b")
    registry.add("a")  # twice is once
    snap = registry.snapshot()
    assert snap == ("a", "b") and registry.snapshot() is snap  # cached while unchanged
    assert registry.discard("a") and not registry.discard("a")
    assert snap == ("a", "b") and registry.snapshot() == ("b",)
    assert len(registry) == 1 and "b" in registry
    registry.discard("b")
    await registry.wait_empty()
    assert counts == [1, 2, 1, 0]


class Conn:
    def __init__(self, client_id: str) -> None:
        self.client_id = client_id


async def test_keyed_finds_a_client_ids_connections_as_they_join_and_leave(io_loop):
    """The index a direct message uses instead of a scan: one connection per id, or
    several sharing one, in the order they joined; gone when they leave."""
    registry: ConnectionRegistry[Conn] = ConnectionRegistry(key=lambda c: c.client_id)
    alice, bob, alice2, alice3 = Conn("alice"), Conn("bob"), Conn("alice"), Conn("alice")
    for conn in (alice, bob, alice2, alice3):
        registry.add(conn)
    registry.add(alice)  # twice is once, in the index too
    assert registry.keyed("alice") == (alice, alice2, alice3)
    assert registry.keyed("bob") == (bob,) and registry.keyed("carol") == ()
    registry.discard(alice2)
    assert registry.keyed("alice") == (alice, alice3)
    registry.discard(alice)
    assert registry.keyed("alice") == (alice3,)
    registry.discard(alice3)
    assert registry.discard(bob) and not registry.discard(bob)  # twice is safe
    assert registry.keyed("alice") == registry.keyed("bob") == () and len(registry) == 0
    assert registry._by_key == {}  # nothing left behind


def test_token_bucket_allows_burst_then_rate():
    bucket = TokenBucket(burst=3, now=0.0)
    assert [bucket.allow(0.0, 2.0, 3) for _ in range(4)] == [True, True, True, False]
    assert not bucket.allow(0.4, 2.0, 3)        # 0.8 tokens
    assert bucket.allow(0.5, 2.0, 3)            # 1.0 token
    assert bucket.allow(100.0, 2.0, 3) and bucket.allow(100.0, 2.0, 3)
    assert bucket.allow(100.0, 2.0, 3) and not bucket.allow(100.0, 2.0, 3)  # capped at 3
    assert all(bucket.allow(100.0, 0, 3) for _ in range(100))  # 0 = unlimited
