"""Acks of messages that finish together leave as one ``basic.ack`` with ``multiple``.

A batch of handlers (``shared/batching.py``) finishes in one event-loop turn; acking each
of its messages on its own costs a frame, a socket write and broker work per message. The
``AckCoalescer`` collects the acks asked for in one turn and, on the next, sends one
``basic.ack(multiple=True)`` for the longest run of consecutive delivery tags that are all
ready, from the oldest unsettled delivery on, and a plain ack for every other ready tag.

Never acked by mistake:
- ``multiple`` covers exactly a run of consecutive tags, all registered and all ready: a
  delivery still being handled, being nacked or re-published (retry, dead letter) stops
  the run, so the broker never reads an ack for a message whose handler did not succeed;
- tags belong to a channel: each channel has its own state, and a closed channel's acks
  fail (its messages come back, as without coalescing);
- a channel's ack frames are sent one at a time, in the order they were decided: the
  client's write queue does not keep the order of writers waiting for room, and a
  ``multiple`` ack overtaking a single ack of a tag it covers would make the broker close
  the channel (unknown delivery tag).
- Nothing waits on a slow message: ready tags behind one are acked on their own at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractIncomingMessage


@dataclass
class _ChannelAcks:
    delivered: deque[int] = field(default_factory=deque)  # unsettled tags, oldest first
    done: set[int] = field(default_factory=set)  # settled otherwise (nack, own ack)
    ready: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    flush_scheduled: bool = False
    sending: asyncio.Lock = field(default_factory=asyncio.Lock)  # frames leave in order


class AckCoalescer:
    """Coalesces the acks of one consumer's messages, per channel."""

    def __init__(self) -> None:
        self._channels: weakref.WeakKeyDictionary[Any, _ChannelAcks] = weakref.WeakKeyDictionary()
        self.frames_sent = 0  # ack frames written (for tests and curiosity)

    def _state(self, message: AbstractIncomingMessage) -> _ChannelAcks:
        channel = message.channel
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _ChannelAcks()
        return state

    def delivered(self, message: AbstractIncomingMessage) -> None:
        """Register a delivery, before anything can settle it."""
        # A channel closed meanwhile has no state worth keeping: its messages come back.
        with contextlib.suppress(Exception):
            if message.delivery_tag is not None:
                self._state(message).delivered.append(message.delivery_tag)

    def settled(self, message: AbstractIncomingMessage) -> None:
        """The message was settled without this coalescer (a nack, or an ack of its own)."""
        if message.delivery_tag is not None:
            self._state(message).done.add(message.delivery_tag)

    async def ack(self, message: AbstractIncomingMessage) -> None:
        """Ack ``message`` with the others acked in this turn; returns once its frame is sent."""
        tag = message.delivery_tag
        if tag is None:  # not a consumed delivery (nothing to coalesce with)
            await message.ack()
            return
        state = self._state(message)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.ready[tag] = future
        if not state.flush_scheduled:
            state.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, message.channel, state)
        await future

    def _flush(self, channel: Any, state: _ChannelAcks) -> None:
        state.flush_scheduled = False
        if not state.ready:
            return
        run: list[int] = []  # consecutive ready tags from the oldest unsettled delivery
        previous: int | None = None
        while state.delivered:
            head = state.delivered[0]
            if head in state.done:
                state.delivered.popleft()
                state.done.discard(head)
                previous = None  # a settled tag breaks the run: multiple would cover it
                if run:
                    break
                continue
            if head not in state.ready or (previous is not None and head != previous + 1):
                break
            run.append(state.delivered.popleft())
            previous = head
        sends: list[tuple[int, bool, list[asyncio.Future[None]]]] = []
        if run:
            sends.append((run[-1], len(run) > 1, [state.ready.pop(t) for t in run]))
        for tag in sorted(state.ready):  # ready behind something unsettled: one by one
            sends.append((tag, False, [state.ready.pop(tag)]))
            state.done.add(tag)
        for tag, multiple, futures in sends:
            # Tasks start in creation order and the lock serves waiters first come, first
            # served: the frames leave in this order.
            asyncio.get_running_loop().create_task(
                self._send(channel, state.sending, tag, multiple, futures)
            )

    async def _send(
        self,
        channel: Any,
        sending: asyncio.Lock,
        tag: int,
        multiple: bool,
        futures: list[asyncio.Future[None]],
    ) -> None:
        try:
            async with sending:
                await channel.basic_ack(delivery_tag=tag, multiple=multiple)
            self.frames_sent += 1
        except BaseException as exc:
            for future in futures:
                if not future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for future in futures:
            if not future.done():
                future.set_result(None)
