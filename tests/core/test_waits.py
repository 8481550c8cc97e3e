"""ebbcast.core.waits.within: a time limit that never swallows the caller's cancellation."""

from __future__ import annotations

import asyncio

import pytest

from ebbcast.core.waits import cancel_for_good, within

#: pytest-tornasync runs each test on the io_loop fixture's loop (without it, on the
#: "current" one, which Python 3.12+ warns about when no test before set one)
pytestmark = pytest.mark.usefixtures("io_loop")


async def test_the_result_comes_back_within_the_limit():
    assert await within(asyncio.sleep(0, "done"), 10) == "done"
    assert await within(asyncio.sleep(0, "no limit"), None) == "no limit"


async def test_time_up_raises_and_cancels_what_it_waited_for():
    never = asyncio.get_running_loop().create_future()
    with pytest.raises(asyncio.TimeoutError):
        await within(never, 0.01)
    assert never.cancelled()


async def test_an_exception_of_what_it_waited_for_is_raised():
    async def fails() -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        await within(fails(), 10)


async def test_a_cancellation_at_the_moment_the_wait_ends_reaches_the_caller():
    """What asyncio.wait_for (before Python 3.12) gets wrong: it returns the result
    and the caller never learns it was cancelled (Ctrl+C ignored, a stop hanging)."""
    fut = asyncio.get_running_loop().create_future()
    caller = asyncio.ensure_future(within(fut, 10))
    await asyncio.sleep(0)  # the caller waits now
    fut.set_result("just in time")
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller


async def test_a_cancelled_caller_cancels_what_it_waited_for():
    never = asyncio.get_running_loop().create_future()
    caller = asyncio.ensure_future(within(never, None))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert never.cancelled()


async def test_stopping_cancels_again_a_task_that_swallowed_its_cancellation():
    """As a redis-py command can: the cancellation lands inside it and it returns as
    if nothing happened, so the loop around it goes on."""
    rounds = 0

    async def heartbeat_like() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            try:
                await asyncio.sleep(3600)  # a command in flight
            except asyncio.CancelledError:
                if rounds == 1:
                    continue  # swallowed, the first time
                raise

    task = asyncio.ensure_future(heartbeat_like())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_for_good([task]), 10)
    assert task.cancelled() and rounds == 2


async def test_a_task_that_cleans_up_when_cancelled_is_let_finish():
    """Closing a connection in a ``finally`` takes an await or two: not cut short."""
    cleaned = False

    async def with_cleanup() -> None:
        nonlocal cleaned
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.05)  # well within RECANCEL_SECONDS (1 s)
            cleaned = True

    task = asyncio.ensure_future(with_cleanup())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_for_good([task]), 10)
    assert cleaned and task.cancelled()
