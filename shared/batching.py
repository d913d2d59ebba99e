"""Group commit for message handlers: concurrent calls share one batch of database work.

The consumer runs up to ``prefetch`` handlers at once, each for one message. A handler that
``submit``s its item to a ``GroupCommit`` waits while up to ``concurrency`` batches run at once:
whatever arrived while they ran goes into the next one, and so do the items submitted in
the same turn of the event loop (the handlers of messages that came in one read from the
broker: billing's ``organization.created`` and ``organization.provisioned`` of one
organization, say). At low load every batch holds one item (no timer, no waiting beyond
that turn); under load the batches grow, so the round trips per message shrink with the
load instead of adding to it.

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
    """Runs the items of concurrent callers in batches, at most ``concurrency`` at a time."""

    def __init__(
        self,
        name: str,
        run_batch: RunBatch[I, R],
        *,
        max_batch: int = 128,
        concurrency: int = 1,
    ) -> None:
        if max_batch < 1 or concurrency < 1:
            raise ValueError("max_batch and concurrency must be at least 1")
        self.name = name
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._concurrency = concurrency
        # Batches run in the context of whoever built the group (the process's log context,
        # e.g. ``service``), not in the first caller's: a batch belongs to no one message.
        self._context = contextvars.copy_context()
        self._pending: list[tuple[I, asyncio.Future[R]]] = []
        self._running: dict[asyncio.Task[None], list[asyncio.Future[R]]] = {}
        # Batches this group has cancelled: callers giving up together cancel a batch once
        # (a second cancel while it unwinds can strand a database driver's lock, see
        # shared.mongo); the task's own ``cancelling()`` would also count a time limit's.
        self._cancelled: set[asyncio.Task[None]] = set()
        self._dispatch_scheduled_on: asyncio.AbstractEventLoop | None = None

    async def submit(self, item: I) -> R:
        """Run ``item`` in the next batch; its result, or its exception raised here.

        A caller that is cancelled (a handler timeout) stops waiting. When every caller of
        a running batch gave up, the batch is cancelled too (as a lone handler's database
        call would be); otherwise it runs on, and a redelivery finds the item's work done.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, future))
        if self._dispatch_scheduled_on is not loop:
            # After the handlers already scheduled for this turn of the loop (messages that
            # came in one read from the broker) have submitted theirs: one batch for them.
            # (Keyed by loop: a loop closed with the call pending does not strand the group.)
            self._dispatch_scheduled_on = loop
            loop.call_soon(self._dispatch_now, context=self._context.copy())
        try:
            return await future
        except asyncio.CancelledError:
            for task, futures in self._running.items():
                if (
                    future in futures
                    and all(f.done() for f in futures)
                    and task not in self._cancelled
                ):
                    self._cancelled.add(task)
                    task.cancel()
            raise

    def _dispatch_now(self) -> None:
        self._dispatch_scheduled_on = None
        self._dispatch()

    def _dispatch(self) -> None:
        """Start batches of what is pending while fewer than ``concurrency`` run."""
        while self._pending and len(self._running) < self._concurrency:
            taken = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            batch = [(item, future) for item, future in taken if not future.done()]
            if not batch:
                continue
            BATCH_SIZE.labels(self.name).observe(len(batch))
            task = asyncio.create_task(
                self._run(batch), name=f"group-commit:{self.name}", context=self._context.copy()
            )
            self._running[task] = [future for _, future in batch]
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._cancelled.discard(task)
        for future in self._running.pop(task, []):
            if not future.done():  # the batch was cancelled
                future.cancel()
        self._dispatch()

    async def _run(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        """Run one batch and settle its callers (each with its own result or exception)."""
        try:
            results = await self._run_batch([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(
                    f"{self.name}: run_batch returned {len(results)} results for {len(batch)} items"
                )
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
