"""The organizations service end to end on the real broker and database (HTTP in memory)."""

from __future__ import annotations

import json
import re

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from services.organizations.app import USERS_QUEUE
from shared.contracts import OrganizationCreated, OrganizationProvisioned
from shared.deadletters import DEAD_LETTERS
from shared.envelope import H_CAUSATION_ID, H_SOURCE
from tests.integration.organizations.conftest import StartService
from tests.integration.organizations.harness import (
    all_memberships,
    all_organizations,
    envelope,
    signup,
    staged_events,
    user_doc,
    verified,
)
from tests.support import EventTap, Isolation, publish_event, wait_until

pytestmark = pytest.mark.integration

CREATED = OrganizationCreated.event_type
PROVISIONED = OrganizationProvisioned.event_type


def of_type(messages: list[AbstractIncomingMessage], event_type: str) -> list[dict[str, str]]:
    return [json.loads(m.body) for m in messages if m.type == event_type]


async def open_tap(amqp: AbstractRobustConnection, isolation: Isolation) -> EventTap:
    return await EventTap.open(amqp, isolation.naming, [CREATED, PROVISIONED])


async def test_a_mailer_on_user_gets_an_organization_only_once_their_email_is_verified(
    start_service: StartService, amqp: AbstractRobustConnection, isolation: Isolation
) -> None:
    service = await start_service()
    db = service.runtime.db
    tap = await open_tap(amqp, isolation)
    await publish_event(amqp, isolation.naming, signup("u1", "ada@acme.com", verified=False))
    await wait_until(lambda: user_doc(db, "u1"))

    missing = await service.http.get("/users/u1/organization")
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"
    assert "no organization" in missing.json()["message"]
    assert await all_organizations(db) == [] and await staged_events(db) == []

    cause = await publish_event(amqp, isolation.naming, verified("u1"))
    messages = await tap.wait_for(lambda msgs: len(msgs) >= 2)
    assert [m.type for m in messages] == [CREATED, PROVISIONED]
    [org] = await all_organizations(db)
    assert of_type(messages, CREATED) == [{"organization_id": org["_id"], "plan_id": "free"}]
    assert of_type(messages, PROVISIONED) == [{"user_id": "u1", "organization_id": org["_id"]}]
    for message in messages:
        assert message.correlation_id == cause.correlation_id
        assert message.headers[H_CAUSATION_ID] == cause.id
        assert message.headers[H_SOURCE] == "organizations"

    found = await service.http.get("/users/u1/organization")
    assert found.status_code == 200
    assert found.json() == {
        "organization_id": org["_id"],
        "name": "Acme",
        "slug": "acme",
        "domain": "acme.com",
        "plan_id": "free",
        "role": "owner",
        "suggested_join": None,
    }


async def test_a_verified_signup_is_provisioned_at_once(
    start_service: StartService, amqp: AbstractRobustConnection, isolation: Isolation
) -> None:
    service = await start_service()
    tap = await open_tap(amqp, isolation)
    await publish_event(amqp, isolation.naming, signup("u1", "ada@gmail.com"))
    messages = await tap.wait_for(lambda msgs: len(msgs) >= 2)
    assert [m.type for m in messages] == [CREATED, PROVISIONED]
    body = (await service.http.get("/users/u1/organization")).json()
    assert (body["name"], body["slug"], body["domain"]) == (
        "Ada's organization",
        "adas-organization",
        None,
    )
    assert (body["plan_id"], body["role"]) == ("free", "owner")
    assert body["organization_id"] == of_type(messages, CREATED)[0]["organization_id"]


async def test_a_replayed_signup_only_announces_the_same_organization_again(
    start_service: StartService, amqp: AbstractRobustConnection, isolation: Isolation
) -> None:
    service = await start_service()
    tap = await open_tap(amqp, isolation)
    event = signup("u1", "ada@acme.com")
    original = envelope(event)
    await publish_event(amqp, isolation.naming, event, envelope=original)
    await tap.wait_for(lambda msgs: len(msgs) >= 2)
    await publish_event(amqp, isolation.naming, event, envelope=original)  # replay, same id
    messages = await tap.wait_for(lambda msgs: len(msgs) >= 3)
    assert [m.type for m in messages] == [CREATED, PROVISIONED, PROVISIONED]
    [created] = of_type(messages, CREATED)
    assert {p["organization_id"] for p in of_type(messages, PROVISIONED)} == {
        created["organization_id"]
    }
    assert len(await all_organizations(service.runtime.db)) == 1


async def test_a_colleague_sees_the_hint_to_join_the_first_organization_of_their_domain(
    start_service: StartService, amqp: AbstractRobustConnection, isolation: Isolation
) -> None:
    service = await start_service()
    tap = await open_tap(amqp, isolation)
    await publish_event(amqp, isolation.naming, signup("u1", "ada@acme.com"))
    await tap.wait_for(lambda msgs: len(msgs) >= 2)
    await publish_event(amqp, isolation.naming, signup("u2", "bob@acme.com", first_name="Bob"))
    await tap.wait_for(lambda msgs: len(msgs) >= 4)
    first = (await service.http.get("/users/u1/organization")).json()
    second = (await service.http.get("/users/u2/organization")).json()
    assert second["organization_id"] != first["organization_id"]
    assert (second["name"], second["slug"], second["domain"]) == ("Acme", "acme-2", "acme.com")
    assert second["suggested_join"] == {"organization_id": first["organization_id"], "name": "Acme"}


async def test_signups_with_one_name_delivered_together_get_unique_slugs(
    start_service: StartService, amqp: AbstractRobustConnection, isolation: Isolation
) -> None:
    service = await start_service()
    tap = await open_tap(amqp, isolation)
    for n in range(8):
        await publish_event(amqp, isolation.naming, signup(f"u{n}", f"ada{n}@gmail.com"))
    await tap.wait_for(lambda msgs: len(of_type(msgs, PROVISIONED)) >= 8)
    slugs = {o["slug"] for o in await all_organizations(service.runtime.db)}
    numbered = {"adas-organization", *(f"adas-organization-{n}" for n in range(2, 7))}
    assert len(slugs) == 8 and numbered <= slugs
    assert all(re.fullmatch(r"adas-organization-[0-9a-f]{10}", s) for s in slugs - numbered)


async def test_one_signup_delivered_to_two_consumers_at_once_creates_one_organization(
    start_service: StartService, amqp: AbstractRobustConnection, isolation: Isolation
) -> None:
    first = await start_service(prefetch=1)
    await start_service(prefetch=1)  # a second replica on the same queue
    channel = await amqp.channel()
    queue = await channel.declare_queue(USERS_QUEUE.name(isolation.naming), passive=True)
    assert queue.declaration_result.consumer_count == 2
    tap = await open_tap(amqp, isolation)
    event = signup("u1", "ada@acme.com")
    duplicate = envelope(event)
    for _ in range(4):
        await publish_event(amqp, isolation.naming, event, envelope=duplicate)
    messages = await tap.wait_for(lambda msgs: len(of_type(msgs, PROVISIONED)) >= 4)
    db = first.runtime.db
    [org] = await all_organizations(db)
    assert len(await all_memberships(db)) == 1
    assert [e.type for e in await staged_events(db)].count(CREATED) == 1
    assert {p["organization_id"] for p in of_type(messages, PROVISIONED)} == {org["_id"]}


async def test_poison_is_dead_lettered_with_its_reason_and_consuming_goes_on(
    start_service: StartService, amqp: AbstractRobustConnection, isolation: Isolation
) -> None:
    service = await start_service()
    tap = await open_tap(amqp, isolation)
    channel = await amqp.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(isolation.naming.events_exchange)
    poison = {
        "missing-fields": ("user.signed_up", {"user_id": "p1"}),
        "malformed-email": (
            "user.signed_up",
            {"user_id": "p2", "email": "not-an-email", "email_verified": True},
        ),
        "verified-without-user": ("user.email_verified", {}),
    }
    for message_id, (event_type, data) in poison.items():
        message = aio_pika.Message(
            json.dumps(data).encode(),
            message_id=message_id,
            type=event_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await exchange.publish(message, routing_key=event_type)
    await publish_event(amqp, isolation.naming, signup("u1", "ada@acme.com"))

    await tap.wait_for(lambda msgs: len(msgs) >= 2)  # the good message after them went through
    dead_letters = service.runtime.db[DEAD_LETTERS]

    async def all_archived() -> bool:
        return await dead_letters.count_documents({}) == len(poison)

    await wait_until(all_archived)
    letters = {d["message_id"]: d async for d in dead_letters.find()}
    assert set(letters) == set(poison)
    for letter in letters.values():
        assert letter["reason"] == "schema_violation"
        assert letter["queue"] == USERS_QUEUE.dlq_name(isolation.naming)
    assert "email" in letters["missing-fields"]["error_message"]
    assert "email must look like local@domain" in letters["malformed-email"]["error_message"]
    assert "user_id" in letters["verified-without-user"]["error_message"]
    assert [o["created_by"] for o in await all_organizations(service.runtime.db)] == ["u1"]


async def test_health_readiness_and_metrics_are_served(
    start_service: StartService, amqp: AbstractRobustConnection, isolation: Isolation
) -> None:
    service = await start_service()
    tap = await open_tap(amqp, isolation)
    await publish_event(amqp, isolation.naming, signup("u1", "ada@acme.com"))
    await tap.wait_for(lambda msgs: len(msgs) >= 2)
    health = await service.http.get("/healthz")
    assert health.json() == {"status": "ok", "service": "organizations"}
    ready = await service.http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    metrics = (await service.http.get("/metrics")).text
    handled = re.search(
        r'grantwire_messages_total\{event_type="user.signed_up",outcome="handled",'
        r'queue="[^"]*organizations.users",service="organizations"\} (\d+)',
        metrics,
    )
    assert handled is not None and int(float(handled.group(1))) >= 1
