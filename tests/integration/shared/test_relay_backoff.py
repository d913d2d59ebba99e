"""Documents backing off hold back their own aggregate only: a full batch of them does not
stop the relay from publishing everyone else's events (real MongoDB and RabbitMQ)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aio_pika.abc import AbstractRobustConnection
from pymongo import AsyncMongoClient
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from shared.contracts import OrganizationCreated, OrganizationProvisioned
from shared.envelope import Envelope
from shared.mongo import ensure_indexes, run_in_transaction
from shared.outbox import OUTBOX, OutboxRelay, outbox_indexes, stage_events
from shared.publisher import ConfirmingPublisher
from shared.runtime import ServiceRuntime
from shared.settings import ServiceSettings
from tests.support import EventTap, Isolation, wait_until

pytestmark = pytest.mark.integration
BATCH = 4
STUCK = 2 * BATCH + 1  # waiting documents beyond the first two reads


@dataclass
class Outbox:
    """An outbox of its own, a confirming publisher and a tap on organization.provisioned."""

    client: AsyncMongoClient[Any]
    db: AsyncDatabase[Any]
    publisher: ConfirmingPublisher
    tap: EventTap


@pytest.fixture
async def outbox(
    isolation: Isolation, amqp: AbstractRobustConnection, mongo: AsyncMongoClient[Any]
) -> AsyncIterator[Outbox]:
    # No event log: only organization.provisioned has a queue; organization.created is
    # unroutable, so its documents fail and back off.
    runtime = ServiceRuntime(
        service="relaybackoff",
        settings=isolation.settings(ServiceSettings, "relaybackoff", event_log_enabled=False),
        indexes={},
    )
    await runtime.start(consume=False)
    tap = await EventTap.open(amqp, isolation.naming, ["organization.provisioned"])
    db = mongo[isolation.db_name("relaybackoff_own")]
    await ensure_indexes(db, outbox_indexes(timedelta(days=1)))
    publisher = await ConfirmingPublisher.open(amqp, isolation.naming.events_exchange)
    yield Outbox(mongo, db, publisher, tap)
    await runtime.stop()
    await mongo.drop_database(db.name)


async def test_a_full_batch_backing_off_does_not_hold_up_other_aggregates(
    outbox: Outbox,
) -> None:
    client, db, tap = outbox.client, outbox.db, outbox.tap
    relay = OutboxRelay(
        db,
        outbox.publisher,
        owner="relay",
        poll_interval_s=0.1,
        batch_size=BATCH,
        max_backoff_s=60.0,
    )

    async def stage(envelope: Envelope, aggregate_id: str) -> None:
        async def work(session: AsyncClientSession) -> None:
            await stage_events(db, session, [envelope], aggregate_id=aggregate_id)

        await run_in_transaction(client, work)
        relay.wake()

    def provisioned(organization_id: str) -> Envelope:
        return Envelope.new(
            OrganizationProvisioned(
                user_id=f"u-{organization_id}", organization_id=organization_id
            ),
            source="t",
        )

    await relay.start()
    try:
        # More than two batches of unroutable events, each of its own aggregate, all backing
        # off; their retries are put an hour away so nothing here depends on timing.
        for k in range(STUCK):
            created = OrganizationCreated(organization_id=f"stuck-{k}", plan_id="free")
            await stage(Envelope.new(created, source="t"), f"stuck-{k}")

        async def all_failed_once() -> bool:
            return await db[OUTBOX].count_documents({"attempts": {"$gte": 1}}) == STUCK

        await wait_until(all_failed_once)
        later = datetime.now(UTC) + timedelta(hours=1)
        await db[OUTBOX].update_many({}, {"$set": {"next_attempt_at": later}})
        # A later event of a stuck aggregate waits behind it (order); another's goes now.
        behind = provisioned("stuck-0")
        await stage(behind, "stuck-0")
        free = provisioned("free-1")
        await stage(free, "free-1")

        await tap.wait_for(lambda ms: any(m.message_id == free.id for m in ms), timeout=10.0)
        for _ in range(5):  # the relay has had its chances to (wrongly) publish ``behind``
            await relay.drain_once()
        assert [m.message_id for m in tap.messages] == [free.id]
        pending = await db[OUTBOX].find({"status": "pending"}).to_list()
        assert {d["aggregate_id"] for d in pending} == {f"stuck-{k}" for k in range(STUCK)}
        assert len(pending) == STUCK + 1

        # stuck-0's event comes due and fails again: its retry goes alone, so ``behind``
        # (routable, in the same read) still waits.
        await db[OUTBOX].update_one(
            {"aggregate_id": "stuck-0", "type": "organization.created"},
            {"$set": {"next_attempt_at": datetime.now(UTC) - timedelta(seconds=1)}},
        )
        published, failed = await relay.drain_once()
        assert (published, failed) == (0, 1)
        for _ in range(5):
            await relay.drain_once()
        assert [m.message_id for m in tap.messages] == [free.id]
        retried = await db[OUTBOX].find_one({"aggregate_id": "stuck-0", "status": "pending"})
        assert retried is not None and retried["attempts"] == 2
    finally:
        await relay.stop(flush_timeout_s=0.5)


async def test_when_reading_past_waiting_aggregates_fails_the_oldest_batch_still_goes(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, db, tap = outbox.client, outbox.db, outbox.tap
    # Not started: the test drains by hand, so nothing else reads the outbox.
    relay = OutboxRelay(db, outbox.publisher, owner="relay", batch_size=BATCH)
    envelopes = [
        Envelope.new(
            OrganizationProvisioned(user_id=f"u-{k}", organization_id=f"org-{k}"), source="t"
        )
        for k in range(BATCH + 1)
    ]
    for k, envelope in enumerate(envelopes):

        async def work(session: AsyncClientSession, e: Envelope = envelope, k: int = k) -> None:
            await stage_events(db, session, [e], aggregate_id=f"org-{k}")

        await run_in_transaction(client, work)
    # The oldest batch: BATCH - 1 documents backing off, then org-3's, due.
    later = datetime.now(UTC) + timedelta(hours=1)
    await db[OUTBOX].update_many(
        {"aggregate_id": {"$in": [f"org-{k}" for k in range(BATCH - 1)]}},
        {"$set": {"attempts": 1, "next_attempt_at": later}},
    )

    async def fail(_now: datetime) -> list[str]:
        raise PyMongoError("waiting set unavailable")

    monkeypatch.setattr(relay, "_waiting_aggregates", fail)
    assert await relay.drain_once() == (1, 0)
    await tap.wait_for(lambda ms: len(ms) == 1)
    assert [m.message_id for m in tap.messages] == [envelopes[BATCH - 1].id]
