"""The Redis clients of one part of the backplane (ebbcast.backplane.redisclients),
with a real redis-server: every client made is closed at the end, and the scripts
are registered once."""

from __future__ import annotations

from helpers import ACL_USER
from ebbcast.backplane.redisclients import RedisClients
from ebbcast.backplane.sentinel import redis_target


def our_connections(redis_server) -> int:
    """Connections of the daemon's Redis user (the test's own client is another's)."""
    admin = redis_server.client()
    try:
        return sum(1 for c in admin.client_list() if c["user"] == ACL_USER)
    finally:
        admin.close()


async def test_every_client_made_is_closed_and_the_scripts_run_on_any(io_loop, redis_server):
    clients = RedisClients(redis_target(redis_server.url), {"double": "return ARGV[1] * 2"},
                           "test")
    made = [clients.new() for _ in range(3)]
    for client in made:
        assert await client.ping()  # each connects when first used
    assert our_connections(redis_server) == 3
    script = clients.scripts["double"]
    assert [await script(args=[21], client=client) for client in made] == [42, 42, 42]
    await clients.close(made[0])
    assert our_connections(redis_server) == 2
    await clients.close_all()
    assert our_connections(redis_server) == 0
    await clients.close_all()  # twice is harmless
