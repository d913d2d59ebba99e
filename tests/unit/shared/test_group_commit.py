"""GroupCommit: concurrent callers share batches; each gets its own result or error back."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence

import pytest

from shared.batching import GroupCommit


class Recorder:
    """A batch function that records its batches and can be held open."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.started = asyncio.Event()
        self.cancelled = 0
        self.cancel_requests: list[int] = []

    async def __call__(self, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            task = asyncio.current_task()
            assert task is not None
            self.cancel_requests.append(task.cancelling())
            raise
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


async def test_a_lone_call_runs_at_once_as_a_batch_of_one() -> None:
    run = Recorder()
    group = GroupCommit[int, int]("t", run)
    assert await group.submit(4) == 40
    assert run.batches == [[4]]


async def test_calls_arriving_while_a_batch_runs_share_the_next_one() -> None:
    run = Recorder()
    run.release.clear()
    group = GroupCommit[int, int]("t", run, max_batch=3)
    first = asyncio.create_task(group.submit(1))
    await run.started.wait()
    rest = [asyncio.create_task(group.submit(i)) for i in range(2, 7)]
    await asyncio.sleep(0)
    run.release.set()
    assert await asyncio.gather(first, *rest) == [10, 20, 30, 40, 50, 60]
    assert run.batches == [[1], [2, 3, 4], [5, 6]]  # max_batch bounds each batch


async def test_each_caller_gets_its_own_error_and_the_others_their_results() -> None:
    group = GroupCommit[int, int]("t", Recorder())
    results = await asyncio.gather(
        group.submit(1), group.submit(-2), group.submit(3), return_exceptions=True
    )
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad -2"


async def test_a_batch_that_raises_fails_its_callers_and_the_next_batch_still_runs() -> None:
    calls: list[list[int]] = []

    async def broken_once(items: Sequence[int]) -> list[int | BaseException]:
        calls.append(list(items))
        if len(calls) == 1:
            raise ConnectionError("database away")
        return list(items)

    group = GroupCommit[int, int]("t", broken_once)
    with pytest.raises(ConnectionError):
        await group.submit(1)
    assert await group.submit(2) == 2


async def test_a_wrong_number_of_results_is_an_error_not_a_silent_mismatch() -> None:
    async def short(items: Sequence[int]) -> list[int | BaseException]:
        return []

    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        await GroupCommit[int, int]("t", short).submit(1)


async def test_when_every_caller_gives_up_the_running_batch_is_cancelled() -> None:
    run = Recorder()
    run.release.clear()
    group = GroupCommit[int, int]("t", run)
    caller = asyncio.create_task(group.submit(1))
    await run.started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.sleep(0)
    assert run.cancelled == 1
    run.release.set()
    assert await group.submit(2) == 20  # the group goes on


async def test_callers_giving_up_together_cancel_their_batch_once() -> None:
    # Cancelling a task twice is what left a PyMongo lock held for ever (see shared.mongo).
    run = Recorder()
    run.release.clear()
    group = GroupCommit[int, int]("t", run)
    callers = [asyncio.create_task(group.submit(i)) for i in (1, 2, 3)]
    await run.started.wait()
    assert run.batches == [[1, 2, 3]]
    for caller in callers:
        caller.cancel()  # one handler time limit, three handlers
    await asyncio.gather(*callers, return_exceptions=True)
    await asyncio.sleep(0)
    assert run.cancel_requests == [1]


async def test_a_batch_unwinding_its_own_time_limit_is_still_cancelled_when_callers_give_up() -> (
    None
):
    # While a time limit inside the batch has fired and not yet ended, the task counts a cancel
    # request of its own; its callers giving up must still cancel it.
    unwinding = asyncio.Event()
    outcome: list[str] = []

    async def run(items: Sequence[int]) -> list[int | BaseException]:
        try:
            async with asyncio.timeout(0.01):
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    unwinding.set()  # like a driver taking its lock back before it leaves
                    await asyncio.sleep(3600)
                    raise
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        return list(items)

    group = GroupCommit[int, int]("t", run)
    caller = asyncio.create_task(group.submit(1))
    await asyncio.wait_for(unwinding.wait(), 5)
    caller.cancel()
    await asyncio.gather(caller, return_exceptions=True)
    for _ in range(10):
        await asyncio.sleep(0)
    assert outcome == ["cancelled"]


async def test_a_batch_with_a_caller_still_waiting_runs_on_for_it() -> None:
    run = Recorder()
    run.release.clear()
    group = GroupCommit[int, int]("t", run)
    blocker = asyncio.create_task(group.submit(0))
    await run.started.wait()
    quitter = asyncio.create_task(group.submit(1))
    stayer = asyncio.create_task(group.submit(2))
    await asyncio.sleep(0)
    run.release.set()
    await blocker
    run.release.clear()
    run.started.clear()
    await run.started.wait()  # the batch [1, 2] is running
    quitter.cancel()
    await asyncio.sleep(0)
    run.release.set()
    assert await stayer == 20 and run.cancelled == 0
    assert quitter.cancelled()


async def test_with_concurrency_two_a_second_batch_starts_while_the_first_runs() -> None:
    run = Recorder()
    run.release.clear()
    group = GroupCommit[int, int]("t", run, concurrency=2)
    first = asyncio.create_task(group.submit(1))
    await run.started.wait()
    second = asyncio.create_task(group.submit(2))
    for _ in range(5):  # let the submitted task and the batch tasks run to their waits
        await asyncio.sleep(0)
    third = asyncio.create_task(group.submit(3))
    for _ in range(5):
        await asyncio.sleep(0)
    assert run.batches == [[1], [2]]  # two running; 3 waits for a free slot
    run.release.set()
    assert await asyncio.gather(first, second, third) == [10, 20, 30]
    assert run.batches == [[1], [2], [3]]


async def test_items_submitted_in_one_turn_of_the_loop_share_a_batch_while_slots_are_free() -> None:
    # Messages that come in one read from the broker start their handlers in one turn.
    run = Recorder()
    group = GroupCommit[int, int]("t", run, concurrency=4)
    results = await asyncio.gather(group.submit(1), group.submit(2), group.submit(3))
    assert results == [10, 20, 30]
    assert run.batches == [[1, 2, 3]]


@pytest.mark.parametrize("bad", [{"max_batch": 0}, {"concurrency": 0}])
async def test_max_batch_and_concurrency_must_be_positive(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        GroupCommit[int, int]("t", Recorder(), **bad)


async def test_batches_run_in_the_builders_context_not_the_first_callers() -> None:
    where: contextvars.ContextVar[str] = contextvars.ContextVar("where", default="-")
    seen: list[str] = []

    async def record(items: Sequence[int]) -> list[int | BaseException]:
        seen.append(where.get())
        return list(items)

    where.set("process")  # e.g. the log context's service
    group = GroupCommit[int, int]("t", record)

    async def caller() -> int:
        where.set("message 1")  # e.g. one message's trace
        return await group.submit(1)

    assert await asyncio.create_task(caller()) == 1
    assert seen == ["process"]
