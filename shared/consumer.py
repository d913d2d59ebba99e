"""The consumer policy every subscriber shares.

- Never ack before the handler returned (its effect is committed).
- A message that can never succeed (no id, unknown type, unknown major version,
  invalid JSON, schema violation, oversize, or a handler's ``PermanentError``) goes
  straight to the queue's dead-letter queue with the reason in its headers.
- Any other failure is transient: the message is re-published to a delay tier (a TTL
  queue that dead-letters back to the work queue) with an attempt counter, and after
  ``max_attempts`` it is dead-lettered.
- Failure headers (attempts, original exchange and routing key, first failure) are the
  consumer's own: they are read back only from a message returning from one of its retry
  tiers, never from what a publisher sent (that is a first attempt, wherever it claims to
  come from).
- The message id, body and properties are kept byte for byte on every hop.
- Acks of messages that finish in the same event-loop turn (a batch) leave as one frame
  (``shared/acks.py``); a nack, or a message still being handled, is never covered by it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from pydantic import ValidationError

from shared import metrics, tracing
from shared.acks import AckCoalescer
from shared.contracts import Event, major_version, model_for
from shared.envelope import Envelope, EnvelopeError
from shared.logging import message_outcome
from shared.publisher import ConfirmingPublisher
from shared.shutdown import STOP_STEP_TIMEOUT_S, bounded_step
from shared.topology import (
    DEFAULT_DELIVERY_LIMIT,
    Naming,
    RetryPolicy,
    WorkQueue,
    declare_work_queue,
)

Handler = Callable[[Event, Envelope], Awaitable[None]]

H_REASON = "x-grantwire-reason"
H_ERROR_TYPE = "x-grantwire-error-type"
H_ERROR_MESSAGE = "x-grantwire-error-message"
H_ATTEMPTS = "x-grantwire-attempts"
H_SERVICE = "x-grantwire-service"
H_QUEUE = "x-grantwire-queue"
H_ORIGINAL_EXCHANGE = "x-grantwire-original-exchange"
H_ORIGINAL_ROUTING_KEY = "x-grantwire-original-routing-key"
H_FIRST_FAILURE_AT = "x-grantwire-first-failure-at"
H_LAST_FAILURE_AT = "x-grantwire-last-failure-at"
H_LETTER_ID = "x-grantwire-letter-id"  # one per dead-lettering: the archive's identity of it
_BROKER_HEADERS = ("x-death", "x-first-death-", "x-last-death-")
_EXPIRED = "expired"  # the x-death reason of a message whose retry-tier delay ran out
_MAX_ERROR_TEXT = 1000


class PermanentError(Exception):
    """A message that can never succeed; it is dead-lettered with ``reason``, not retried."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ConsumerSettings:
    """Limits and retry behaviour of one consumer."""

    max_message_bytes: int = 256 * 1024
    prefetch: int = 32
    handler_timeout_s: float = 30.0
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    retry: RetryPolicy = field(default_factory=RetryPolicy)


class Consumer:
    """Consumes one work queue and dispatches each event type to its handler."""

    def __init__(
        self,
        *,
        service: str,
        connection: AbstractConnection,
        publisher: ConfirmingPublisher,
        naming: Naming,
        work_queue: WorkQueue,
        handlers: Mapping[str, Handler],
        settings: ConsumerSettings,
    ) -> None:
        self._service = service
        self._connection = connection
        self._publisher = publisher
        self._naming = naming
        self._work_queue = work_queue
        self._handlers = dict(handlers)
        self._settings = settings
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._acks = AckCoalescer()  # a batch's acks leave as one frame
        self._log = structlog.get_logger("grantwire.consumer").bind(
            service=service, queue=work_queue.name(naming)
        )

    @property
    def queue_name(self) -> str:
        return self._work_queue.name(self._naming)

    async def start(self) -> None:
        """Declare the topology and start consuming."""
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._settings.prefetch)
        queue = await declare_work_queue(
            channel,
            self._naming,
            self._work_queue,
            self._settings.retry,
            self._settings.delivery_limit,
        )
        self._channel = channel
        self._queue = queue
        self._consumer_tag = await queue.consume(self._on_message)
        metrics.CONSUMER_UP.labels(self._service, self.queue_name).set(1)

    @property
    def consuming(self) -> bool:
        """True while the consumer is registered on an open channel."""
        channel = self._channel
        return channel is not None and not channel.is_closed and self._consumer_tag is not None

    async def stop(
        self, timeout_s: float = 20.0, step_timeout_s: float = STOP_STEP_TIMEOUT_S
    ) -> None:
        """Stop taking messages, let in-flight ones finish, close the channel.

        In-flight messages get ``timeout_s``; each broker round trip (cancel, close) gets
        ``step_timeout_s``, so a stop finishes while the broker is away.
        """
        channel = self._channel
        if channel is None:
            return
        metrics.CONSUMER_UP.labels(self._service, self.queue_name).set(0)
        closed = channel.is_closed
        if closed:
            # The broker is away and our consumer went with the channel: no cancel can be
            # answered. Closing the channel now keeps a reconnection from restoring it.
            await self._close_channel(channel, step_timeout_s)
        elif self._queue is not None and self._consumer_tag is not None:
            # The declared (robust) queue forgets the consumer at once, so a reconnection
            # never restores it, then waits for the broker's CancelOk: bounded.
            await bounded_step(
                self._queue.cancel(self._consumer_tag),
                what="cancel consumer",
                log=self._log,
                timeout_s=step_timeout_s,
            )
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout_s)
        if not closed:
            await self._close_channel(channel, step_timeout_s)
        self._channel = None
        self._queue = None

    async def _close_channel(self, channel: AbstractChannel, timeout_s: float) -> None:
        await bounded_step(
            channel.close(), what="close consumer channel", log=self._log, timeout_s=timeout_s
        )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._acks.delivered(message)
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        in_flight = metrics.IN_FLIGHT.labels(self._service, self.queue_name)
        in_flight.inc()
        try:
            await self._process(message)
        finally:
            in_flight.dec()
            if task is not None:
                self._in_flight.discard(task)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        """Handle one message and settle it; one log line and one span per message."""
        started = time.perf_counter()
        event_type = message.type or "unknown"
        detail: dict[str, Any] = {}
        error: BaseException | None = None
        with tracing.consuming(
            message.headers,
            service=self._service,
            queue=self.queue_name,
            event_type=event_type,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
        ) as span:
            log = self._log.bind(
                event_id=message.message_id,
                event_type=event_type,
                correlation_id=message.correlation_id,
                **tracing.log_ids(span),
            )
            try:
                envelope, event, handler = self._decode(message)
                event_type = envelope.type
                log = log.bind(correlation_id=envelope.correlation_id)
                self._observe_age(envelope)
                with message_outcome() as reported:
                    async with asyncio.timeout(self._settings.handler_timeout_s):
                        await handler(event, envelope)
                if reported:
                    detail = {"handler": reported}
            except PermanentError as exc:
                error = exc
                detail = {"reason": exc.reason, "error": str(exc)}
                outcome = await self._dead_letter(message, reason=exc.reason, error=exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = exc
                outcome, detail = await self._retry_or_dead_letter(message, exc)
            else:
                await self._acks.ack(message)
                outcome = "handled"
            duration = time.perf_counter() - started
            tracing.settle(span, outcome, error)
        level = {"handled": "info", "retried": "warning"}.get(outcome, "error")
        getattr(log, level)(
            "message handled", outcome=outcome, duration_ms=round(duration * 1e3, 2), **detail
        )
        metrics.MESSAGES.labels(self._service, self.queue_name, event_type, outcome).inc()
        metrics.HANDLER_SECONDS.labels(self._service, self.queue_name, event_type).observe(duration)

    def _observe_age(self, envelope: Envelope) -> None:
        age = (datetime.now(UTC) - envelope.time).total_seconds()
        metrics.MESSAGE_AGE.labels(self._service, self.queue_name, envelope.type).observe(
            max(0.0, age)
        )

    def _decode(self, message: AbstractIncomingMessage) -> tuple[Envelope, Event, Handler]:
        """Envelope, event and handler of a message, or ``PermanentError`` why not."""
        if len(message.body) > self._settings.max_message_bytes:
            raise PermanentError(
                "oversize",
                f"body of {len(message.body)} bytes exceeds {self._settings.max_message_bytes}",
            )
        try:
            envelope = Envelope.from_amqp(
                body=message.body,
                message_id=message.message_id,
                headers=dict(message.headers or {}),
                correlation_id=message.correlation_id,
                message_type=message.type,
                timestamp=message.timestamp,
            )
        except EnvelopeError as exc:
            raise PermanentError("bad_envelope", str(exc)) from exc
        handler = self._handlers.get(envelope.type)
        if handler is None:
            raise PermanentError("unknown_event_type", f"no handler for {envelope.type!r}")
        model = model_for(envelope.type)
        try:
            known = major_version(envelope.schema_version) == major_version(model.schema_version)
        except ValueError:
            known = False
        if not known:
            raise PermanentError(
                "unsupported_version",
                f"{envelope.type} schema version {envelope.schema_version!r} is not "
                f"{major_version(model.schema_version)}.x",
            )
        media = (message.content_type or "application/json").split(";")[0].strip().lower()
        if media != "application/json":
            raise PermanentError(
                "unsupported_content_type",
                f"content type {message.content_type!r} is not application/json",
            )
        try:
            data = json.loads(envelope.body)
        except (ValueError, RecursionError) as exc:
            # ValueError covers bad JSON, bad UTF-8 and integers past Python's digit limit;
            # RecursionError, nesting deeper than the parser goes: none will ever parse.
            raise PermanentError("invalid_json", f"body is not JSON: {exc!s:.300}") from exc
        try:
            event = model.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<body>'}: {err['msg']}"
                for err in exc.errors()
            )
            raise PermanentError("schema_violation", problems) from exc
        return envelope, event, handler

    async def _retry_or_dead_letter(
        self, message: AbstractIncomingMessage, exc: Exception
    ) -> tuple[str, dict[str, Any]]:
        """Park a transiently failed message in a delay tier, or dead-letter it; (outcome, log)."""
        attempts = self._failed_attempts(message) + 1
        retry = self._settings.retry
        detail: dict[str, Any] = {"attempts": attempts, "error": repr(exc)}
        if attempts >= retry.max_attempts:
            detail["reason"] = "retries_exhausted"
            outcome = await self._dead_letter(message, reason="retries_exhausted", error=exc)
            return outcome, detail
        tier = retry.delay_tier(attempts)
        detail["tier"] = tier
        failure = self._failure_headers(message, exc, attempts, reason="transient")
        try:
            await self._publisher.publish_message(
                _copy(message, failure),
                exchange="",
                routing_key=self._work_queue.retry_name(self._naming, tier),
            )
        except Exception as publish_exc:
            # Could not park it: let the broker redeliver (its delivery limit still applies).
            detail["publish_error"] = repr(publish_exc)
            await self._requeue(message)
            return "requeued", detail
        await self._acks.ack(message)
        return "retried", detail

    async def _dead_letter(
        self, message: AbstractIncomingMessage, *, reason: str, error: BaseException
    ) -> str:
        """Publish the message to the dead-letter queue with failure headers; the outcome."""
        attempts = self._failed_attempts(message) + 1
        headers = self._failure_headers(message, error, attempts, reason=reason)
        headers[H_LETTER_ID] = uuid.uuid4().hex
        try:
            await self._publisher.publish_message(
                _copy(message, headers),
                exchange=self._naming.dead_letter_exchange,
                routing_key=self._work_queue.dlq_name(self._naming),
            )
        except Exception as publish_exc:
            self._log.error(
                "dead-letter publish failed; requeueing",
                event_id=message.message_id,
                event_type=message.type,
                correlation_id=message.correlation_id,
                error=repr(publish_exc),
            )
            await self._requeue(message)
            return "requeued"
        await self._acks.ack(message)
        return "dead_lettered"

    async def _requeue(self, message: AbstractIncomingMessage) -> None:
        await message.nack(requeue=True)
        self._acks.settled(message)

    def _failed_attempts(self, message: AbstractIncomingMessage) -> int:
        """Failed attempts before this delivery (0 unless it returns from a retry tier)."""
        if not returned_from_retry_tier(message, self.queue_name):
            return 0
        return max(0, _int_header(message, H_ATTEMPTS))

    def _failure_headers(
        self, message: AbstractIncomingMessage, error: BaseException, attempts: int, reason: str
    ) -> dict[str, Any]:
        now = datetime.now(UTC).isoformat()
        # What a publisher put in our headers is not ours to trust: a first failure starts
        # from the delivery's own exchange and routing key.
        ours = returned_from_retry_tier(message, self.queue_name)
        headers = dict(message.headers or {}) if ours else {}
        return {
            H_ORIGINAL_EXCHANGE: headers.get(H_ORIGINAL_EXCHANGE, message.exchange or ""),
            H_ORIGINAL_ROUTING_KEY: headers.get(H_ORIGINAL_ROUTING_KEY, message.routing_key or ""),
            H_FIRST_FAILURE_AT: headers.get(H_FIRST_FAILURE_AT, now),
            H_LAST_FAILURE_AT: now,
            H_ATTEMPTS: attempts,
            H_REASON: reason,
            H_ERROR_TYPE: type(error).__name__,
            H_ERROR_MESSAGE: str(error)[:_MAX_ERROR_TEXT],
            H_SERVICE: self._service,
            H_QUEUE: self.queue_name,
        }


def returned_from_retry_tier(message: AbstractIncomingMessage, queue_name: str) -> bool:
    """True when ``message`` comes back to ``queue_name`` from one of its retry tiers.

    A tier (``<queue>.retry.<n>``) dead-letters an expired message through the default
    exchange with the work queue's name as routing key, and the broker records that as the
    newest ``x-death`` entry. Only then are the failure headers the consumer's own: an
    event published to the events exchange arrives with that exchange's name, and only
    Grantwire's own users may write to the default exchange
    (``deploy/rabbitmq/definitions.json``; identity may not).
    """
    if message.exchange != "" or message.routing_key != queue_name:
        return False
    deaths = (message.headers or {}).get("x-death")
    if not isinstance(deaths, list | tuple) or not deaths or not isinstance(deaths[0], dict):
        return False
    newest = deaths[0]
    return _text(newest.get("reason")) == _EXPIRED and _text(newest.get("queue")).startswith(
        f"{queue_name}.retry."
    )


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")


def _int_header(message: AbstractIncomingMessage, name: str) -> int:
    value = (message.headers or {}).get(name, 0)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


def _copy(message: AbstractIncomingMessage, extra_headers: Mapping[str, Any]) -> aio_pika.Message:
    """The same message (id, body, properties) with updated failure headers."""
    headers = {
        k: v
        for k, v in (message.headers or {}).items()
        if k != H_LETTER_ID and not any(k.startswith(prefix) for prefix in _BROKER_HEADERS)
    }
    headers.update(extra_headers)
    return aio_pika.Message(
        body=message.body,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        type=message.type,
        app_id=message.app_id,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        timestamp=message.timestamp,
        headers=headers,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
