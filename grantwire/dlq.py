"""`grantwire dlq`: inspect, replay and purge dead letters — safely, with an audit trail.

Dead letters are read from each service's ``dead_letters`` collection (the services'
keepers move them there from the broker), so listing never consumes, requeues or
reorders anything in RabbitMQ. Replay claims a batch of letters (``dead`` ->
``replaying``) before publishing them with their original message id, correlation id and
body, and marks each ``replayed`` after the broker's confirm (``dead`` again when the broker
refused it; left ``replaying``, in doubt, when the connection failed under it): an
interrupted run never re-sends a letter by itself on the next run. ``--include-interrupted``
takes such letters over, but never from a run that may still be going: a claim carries its
time, and only a letter its run let go (in doubt) or a claim older than
``--stale-claim-after`` (a run that died) is taken. Purge archives (``purged``, expired by a
TTL index later). Every replay and purge writes an audit record.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

import aio_pika
import typer
from aio_pika.abc import AbstractConnection
from aiormq.exceptions import ChannelNotFoundEntity
from bson import ObjectId
from bson.errors import InvalidId
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from pymongo import AsyncMongoClient, ReadPreference, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from shared.deadletters import DEAD_LETTER_AUDIT, DEAD_LETTERS
from shared.logging import mask_url
from shared.mongo import Document, create_client, is_transient
from shared.publisher import ConfirmingPublisher, PublishRejectedError, UnroutableError

FAILURE_HEADER_PREFIX = "x-grantwire-"
H_REPLAY = "x-grantwire-replay"
SERVICES = ("organizations", "invitations", "billing")


class ExchangeMissingError(Exception):
    """A letter's exchange does not exist (any more): it was not sent."""


# The broker answered for the letter itself: it was not taken, and may be sent again.
_REFUSED = (UnroutableError, PublishRejectedError, ExchangeMissingError)
# A replay's claim this old belongs to a run that died: --include-interrupted may take it.
# A run renews its batch's claim every CLAIM_RENEWAL while the batch is out.
STALE_CLAIM_AFTER = timedelta(seconds=120)
CLAIM_RENEWAL = timedelta(seconds=10)
CHECK_TIMEOUT_S = 10.0


class DlqSettings(BaseSettings):
    """Where the dead letters are: the services' databases and the broker."""

    model_config = SettingsConfigDict(env_prefix="GRANTWIRE_", extra="ignore")

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    mongo_url: SecretStr = SecretStr("mongodb://127.0.0.1:27017/?replicaSet=rs0")
    dlq_databases: dict[str, str] = {s: f"grantwire_{s}" for s in SERVICES}


@dataclass
class Filter:
    """Which dead letters an operation concerns."""

    ids: list[str] = field(default_factory=list)
    service: str | None = None
    queue: str | None = None
    event_type: str | None = None
    error: str | None = None
    since: datetime | None = None
    before: datetime | None = None
    min_attempts: int | None = None
    statuses: tuple[str, ...] = ("dead",)
    # Set: a ``replaying`` letter counts only once no run may still hold it (see claimable).
    stale_claim_after: timedelta | None = None

    def query(self) -> Document:
        query: Document = claimable(self.statuses, self.stale_claim_after)
        if self.ids:
            try:
                query["_id"] = {"$in": [ObjectId(i) for i in self.ids]}
            except InvalidId as exc:
                raise typer.BadParameter(f"not a dead-letter id: {exc}") from exc
        if self.queue:
            query.setdefault("$and", []).append(
                {"$or": [{"queue": self.queue}, {"work_queue": self.queue}]}
            )
        if self.event_type:
            query["event_type"] = self.event_type
        if self.error:
            pattern = {"$regex": re.escape(self.error), "$options": "i"}
            query.setdefault("$and", []).append(
                {"$or": [{"error_type": pattern}, {"error_message": pattern}, {"reason": pattern}]}
            )
        if self.since or self.before:
            query["failed_at"] = {}
            if self.since:
                query["failed_at"]["$gte"] = self.since
            if self.before:
                query["failed_at"]["$lt"] = self.before
        if self.min_attempts is not None:
            query["attempts"] = {"$gte": self.min_attempts}
        return query

    def describe(self) -> Document:
        return {
            k: (
                v.isoformat()
                if isinstance(v, datetime)
                else v.total_seconds()
                if isinstance(v, timedelta)
                else v
            )
            for k, v in self.__dict__.items()
            if v or isinstance(v, timedelta)  # --stale-claim-after 0 is worth recording
        }


def claimable(statuses: tuple[str, ...], stale_claim_after: timedelta | None) -> Document:
    """The letters of ``statuses``; with ``stale_claim_after``, a ``replaying`` one only when
    no run may still be sending it: its claim has no time (its run let it go, in doubt, or
    it is from an older command), or its time is older than that (the run died)."""
    if "replaying" not in statuses or stale_claim_after is None:
        return {"status": {"$in": list(statuses)}}
    others = [status for status in statuses if status != "replaying"]
    # The database's clock, never an operator machine's: claims are set and read by it.
    stale_ms = int(stale_claim_after.total_seconds() * 1000)
    abandoned: Document = {
        "status": "replaying",
        "$or": [
            {"claimed_at": {"$exists": False}},
            {"$expr": {"$lt": ["$claimed_at", {"$subtract": ["$$NOW", stale_ms]}]}},
        ],
    }
    return {"$or": [{"status": {"$in": others}}, abandoned]} if others else abandoned


class DeadLetterStore:
    """The dead-letter collections of the services, read and changed together."""

    def __init__(self, client: AsyncMongoClient[Document], databases: dict[str, str]) -> None:
        self._client = client
        self.databases = databases

    def db(self, service: str) -> AsyncDatabase[Document]:
        return self._client[self.databases[service]]

    def services(self, only: str | None) -> list[str]:
        if only is not None and only not in self.databases:
            raise typer.BadParameter(f"unknown service {only!r}; known: {sorted(self.databases)}")
        return [only] if only else list(self.databases)

    async def find(self, flt: Filter, limit: int = 0) -> list[Document]:
        letters: list[Document] = []
        for service in self.services(flt.service):
            cursor = self.db(service)[DEAD_LETTERS].find(flt.query()).sort("failed_at", 1)
            if limit:
                cursor = cursor.limit(limit)
            for doc in await cursor.to_list():
                doc["service"] = service
                letters.append(doc)
        letters.sort(key=lambda d: d["failed_at"])
        return letters[:limit] if limit else letters

    async def count(self, flt: Filter) -> int:
        return sum(
            [
                await self.db(service)[DEAD_LETTERS].count_documents(flt.query())
                for service in self.services(flt.service)
            ]
        )

    async def get(self, letter_id: str) -> Document | None:
        try:
            oid = ObjectId(letter_id)
        except InvalidId as exc:
            raise typer.BadParameter(f"not a dead-letter id: {letter_id!r}") from exc
        for service in self.databases:
            doc = await self.db(service)[DEAD_LETTERS].find_one({"_id": oid})
            if doc is not None:
                return doc
        return None

    async def audit(self, services: set[str], record: Document) -> None:
        for service in sorted(services) or [next(iter(self.databases))]:
            await self.db(service)[DEAD_LETTER_AUDIT].insert_one(dict(record))


def summary_row(doc: Document) -> Document:
    return {
        "id": str(doc["_id"]),
        "service": doc["service"],
        "queue": doc["queue"],
        "event_type": doc["event_type"],
        "reason": doc["reason"],
        "error_type": doc["error_type"],
        "error": (doc.get("error_message") or "")[:80],
        "attempts": doc["attempts"],
        "failed_at": doc["failed_at"].isoformat(),
        "status": doc["status"],
        "message_id": doc["message_id"],
    }


def grouped(letters: list[Document]) -> list[Document]:
    counts = Counter((d["queue"], d["event_type"], d["error_type"]) for d in letters)
    return [
        {"queue": q, "event_type": t, "error_type": e, "count": n}
        for (q, t, e), n in counts.most_common()
    ]


def replay_message(doc: Document, replay: Document) -> aio_pika.Message:
    """The original message again: same id, correlation id, body; failure headers reset."""
    props = doc["properties"]
    headers = {
        k: v
        for k, v in (props.get("headers") or {}).items()
        if not k.startswith(FAILURE_HEADER_PREFIX)
        and not k.startswith("x-death")
        and not k.startswith("x-first-death")
        and not k.startswith("x-last-death")
    }
    headers[H_REPLAY] = json.dumps(replay, default=str)
    timestamp = props.get("timestamp")
    return aio_pika.Message(
        body=bytes(doc["body"]),
        message_id=props.get("message_id"),
        correlation_id=props.get("correlation_id"),
        type=props.get("type"),
        app_id=props.get("app_id"),
        content_type=props.get("content_type"),
        content_encoding=props.get("content_encoding"),
        timestamp=timestamp,
        headers=headers,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


@dataclass
class ReplayReport:
    operation_id: str
    selected: int = 0
    replayed: int = 0
    failed: int = 0
    skipped: int = 0
    interrupted_before: int = 0
    claimed_by_running: int = 0  # replaying under a fresh claim: a run may still be sending
    in_doubt: int = 0
    taken_over: int = 0  # claimed by this run, then by another before this one marked them
    stopped: str | None = None  # why the run stopped early (an error it could not go past)
    audit_written: bool = True
    dry_run: bool = False
    duration_s: float = 0.0
    errors: list[str] = field(default_factory=list)


async def replay(
    store: DeadLetterStore,
    publisher: ConfirmingPublisher | None,
    flt: Filter,
    *,
    operator: str,
    reason: str,
    dry_run: bool = False,
    batch_size: int = 100,
    rate: float | None = None,
    to_queue: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    show: Callable[[Document], None] | None = None,
    stale_claim_after: timedelta = STALE_CLAIM_AFTER,
    exchanges: ExchangeCheck | None = None,
) -> ReplayReport:
    """Replay the dead letters ``flt`` selects; see the module docstring for the rules.

    Batch by batch (``batch_size`` letters): one update claims the batch, its messages go
    out with pipelined confirms (one by one at ``rate``), one bulk write marks each letter
    replayed or, when the broker refused it, dead again; a letter whose connection failed
    under it stays ``replaying`` (in doubt, its claim let go) and the run stops. An
    interrupted run leaves at most one batch ``replaying``. A ``replaying`` letter
    ``flt`` asks for is taken only once no run may still be sending it (``claimable``,
    with ``stale_claim_after``), when it is selected and again, atomically, when claimed.
    """
    report = ReplayReport(operation_id=uuid.uuid4().hex, dry_run=dry_run)
    started = time.monotonic()
    if "replaying" in flt.statuses:
        flt = replace(flt, stale_claim_after=stale_claim_after)
    letters = await store.find(flt)
    report.selected = len(letters)
    if not dry_run:
        replaying = replace(flt, statuses=("replaying",))
        every = await store.count(replace(replaying, stale_claim_after=None))
        report.interrupted_before = await store.count(
            replace(replaying, stale_claim_after=stale_claim_after)
        )
        report.claimed_by_running = every - report.interrupted_before
    touched: set[str] = set()
    request = _ReplayRequest(operator, reason, to_queue, flt.statuses, stale_claim_after)
    pace = _Pace(rate)
    # At a rate, one letter at a time, claimed once its turn has come: a claim lives only
    # while its letter is being sent.
    step = 1 if rate else batch_size
    for start in range(0, len(letters), step):
        batch = letters[start : start + step]
        for doc in batch:
            if show is not None:
                show(doc)
        if dry_run:
            continue
        assert publisher is not None
        if pace.interval:
            await pace.turn()
        for service, docs in _by_service(batch).items():
            try:
                if await _replay_batch(
                    store.db(service)[DEAD_LETTERS], publisher, exchanges, docs, report, request
                ):
                    touched.add(service)
            except Exception as exc:  # the broker or the database went away: report, stop
                report.stopped = f"{type(exc).__name__}: {exc}"
                touched.add(service)
                break
            if report.in_doubt:
                break
        if progress is not None:
            progress(report.replayed + report.failed + report.skipped, report.selected)
        if report.in_doubt or report.stopped:  # nothing more can be sent: stop
            break
    report.duration_s = round(time.monotonic() - started, 3)
    if not dry_run:
        record = {
            "operation_id": report.operation_id,
            "action": "replay",
            "operator": operator,
            "reason": reason,
            "filter": flt.describe(),
            "to_queue": to_queue,
            "selected": report.selected,
            "replayed": report.replayed,
            "failed": report.failed,
            "skipped": report.skipped,
            "in_doubt": report.in_doubt,
            "taken_over": report.taken_over,
            "stopped": report.stopped,
            "errors": report.errors[:100],
            "at": datetime.now(UTC),
        }
        try:
            await store.audit(touched or set(store.services(flt.service)), record)
        except PyMongoError as exc:  # the report still goes out: it says what was sent
            report.errors.append(f"audit record not written: {type(exc).__name__}: {exc}")
            report.audit_written = False
    return report


@dataclass(frozen=True)
class _ReplayRequest:
    operator: str
    reason: str
    to_queue: str | None
    statuses: tuple[str, ...]
    stale_claim_after: timedelta


class _Pace:
    """At most ``rate`` publishes per second (no limit without one)."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self._next_at = time.monotonic()

    async def turn(self) -> None:
        await asyncio.sleep(max(0.0, self._next_at - time.monotonic()))
        self._next_at = max(self._next_at + self.interval, time.monotonic())


def _by_service(letters: list[Document]) -> dict[str, list[Document]]:
    groups: dict[str, list[Document]] = {}
    for doc in letters:
        groups.setdefault(doc["service"], []).append(doc)
    return groups


class ExchangeCheck:
    """Whether an exchange exists: a passive declare on a channel of its own, since the
    broker closes the channel it answers "not found" on. That channel is a plain one, not
    one the robust connection would reopen (and keep, one per missing exchange) or replay
    the declares of on a reconnection. Each name is asked once per run."""

    def __init__(self, connection: AbstractConnection, timeout_s: float = CHECK_TIMEOUT_S) -> None:
        self._connection = connection
        self._timeout_s = timeout_s
        self._channel: aio_pika.Channel | None = None
        self._known: dict[str, bool] = {"": True}  # the default exchange always exists

    async def exists(self, name: str) -> bool:
        if name in self._known:
            return self._known[name]
        channel = self._channel
        if channel is None or channel.is_closed:
            channel = self._channel = aio_pika.Channel(self._connection, publisher_confirms=False)
            await asyncio.wait_for(channel, self._timeout_s)
        try:
            await channel.declare_exchange(name, passive=True, timeout=self._timeout_s)
        except ChannelNotFoundEntity:  # the broker closed the channel with its answer
            self._channel = None
            self._known[name] = False
            return False
        self._known[name] = True
        return True


async def _replay_batch(
    collection: AsyncCollection[Document],
    publisher: ConfirmingPublisher,
    exchanges: ExchangeCheck | None,
    docs: list[Document],
    report: ReplayReport,
    request: _ReplayRequest,
) -> bool:
    """Claim, publish and mark one batch of one service's letters; True when it touched any.

    A letter the broker refused (unroutable, nacked) is dead again; one whose publish ended
    any other way (channel or connection closed under it) may have reached the broker, so
    it stays ``replaying`` for the operator to check (``--include-interrupted``), and the
    run stops there (``in_doubt``). A letter whose exchange does not exist fails alone,
    unsent (published, it would make the broker close the channel under the whole batch);
    exchanges are checked before the claim, so a check that fails leaves nothing claimed.
    """

    def target(doc: Document) -> tuple[str, str]:
        if request.to_queue:
            return "", request.to_queue
        return doc["original_exchange"], doc["original_routing_key"]

    missing: dict[Any, BaseException | None] = {}
    for doc in docs:
        exchange = target(doc)[0]
        if exchanges is not None and not await exchanges.exists(exchange):
            missing[doc["_id"]] = ExchangeMissingError(f"exchange {exchange!r} does not exist")
    ids = [doc["_id"] for doc in docs]
    # The claim keeps the status it took the letter from, to give it back unsent. Run again
    # after a failover it claims nothing twice: what it claimed before is no longer claimable.
    await retry_transient(
        lambda: collection.update_many(
            {
                "_id": {"$in": ids},
                "claim": {"$ne": report.operation_id},  # a retried claim keeps claimed_from
                **claimable(request.statuses, request.stale_claim_after),
            },
            [
                {
                    "$set": {
                        "claimed_from": "$status",
                        "status": "replaying",
                        "claim": report.operation_id,
                        "claimed_at": "$$NOW",
                    }
                }
            ],
        )
    )
    primary = collection.with_options(read_preference=ReadPreference.PRIMARY)
    ours = {
        d["_id"]
        async for d in primary.find(
            {"_id": {"$in": ids}, "status": "replaying", "claim": report.operation_id},
            {"_id": 1},
        )
    }
    claimed = [doc for doc in docs if doc["_id"] in ours]  # the rest: replayed or purged since
    report.skipped += len(docs) - len(claimed)
    if not claimed:
        return False
    now = datetime.now(UTC)

    def info(doc: Document) -> Document:
        return {
            "by": request.operator,
            "at": now.isoformat(),
            "reason": request.reason,
            "operation_id": report.operation_id,
            "dead_letter_id": str(doc["_id"]),
        }

    async def send(doc: Document) -> None:
        exchange, routing_key = target(doc)
        await publisher.publish_message(
            replay_message(doc, info(doc)), exchange=exchange, routing_key=routing_key
        )

    outcomes = {doc["_id"]: missing[doc["_id"]] for doc in claimed if doc["_id"] in missing}
    async with _claim_kept(collection, [doc["_id"] for doc in claimed], report.operation_id):
        for wave in _waves([doc for doc in claimed if doc["_id"] not in missing]):
            # In order on one channel, confirms pipelined. The client matches a returned
            # (unroutable) message to its publish by message id, so a wave never holds two
            # letters of one message id.
            results = await asyncio.gather(*(send(doc) for doc in wave), return_exceptions=True)
            for doc, result in zip(wave, results, strict=True):
                if isinstance(result, BaseException) and not isinstance(result, Exception):
                    raise result
                outcomes[doc["_id"]] = result
            if any(r is not None and not isinstance(r, _REFUSED) for r in results):
                break  # the channel is most likely gone: what follows is not sent
    marks: list[UpdateOne] = []
    replayed = failed = in_doubt = 0
    errors: list[str] = []
    for doc in claimed:
        mine = {"_id": doc["_id"], "claim": report.operation_id}
        if doc["_id"] not in outcomes:  # never published: back to the status it was claimed from
            # (one taken over from a run that died goes back to replaying, unclaimed)
            back = {"$ifNull": ["$claimed_from", doc["status"]]}
            marks.append(UpdateOne(mine, [{"$set": {"status": back}}, {"$unset": list(_CLAIM)}]))
            continue
        error = outcomes[doc["_id"]]
        if error is None:
            replayed += 1
            exchange, routing_key = target(doc)
            history = {
                **info(doc),
                "action": "replayed",
                "exchange": exchange,
                "routing_key": routing_key,
            }
            change: Document = {"$set": {"status": "replayed", "replayed_at": now}}
        elif isinstance(error, _REFUSED):
            failed += 1
            errors.append(f"{doc['_id']}: {type(error).__name__}: {error}")
            history = {**info(doc), "action": "replay_failed", "error": str(error)}
            change = {"$set": {"status": "dead"}}
        else:
            in_doubt += 1
            errors.append(
                f"{doc['_id']}: in doubt, left replaying: {type(error).__name__}: {error}"
            )
            # Let go (still replaying): this run stops here, so --include-interrupted may
            # take it at once.
            history = {**info(doc), "action": "in_doubt", "error": str(error)}
            marks.append(UpdateOne(mine, {"$unset": _CLAIM, "$push": {"history": history}}))
            continue
        marks.append(UpdateOne(mine, {**change, "$unset": _CLAIM, "$push": {"history": history}}))
    try:
        # Each mark matches only while this run's claim is there and removes it, so a retry
        # after an attempt that was applied matches nothing again.
        await retry_transient(lambda: collection.bulk_write(marks, ordered=False))
    except Exception:
        # Not marked: they stay replaying under this run's claim, and the report names the
        # ones that may have gone out, since --include-interrupted would send them again.
        gone = [
            str(doc["_id"])
            for doc in claimed
            if doc["_id"] in outcomes and not isinstance(outcomes[doc["_id"]], _REFUSED)
        ]
        if gone:
            report.errors.append(
                f"delivered or in doubt, not marked (left replaying): {', '.join(gone)}"
            )
        report.in_doubt += in_doubt
        report.errors += errors
        raise
    report.replayed += replayed
    report.failed += failed
    report.in_doubt += in_doubt
    report.errors += errors
    # Claimed by another run before this one marked them (this run's claim went stale).
    taken = await collection.count_documents(
        {
            "_id": {"$in": [doc["_id"] for doc in claimed]},
            "claim": {"$nin": [None, report.operation_id]},
        }
    )
    if taken:
        report.taken_over += taken
        report.errors.append(
            f"{taken} letters were claimed by another run before this one marked them"
        )
    return True


_CLAIM = {"claim": "", "claimed_at": "", "claimed_from": ""}
T = TypeVar("T")


async def retry_transient(
    operation: Callable[[], Awaitable[T]], attempts: int = 3, pause_s: float = 0.5
) -> T:
    """``operation``, again after a transient database error (a primary stepping down, a
    lost connection): the driver retries single-document writes itself, not multi-document
    ones such as the claim."""
    for attempt in range(1, attempts + 1):
        try:
            return await operation()
        except PyMongoError as exc:
            if not is_transient(exc) or attempt == attempts:
                raise
            await asyncio.sleep(pause_s * attempt)
    raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def _claim_kept(
    collection: AsyncCollection[Document], ids: list[Any], operation_id: str
) -> AsyncIterator[None]:
    """Renew this run's claim on ``ids`` every ``CLAIM_RENEWAL`` while the block runs (a
    publish can wait on a blocked broker for longer than a claim stays fresh)."""

    async def renew() -> None:
        while True:
            await asyncio.sleep(CLAIM_RENEWAL.total_seconds())
            with contextlib.suppress(PyMongoError):  # the marks will tell
                await collection.update_many(
                    {"_id": {"$in": ids}, "claim": operation_id},
                    [{"$set": {"claimed_at": "$$NOW"}}],
                )

    renewing = asyncio.create_task(renew())
    try:
        yield
    finally:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing


def _waves(letters: list[Document]) -> list[list[Document]]:
    """``letters`` in order, cut wherever a message id would repeat within a wave."""
    waves: list[list[Document]] = [[]]
    seen: set[Any] = set()
    for doc in letters:
        message_id = doc["message_id"]
        if message_id in seen:
            waves.append([])
            seen = set()
        waves[-1].append(doc)
        seen.add(message_id)
    return waves


async def purge(
    store: DeadLetterStore, flt: Filter, *, operator: str, reason: str, dry_run: bool
) -> tuple[int, list[Document]]:
    """Archive the selected letters as ``purged`` (they expire after the retention)."""
    letters = await store.find(flt)
    if dry_run or not letters:
        return 0, letters
    now = datetime.now(UTC)
    purged = 0
    by_service: dict[str, list[Any]] = {}
    for doc in letters:
        by_service.setdefault(doc["service"], []).append(doc["_id"])
    for service, ids in by_service.items():
        result = await store.db(service)[DEAD_LETTERS].update_many(
            {"_id": {"$in": ids}, "status": "dead"},
            {
                "$set": {"status": "purged", "purged_at": now},
                "$push": {
                    "history": {
                        "action": "purged",
                        "by": operator,
                        "reason": reason,
                        "at": now.isoformat(),
                    }
                },
            },
        )
        purged += result.modified_count
    await store.audit(
        set(by_service),
        {
            "operation_id": uuid.uuid4().hex,
            "action": "purge",
            "operator": operator,
            "reason": reason,
            "filter": flt.describe(),
            "selected": len(letters),
            "purged": purged,
            "at": now,
        },
    )
    return purged, letters


# -- command line -----------------------------------------------------------------------

dlq_app = typer.Typer(no_args_is_help=True, help="Inspect, replay and purge dead letters.")

Service = Annotated[str | None, typer.Option(help="organizations | invitations | billing")]
Queue = Annotated[str | None, typer.Option(help="dead-letter or work queue name")]
EventType = Annotated[
    str | None, typer.Option("--event-type", help="e.g. organization.provisioned")
]
ErrorText = Annotated[str | None, typer.Option("--error", help="text in error type/message/reason")]
Since = Annotated[datetime | None, typer.Option(help="failed at or after (ISO time)")]
Before = Annotated[datetime | None, typer.Option(help="failed before (ISO time): a cut-off")]
MinAttempts = Annotated[int | None, typer.Option("--min-attempts")]
AsJson = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def _filter(
    ids: list[str] | None,
    service: str | None,
    queue: str | None,
    event_type: str | None,
    error: str | None,
    since: datetime | None,
    before: datetime | None,
    min_attempts: int | None,
    statuses: tuple[str, ...] = ("dead",),
) -> Filter:
    return Filter(
        list(ids or []),
        service,
        queue,
        event_type,
        error,
        _aware(since),
        _aware(before),
        min_attempts,
        statuses,
    )


def _operator(value: str | None) -> str:
    return value or os.environ.get("GRANTWIRE_OPERATOR") or getpass.getuser()


async def _with_store(work: Callable[[DeadLetterStore, DlqSettings], Any]) -> Any:
    settings = DlqSettings()
    client = create_client(
        settings.mongo_url.get_secret_value(), app_name="grantwire-dlq", timeout_ms=5_000
    )
    try:
        return await work(DeadLetterStore(client, settings.dlq_databases), settings)
    except PyMongoError as exc:
        url = mask_url(settings.mongo_url.get_secret_value())
        typer.echo(f"database at {url} unavailable: {type(exc).__name__}", err=True)
        raise typer.Exit(1) from exc
    finally:
        await client.close()


def _table(rows: list[Document], columns: list[str]) -> None:
    if not rows:
        typer.echo("(none)")
        return
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    typer.echo("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for row in rows:
        typer.echo("  ".join(str(row[c]).ljust(widths[c]) for c in columns))


@dlq_app.command("list")
def list_letters(
    service: Service = None,
    queue: Queue = None,
    event_type: EventType = None,
    error: ErrorText = None,
    since: Since = None,
    before: Before = None,
    min_attempts: MinAttempts = None,
    status: Annotated[
        str, typer.Option(help="dead | replaying | replayed | purged | all")
    ] = "dead",
    group: Annotated[bool, typer.Option("--group", help="counts by queue, type, error")] = False,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 200,
    as_json: AsJson = False,
) -> None:
    """List dead letters (read-only: the broker's queues are not touched)."""
    statuses = ("dead", "replaying", "replayed", "purged") if status == "all" else (status,)
    flt = _filter(None, service, queue, event_type, error, since, before, min_attempts, statuses)

    async def work(store: DeadLetterStore, _: DlqSettings) -> list[Document]:
        return await store.find(flt, limit=0 if group else limit)

    letters = asyncio.run(_with_store(work))
    rows = grouped(letters) if group else [summary_row(d) for d in letters]
    if as_json:
        typer.echo(json.dumps(rows))
    elif group:
        _table(rows, ["queue", "event_type", "error_type", "count"])
    else:
        _table(rows, ["id", "queue", "event_type", "error_type", "attempts", "failed_at", "error"])


@dlq_app.command()
def show(letter_id: str, as_json: AsJson = False) -> None:
    """Body, properties, headers and failure history of one dead letter."""

    async def work(store: DeadLetterStore, _: DlqSettings) -> Document | None:
        return await store.get(letter_id)

    doc = asyncio.run(_with_store(work))
    if doc is None:
        typer.echo(f"no dead letter {letter_id}", err=True)
        raise typer.Exit(1)
    body = bytes(doc.pop("body"))
    try:
        doc["body"] = json.loads(body)
    except ValueError:
        doc["body"] = body.decode("utf-8", "replace")
    doc["_id"] = str(doc["_id"])
    typer.echo(json.dumps(doc, default=str, indent=None if as_json else 2))


@dlq_app.command("replay")
def replay_command(
    ids: Annotated[
        list[str] | None, typer.Argument(help="dead-letter ids (or use filters)")
    ] = None,
    reason: Annotated[str, typer.Option(help="why (kept in the audit trail)")] = ...,  # type: ignore[assignment]
    operator: Annotated[
        str | None, typer.Option(help="default: $GRANTWIRE_OPERATOR or $USER")
    ] = None,
    service: Service = None,
    queue: Queue = None,
    event_type: EventType = None,
    error: ErrorText = None,
    since: Since = None,
    before: Before = None,
    min_attempts: MinAttempts = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print what would be replayed")
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, max=10_000)] = 100,
    rate: Annotated[float | None, typer.Option(min=0.1, help="messages per second")] = None,
    to_queue: Annotated[str | None, typer.Option(help="send to this queue instead")] = None,
    include_interrupted: Annotated[
        bool, typer.Option(help="also letters an interrupted run claimed")
    ] = False,
    stale_claim_after: Annotated[
        float,
        typer.Option(
            min=0,
            help="with --include-interrupted: seconds after which a claim belongs to a run "
            "that died (a fresher one is left to its run). A running replay renews its claim "
            "every 10 s: below about 20 s, say so only when you know that run is gone",
        ),
    ] = STALE_CLAIM_AFTER.total_seconds(),
    as_json: AsJson = False,
) -> None:
    """Replay dead letters to their original exchange and routing key (or --to-queue)."""
    if not ids and not any((service, queue, event_type, error, since, before, min_attempts)):
        raise typer.BadParameter("name dead-letter ids or at least one filter")
    statuses = ("dead", "replaying") if include_interrupted else ("dead",)
    flt = _filter(ids, service, queue, event_type, error, since, before, min_attempts, statuses)
    who = _operator(operator)
    tty = sys.stdout.isatty() and not as_json

    def show_letter(doc: Document) -> None:
        if dry_run and not as_json:
            target = to_queue or f"{doc['original_exchange']} / {doc['original_routing_key']}"
            typer.echo(
                f"would replay {doc['_id']} {doc['event_type']} {doc['message_id']} -> {target}"
            )

    async def work(store: DeadLetterStore, settings: DlqSettings) -> ReplayReport:
        if dry_run:
            return await replay(
                store,
                None,
                flt,
                operator=who,
                reason=reason,
                dry_run=True,
                show=show_letter,
                stale_claim_after=timedelta(seconds=stale_claim_after),
            )
        connection = await aio_pika.connect_robust(settings.amqp_url.get_secret_value())
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            publisher = ConfirmingPublisher(channel, channel.default_exchange)
            exchanges = ExchangeCheck(connection)

            async def run(progress: Callable[[int, int], None] | None) -> ReplayReport:
                return await replay(
                    store,
                    publisher,
                    flt,
                    operator=who,
                    reason=reason,
                    batch_size=batch_size,
                    rate=rate,
                    to_queue=to_queue,
                    progress=progress,
                    stale_claim_after=timedelta(seconds=stale_claim_after),
                    exchanges=exchanges,
                )

            if not tty:
                return await run(None)
            from rich.progress import Progress

            with Progress() as bar:
                task = bar.add_task("replaying", total=None)
                return await run(lambda done, total: bar.update(task, completed=done, total=total))
        finally:
            await connection.close()

    report = asyncio.run(_with_store(work))
    typer.echo(json.dumps(report.__dict__))
    if report.interrupted_before and not include_interrupted:
        typer.echo(
            f"note: {report.interrupted_before} letters were claimed by an interrupted replay and "
            "not re-sent; check them, then use --include-interrupted",
            err=True,
        )
    if report.claimed_by_running:
        typer.echo(
            f"note: {report.claimed_by_running} letters are claimed by a replay that may still "
            f"be running (claimed less than {stale_claim_after:g} s ago); left to it",
            err=True,
        )
    if report.in_doubt:
        typer.echo(
            f"note: the broker connection failed under {report.in_doubt} letters; they may have "
            "been delivered and are left replaying (see errors); the run stopped there",
            err=True,
        )
    if report.stopped:
        typer.echo(
            f"note: the run stopped early ({report.stopped}); letters it had claimed stay "
            "replaying (see errors for any delivered but not marked), for "
            "--include-interrupted once their claim is older than its --stale-claim-after",
            err=True,
        )
    if not report.audit_written:
        typer.echo("note: the audit record could not be written (see errors)", err=True)
    if (
        report.failed
        or report.in_doubt
        or report.stopped
        or report.taken_over
        or not report.audit_written
    ):
        raise typer.Exit(1)


@dlq_app.command("purge")
def purge_command(
    ids: Annotated[
        list[str] | None, typer.Argument(help="dead-letter ids (or use filters)")
    ] = None,
    reason: Annotated[str, typer.Option(help="why (kept in the audit trail)")] = ...,  # type: ignore[assignment]
    operator: Annotated[str | None, typer.Option()] = None,
    service: Service = None,
    queue: Queue = None,
    event_type: EventType = None,
    error: ErrorText = None,
    since: Since = None,
    before: Before = None,
    min_attempts: MinAttempts = None,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
) -> None:
    """Archive dead letters as purged (kept for the retention period, then expired)."""
    if not ids and not any((service, queue, event_type, error, since, before, min_attempts)):
        raise typer.BadParameter("name dead-letter ids or at least one filter")
    flt = _filter(ids, service, queue, event_type, error, since, before, min_attempts)
    who = _operator(operator)

    async def preview(store: DeadLetterStore, _: DlqSettings) -> list[Document]:
        return await store.find(flt)

    letters = asyncio.run(_with_store(preview))
    if dry_run:
        for doc in letters:
            typer.echo(f"would purge {doc['_id']} {doc['event_type']} {doc['error_type']}")
        typer.echo(json.dumps({"selected": len(letters), "purged": 0, "dry_run": True}))
        return
    if not yes:
        if not sys.stdin.isatty():
            typer.echo("refusing to purge without --yes when not on a terminal", err=True)
            raise typer.Exit(2)
        typer.confirm(f"Purge {len(letters)} dead letters?", abort=True)

    async def work(store: DeadLetterStore, _: DlqSettings) -> tuple[int, list[Document]]:
        return await purge(store, flt, operator=who, reason=reason, dry_run=False)

    purged, selected = asyncio.run(_with_store(work))
    typer.echo(json.dumps({"selected": len(selected), "purged": purged, "dry_run": False}))


def register(app: typer.Typer) -> None:
    """Add `grantwire dlq ...` to the command line."""
    app.add_typer(dlq_app, name="dlq")
