"""Coalesced acks on the real RabbitMQ: one frame for a batch, and never an ack too many.

Each test consumes a private classic queue with manual acks, settles some messages through
the ``AckCoalescer``, closes the channel, and reads back what the broker redelivers: exactly
the messages that were not acked.
"""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from shared.acks import AckCoalescer
from tests.support import wait_until

pytestmark = pytest.mark.integration
N = 20


async def deliver(
    connection: AbstractRobustConnection, queue_name: str
) -> tuple[aio_pika.abc.AbstractChannel, list[AbstractIncomingMessage], AckCoalescer]:
    """N messages in a new queue, all delivered (unacked) to a fresh channel."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=100)
    queue = await channel.declare_queue(queue_name, auto_delete=False, durable=False)
    for i in range(N):
        await channel.default_exchange.publish(
            aio_pika.Message(body=str(i).encode()), routing_key=queue_name
        )
    coalescer = AckCoalescer()
    delivered: list[AbstractIncomingMessage] = []

    async def on_message(message: AbstractIncomingMessage) -> None:
        coalescer.delivered(message)
        delivered.append(message)

    await queue.consume(on_message)
    await wait_until(lambda: asyncio.sleep(0, len(delivered) == N), timeout=10)
    return channel, delivered, coalescer


async def redelivered(connection: AbstractRobustConnection, queue_name: str) -> list[int]:
    """Bodies of what the queue holds once the consuming channel is gone (then delete it)."""
    channel = await connection.channel()
    queue = await channel.declare_queue(queue_name, auto_delete=False, durable=False)
    bodies = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        bodies.append(int(message.body))
    await queue.delete(if_unused=False, if_empty=False)
    await channel.close()
    return sorted(bodies)


async def test_a_batch_finishing_together_is_acked_with_one_frame(
    amqp: AbstractRobustConnection,
) -> None:
    name = f"acks-{uuid.uuid4().hex[:8]}"
    channel, messages, coalescer = await deliver(amqp, name)

    await asyncio.gather(*(coalescer.ack(m) for m in messages))

    assert coalescer.frames_sent == 1
    await channel.close()
    assert await redelivered(amqp, name) == []


async def test_an_unsettled_or_nacked_message_is_never_covered_by_a_multiple_ack(
    amqp: AbstractRobustConnection,
) -> None:
    name = f"acks-{uuid.uuid4().hex[:8]}"
    channel, messages, coalescer = await deliver(amqp, name)
    still_handling = messages[0]  # the oldest delivery: it blocks the run
    nacked = messages[10]
    await nacked.nack(requeue=False)  # dropped, as a dead letter would be
    coalescer.settled(nacked)
    rest = [m for m in messages if m not in (still_handling, nacked)]

    await asyncio.gather(*(coalescer.ack(m) for m in rest))

    assert coalescer.frames_sent == len(rest)  # behind an unsettled one: each on its own
    await channel.close()
    assert await redelivered(amqp, name) == [0]  # only the one still being handled


async def test_the_run_stops_at_a_settled_tag_and_the_rest_is_acked_alone(
    amqp: AbstractRobustConnection,
) -> None:
    name = f"acks-{uuid.uuid4().hex[:8]}"
    channel, messages, coalescer = await deliver(amqp, name)
    await messages[5].nack(requeue=False)
    coalescer.settled(messages[5])
    first_run = [m for m in messages[:5]]
    await asyncio.gather(*(coalescer.ack(m) for m in first_run))
    assert coalescer.frames_sent == 1  # tags 1-5: one multiple ack

    await asyncio.gather(*(coalescer.ack(m) for m in messages[6:]))

    assert coalescer.frames_sent == 2  # the settled tag was passed over, then one run again
    await channel.close()
    assert await redelivered(amqp, name) == []
