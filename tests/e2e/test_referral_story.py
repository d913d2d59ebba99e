"""The whole referral story on three real service processes, through public interfaces only.

Each test starts organizations, invitations and billing as OS processes (as `make demo`
does) on the real broker and database, and talks to them the way outside clients do:
identity events over RabbitMQ, everything else over HTTP.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from grantwire.asyncapi import service_runtimes
from grantwire.demo import Client, Timeline, demo_env, eventually, play_story
from grantwire.system import LocalSystem
from shared.contracts import InvitationAccepted, UserEmailVerified, UserSignedUp
from tests.support import EventTap, Isolation, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
async def system(isolation: Isolation) -> AsyncIterator[LocalSystem]:
    for runtime in service_runtimes().values():
        isolation.track_runtime(runtime)
    infra = {
        "GRANTWIRE_AMQP_URL": isolation.urls.amqp_url,
        "GRANTWIRE_MONGO_URL": isolation.urls.mongo_url,
    }
    env = demo_env(
        infra, namespace=isolation.naming.namespace, database_prefix=f"t{isolation.token}"
    )
    env.update({"GRANTWIRE_RETRY_DELAYS_S": "[0.1, 0.5]", "GRANTWIRE_SHUTDOWN_GRACE_S": "10"})
    local = LocalSystem(env, logs=isolation_logs(isolation), default_ports=False)
    local.start()
    try:
        local.wait_ready(timeout=60)
        yield local
    finally:
        codes = local.stop()
    assert all(code == 0 for code in codes.values()), f"unclean exits: {codes}"


def isolation_logs(isolation: Isolation) -> Any:
    from grantwire.system import ROOT

    return ROOT / ".infra" / "logs" / f"e2e-{isolation.token}"


@pytest.fixture
async def client(
    system: LocalSystem, amqp: AbstractRobustConnection, isolation: Isolation
) -> AsyncIterator[Client]:
    outside = Client(system, amqp, isolation.naming)
    await outside.open()
    yield outside
    await outside.close()


async def ledger(client: Client, organization_id: str) -> list[dict[str, Any]]:
    response = await client.http.get(
        f"{client.system['billing'].url}/organizations/{organization_id}/ledger",
        params={"limit": 200},
        headers=client.admin_headers(),
    )
    response.raise_for_status()
    body = response.json()
    return list(body["entries"] if isinstance(body, dict) else body)


async def handled_by_billing(client: Client) -> float:
    """Messages billing has settled so far, from its Prometheus metrics."""
    text = (await client.http.get(f"{client.system['billing'].url}/metrics")).text
    pattern = r'^grantwire_messages_total\{[^}]*service="billing"[^}]*\} ([0-9.e+]+)$'
    return sum(float(v) for v in re.findall(pattern, text, flags=re.MULTILINE))


def new_users() -> tuple[str, str, str, str]:
    run = uuid.uuid4().hex[:6]
    return f"ada-{run}", f"ada.{run}@example.com", f"grace-{run}", f"grace.{run}@example.org"


async def signed_up_with_organization(client: Client, user_id: str, email: str) -> dict[str, Any]:
    await client.publish(UserSignedUp(user_id=user_id, email=email, email_verified=True))
    org: dict[str, Any] = await eventually(lambda: client.organization_of(user_id), "organization")
    return org


async def test_mailer_on_story_credits_referrer_at_acceptance_and_referee_at_verification(
    client: Client,
) -> None:
    figures = await play_story(client, Timeline())
    assert figures["inviter_balance"] == 1500  # 500 signup grant + 1000 referral
    assert figures["friend_balance"] == 1000  # 500 signup grant + 500 referral
    referral_keys = [
        e["ref_id"]
        for org in ("inviter_organization_id", "friend_organization_id")
        for e in await ledger(client, figures[org])
        if e["ref_id"].startswith("referral:")
    ]
    invitation = figures["invitation_id"]
    assert sorted(referral_keys) == [
        f"referral:{invitation}:referee",
        f"referral:{invitation}:referrer",
    ]


async def test_no_mailer_story_provisioned_before_accepted_credits_both_sides(
    client: Client,
) -> None:
    inviter_id, inviter_email, friend_id, friend_email = new_users()
    inviter_org = await signed_up_with_organization(client, inviter_id, inviter_email)
    invitation = await client.invite(inviter_id, inviter_email, friend_email)
    await client.publish(
        UserSignedUp(
            user_id=friend_id,
            email=friend_email,
            email_verified=True,
            invite_token=invitation["token"],
        )
    )
    friend_org = await eventually(lambda: client.organization_of(friend_id), "friend org")
    assert await eventually(
        lambda: _equals(client.balance(friend_org["organization_id"]), 1000), "referee credit"
    )
    assert await eventually(
        lambda: _equals(client.balance(inviter_org["organization_id"]), 1500), "referrer credit"
    )


async def test_self_invite_is_refused_and_a_self_referral_event_credits_no_referrer(
    client: Client, amqp: AbstractRobustConnection, isolation: Isolation
) -> None:
    inviter_id, inviter_email, _, _ = new_users()
    org = await signed_up_with_organization(client, inviter_id, inviter_email)
    response = await client.http.post(
        f"{client.system['invitations'].url}/invitations",
        json={"email": inviter_email.upper()},
        headers={"Authorization": f"Bearer {client.token_for(inviter_id, inviter_email)}"},
    )
    assert response.status_code == 422 and response.json()["error"]
    assert await eventually(lambda: _equals(client.balance(org["organization_id"]), 500), "grant")
    invitation_id = f"inv-{uuid.uuid4().hex[:8]}"
    await client.publish(
        InvitationAccepted(
            invitation_id=invitation_id,
            email=inviter_email,
            invited_by=inviter_id,
            accepted_user_id=inviter_id,
        )
    )
    referee_key = f"referral:{invitation_id}:referee"

    async def referee_credited() -> bool:
        return any(e["ref_id"] == referee_key for e in await ledger(client, org["organization_id"]))

    await wait_until(referee_credited, timeout=15)
    keys = [e["ref_id"] for e in await ledger(client, org["organization_id"])]
    assert f"referral:{invitation_id}:referrer" not in keys
    assert await client.balance(org["organization_id"]) == 1000  # grant + referee side only


async def test_revoked_invite_accepts_nothing_and_credits_no_referral(
    client: Client, amqp: AbstractRobustConnection, isolation: Isolation
) -> None:
    tap = await EventTap.open(amqp, isolation.naming, ["invitation.accepted"])
    inviter_id, inviter_email, friend_id, friend_email = new_users()
    inviter_org = await signed_up_with_organization(client, inviter_id, inviter_email)
    invitation = await client.invite(inviter_id, inviter_email, friend_email)
    revoked = await client.http.delete(
        f"{client.system['invitations'].url}/invitations/{invitation['id']}",
        headers={"Authorization": f"Bearer {client.token_for(inviter_id, inviter_email)}"},
    )
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    await client.publish(
        UserSignedUp(
            user_id=friend_id,
            email=friend_email,
            email_verified=True,
            invite_token=invitation["token"],
        )
    )
    friend_org = await eventually(lambda: client.organization_of(friend_id), "friend org")
    assert await eventually(
        lambda: _equals(client.balance(friend_org["organization_id"]), 500), "signup grant"
    )
    verified = await client.http.get(
        f"{client.system['invitations'].url}/invitations/verify/{invitation['token']}"
    )
    assert verified.json()["valid"] is False
    assert tap.messages == []
    assert await client.balance(inviter_org["organization_id"]) == 500


async def test_replaying_every_event_of_a_story_changes_no_balance(
    client: Client, amqp: AbstractRobustConnection, isolation: Isolation
) -> None:
    tap = await EventTap.open(amqp, isolation.naming, ["#"])
    figures = await play_story(client, Timeline())
    story_events = [m for m in tap.messages if m.type != "billing.credits_granted"]
    assert {m.type for m in story_events} >= {
        "user.signed_up",
        "user.email_verified",
        "organization.created",
        "organization.provisioned",
        "invitation.accepted",
    }
    for_billing = sum(
        1
        for m in story_events
        if m.type in ("invitation.accepted", "organization.provisioned", "organization.created")
    )
    before = await handled_by_billing(client)
    await _republish(amqp, isolation, story_events)

    async def billing_saw_all_replays() -> bool:
        return await handled_by_billing(client) >= before + for_billing

    await wait_until(billing_saw_all_replays, timeout=20)
    assert await client.balance(figures["inviter_organization_id"]) == 1500
    assert await client.balance(figures["friend_organization_id"]) == 1000


async def test_billing_killed_mid_story_and_restarted_ends_with_exactly_the_right_credits(
    client: Client, system: LocalSystem
) -> None:
    inviter_id, inviter_email, friend_id, friend_email = new_users()
    inviter_org = await signed_up_with_organization(client, inviter_id, inviter_email)
    invitation = await client.invite(inviter_id, inviter_email, friend_email)
    await client.publish(
        UserSignedUp(
            user_id=friend_id,
            email=friend_email,
            email_verified=False,
            invite_token=invitation["token"],
        )
    )
    assert await eventually(
        lambda: _equals(client.balance(inviter_org["organization_id"]), 1500), "referrer credit"
    )
    system["billing"].kill()  # SIGKILL: no drain, no flush
    await client.publish(UserEmailVerified(user_id=friend_id))
    friend_org = await eventually(lambda: client.organization_of(friend_id), "friend org")
    system.restart("billing")
    system.wait_ready(names=("billing",))
    assert await eventually(
        lambda: _equals(client.balance(friend_org["organization_id"]), 1000), "referee credit"
    )
    entries = await ledger(client, friend_org["organization_id"])
    assert sorted(e["ref_id"] for e in entries) == sorted(
        [f"signup_grant:{friend_org['organization_id']}", f"referral:{invitation['id']}:referee"]
    )
    assert await client.balance(inviter_org["organization_id"]) == 1500


async def _equals(balance: Any, expected: int) -> bool:
    return int(await balance) == expected


async def _republish(
    amqp: AbstractRobustConnection, isolation: Isolation, messages: list[AbstractIncomingMessage]
) -> None:
    """Publish the captured messages again, byte for byte, with their original ids."""
    channel = await amqp.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(isolation.naming.events_exchange)
    for m in messages:
        await exchange.publish(
            aio_pika.Message(
                m.body,
                message_id=m.message_id,
                correlation_id=m.correlation_id,
                type=m.type,
                headers=dict(m.headers or {}),
                content_type=m.content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=m.routing_key or "",
        )
    await channel.close()
