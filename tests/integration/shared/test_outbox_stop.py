"""The outbox relay's stop with a backlog: everything pending is published, each event once.

A focused regression test of what tests/e2e/test_graceful_shutdown.py checks on real
processes: ``OutboxRelay.stop`` flushes while the relay task may still be draining; unless
the two are serialized (one batch at a time), both read the same pending documents and
publish them twice (measured before the fix: 707 of a 1000-event backlog, 150-300 per stop of
a loaded service).
"""

from __future__ import annotations

import uuid
from collections import Counter

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from pymongo import AsyncMongoClient
from pymongo.asynchronous.client_session import AsyncClientSession

from shared.contracts import OrganizationCreated
from shared.envelope import Envelope
from shared.mongo import Document
from shared.outbox import OUTBOX, stage_events
from shared.runtime import ServiceRuntime
from shared.settings import ServiceSettings
from tests.support import EventTap, Isolation, wait_until

pytestmark = pytest.mark.integration
BACKLOG = 600


async def test_stop_with_a_backlog_publishes_every_pending_event_exactly_once(
    isolation: Isolation, amqp: AbstractRobustConnection, mongo: AsyncMongoClient[Document]
) -> None:
    runtime = ServiceRuntime(
        service="relaystop",
        # stop() gives the flush a third of the grace: room for the whole backlog on a busy
        # machine (what is left after the flush timeout is the next start's to publish).
        settings=isolation.settings(ServiceSettings, "relaystop", shutdown_grace_s=60.0),
        indexes={},
    )
    await runtime.start(consume=False)
    stopped = False
    try:
        tap = await EventTap.open(amqp, isolation.naming, ["organization.created"])
        envelopes = [
            Envelope.new(OrganizationCreated(organization_id=f"o{i}", plan_id="free"), source="t")
            for i in range(BACKLOG)
        ]

        async def stage(session: AsyncClientSession) -> None:
            for start in range(0, BACKLOG, 100):
                batch = envelopes[start : start + 100]
                await stage_events(runtime.db, session, batch, aggregate_id=f"a{start}")

        await runtime.commit(stage)

        async def relaying() -> bool:
            return runtime.relay.published > 0

        await wait_until(relaying)  # the relay task is busy with the backlog: stop now
        await runtime.stop()
        stopped = True
        outbox = mongo[isolation.db_name("relaystop")][OUTBOX]
        assert await outbox.count_documents({"status": "pending"}) == 0

        sentinel = uuid.uuid4().hex  # queued after everything the relay published
        channel = await amqp.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(isolation.naming.events_exchange, ensure=False)
        await exchange.publish(
            aio_pika.Message(b"{}", message_id=sentinel), routing_key="organization.created"
        )
        await channel.close()
        await tap.wait_for(lambda msgs: any(m.message_id == sentinel for m in msgs))

        copies = Counter(m.message_id for m in tap.messages if m.message_id != sentinel)
        assert set(copies) == {envelope.id for envelope in envelopes}  # nothing lost
        assert set(copies.values()) == {1}, f"{sum(copies.values()) - BACKLOG} published twice"
    finally:
        if not stopped:
            await runtime.stop()
