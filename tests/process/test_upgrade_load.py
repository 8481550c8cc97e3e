"""Ten upgrades in a row under load refuse and reset nothing.

A thousand clients stay connected and move on each shutdown frame, make before
break; a hammer completes handshakes at 250 a second (paced) throughout. Every handshake
must succeed, on one generation or the other. The figures (how long each
generation took to serve, how long the clients took to move) are recorded by
``bench/upgrade.py``, not asserted here.
"""

from __future__ import annotations

import asyncio

import pytest

from helpers import QUICK, metric, set_open_files_limit, status, wait_for
from wsload import upgrades_under_load

CLIENTS, UPGRADES, RATE = 1000, 10, 250.0  # paced at 250/s to achieve 200/s at least


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_ten_upgrades_under_a_connection_hammer_fail_no_handshake(spawn, workers):
    set_open_files_limit()
    d = spawn("--port", "0", "--admin-port", "0", "--workers", str(workers),
              "--drain-timeout", "60s",
              env={**QUIET_LOAD, "EBBCAST_SHUTDOWN_UPGRADE_SPREAD": "1s"})
    rounds, hammer, held = asyncio.run(upgrades_under_load(d, CLIENTS, UPGRADES, RATE,
                                                           move_timeout=30.0))
    print(f"\nworkers={workers}: {hammer.attempts} handshakes "
          f"({hammer.achieved_rate:.0f}/s), "
          f"{len(hammer.failures)} failed; " + ", ".join(
              f"gen {r.generation}: {r.ready_seconds:.2f}s + {r.moved_seconds:.2f}s"
              for r in rounds))
    assert hammer.failures == [] and held.failures == []
    assert held.close_reasons == []  # nobody was closed on: they all moved
    # every client moved in every upgrade; one whose move landed, at the switch, on a
    # connection the old generation had accepted is told to move once more
    assert len(held.moves) >= CLIENTS * UPGRADES
    assert [r.generation for r in rounds] == list(range(2, UPGRADES + 2))
    assert all(r.handshakes > 0 for r in rounds)  # the hammer ran through every upgrade
    assert hammer.attempts >= len(hammer.completed_at) > 0
    report = status(d)
    assert report["generation"] == UPGRADES + 1
    assert metric(d, 'ebbcast_upgrades_total{result="ok"}') == UPGRADES
    wait_for(lambda: status(d)["previous"] == [])  # every old generation has finished


QUIET_LOAD = {**QUICK,
              "EBBCAST_LIMITS_MESSAGES_PER_SECOND": "0"}
