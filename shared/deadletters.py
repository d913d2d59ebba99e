"""Dead letters kept where operators can query them without touching the broker.

Each service runs a ``DeadLetterKeeper`` beside its consumers: it moves every message of
its dead-letter queues, byte for byte with all properties and headers, into the
service's own ``dead_letters`` collection and acks it only after the insert is committed
(majority). A crash between insert and ack redelivers the message; a unique key on
(queue, letter id) turns that second insert into a no-op, so nothing is lost and nothing
is kept twice. The letter id is the one the consumer stamped when it dead-lettered the
message (``x-grantwire-letter-id``); a letter the broker dead-lettered itself (delivery
limit) has none, and gets one derived from what every redelivery of it carries alike.
Listing and replay then work on the collection, never by browsing (and so reordering) a
queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from shared import metrics
from shared.consumer import (
    H_ATTEMPTS,
    H_ERROR_MESSAGE,
    H_ERROR_TYPE,
    H_FIRST_FAILURE_AT,
    H_LAST_FAILURE_AT,
    H_LETTER_ID,
    H_ORIGINAL_EXCHANGE,
    H_ORIGINAL_ROUTING_KEY,
    H_REASON,
)
from shared.envelope import H_CORRELATION_ID
from shared.mongo import Document
from shared.shutdown import STOP_STEP_TIMEOUT_S, bounded_step
from shared.topology import Naming, WorkQueue

DEAD_LETTERS = "dead_letters"
DEAD_LETTER_AUDIT = "dead_letter_audit"
# Replaced indexes, dropped at startup: (queue, message id, failed_at) kept only one of two
# letters sharing a message id that failed in the same millisecond.
RETIRED_DEAD_LETTER_INDEXES = {DEAD_LETTERS: ("one_copy_per_failure",)}
log = structlog.get_logger("grantwire.deadletters")


def dead_letter_indexes(purged_retention: timedelta) -> dict[str, list[IndexModel]]:
    """Indexes of the dead-letter archive (the TTL expires purged letters only)."""
    return {
        DEAD_LETTERS: [
            IndexModel(
                [("queue", ASCENDING), ("letter_id", ASCENDING)],
                unique=True,
                # letters archived before letter ids existed have none and stay as they are
                partialFilterExpression={"letter_id": {"$type": "string"}},
                name="one_copy_per_letter",
            ),
            IndexModel([("status", ASCENDING), ("failed_at", DESCENDING)], name="by_status"),
            IndexModel([("event_type", ASCENDING), ("error_type", ASCENDING)], name="by_kind"),
            IndexModel(
                [("purged_at", ASCENDING)],
                expireAfterSeconds=int(purged_retention.total_seconds()),
                name="purged_ttl",
            ),
        ],
        DEAD_LETTER_AUDIT: [],
    }


def _plain(value: Any) -> Any:
    """Header values as BSON-friendly plain values (bytes and nested tables included)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str | bytes):
        text = value.decode() if isinstance(value, bytes) else value
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(text)
    return None


def letter_id(*, queue: str, message_id: str, headers: Document, body: bytes) -> str:
    """The identity of one dead letter in ``queue``: the same for each of its redeliveries.

    The consumer's stamp (``x-grantwire-letter-id``) when the consumer dead-lettered it. A
    letter the broker dead-lettered (it carries ``x-death``) keeps whatever headers it was
    published with, so any stamp on it is not ours: its id is derived from its queue,
    message id, failure headers, ``x-death`` entries and body, which its redeliveries share
    (``headers`` are the archive's plain values, see ``dead_letter_document``).
    """
    stamped = headers.get(H_LETTER_ID)
    if isinstance(stamped, str) and stamped and not headers.get("x-death"):
        return stamped
    basis = [
        queue,
        message_id,
        headers.get(H_LAST_FAILURE_AT),
        headers.get("x-death"),
        hashlib.sha256(body).hexdigest(),
    ]
    text = json.dumps(basis, sort_keys=True, default=str)
    return f"derived-{hashlib.sha256(text.encode()).hexdigest()[:32]}"


def dead_letter_document(message: AbstractIncomingMessage, *, service: str) -> Document:
    """The archive document of one dead-lettered message (everything needed to replay)."""
    headers: dict[str, Any] = _plain(dict(message.headers or {}))
    deaths = headers.get("x-death") or []
    broker_death = deaths[0] if deaths else {}
    # A letter the broker dead-lettered (it has ``x-death``) was never through the consumer's
    # dead-letter path, so its failure headers are a publisher's claims: where it came from,
    # why and how often it failed are the broker's record. A letter the consumer
    # dead-lettered has no ``x-death`` (the consumer strips it) and its headers are ours.
    failure = {} if deaths else headers
    if deaths:
        reason = f"broker:{broker_death.get('reason', 'unknown')}"
        original_exchange = str(broker_death.get("exchange") or "")
        original_routing_key = str((broker_death.get("routing-keys") or [""])[0])
    else:
        reason = str(failure.get(H_REASON) or "unknown")
        original_exchange = str(failure.get(H_ORIGINAL_EXCHANGE) or "")
        original_routing_key = str(failure.get(H_ORIGINAL_ROUTING_KEY) or "")
    failed_at = (
        _parse_time(failure.get(H_LAST_FAILURE_AT))
        or _parse_time(broker_death.get("time"))
        or datetime.now(UTC)
    )
    work_queue = str(broker_death.get("queue") or headers.get("x-grantwire-queue") or "")
    queue = message.routing_key or ""
    message_id = message.message_id or ""
    return {
        "_id": ObjectId(),
        "letter_id": letter_id(
            queue=queue, message_id=message_id, headers=headers, body=message.body
        ),
        "message_id": message_id,
        "queue": queue,
        "work_queue": work_queue,
        "service": service,
        "event_type": message.type or headers.get("cloudEvents:type") or "unknown",
        "correlation_id": message.correlation_id or headers.get(H_CORRELATION_ID),
        "original_exchange": original_exchange,
        "original_routing_key": original_routing_key,
        "reason": reason,
        "error_type": failure.get(H_ERROR_TYPE) or reason,
        "error_message": failure.get(H_ERROR_MESSAGE, ""),
        "attempts": int(failure.get(H_ATTEMPTS) or broker_death.get("count") or 0),
        "first_failure_at": _parse_time(failure.get(H_FIRST_FAILURE_AT)) or failed_at,
        "failed_at": failed_at,
        "received_at": datetime.now(UTC),
        "status": "dead",
        "body": message.body,
        "properties": {
            "message_id": message.message_id,
            "correlation_id": message.correlation_id,
            "type": message.type,
            "app_id": message.app_id,
            "content_type": message.content_type,
            "content_encoding": message.content_encoding,
            "timestamp": _plain(message.timestamp),
            "delivery_mode": int(message.delivery_mode or 2),
            "headers": headers,
        },
        "history": [],
    }


class DeadLetterKeeper:
    """Moves a service's dead-letter queues into its ``dead_letters`` collection."""

    def __init__(
        self,
        *,
        service: str,
        connection: AbstractConnection,
        db: AsyncDatabase[Document],
        naming: Naming,
        work_queues: list[WorkQueue],
    ) -> None:
        self._service = service
        self._connection = connection
        self._db = db
        self._names = [wq.dlq_name(naming) for wq in work_queues]
        self._channel: AbstractChannel | None = None
        self.kept = 0

    async def start(self) -> None:
        """Consume each dead-letter queue (declared by the consumers before this)."""
        if not self._names:
            return
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=50)
        for name in self._names:
            queue = await self._channel.get_queue(name, ensure=True)
            await queue.consume(self._keep)

    async def stop(self, step_timeout_s: float = STOP_STEP_TIMEOUT_S) -> None:
        """Close the channel (bounded: the broker may be away); unacked letters stay queued."""
        if self._channel is not None:
            await bounded_step(
                self._channel.close(),
                what="close dead-letter keeper channel",
                log=log,
                timeout_s=step_timeout_s,
            )
            self._channel = None

    async def _keep(self, message: AbstractIncomingMessage) -> None:
        doc = dead_letter_document(message, service=self._service)
        try:
            await self._db[DEAD_LETTERS].insert_one(doc)
        except DuplicateKeyError:
            pass  # kept before a crash: this is the redelivery of an archived letter
        except Exception as exc:
            log.error("could not archive dead letter; it stays queued", error=repr(exc))
            await asyncio.sleep(1.0)  # the database is down: hold the slot, don't spin
            await message.nack(requeue=True)
            return
        await message.ack()
        self.kept += 1
        metrics.DEAD_LETTERS_ARCHIVED.labels(
            self._service, doc["work_queue"] or doc["queue"], doc["event_type"], doc["reason"]
        ).inc()
        log.warning(
            "dead letter archived",
            event_id=doc["message_id"],
            event_type=doc["event_type"],
            correlation_id=doc["correlation_id"],
            queue=doc["queue"],
            reason=doc["reason"],
        )
