"""Group commit for message handlers: concurrent calls share one batch of database work.

The consumer runs up to ``prefetch`` handlers at once, each for one message. A handler that
``submit``s its item to a ``GroupCommit`` waits while one batch runs at a time: whatever
arrived while the previous batch ran goes into the next one. At low load every batch holds
one item (no waiting, no timer); under load the batches grow, so the round trips per
message shrink with the load instead of adding to it.

Each caller gets its own item's result or exception back, so the consumer still acks,
retries or dead-letters each message on its own. ``run_batch`` returns one entry per item:
a result, or an exception for that item alone; raising fails every item of the batch.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from prometheus_client import Histogram

I = TypeVar("I")  # noqa: E741 - the item type
R = TypeVar("R")

BATCH_SIZE = Histogram(
    "grantwire_batch_size",
    "Items per group-commit batch (1 at low load; grows with the load).",
    ["batch"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)

RunBatch = Callable[[Sequence[I]], Awaitable[Sequence[R | BaseException]]]


class GroupCommit(Generic[I, R]):
    """Runs the items of concurrent callers in batches, one batch at a time."""

    def __init__(self, name: str, run_batch: RunBatch[I, R], *, max_batch: int = 128) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.name = name
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._pending: list[tuple[I, asyncio.Future[R]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def submit(self, item: I) -> R:
        """Run ``item`` in the next batch; its result, or its exception raised here.

        A caller that is cancelled (a handler timeout) stops waiting; its item still runs if
        its batch started, and the message's redelivery finds the work done.
        """
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._runner is None or self._runner.done():
            # A clean context: the batch belongs to no single message's trace or log context.
            self._runner = asyncio.create_task(
                self._drain(), name=f"group-commit:{self.name}", context=contextvars.Context()
            )
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            batch = [(item, future) for item, future in batch if not future.done()]
            if not batch:
                continue
            BATCH_SIZE.labels(self.name).observe(len(batch))
            try:
                results = await self._run_batch([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"{self.name}: run_batch returned {len(results)} results "
                        f"for {len(batch)} items"
                    )
            except asyncio.CancelledError:
                for _, future in batch + self._pending:
                    future.cancel()
                self._pending.clear()
                raise
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
