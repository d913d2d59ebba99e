"""Durable publishing: persistent messages, publisher confirms, mandatory routing.

FastStream's and aio-pika's defaults publish transient messages and only log an
unroutable one; here an unroutable message raises ``UnroutableError`` and a broker
nack raises ``PublishRejectedError``, so a caller (the outbox relay) never marks as
sent what the broker did not take.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aiormq.exceptions import DeliveryError, PublishError

from shared.envelope import CONTENT_TYPE, Envelope


class UnroutableError(Exception):
    """The broker returned a mandatory message: no queue is bound for its routing key."""


class PublishRejectedError(Exception):
    """The broker nacked a message (for example a queue at its length limit)."""


def to_message(envelope: Envelope) -> aio_pika.Message:
    """The AMQP message of an envelope: persistent, id = CloudEvents id."""
    return aio_pika.Message(
        body=envelope.body,
        message_id=envelope.id,
        correlation_id=envelope.correlation_id,
        type=envelope.type,
        app_id=envelope.source,
        content_type=CONTENT_TYPE,
        timestamp=envelope.time,
        headers=envelope.headers(),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


class ConfirmingPublisher:
    """Publishes on its own confirming channel; safe to share within one process."""

    def __init__(self, channel: AbstractChannel, events: AbstractExchange) -> None:
        self._channel = channel
        self._events = events

    @classmethod
    async def open(
        cls, connection: AbstractConnection, events_exchange: str
    ) -> ConfirmingPublisher:
        """Open a channel with confirms and returns-as-errors on ``connection``."""
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        events = await channel.get_exchange(events_exchange, ensure=True)
        return cls(channel, events)

    @property
    def channel(self) -> AbstractChannel:
        return self._channel

    async def publish(self, envelope: Envelope, routing_key: str | None = None) -> None:
        """Publish one event to the events exchange and wait for its confirm."""
        await self._confirm(
            self._events, to_message(envelope), routing_key or envelope.type, envelope.type
        )

    async def publish_many(self, envelopes: Sequence[Envelope]) -> list[BaseException | None]:
        """Publish in order with pipelined confirms; one result (None = confirmed) each."""
        results = await asyncio.gather(
            *(self.publish(envelope) for envelope in envelopes), return_exceptions=True
        )
        return [r if isinstance(r, BaseException) else None for r in results]

    async def publish_message(
        self, message: aio_pika.Message, *, exchange: str, routing_key: str
    ) -> None:
        """Publish an already-built message (dead letters, retries, replays)."""
        target = (
            self._channel.default_exchange
            if exchange == ""
            else await self._channel.get_exchange(exchange, ensure=False)
        )
        await self._confirm(target, message, routing_key, routing_key)

    async def _confirm(
        self, exchange: AbstractExchange, message: aio_pika.Message, routing_key: str, what: Any
    ) -> None:
        try:
            await exchange.publish(message, routing_key=routing_key, mandatory=True)
        except PublishError as exc:
            raise UnroutableError(
                f"no queue bound for {what!r} on exchange {exchange.name!r}"
            ) from exc
        except DeliveryError as exc:
            raise PublishRejectedError(f"broker rejected {what!r}: {exc}") from exc
