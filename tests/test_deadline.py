"""engine/deadline.py: asyncio.timeout_at's semantics, without asking for the loop."""

from __future__ import annotations

import asyncio

import pytest

from gateway.engine.deadline import Deadline


async def test_an_expired_deadline_leaves_the_block_as_timeout_error():
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        async with Deadline(loop, loop.time() + 0.01):
            await asyncio.Event().wait()
    assert asyncio.current_task().cancelling() == 0


async def test_a_block_done_in_time_is_untouched_and_the_timer_gone():
    loop = asyncio.get_running_loop()
    async with Deadline(loop, loop.time() + 0.01) as deadline:
        pass
    assert deadline._handle.cancelled()
    await asyncio.sleep(0.03)  # had the timer fired, this task would be cancelled here


async def test_reschedule_moves_the_deadline_later_and_earlier():
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with Deadline(loop, started + 0.02) as deadline:
            deadline.reschedule(started + 5.0)
            await asyncio.sleep(0.05)  # past the first deadline: not cancelled
            deadline.reschedule(loop.time())
            await asyncio.Event().wait()
    assert 0.05 <= loop.time() - started < 4.0


@pytest.mark.parametrize("scope", [Deadline, lambda loop, when: asyncio.timeout_at(when)],
                         ids=["Deadline", "asyncio.timeout_at"])
async def test_a_cancellation_from_elsewhere_stays_a_cancellation_even_if_both_fire(scope):
    loop = asyncio.get_running_loop()
    when = loop.time() + 0.01
    entered = asyncio.Event()

    async def guarded():
        async with scope(loop, when):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(guarded())
    await entered.wait()
    loop.call_at(when, task.cancel)  # the client goes in the same loop turn as the deadline
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
