"""The IO of one service process: database, broker, consumers and outbox relay.

A service's composition root builds one ``ServiceRuntime``, registers its consumers,
and starts/stops it from the HTTP app's lifespan. Stop order matters: stop consuming,
let in-flight messages finish, flush the outbox, then close the connections.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import aio_pika
import structlog
from aio_pika.abc import AbstractRobustConnection
from pymongo import AsyncMongoClient, IndexModel
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase

from shared import metrics
from shared.consumer import Consumer, Handler
from shared.deadletters import (
    DEAD_LETTERS,
    RETIRED_DEAD_LETTER_INDEXES,
    DeadLetterKeeper,
    dead_letter_indexes,
)
from shared.logging import mask_url
from shared.mongo import (
    Document,
    create_client,
    drop_retired_indexes,
    ensure_indexes,
    ping,
    run_in_transaction,
)
from shared.outbox import OutboxRelay, outbox_indexes
from shared.publisher import ConfirmingPublisher
from shared.settings import ServiceSettings
from shared.shutdown import STOP_STEP_TIMEOUT_S, bounded_step
from shared.topology import WorkQueue, declare_event_log, declare_exchanges

T = TypeVar("T")
DEAD_LETTER_STATUSES = ("dead", "replaying", "replayed", "purged")
log = structlog.get_logger("grantwire.runtime")
READINESS_PING_TIMEOUT_S = 2.0
MIN_STOP_STEP_S = 0.1  # past the grace, each remaining close still gets this long


class ServiceRuntime:
    """Owns the process's one Mongo client, one AMQP connection, consumers and relay."""

    def __init__(
        self,
        *,
        service: str,
        settings: ServiceSettings,
        indexes: Mapping[str, Sequence[IndexModel]],
        publishes: Sequence[str] = (),
    ) -> None:
        self.service = service
        self.publishes = tuple(publishes)  # event types it stages in its outbox (contract docs)
        self.settings = settings
        self.naming = settings.naming()
        self._indexes = {
            **outbox_indexes(settings.sent_retention()),
            **dead_letter_indexes(timedelta(days=settings.dead_letter_purged_retention_days)),
            **indexes,
        }
        self.instance_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._client: AsyncMongoClient[Document] | None = None
        self._connection: AbstractRobustConnection | None = None
        self._publisher: ConfirmingPublisher | None = None
        self._relay: OutboxRelay | None = None
        self._subscriptions: list[tuple[WorkQueue, Mapping[str, Handler]]] = []
        self._consumers: list[Consumer] = []
        self._keeper: DeadLetterKeeper | None = None
        self._scrape_hooks: list[Callable[[], Awaitable[None]]] = []

    # -- wiring -----------------------------------------------------------------------
    def subscribe(self, work_queue: WorkQueue, handlers: Mapping[str, Handler]) -> None:
        """Register a work queue and its handlers (before ``start``)."""
        self._subscriptions.append((work_queue, handlers))

    def on_scrape(self, refresh: Callable[[], Awaitable[None]]) -> None:
        """Run ``refresh`` before every ``/metrics`` scrape (a service's own gauges)."""
        self._scrape_hooks.append(refresh)

    @property
    def work_queues(self) -> list[WorkQueue]:
        """The work queues this runtime consumes (declared on start)."""
        return [work_queue for work_queue, _ in self._subscriptions]

    @property
    def client(self) -> AsyncMongoClient[Document]:
        assert self._client is not None, "runtime not started"
        return self._client

    @property
    def db(self) -> AsyncDatabase[Document]:
        return self.client[self.settings.mongo_db]

    @property
    def publisher(self) -> ConfirmingPublisher:
        assert self._publisher is not None, "runtime not started"
        return self._publisher

    @property
    def relay(self) -> OutboxRelay:
        assert self._relay is not None, "runtime not started"
        return self._relay

    async def commit(self, work: Callable[[AsyncClientSession], Awaitable[T]]) -> T:
        """Run ``work`` in one transaction, then wake the relay for its outbox events."""
        result = await run_in_transaction(self.client, work)
        if self._relay is not None:
            self._relay.wake()
        return result

    # -- lifecycle --------------------------------------------------------------------
    async def start(self, *, consume: bool = True) -> None:
        """Connect, declare indexes and topology, start the relay and the consumers."""
        settings = self.settings
        log.info(
            "starting",
            amqp=mask_url(settings.amqp_url.get_secret_value()),
            mongo=mask_url(settings.mongo_url.get_secret_value()),
            database=settings.mongo_db,
        )
        self._client = create_client(
            settings.mongo_url.get_secret_value(),
            app_name=self.service,
            tls_options=settings.mongo_tls_options(),
        )
        await ensure_indexes(self.db, self._indexes)
        await drop_retired_indexes(self.db, RETIRED_DEAD_LETTER_INDEXES)
        self._connection = await aio_pika.connect_robust(
            settings.amqp_url.get_secret_value(),
            client_properties={"connection_name": f"{self.service}:{self.instance_id}"},
            reconnect_interval=settings.amqp_reconnect_interval_s,
            ssl_context=settings.amqp_ssl_context(),
        )
        setup = await self._connection.channel()
        await declare_exchanges(setup, self.naming)
        if settings.event_log_enabled:
            await declare_event_log(setup, self.naming, settings.event_log_max_age)
        await setup.close()
        self._publisher = await ConfirmingPublisher.open(
            self._connection, self.naming.events_exchange
        )
        self._relay = OutboxRelay(
            self.db,
            self._publisher,
            owner=self.instance_id,
            service=self.service,
            events_exchange=self.naming.events_exchange,
            poll_interval_s=settings.outbox_poll_interval_s,
            max_backoff_s=settings.outbox_max_backoff_s,
        )
        await self._relay.start()
        if consume:
            await self.start_consumers()

    async def start_consumers(self) -> None:
        """Declare each work queue and start consuming it."""
        assert self._connection is not None and self._publisher is not None
        for work_queue, handlers in self._subscriptions:
            consumer = Consumer(
                service=self.service,
                connection=self._connection,
                publisher=self._publisher,
                naming=self.naming,
                work_queue=work_queue,
                handlers=handlers,
                settings=self.settings.consumer_settings(),
            )
            await consumer.start()
            self._consumers.append(consumer)
        if self.settings.keep_dead_letters and self._subscriptions:
            self._keeper = DeadLetterKeeper(
                service=self.service,
                connection=self._connection,
                db=self.db,
                naming=self.naming,
                work_queues=self.work_queues,
            )
            await self._keeper.start()

    async def stop(self) -> None:
        """Stop consuming, finish in-flight messages, flush the outbox, close.

        It returns even while the broker or the database is unreachable: in-flight messages
        get half the grace, the outbox flush a third, and each broker or database round trip
        a quarter of it, at most ``STOP_STEP_TIMEOUT_S``, and hardly any once the grace is
        over.
        """
        grace = self.settings.shutdown_grace_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace

        def step_timeout() -> float:
            left = deadline - loop.time()
            return max(MIN_STOP_STEP_S, min(STOP_STEP_TIMEOUT_S, grace / 4, left))

        await asyncio.gather(
            *(
                consumer.stop(timeout_s=grace / 2, step_timeout_s=step_timeout())
                for consumer in self._consumers
            )
        )
        self._consumers.clear()
        if self._keeper is not None:
            await self._keeper.stop(step_timeout_s=step_timeout())
            self._keeper = None
        if self._relay is not None:
            await self._relay.stop(flush_timeout_s=grace / 3, step_timeout_s=step_timeout())
        if self._connection is not None:
            await bounded_step(
                self._connection.close(),
                what="close broker connection",
                log=log,
                timeout_s=step_timeout(),
            )
        if self._client is not None:
            await bounded_step(
                self._client.close(),
                what="close database client",
                log=log,
                timeout_s=step_timeout(),
            )
        log.info("stopped")

    # -- health and metrics -------------------------------------------------------------
    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, checks): broker connected, database reachable, outbox not stuck.

        A failing check says why in ``checks["reasons"]``; the outbox check names the
        oldest pending event and the error that holds it up.
        """
        checks: dict[str, Any] = {}
        reasons: list[str] = []
        connection = self._connection
        connected = (
            connection is not None and connection.connected.is_set() and not connection.is_closed
        )
        checks["broker"] = "ok" if connected else "down"
        if not connected:
            reasons.append("broker: not connected")
        try:
            # Bounded: a probe must answer (with the reason) before the orchestrator gives up.
            await asyncio.wait_for(ping(self.client), READINESS_PING_TIMEOUT_S)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"down: {type(exc).__name__}"
            reasons.append(f"database: {type(exc).__name__}: {exc}"[:300])
        if self._relay is None:
            reasons.append("outbox: relay not started")
        elif checks["database"] == "ok":
            checks["outbox"] = await self._outbox_check(reasons)
        ready = not reasons
        for consumer in self._consumers:
            up = 1 if connected and consumer.consuming else 0
            metrics.CONSUMER_UP.labels(self.service, consumer.queue_name).set(up)
        metrics.READY.labels(self.service).set(1 if ready else 0)
        if reasons:
            checks["reasons"] = reasons
        return ready, checks

    async def _outbox_check(self, reasons: list[str]) -> dict[str, Any]:
        summary = await self.relay.pending_summary()
        metrics.OUTBOX_PENDING.labels(self.service).set(summary.pending)
        metrics.OUTBOX_OLDEST_AGE.labels(self.service).set(summary.oldest_age_s)
        threshold = self.settings.outbox_stuck_after_s
        stuck = summary.oldest_age_s > threshold
        check: dict[str, Any] = {
            "status": "stuck" if stuck else "ok",
            "pending": summary.pending,
            "oldest_pending_s": round(summary.oldest_age_s, 3),
            "stuck_after_s": threshold,
            "last_error": self.relay.last_error,
        }
        if summary.oldest_event_id is not None:
            check["oldest"] = {
                "event_id": summary.oldest_event_id,
                "event_type": summary.oldest_event_type,
                "attempts": summary.oldest_attempts,
                "error": summary.oldest_error,
            }
        if stuck:
            cause = summary.oldest_error or self.relay.last_error or "the relay has not run"
            reasons.append(
                f"outbox: {summary.pending} pending, the oldest ({summary.oldest_event_type} "
                f"{summary.oldest_event_id}) waits {summary.oldest_age_s:.1f} s > {threshold:g} s;"
                f" last error: {cause}"
            )
        return check

    async def refresh_metrics(self) -> None:
        """Refresh the gauges before a scrape: readiness, outbox, dead letters, the service's."""
        await self.readiness()
        hooks = [self._count_dead_letters] if self._keeper is not None else []
        for refresh in [*hooks, *self._scrape_hooks]:
            try:
                await refresh()
            except Exception as exc:  # a scrape still answers; the gauges keep their values
                log.warning("metrics refresh failed", error=repr(exc))

    async def _count_dead_letters(self) -> None:
        letters = self.db[DEAD_LETTERS]
        for status in DEAD_LETTER_STATUSES:
            count = await letters.count_documents({"status": status})
            metrics.DEAD_LETTERS_STORED.labels(self.service, status).set(count)
