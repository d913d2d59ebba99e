"""RabbitMQ least privilege, on the real broker with deploy/rabbitmq/definitions.json loaded:
each service user works its own queues and publishes only its own event types."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aiormq.exceptions import ChannelAccessRefused

from services.organizations.app import build as build_organizations
from services.organizations.settings import OrganizationsSettings
from shared.contracts import (
    CreditsGranted,
    OrganizationCreated,
    OrganizationProvisioned,
    UserSignedUp,
)
from shared.topology import RetryPolicy, declare_exchanges, declare_work_queue
from tests.integration.security.conftest import (
    BILLING_GRANTS,
    NAMING,
    ORGANIZATIONS_USERS,
    LeastPrivilegeBroker,
    publish_as,
)
from tests.support import EventTap, Isolation, running_service, wait_until

pytestmark = pytest.mark.integration


async def refused(
    connection: AbstractRobustConnection,
    action: Callable[[AbstractChannel], Awaitable[Any]],
    resource: str,
) -> None:
    """Run ``action`` on a fresh channel: the broker must close it with ACCESS_REFUSED on
    ``resource`` (e.g. "topic 'billing.credits_granted'", "queue 'billing.grants")."""
    channel = await connection.channel(publisher_confirms=True)
    with pytest.raises(ChannelAccessRefused) as caught:
        await action(channel)
    message = str(caught.value)
    assert message.startswith("ACCESS_REFUSED") and f"access to {resource}" in message, message


async def settle(message: AbstractIncomingMessage) -> None:
    await message.ack()


def credits_granted() -> CreditsGranted:
    return CreditsGranted(
        organization_id="org-x", ref_id="forged:1", source="referral", amount=10**6, balance=10**6
    )


async def test_organizations_user_works_its_own_queue_and_publishes_its_own_events(
    broker: LeastPrivilegeBroker,
) -> None:
    connection = await broker.connect("organizations")
    try:
        channel = await connection.channel()
        await declare_exchanges(channel, NAMING)
        queue = await declare_work_queue(channel, NAMING, ORGANIZATIONS_USERS, RetryPolicy())
        tag = await queue.consume(settle)
        await queue.cancel(tag)
        # Confirmed and routed (the event log stream of the definitions is bound to `#`).
        await publish_as(connection, OrganizationProvisioned(user_id="u1", organization_id="o1"))
        await publish_as(connection, OrganizationCreated(organization_id="o1", plan_id="free"))
    finally:
        await connection.close()


async def test_organizations_user_cannot_publish_billing_credits_granted(
    broker: LeastPrivilegeBroker,
) -> None:
    connection = await broker.connect("organizations")
    try:
        # With publisher confirms the refusal surfaces: the broker closes the channel.
        await refused(
            connection,
            lambda _: publish_as(connection, credits_granted()),
            "topic 'billing.credits_granted' in exchange 'grantwire.events'",
        )
        # Nor the identity service's events.
        forged = UserSignedUp(user_id="u", email="u@example.com", email_verified=True)
        await refused(
            connection, lambda _: publish_as(connection, forged), "topic 'user.signed_up'"
        )
    finally:
        await connection.close()


async def test_organizations_user_cannot_declare_read_or_bind_billing_queues(
    broker: LeastPrivilegeBroker,
) -> None:
    billing = await broker.connect("billing")
    organizations = await broker.connect("organizations")
    try:
        # billing.grants exists, declared by its owner as the service does at start.
        setup = await billing.channel()
        await declare_work_queue(setup, NAMING, BILLING_GRANTS, RetryPolicy())
        await setup.close()

        async def consume(channel: AbstractChannel) -> Any:
            queue = await channel.get_queue(BILLING_GRANTS.name(NAMING), ensure=False)
            return await queue.consume(settle)

        async def get(channel: AbstractChannel) -> Any:
            queue = await channel.get_queue(BILLING_GRANTS.name(NAMING), ensure=False)
            return await queue.get(no_ack=False, fail=False)

        async def declare(channel: AbstractChannel) -> Any:
            return await declare_work_queue(channel, NAMING, BILLING_GRANTS, RetryPolicy())

        async def purge(channel: AbstractChannel) -> Any:
            queue = await channel.get_queue(BILLING_GRANTS.name(NAMING), ensure=False)
            return await queue.purge()

        async def bind_to_invitations(channel: AbstractChannel) -> Any:
            # its own queue, another service's event type: the topic read permission refuses
            name = f"organizations.probe-{uuid.uuid4().hex[:6]}"
            queue = await channel.declare_queue(name, exclusive=True)
            return await queue.bind(NAMING.events_exchange, routing_key="invitation.accepted")

        for action in (consume, get, purge):
            await refused(organizations, action, "queue 'billing.grants'")
        await refused(organizations, declare, "queue 'billing.grants.dlq'")  # declared first
        await refused(organizations, bind_to_invitations, "topic 'invitation.accepted'")
    finally:
        await organizations.close()
        await billing.close()


async def test_the_organizations_service_runs_under_its_least_privileged_user(
    broker: LeastPrivilegeBroker, isolation: Isolation
) -> None:
    """The real runtime: declares its topology, consumes, publishes through the outbox and
    dead-letters poison, all as `organizations` (the event log is the broker's)."""
    settings = isolation.settings(
        OrganizationsSettings,
        "organizations",
        amqp_url=broker.url("organizations"),
        namespace="",
        event_log_enabled=False,
    )
    admin = await broker.connect("grantwire-admin")
    identity = await broker.connect("identity")
    try:
        tap = await EventTap.open(admin, NAMING, ["organization.*"])
        runtime, app = build_organizations(settings)
        async with running_service(runtime, app, isolation) as service:
            user = f"lp-{uuid.uuid4().hex[:6]}"
            await publish_as(
                identity, UserSignedUp(user_id=user, email=f"{user}@gmail.com", email_verified=True)
            )
            await tap.wait_for(
                lambda msgs: (
                    {m.type for m in msgs} >= {"organization.created", "organization.provisioned"}
                )
            )
            provisioned = tap.of_type("organization.provisioned")
            assert [p["user_id"] for p in provisioned] == [user]
            found = await service.http.get(f"/users/{user}/organization")
            assert found.status_code == 200
            assert found.json()["organization_id"] == provisioned[0]["organization_id"]

            # Poison goes to the dead letters (publish to grantwire.dead-letters, keeper).
            channel = await identity.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(NAMING.events_exchange, ensure=False)
            await exchange.publish(
                aio_pika.Message(b"not json", message_id="poison-1", type="user.signed_up"),
                routing_key="user.signed_up",
            )

            async def dead_lettered() -> int:
                return await runtime.db["dead_letters"].count_documents({})

            assert await wait_until(dead_lettered) == 1
            ready = await service.http.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert await runtime.db["outbox"].count_documents({"status": "pending"}) == 0
    finally:
        await identity.close()
        await admin.close()
