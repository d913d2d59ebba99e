"""PyMongo's condition waits, cancelled twice, leave their lock free (Python 3.11 fix).

The scenario that hung a test run: a task waits on one of PyMongo's conditions (the pool's,
or server selection's) while others hold and queue for its lock, and is cancelled twice
before its wait has ended. With Python 3.11's ``asyncio.wait_for`` the lock stayed locked
with no task left to release it; ``shared.mongo`` makes the wait run in the caller's task.
"""

from __future__ import annotations

import asyncio

import pymongo.lock
from pymongo._asyncio_lock import Condition, Lock

import shared.mongo  # noqa: F401  (importing it makes the waits cancel safely)


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _leaves_the_lock_locked() -> bool:
    condition = Condition(Lock())

    async def waiter() -> None:
        async with condition:
            await pymongo.lock._async_cond_wait(condition, 10)

    async def holder(until: asyncio.Event) -> None:
        async with condition:
            await until.wait()

    waiting = asyncio.create_task(waiter())
    await _turns()  # waiting on the condition, the lock let go
    first_holder_done = asyncio.Event()
    first = asyncio.create_task(holder(first_holder_done))
    await _turns()  # the lock held by another task
    free = asyncio.Event()
    free.set()
    second = asyncio.create_task(holder(free))
    await _turns()  # and a third task queued for it
    waiting.cancel()
    await asyncio.sleep(0)  # the wait is cancelled and goes back for the lock
    waiting.cancel()  # cancelled again before it has it
    first_holder_done.set()
    await asyncio.gather(waiting, first, second, return_exceptions=True)
    await _turns(20)
    return condition.locked()


async def test_a_condition_wait_cancelled_twice_leaves_the_lock_free() -> None:
    assert not await _leaves_the_lock_locked()


async def test_a_condition_wait_still_times_out() -> None:
    condition = Condition(Lock())
    async with condition:
        assert await pymongo.lock._async_cond_wait(condition, 0.01) is False
    assert not condition.locked()
