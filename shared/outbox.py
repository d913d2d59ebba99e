"""Transactional outbox: events commit with the state change, a relay publishes them.

``stage_events`` writes outbox documents inside the caller's transaction. The
``OutboxRelay`` publishes pending documents with confirms and marks them sent. It wakes
on a change stream (polling as a fallback), backs off while the broker is down, keeps
order per aggregate in the steady state, and runs as the single active relay of its
service through a lease, so several replicas never publish the same document twice
unless one crashes between publish and mark (consumers dedupe that). Sent documents
expire through a TTL index.

A document the broker refused (unroutable, nacked) backs off, and every later document of
its aggregate waits behind it; its retry goes alone, so nothing of that aggregate is
published after it until the broker takes it. The one gap: documents of one aggregate that
go out together for the first time are all published, so when the first is refused the
later ones arrive before its retry (consumers handle events out of order). Aggregates that
wait never hold up the others: when they fill part of the oldest batch, the relay reads past
them (through a partial index of the documents backing off).

Round trips are what an event costs here (the database's journal flush above all), so the
relay spends few: only the relay holding the lease watches the outbox (a change stream costs
the database a scan of its oplog); the lease is renewed once per third of its TTL, not per
batch; marking documents sent is acknowledged by the primary without waiting for the journal
(lost in a crash, a document is published again, which consumers dedupe anyway); and a
change-stream notice of a document the relay has already read does not wake it for an
empty read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from bson import ObjectId
from opentelemetry.trace import Span
from pymongo import ASCENDING, IndexModel, WriteConcern
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from shared import metrics, tracing
from shared.envelope import Envelope
from shared.lease import Lease
from shared.mongo import Document
from shared.publisher import ConfirmingPublisher, PublishRejectedError, UnroutableError
from shared.shutdown import STOP_STEP_TIMEOUT_S, bounded_step

OUTBOX = "outbox"
LEASES = "leases"
# Marking sent needs no journal flush: a mark lost in a crash means one more publish.
_MARK_SENT = WriteConcern(w=1)
_RECENTLY_READ = 4096  # outbox ids remembered so their change-stream notices wake nothing
_MAX_EXCLUDED = 10_000  # waiting aggregates a read skips at most (beyond: read as they come)
log = structlog.get_logger("grantwire.outbox")


def outbox_indexes(sent_retention: timedelta) -> dict[str, list[IndexModel]]:
    """Indexes the outbox needs: pending scan, unique event id, TTL on sent documents."""
    return {
        OUTBOX: [
            IndexModel([("status", ASCENDING), ("_id", ASCENDING)], name="pending_scan"),
            IndexModel([("event_id", ASCENDING)], unique=True, name="event_id_unique"),
            IndexModel(
                [("next_attempt_at", ASCENDING)],
                name="backing_off",
                partialFilterExpression={"status": "pending", "next_attempt_at": {"$exists": True}},
            ),
            IndexModel(
                [("sent_at", ASCENDING)],
                expireAfterSeconds=int(sent_retention.total_seconds()),
                name="sent_ttl",
            ),
        ],
        LEASES: [],
    }


async def stage_events(
    db: AsyncDatabase[Document],
    session: AsyncClientSession,
    envelopes: Sequence[Envelope],
    *,
    aggregate_id: str,
) -> None:
    """Write events to the outbox inside ``session``'s transaction, in order."""
    await stage_event_batch(db, session, [(env, aggregate_id) for env in envelopes])


async def stage_event_batch(
    db: AsyncDatabase[Document],
    session: AsyncClientSession,
    staged: Sequence[tuple[Envelope, str]],
) -> None:
    """``stage_events`` for events of several aggregates (envelope, aggregate id), in order,
    in one round trip."""
    if not staged:
        return
    now = datetime.now(UTC)
    docs = [
        {
            "_id": ObjectId(),
            "event_id": env.id,
            "type": env.type,
            "aggregate_id": aggregate_id,
            "source": env.source,
            "time": env.time,
            "schema_version": env.schema_version,
            "correlation_id": env.correlation_id,
            "causation_id": env.causation_id,
            "extra_headers": env.extra_headers,
            "body": env.body,
            "status": "pending",
            "created_at": now,
            "attempts": 0,
        }
        for env, aggregate_id in staged
    ]
    await db[OUTBOX].insert_many(docs, session=session, ordered=True)


def _publishable(docs: list[Document], now: datetime) -> tuple[list[Document], set[str], int]:
    """The documents (oldest first) that may go now; the aggregates with a document backing
    off, whose later documents all wait (order); and how many documents wait behind a retry
    in this batch (a retry goes alone, so a later event of its aggregate is published only
    after the broker took it)."""
    batch: list[Document] = []
    waiting: set[str] = set()
    retrying: set[str] = set()
    held = 0
    for doc in docs:
        aggregate = doc["aggregate_id"]
        due = doc.get("next_attempt_at")
        if aggregate in waiting or (due is not None and due > now):
            waiting.add(aggregate)
        elif aggregate in retrying:
            held += 1
        else:
            batch.append(doc)
            if doc.get("attempts", 0):
                retrying.add(aggregate)
    return batch, waiting, held


def envelope_of(doc: Document) -> Envelope:
    """Rebuild the envelope of an outbox document (same id as when it was staged)."""
    return Envelope(
        id=doc["event_id"],
        type=doc["type"],
        source=doc["source"],
        time=doc["time"],
        schema_version=doc["schema_version"],
        correlation_id=doc["correlation_id"],
        causation_id=doc.get("causation_id"),
        body=bytes(doc["body"]),
        extra_headers=dict(doc.get("extra_headers") or {}),
    )


@dataclass(frozen=True)
class PendingSummary:
    """What is waiting in the outbox, and what holds up its oldest document."""

    pending: int
    oldest_age_s: float
    oldest_event_id: str | None = None
    oldest_event_type: str | None = None
    oldest_attempts: int = 0
    oldest_error: str | None = None


class OutboxRelay:
    """Publishes a service's pending outbox documents; one active relay per service."""

    def __init__(
        self,
        db: AsyncDatabase[Document],
        publisher: ConfirmingPublisher,
        *,
        owner: str,
        service: str = "unknown",
        events_exchange: str = "",
        lease_ttl: timedelta = timedelta(seconds=10),
        poll_interval_s: float = 1.0,
        batch_size: int = 200,
        max_backoff_s: float = 15.0,
    ) -> None:
        self._db = db
        self._publisher = publisher
        self._service = service
        self._events_exchange = events_exchange  # for spans only: the publisher knows its exchange
        self._lease = Lease(db[LEASES], "outbox-relay", owner, lease_ttl)
        self._poll_interval_s = poll_interval_s
        self._batch_size = batch_size
        self._max_backoff_s = max_backoff_s
        self._wake = asyncio.Event()
        # Wake-ups asked for, and how many of them the latest read covers (it started after
        # them, so it saw their documents): a wake-up a read already covered starts none.
        self._wakes_asked = 0
        self._wakes_read = 0
        # One batch at a time: stop()'s final flush must not re-read documents the relay
        # task is publishing right now (that would publish them twice).
        self._drain_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._recently_read: OrderedDict[Any, None] = OrderedDict()
        self._more_pending = False  # the last read was a full batch: read again at once
        # Set while this relay holds the lease: only then does it watch the outbox (a relay
        # that does not hold it would be woken for nothing, and each stream costs the
        # database a scan of its oplog).
        self._holding = asyncio.Event()
        self.published = 0
        self.last_error: str | None = None

    async def start(self) -> None:
        """Start relaying in the background (and watching for new documents)."""
        self._tasks = [
            asyncio.create_task(self._run(), name="outbox-relay"),
            asyncio.create_task(self._watch(), name="outbox-watch"),
        ]

    def wake(self) -> None:
        """Publish soon (called after a commit in this process)."""
        self._wakes_asked += 1
        self._wake.set()

    @property
    def caught_up(self) -> bool:
        """True when every wake-up asked for has had its read and none is under way."""
        return self._wakes_read >= self._wakes_asked and not self._drain_lock.locked()

    @contextlib.asynccontextmanager
    async def draining(self) -> AsyncIterator[None]:
        """Hold the relay's drain lock: no read starts, and no change-stream notice is
        looked at, until the block ends (tests use it to order a commit before both)."""
        async with self._drain_lock:
            yield

    async def stop(
        self, flush_timeout_s: float = 10.0, step_timeout_s: float = STOP_STEP_TIMEOUT_S
    ) -> None:
        """Flush what is pending (within the timeout), stop, and release the lease.

        Neither an unreachable broker nor database keeps it from returning: the flush is
        bounded by ``flush_timeout_s``, the lease release by ``step_timeout_s``.
        """
        await bounded_step(self.flush(), what="flush outbox", log=log, timeout_s=flush_timeout_s)
        self._stopping.set()
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await bounded_step(
            self._lease.release(), what="release outbox lease", log=log, timeout_s=step_timeout_s
        )

    async def flush(self) -> None:
        """Publish until nothing is pending that this relay can publish now."""
        while await self._lease.hold():
            published, failed = await self.drain_once()
            if failed:
                await asyncio.sleep(0.2)
            elif published == 0:
                return

    async def pending_stats(self) -> tuple[int, float]:
        """Number of pending documents and the age in seconds of the oldest."""
        summary = await self.pending_summary()
        return summary.pending, summary.oldest_age_s

    async def pending_summary(self) -> PendingSummary:
        """Pending documents, the oldest one's age, and why it is not published yet."""
        outbox = self._db[OUTBOX]
        count = await outbox.count_documents({"status": "pending"})
        oldest = await outbox.find_one({"status": "pending"}, sort=[("_id", ASCENDING)])
        if oldest is None:
            return PendingSummary(count, 0.0)
        return PendingSummary(
            pending=count,
            oldest_age_s=(datetime.now(UTC) - oldest["created_at"]).total_seconds(),
            oldest_event_id=oldest["event_id"],
            oldest_event_type=oldest["type"],
            oldest_attempts=int(oldest.get("attempts", 0)),
            oldest_error=oldest.get("last_error"),
        )

    async def drain_once(self) -> tuple[int, int]:
        """Publish one batch; returns (published, failed)."""
        async with self._drain_lock:
            # A wake-up from here on is for documents this read may not see; one set before
            # (a change-stream notice that waited for the lock, say) is for documents it sees.
            self._wakes_read = self._wakes_asked
            self._wake.clear()
            return await self._drain_batch()

    async def _read_pending(self, query: Document) -> list[Document]:
        return await (
            self._db[OUTBOX].find(query).sort("_id", ASCENDING).limit(self._batch_size).to_list()
        )

    async def _waiting_aggregates(self, now: datetime) -> list[str]:
        """Aggregates with a document backing off (not due before ``now``), at most
        ``_MAX_EXCLUDED`` of them, through the partial index of backing-off documents."""
        groups = await self._db[OUTBOX].aggregate(
            [
                {"$match": {"status": "pending", "next_attempt_at": {"$gt": now}}},
                {"$group": {"_id": "$aggregate_id"}},
                {"$limit": _MAX_EXCLUDED},
            ]
        )
        return [group["_id"] async for group in groups]

    async def _drain_batch(self) -> tuple[int, int]:
        now = datetime.now(UTC)
        docs = await self._read_pending({"status": "pending"})
        self._more_pending = len(docs) == self._batch_size
        self._remember_read(docs)
        batch, waiting, held = _publishable(docs, now)
        if waiting and self._more_pending:
            # Documents backing off fill part of the oldest batch: read past every aggregate
            # that waits, or a full batch of them would hold up everyone else's events.
            try:
                excluded = await self._waiting_aggregates(now)
                docs = await self._read_pending(
                    {"status": "pending", "aggregate_id": {"$nin": sorted({*excluded, *waiting})}}
                )
            except PyMongoError as exc:  # publish what the oldest batch allows meanwhile
                log.warning("outbox read past waiting aggregates failed", error=str(exc))
            else:
                self._more_pending = len(docs) == self._batch_size
                self._remember_read(docs)
                batch, _, held = _publishable(docs, now)
        if held:
            self._more_pending = True  # read again once the retries in this batch are settled
        if not batch:
            return 0, 0
        traced = [self._traced(envelope_of(d)) for d in batch]
        started = time.perf_counter()
        results = await self._publisher.publish_many([envelope for _, envelope in traced])
        metrics.RELAY_PUBLISH_SECONDS.labels(self._service).observe(time.perf_counter() - started)
        for (span, _), result in zip(traced, results, strict=True):
            tracing.end_publish(span, result)
        sent_docs = [d for d, r in zip(batch, results, strict=True) if r is None]
        if sent_docs:
            sent_at = datetime.now(UTC)
            await (
                self._db[OUTBOX]
                .with_options(write_concern=_MARK_SENT)
                .update_many(
                    {"_id": {"$in": [d["_id"] for d in sent_docs]}},
                    {"$set": {"status": "sent", "sent_at": sent_at}},
                )
            )
            self.published += len(sent_docs)
            for doc in sent_docs:
                metrics.OUTBOX_PUBLISHED.labels(self._service, doc["type"]).inc()
                metrics.OUTBOX_DELAY.labels(self._service, doc["type"]).observe(
                    max(0.0, (sent_at - doc["created_at"]).total_seconds())
                )
        failures = [(d, r) for d, r in zip(batch, results, strict=True) if r is not None]
        for doc, error in failures:
            await self._record_failure(doc, error)
        return len(sent_docs), len(failures)

    def _remember_read(self, docs: list[Document]) -> None:
        for doc in docs:
            self._recently_read[doc["_id"]] = None
        while len(self._recently_read) > _RECENTLY_READ:
            self._recently_read.popitem(last=False)

    def _traced(self, envelope: Envelope) -> tuple[Span, Envelope]:
        """A PRODUCER span continuing the trace that staged the event, and its envelope."""
        span, headers = tracing.start_publish(
            envelope.extra_headers,
            service=self._service,
            exchange=self._events_exchange,
            event_type=envelope.type,
            message_id=envelope.id,
            correlation_id=envelope.correlation_id,
        )
        return span, replace(envelope, extra_headers=headers)

    async def _record_failure(self, doc: Document, error: BaseException) -> None:
        self.last_error = f"{type(error).__name__}: {error}"
        metrics.OUTBOX_PUBLISH_FAILURES.labels(
            self._service, doc["type"], type(error).__name__
        ).inc()
        log.warning(
            "outbox publish failed",
            event_id=doc["event_id"],
            event_type=doc["type"],
            correlation_id=doc["correlation_id"],
            error=self.last_error,
        )
        if isinstance(error, UnroutableError | PublishRejectedError):
            # Only this document's aggregate waits; others keep flowing.
            attempts = int(doc.get("attempts", 0)) + 1
            delay = min(self._max_backoff_s, 0.5 * 2 ** min(attempts, 10))
            update: dict[str, Any] = {
                "$set": {
                    "attempts": attempts,
                    "last_error": self.last_error,
                    "next_attempt_at": datetime.now(UTC) + timedelta(seconds=delay),
                }
            }
            await self._db[OUTBOX].update_one({"_id": doc["_id"]}, update)

    async def _run(self) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            try:
                if not await self._lease.hold():
                    self._holding.clear()
                    await self._sleep(self._lease.ttl.total_seconds() / 3)
                    continue
                self._holding.set()
                published, failed = await self.drain_once()
                if failed and not published:
                    backoff = min(self._max_backoff_s, max(0.2, backoff * 2))
                    await self._sleep(backoff)
                    continue
                backoff = 0.0
                if published == 0 or not self._more_pending:
                    await self._idle(self._poll_interval_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker or database down: back off, keep going
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("outbox relay error", error=self.last_error)
                backoff = min(self._max_backoff_s, max(0.2, backoff * 2))
                await self._sleep(backoff)

    async def _sleep(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a wake-up; True when woken."""
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
            return True
        except TimeoutError:
            return False
        finally:
            self._wake.clear()

    async def _idle(self, poll_interval_s: float) -> None:
        """Sleep until a wake-up that no read has covered yet, or the next poll."""
        deadline = time.monotonic() + poll_interval_s
        while not self._stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or not await self._sleep(left):
                return
            if self._wakes_asked > self._wakes_read:
                return

    async def _watch(self) -> None:
        """Wake the relay on inserts while it holds the lease; polling covers the gaps when
        the stream fails."""
        while not self._stopping.is_set():
            if not self._holding.is_set():
                await self._until_holding()
                continue
            try:
                # Only that something was inserted matters, and what: the server sends the
                # change's id (its resume token) and the document's key, not its body.
                pipeline: list[dict[str, Any]] = [
                    {"$match": {"operationType": "insert"}},
                    {"$project": {"_id": 1, "documentKey": 1}},
                ]
                async with await self._db[OUTBOX].watch(pipeline) as stream:
                    # A document committed after the relay's last read and before the stream
                    # began has no notice: one read covers it.
                    self.wake()
                    # Each empty answer (the server waits up to a second) checks the lease;
                    # an invalidated stream (the collection dropped) is reopened.
                    while self._holding.is_set() and stream.alive:
                        change = await stream.try_next()
                        if change is None:
                            continue
                        key = (change.get("documentKey") or {}).get("_id")
                        if self._drain_lock.locked():
                            async with self._drain_lock:  # a read under way may hold it
                                pass
                        if key not in self._recently_read:
                            self.wake()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("outbox change stream interrupted", error=str(exc))
                await asyncio.sleep(self._poll_interval_s)

    async def _until_holding(self) -> None:
        """Wait until the relay holds the lease (or stops)."""
        holding = asyncio.ensure_future(self._holding.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({holding, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            holding.cancel()
            stopping.cancel()
