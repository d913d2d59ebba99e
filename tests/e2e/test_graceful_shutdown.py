"""Graceful shutdown under load, on real service processes: SIGTERM mid-stream stops
consuming, finishes in-flight messages, flushes the outbox, closes, exits 0 within
``GRANTWIRE_SHUTDOWN_GRACE_S``; after a restart every effect exists exactly once.

Effects are counted where they land: billing's ledger and accounts (its database), the
``billing.credits_granted`` events on a tap bound before the load, the outbox; for
organizations its organizations and the events it published. Each service's JSON log
also shows every message handled exactly once across the two runs.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from grantwire.asyncapi import service_runtimes
from grantwire.demo import demo_env
from grantwire.system import ROOT, LocalSystem
from services.billing.app import GRANTS_QUEUE
from services.organizations.app import USERS_QUEUE
from shared.contracts import (
    CreditsGranted,
    Event,
    InvitationAccepted,
    OrganizationProvisioned,
    UserSignedUp,
)
from shared.envelope import Envelope
from shared.mongo import Document
from shared.publisher import ConfirmingPublisher
from shared.topology import Naming, WorkQueue
from tests.support import EventTap, Isolation, wait_until

pytestmark = pytest.mark.e2e
GRACE_S = 20.0  # the deployed default; the flush may take a third of it
# Backlogs several seconds long at the services' batched speed (hundreds of events a second
# here), so work is still queued when the SIGTERM lands: with 300 referrals and 1,000
# signups, billing with coalesced acks had sometimes consumed everything before its stop.
REFERRALS = 1000  # x3 messages for billing: two provisioned users and the accepted invitation
# user.signed_up for organizations, each one organization and two events
SIGNUPS = 3000
STOP_AFTER = 0.1  # SIGTERM once this share of the effects is committed


@pytest.fixture
def system(isolation: Isolation) -> Iterator[LocalSystem]:
    """The services as processes (not started: each test starts the one it loads)."""
    for runtime in service_runtimes().values():
        isolation.track_runtime(runtime)
    infra = {
        "GRANTWIRE_AMQP_URL": isolation.urls.amqp_url,
        "GRANTWIRE_MONGO_URL": isolation.urls.mongo_url,
    }
    env = demo_env(
        infra, namespace=isolation.naming.namespace, database_prefix=f"t{isolation.token}"
    )
    env.update(
        {
            "GRANTWIRE_SHUTDOWN_GRACE_S": str(GRACE_S),
            "GRANTWIRE_RETRY_DELAYS_S": "[0.1, 0.5]",
            "GRANTWIRE_LOG_JSON": "true",
            "GRANTWIRE_LOG_LEVEL": "INFO",
        }
    )
    logs = ROOT / ".infra" / "logs" / f"e2e-{isolation.token}"
    local = LocalSystem(env, logs=logs, default_ports=False)
    try:
        yield local
    finally:
        local.stop()


async def publish_all(
    amqp: AbstractRobustConnection, naming: Naming, events: list[Event]
) -> list[Envelope]:
    """Publish with pipelined confirms (all confirmed when this returns)."""
    publisher = await ConfirmingPublisher.open(amqp, naming.events_exchange)
    envelopes = [Envelope.new(event, source="tests") for event in events]
    for start in range(0, len(envelopes), 100):
        results = await publisher.publish_many(envelopes[start : start + 100])
        assert all(result is None for result in results), results
    await publisher.channel.close()
    return envelopes


async def staged_at_least(db: AsyncDatabase[Document], count: float) -> None:
    """Wait until the handlers committed this many outbox events (their effects)."""

    async def enough() -> bool:
        return await db["outbox"].count_documents({}) >= count

    await wait_until(enough, timeout=60)


async def sigterm_and_wait(system: LocalSystem, name: str) -> tuple[int, float]:
    """SIGTERM the service; (exit code, seconds until it exited)."""
    process = system[name].process
    assert process is not None and process.poll() is None
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(process.wait, GRACE_S + 10)
    return code, time.monotonic() - started


async def ready_messages(amqp: AbstractRobustConnection, naming: Naming, queue: WorkQueue) -> int:
    channel = await amqp.channel()
    declared = await channel.get_queue(queue.name(naming), ensure=True)  # passive
    count = declared.declaration_result.message_count or 0
    await channel.close()
    return count


async def drain_tap(
    amqp: AbstractRobustConnection, naming: Naming, tap: EventTap, key: str
) -> None:
    """Wait until the tap consumed everything routed to it so far (a sentinel comes last)."""
    sentinel = uuid.uuid4().hex
    channel = await amqp.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(naming.events_exchange, ensure=False)
    await exchange.publish(aio_pika.Message(b"{}", message_id=sentinel, type="sentinel"), key)
    await channel.close()
    await tap.wait_for(lambda msgs: any(m.message_id == sentinel for m in msgs), timeout=20)


def log_lines(path: Path) -> list[dict[str, Any]]:
    """The process's log: structlog's JSON lines, and uvicorn's plain ones as ``event``."""
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        try:
            line = json.loads(raw) if raw.startswith("{") else {"event": raw}
        except ValueError:
            line = {"event": raw}
        lines.append(line)
    return lines


def handled_ids(lines: list[dict[str, Any]]) -> Counter[str]:
    """Message ids settled as handled (``message handled`` without another outcome)."""
    return Counter(
        line["event_id"]
        for line in lines
        if line.get("event") == "message handled" and line.get("outcome", "handled") == "handled"
    )


def event_ids_by(messages: list[AbstractIncomingMessage], field: str) -> dict[str, set[str]]:
    """Distinct event ids per value of a body field (a redelivered event counts once)."""
    ids: dict[str, set[str]] = defaultdict(set)
    for message in messages:
        ids[json.loads(message.body)[field]].add(str(message.message_id))
    return ids


def expect_each_event_once(messages: list[AbstractIncomingMessage]) -> None:
    """No event published twice: the relay's final flush and its task do not both publish
    the same pending documents (before that was serialized, a stop under load published
    150-300 events twice)."""
    copies = Counter(str(message.message_id) for message in messages)
    twice = {event_id: count for event_id, count in copies.items() if count > 1}
    assert not twice, f"{len(twice)} of {len(copies)} events published more than once"


def assert_drained_and_stopped(lines: list[dict[str, Any]]) -> None:
    """The first run's log: a graceful drain (uvicorn's shutdown, then the runtime's stop)."""
    events = [str(line.get("event", "")) for line in lines]
    assert any("Shutting down" in event for event in events), "no graceful shutdown in the log"
    assert "stopped" in events, "the runtime did not log that it stopped"
    assert events.index("stopped") > max(i for i, e in enumerate(events) if "Shutting down" in e), (
        "stopped before the shutdown began"
    )
    errors = [line for line in lines if line.get("level") in ("error", "critical")]
    assert errors == [], errors[:3]


async def test_billing_sigterm_under_load_drains_flushes_exits_0_and_nothing_is_lost_or_doubled(
    system: LocalSystem,
    isolation: Isolation,
    amqp: AbstractRobustConnection,
    mongo: AsyncMongoClient[Document],
) -> None:
    db = mongo[isolation.db_name("billing")]
    tap = await EventTap.open(amqp, isolation.naming, [CreditsGranted.event_type])
    system["billing"].start()
    system.wait_ready(names=("billing",))

    run = uuid.uuid4().hex[:6]
    expected: dict[str, tuple[str, int]] = {}  # ledger key -> (organization, units)
    events: list[Event] = []
    for i in range(REFERRALS):
        inviter, friend, invitation = f"a{run}-{i}", f"g{run}-{i}", f"inv-{run}-{i}"
        inviter_org, friend_org = f"org-a{run}-{i}", f"org-g{run}-{i}"
        events += [
            OrganizationProvisioned(user_id=inviter, organization_id=inviter_org),
            OrganizationProvisioned(user_id=friend, organization_id=friend_org),
            InvitationAccepted(
                invitation_id=invitation,
                email=f"{friend}@example.org",
                invited_by=inviter,
                accepted_user_id=friend,
            ),
        ]
        expected[f"referral:{invitation}:referrer"] = (inviter_org, 1000)
        expected[f"referral:{invitation}:referee"] = (friend_org, 500)
    published = await publish_all(amqp, isolation.naming, events)

    # Mid-stream: some credits are committed, most of the work is still queued.
    await staged_at_least(db, STOP_AFTER * len(expected))
    code, took = await sigterm_and_wait(system, "billing")
    assert code == 0, f"billing exited {code}; see {system['billing'].log_path}"
    assert took <= GRACE_S, f"billing took {took:.1f} s > its {GRACE_S} s grace period"

    # Stopped consuming: work is left in its queue. Flushed: nothing pending in the outbox,
    # and every credit committed before the exit was published.
    left = await ready_messages(amqp, isolation.naming, GRANTS_QUEUE)
    assert 0 < left < len(published), left
    assert await db["outbox"].count_documents({"status": {"$ne": "sent"}}) == 0
    committed = await db["ledger"].count_documents({})
    await drain_tap(amqp, isolation.naming, tap, CreditsGranted.event_type)
    published_credits = {m.message_id for m in tap.messages if m.type == CreditsGranted.event_type}
    assert len(published_credits) == committed
    first_run = log_lines(system["billing"].log_path)
    assert_drained_and_stopped(first_run)

    system.restart("billing")
    system.wait_ready(names=("billing",))

    async def all_credited() -> bool:
        return await db["ledger"].count_documents({}) >= len(expected)

    await wait_until(all_credited, timeout=60, interval=0.1)

    async def outbox_drained() -> bool:
        return await db["outbox"].count_documents({"status": {"$ne": "sent"}}) == 0

    await wait_until(outbox_drained, timeout=30)
    await drain_tap(amqp, isolation.naming, tap, CreditsGranted.event_type)

    # Every ledger key exactly once, on the right organization, with the right units.
    entries = await db["ledger"].find({}).to_list()
    keys = Counter(entry["ref_id"] for entry in entries)
    assert set(keys) == set(expected) and set(keys.values()) == {1}
    for entry in entries:
        assert (entry["organization_id"], entry["amount"]) == expected[entry["ref_id"]]
    accounts = {doc["_id"]: doc["balance"] async for doc in db["accounts"].find({})}
    assert accounts == {org: units for org, units in expected.values()}
    # Every published message handled exactly once over the two runs: none lost, none
    # redelivered after the stop.
    both_runs = handled_ids(log_lines(system["billing"].log_path))
    assert both_runs == Counter(envelope.id for envelope in published)
    assert await ready_messages(amqp, isolation.naming, GRANTS_QUEUE) == 0
    # One billing.credits_granted per key (one event, never two grants of a key).
    credits = [m for m in tap.messages if m.type == CreditsGranted.event_type]
    events_of_key = event_ids_by(credits, "ref_id")
    assert set(events_of_key) == set(expected)
    assert {len(ids) for ids in events_of_key.values()} == {1}, "a key was granted twice"
    expect_each_event_once(credits)


async def test_organizations_sigterm_under_load_drains_flushes_exits_0_and_nothing_is_lost(
    system: LocalSystem,
    isolation: Isolation,
    amqp: AbstractRobustConnection,
    mongo: AsyncMongoClient[Document],
) -> None:
    db = mongo[isolation.db_name("organizations")]
    tap = await EventTap.open(amqp, isolation.naming, ["organization.*"])
    system["organizations"].start()
    system.wait_ready(names=("organizations",))

    run = uuid.uuid4().hex[:6]
    users = [f"u{run}-{i}" for i in range(SIGNUPS)]
    signups = [
        # public email domains: one new organization per user, no domain matching
        UserSignedUp(user_id=user, email=f"{user}@gmail.com", email_verified=True)
        for user in users
    ]
    published = await publish_all(amqp, isolation.naming, signups)

    await staged_at_least(db, STOP_AFTER * 2 * SIGNUPS)
    code, took = await sigterm_and_wait(system, "organizations")
    assert code == 0, f"organizations exited {code}; see {system['organizations'].log_path}"
    assert took <= GRACE_S, f"organizations took {took:.1f} s > its {GRACE_S} s grace period"
    assert 0 < await ready_messages(amqp, isolation.naming, USERS_QUEUE) < len(published)
    assert await db["outbox"].count_documents({"status": {"$ne": "sent"}}) == 0
    assert_drained_and_stopped(log_lines(system["organizations"].log_path))

    system.restart("organizations")
    system.wait_ready(names=("organizations",))

    async def all_provisioned() -> bool:
        users_seen = {p["user_id"] for p in tap.of_type(OrganizationProvisioned.event_type)}
        return len(users_seen) >= SIGNUPS

    await wait_until(all_provisioned, timeout=60, interval=0.1)

    async def outbox_drained() -> bool:
        return await db["outbox"].count_documents({"status": {"$ne": "sent"}}) == 0

    await wait_until(outbox_drained, timeout=30)
    await drain_tap(amqp, isolation.naming, tap, "organization.drain")

    both_runs = handled_ids(log_lines(system["organizations"].log_path))
    assert both_runs == Counter(envelope.id for envelope in published)
    assert await db["outbox"].count_documents({}) == 2 * SIGNUPS  # created + provisioned
    # One organization per user, each announced by one organization.created and one
    # organization.provisioned event.
    provisioned = [m for m in tap.messages if m.type == OrganizationProvisioned.event_type]
    created = [m for m in tap.messages if m.type == "organization.created"]
    provisioned_of_user = event_ids_by(provisioned, "user_id")
    assert set(provisioned_of_user) == set(users)
    assert {len(ids) for ids in provisioned_of_user.values()} == {1}
    organization_of = {
        json.loads(m.body)["user_id"]: json.loads(m.body)["organization_id"] for m in provisioned
    }
    assert len(set(organization_of.values())) == SIGNUPS
    created_of_organization = event_ids_by(created, "organization_id")
    assert set(created_of_organization) == set(organization_of.values())
    assert {len(ids) for ids in created_of_organization.values()} == {1}
    expect_each_event_once([*provisioned, *created])
