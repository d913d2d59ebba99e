"""The coalescer's frames leave one at a time, in the order they were decided (a fake channel
whose writes take varying time stands in for aiormq's bounded write queue)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any, cast

from aio_pika.abc import AbstractIncomingMessage

from shared.acks import AckCoalescer


@dataclass(eq=False)
class SlowChannel:
    """Records each ack when its (randomly slow) write finishes."""

    written: list[tuple[int, bool]] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        await asyncio.sleep(self.rng.random() / 1000)
        self.written.append((delivery_tag, multiple))


@dataclass
class Delivery:
    channel: SlowChannel
    delivery_tag: int


def message(channel: SlowChannel, tag: int) -> AbstractIncomingMessage:
    return cast(AbstractIncomingMessage, Delivery(channel, tag))


async def test_single_acks_decided_first_are_written_before_a_later_multiple_ack() -> None:
    channel = SlowChannel()
    coalescer = AckCoalescer()
    messages = [message(channel, tag) for tag in range(1, 41)]
    for m in messages:
        coalescer.delivered(m)
    head, middle, tail = messages[0], messages[1:20], messages[20:]

    individually = [asyncio.ensure_future(coalescer.ack(m)) for m in middle]  # behind the head
    for _ in range(2):  # their acks are asked for, then flushed: one frame each, sending
        await asyncio.sleep(0)
    coalescer.settled(head)  # e.g. nacked
    await asyncio.gather(*individually, *(coalescer.ack(m) for m in tail))

    assert channel.written == [(tag, False) for tag in range(2, 21)] + [(40, True)]


async def test_a_failed_write_fails_the_acks_it_carried() -> None:
    class ClosedChannel(SlowChannel):
        async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
            raise RuntimeError("channel closed")

    channel: Any = ClosedChannel()
    coalescer = AckCoalescer()
    messages = [message(channel, tag) for tag in (1, 2, 3)]
    for m in messages:
        coalescer.delivered(m)

    results = await asyncio.gather(*(coalescer.ack(m) for m in messages), return_exceptions=True)

    assert [type(r) for r in results] == [RuntimeError] * 3
    assert coalescer.frames_sent == 0
