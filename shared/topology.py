"""Broker topology, declared by code at startup (idempotent).

- one durable topic exchange for domain events (routing key = event type);
- per work queue ``<service>.<purpose>``: a durable quorum queue with an explicit
  delivery limit and at-least-once dead lettering into the dead-letter exchange;
- its dead-letter queue ``<queue>.dlq`` (quorum);
- retry tiers ``<queue>.retry.<n>``: quorum queues with a message TTL that dead-letter
  back to the work queue through the default exchange (no plugin needed on 3.10).

A ``namespace`` prefixes every name, so tests (and side-by-side deployments) are
isolated on one broker.
"""

from __future__ import annotations

from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue


@dataclass(frozen=True)
class RetryPolicy:
    """How a transient failure is retried: delays between attempts, then dead letter."""

    delays_s: tuple[float, ...] = (1.0, 5.0, 30.0)
    max_attempts: int = 5

    def delay_tier(self, failed_attempts: int) -> int:
        """Index of the retry tier after ``failed_attempts`` failures (1-based)."""
        return min(failed_attempts, len(self.delays_s)) - 1


@dataclass(frozen=True)
class Naming:
    """Names of the shared exchanges, under an optional namespace prefix."""

    namespace: str = ""

    @property
    def events_exchange(self) -> str:
        return f"{self.namespace}grantwire.events"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}grantwire.dead-letters"

    @property
    def event_log(self) -> str:
        return f"{self.namespace}grantwire.events.log"

    def queue(self, service: str, purpose: str) -> str:
        return f"{self.namespace}{service}.{purpose}"


@dataclass(frozen=True)
class WorkQueue:
    """A service's work queue and the event types bound to it."""

    service: str
    purpose: str
    event_types: tuple[str, ...]

    def name(self, naming: Naming) -> str:
        return naming.queue(self.service, self.purpose)

    def dlq_name(self, naming: Naming) -> str:
        return f"{self.name(naming)}.dlq"

    def retry_name(self, naming: Naming, tier: int) -> str:
        return f"{self.name(naming)}.retry.{tier}"


DEFAULT_DELIVERY_LIMIT = 20


async def declare_exchanges(
    channel: AbstractChannel, naming: Naming
) -> tuple[AbstractExchange, AbstractExchange]:
    """Declare the events topic exchange and the dead-letter direct exchange."""
    events = await channel.declare_exchange(
        naming.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dead_letters = await channel.declare_exchange(
        naming.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    return events, dead_letters


async def declare_event_log(
    channel: AbstractChannel, naming: Naming, max_age: str = "7D"
) -> AbstractQueue:
    """A stream bound to every event: a retained log of all events for operators.

    It also makes every well-formed event routable, so an event with no consumer yet
    (``billing.credits_granted`` before any team subscribes) is kept, not returned;
    ``mandatory`` then only fires on real misrouting (a wrong exchange or namespace).
    """
    events, _ = await declare_exchanges(channel, naming)
    log = await channel.declare_queue(
        naming.event_log,
        durable=True,
        arguments={
            "x-queue-type": "stream",
            "x-max-age": max_age,
            "x-stream-max-segment-size-bytes": 50_000_000,
        },
    )
    await log.bind(events, routing_key="#")
    return log


async def declare_work_queue(
    channel: AbstractChannel,
    naming: Naming,
    work_queue: WorkQueue,
    retry: RetryPolicy,
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
) -> AbstractQueue:
    """Declare a work queue with its dead-letter queue and retry tiers; bind it."""
    events, dead_letters = await declare_exchanges(channel, naming)
    name = work_queue.name(naming)
    dlq_name = work_queue.dlq_name(naming)
    dlq = await channel.declare_queue(dlq_name, durable=True, arguments={"x-queue-type": "quorum"})
    await dlq.bind(dead_letters, routing_key=dlq_name)
    queue = await channel.declare_queue(
        name,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": naming.dead_letter_exchange,
            "x-dead-letter-routing-key": dlq_name,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )
    for event_type in work_queue.event_types:
        await queue.bind(events, routing_key=event_type)
    for tier, delay in enumerate(retry.delays_s):
        await channel.declare_queue(
            work_queue.retry_name(naming, tier),
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-message-ttl": max(1, int(delay * 1000)),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": name,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
    return queue


async def delete_work_queue(
    channel: AbstractChannel, naming: Naming, work_queue: WorkQueue, retry: RetryPolicy
) -> None:
    """Delete a work queue, its dead-letter queue and its retry tiers (tests, teardown)."""
    names = [work_queue.name(naming), work_queue.dlq_name(naming)]
    names += [work_queue.retry_name(naming, tier) for tier in range(len(retry.delays_s))]
    for queue_name in names:
        await channel.queue_delete(queue_name)
