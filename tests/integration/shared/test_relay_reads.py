"""The outbox relay reads the outbox once per wake-up it needs, not again for the change-stream
notice of a document it has already read (real MongoDB replica set and RabbitMQ).

Each round queues the commit's read on the relay's drain lock before the commit, so the read
starts before the watch looks at the notice. Measured: passes 12 of 12 runs with the relay's
filter, fails 8 of 8 without it. (Before, the test called ``wake()`` after the commit: a
notice that came first started the read itself, the wake-up one more, and the test failed
about 1 run in 3 with a correct relay.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aio_pika.abc import AbstractRobustConnection
from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from shared.contracts import OrganizationProvisioned
from shared.envelope import Envelope
from shared.mongo import run_in_transaction
from shared.outbox import LEASES, OUTBOX, OutboxRelay, stage_events
from shared.publisher import ConfirmingPublisher
from shared.runtime import ServiceRuntime
from shared.settings import ServiceSettings
from tests.support import Isolation, wait_until

pytestmark = pytest.mark.integration
ROUNDS = 3


class OutboxCommands(monitoring.CommandListener):
    """Counts the relay's reads of the outbox and the change-stream notices it receives."""

    def __init__(self) -> None:
        self.finds = 0
        self.notices = 0
        self.get_mores_started = 0
        self.streams = 0  # change streams opened on the outbox
        self.streams_closed = 0
        self.lease_attempts = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "find" and event.command.get("find") == OUTBOX:
            self.finds += 1
        if event.command_name == "aggregate" and event.command.get("aggregate") == OUTBOX:
            stages = event.command.get("pipeline") or [{}]
            self.streams += "$changeStream" in stages[0]
        if event.command_name == "findAndModify" and event.command.get("findAndModify") == LEASES:
            self.lease_attempts += 1
        if event.command_name == "killCursors" and event.command.get("killCursors") == OUTBOX:
            self.streams_closed += 1
        if event.command_name == "getMore" and event.command.get("collection") == OUTBOX:
            self.get_mores_started += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        if event.command_name == "getMore" and (event.reply.get("cursor") or {}).get("nextBatch"):
            self.notices += 1

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


class GatedPublisher(ConfirmingPublisher):
    """Publishes only once ``gate`` is set: the relay's drain waits there."""

    gate = asyncio.Event()

    async def publish_many(self, envelopes: Sequence[Envelope]) -> list[BaseException | None]:
        await self.gate.wait()
        return await super().publish_many(envelopes)


def counted_client(isolation: Isolation, commands: OutboxCommands) -> AsyncMongoClient[Any]:
    return AsyncMongoClient(
        isolation.urls.mongo_url, event_listeners=[commands], w="majority", tz_aware=True
    )


@contextlib.asynccontextmanager
async def counted_outbox(
    isolation: Isolation, service: str
) -> AsyncIterator[tuple[OutboxCommands, AsyncMongoClient[Any], AsyncDatabase[Any]]]:
    """The service's topology declared (the exchanges, the event log that routes events)
    and an outbox of its own, reached through a client whose commands are counted."""
    runtime = ServiceRuntime(
        service=service, settings=isolation.settings(ServiceSettings, service), indexes={}
    )
    await runtime.start(consume=False)
    commands = OutboxCommands()
    client = counted_client(isolation, commands)
    db = client[isolation.db_name(f"{service}_own")]
    await db.create_collection(OUTBOX)
    try:
        yield commands, client, db
    finally:
        await runtime.stop()
        await client.drop_database(db.name)
        await client.close()


async def test_a_change_stream_notice_of_a_document_already_published_wakes_no_read(
    isolation: Isolation, amqp: AbstractRobustConnection
) -> None:
    async with counted_outbox(isolation, "relayreads") as (commands, client, db):
        publisher = await GatedPublisher.open(amqp, isolation.naming.events_exchange)
        assert isinstance(publisher, GatedPublisher)
        publisher.gate = asyncio.Event()
        relay = OutboxRelay(db, publisher, owner="reader", poll_interval_s=60.0)
        await relay.start()
        try:
            # Started: its first read, the stream open (which asks for one more read, for what
            # was committed before the stream began), and that read done.
            await wait_until(
                lambda: asyncio.sleep(0, commands.get_mores_started and relay.caught_up)
            )
            started = commands.finds
            for round_ in range(1, ROUNDS + 1):
                envelope = Envelope.new(
                    OrganizationProvisioned(user_id=f"u{round_}", organization_id="o1"), source="t"
                )

                async def stage(session: AsyncClientSession, envelope: Envelope = envelope) -> None:
                    await stage_events(db, session, [envelope], aggregate_id="o1")

                publisher.gate.clear()
                # The read that follows the commit (the one its wake-up starts) is queued on the
                # drain lock before the commit, so it takes the lock before the watch can look
                # at the document's notice; the relay's own task sleeps (no wake-up, 60 s poll).
                async with relay.draining():
                    read = asyncio.create_task(relay.drain_once())
                    await asyncio.sleep(0)  # the read task runs until it waits for the lock
                    await run_in_transaction(client, stage)

                async def read_and_noticed(n: int = round_) -> bool:
                    return commands.finds == started + n and commands.notices == n

                # The read has the document and is publishing it when its notice arrives.
                await wait_until(read_and_noticed)
                asked_again = commands.get_mores_started
                publisher.gate.set()
                assert await read == (1, 0)
                assert relay.published == round_

                # The watch handled the notice and waits for the next; a wake-up it set has had
                # its chance to start a read.
                async def asked_again_for_notices(asked: int = asked_again) -> bool:
                    return commands.get_mores_started > asked

                await wait_until(asked_again_for_notices)
                for _ in range(50):
                    await asyncio.sleep(0)

                # The start, then one read per commit; none for the notices.
                assert commands.finds == started + round_
        finally:
            await relay.stop()


async def test_only_the_relay_holding_the_lease_watches_the_outbox(
    isolation: Isolation, amqp: AbstractRobustConnection
) -> None:
    async with counted_outbox(isolation, "relaywatch") as (first, client, db):
        second = OutboxCommands()
        other = counted_client(isolation, second)
        publisher = await ConfirmingPublisher.open(amqp, isolation.naming.events_exchange)
        ttl = timedelta(seconds=1.5)  # renewed every 0.5 s: a stalled loop still renews in time
        relays = {
            # the first renews its lease while it idles (it polls more often than ttl / 3)
            "first": OutboxRelay(db, publisher, owner="first", lease_ttl=ttl, poll_interval_s=0.1),
            # no polling to speak of: the second learns of a document only from its stream
            "second": OutboxRelay(
                other[db.name], publisher, owner="second", lease_ttl=ttl, poll_interval_s=60
            ),
        }
        try:
            await _only_the_holder_watches(first, second, relays, client, db)
        finally:
            for relay in relays.values():
                await relay.stop()
            await other.close()


async def _only_the_holder_watches(
    first: OutboxCommands,
    second: OutboxCommands,
    relays: dict[str, OutboxRelay],
    client: AsyncMongoClient[Any],
    db: AsyncDatabase[Any],
) -> None:
    leases = db[LEASES]

    async def holder() -> str | None:
        doc = await leases.find_one({"_id": "outbox-relay"})
        return None if doc is None else str(doc["owner"])

    await relays["first"].start()
    await wait_until(lambda: asyncio.sleep(0, first.streams == 1))
    await relays["second"].start()
    # it has asked for the lease three times (every third of the TTL) and been refused
    await wait_until(lambda: asyncio.sleep(0, second.lease_attempts >= 3))
    assert await holder() == "first"
    assert second.streams == 0
    # an operator's tool takes the lease: the first stops watching, the second cannot start
    await leases.update_one(
        {"_id": "outbox-relay"},
        {"$set": {"owner": "tool", "expires_at": datetime.now(UTC) + timedelta(minutes=1)}},
    )
    await wait_until(lambda: asyncio.sleep(0, first.streams_closed == 1))
    await relays["first"].stop()
    assert (first.streams, second.streams) == (1, 0)
    await leases.delete_one({"_id": "outbox-relay", "owner": "tool"})
    await wait_until(lambda: asyncio.sleep(0, second.streams == 1))
    await _commit_one_event(client, db)
    await wait_until(lambda: asyncio.sleep(0, relays["second"].published == 1))


async def _commit_one_event(client: AsyncMongoClient[Any], db: AsyncDatabase[Any]) -> None:
    envelope = Envelope.new(OrganizationProvisioned(user_id="u1", organization_id="o1"), source="t")

    async def stage(session: AsyncClientSession) -> None:
        await stage_events(db, session, [envelope], aggregate_id="o1")

    await run_in_transaction(client, stage)


@pytest.mark.timeout(30)  # the failure this guards against froze the event loop
async def test_a_relay_whose_change_stream_is_invalidated_opens_another(
    isolation: Isolation, amqp: AbstractRobustConnection
) -> None:
    async with counted_outbox(isolation, "relayreopen") as (commands, client, db):
        publisher = await ConfirmingPublisher.open(amqp, isolation.naming.events_exchange)
        relay = OutboxRelay(db, publisher, owner="only", poll_interval_s=60)
        try:
            await relay.start()
            await wait_until(lambda: asyncio.sleep(0, commands.streams == 1))
            await db.drop_collection(OUTBOX)  # the stream ends with an "invalidate"
            await wait_until(lambda: asyncio.sleep(0, commands.streams == 2))
            await _commit_one_event(client, db)
            await wait_until(lambda: asyncio.sleep(0, relay.published == 1))
        finally:
            await relay.stop()


async def test_a_document_committed_just_before_the_stream_began_is_read_at_once(
    isolation: Isolation, amqp: AbstractRobustConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with counted_outbox(isolation, "relaygap") as (commands, client, db):
        publisher = await ConfirmingPublisher.open(amqp, isolation.naming.events_exchange)
        relay = OutboxRelay(db, publisher, owner="only", poll_interval_s=60)
        watch = AsyncCollection.watch

        async def commit_then_watch(self: AsyncCollection[Any], *args: Any, **kw: Any) -> Any:
            # the relay has read (nothing); another replica commits before the stream
            # begins, so the stream never tells of that document
            await wait_until(lambda: asyncio.sleep(0, commands.finds >= 1 and relay.caught_up))
            await _commit_one_event(client, db)
            return await watch(self, *args, **kw)

        monkeypatch.setattr(AsyncCollection, "watch", commit_then_watch)
        try:
            await relay.start()
            # no 60 s poll: the stream's opening read finds it
            await wait_until(lambda: asyncio.sleep(0, relay.published == 1))
        finally:
            await relay.stop()
