"""Accepting invitations on ``user.signed_up``: claim, finalize + outbox, exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

from services.invitations.domain import new_invitation
from shared.contracts import InvitationAccepted, UserSignedUp
from shared.envelope import Envelope
from shared.outbox import OUTBOX
from tests.integration.invitations.conftest import ALICE, Service
from tests.support import EventTap, wait_until

pytestmark = pytest.mark.integration

ACCEPTED = InvitationAccepted.event_type


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with capture_logs() as captured:
        yield captured


async def logged_refusal(logs: list[dict[str, Any]], user_id: str) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        return next(
            (
                line
                for line in logs
                if line["event"] == "invitation not accepted" and line.get("user_id") == user_id
            ),
            None,
        )

    return await wait_until(found)


async def status_of(service: Service, invitation_id: str) -> str | None:
    invitation = await service.repo.get(invitation_id)
    return invitation.status if invitation else None


async def outbox_events(service: Service, invitation_id: str) -> int:
    return await service.runtime.db[OUTBOX].count_documents({"aggregate_id": invitation_id})


def signup(user_id: str, email: str, token: str | None) -> tuple[UserSignedUp, Envelope]:
    event = UserSignedUp(user_id=user_id, email=email, email_verified=False, invite_token=token)
    return event, Envelope.new(event, source="tests")


async def test_signup_with_the_token_accepts_the_invite_and_publishes_invitation_accepted(
    service: Service,
) -> None:
    tap = await EventTap.open(service.amqp, service.isolation.naming, [ACCEPTED])
    created = await service.created("friend@example.com", ALICE)
    signed_up = await service.sign_up("bob-1", "  FRIEND@Example.com", created["token"])

    [message] = await tap.wait_for(lambda msgs: len(msgs) == 1)
    assert tap.of_type(ACCEPTED) == [
        {
            "invitation_id": created["id"],
            "email": "friend@example.com",
            "invited_by": "alice",
            "accepted_user_id": "bob-1",
        }
    ]
    assert message.headers["cloudEvents:correlationid"] == signed_up.correlation_id
    assert message.headers["cloudEvents:causationid"] == signed_up.id
    invitation = await service.repo.get(created["id"])
    assert invitation is not None
    assert invitation.status == "accepted" and invitation.accepted_user_id == "bob-1"
    assert invitation.accepted_at is not None and invitation.claimed_at is not None
    verify = (await service.http.get(f"/invitations/verify/{created['token']}")).json()
    assert verify["valid"] is False and verify["reason"] == "accepted"
    # The new user is in the projection: they cannot be invited again.
    assert (await service.invite("friend@example.com")).status_code == 422


async def test_an_invite_without_inviter_publishes_invited_by_null(service: Service) -> None:
    tap = await EventTap.open(service.amqp, service.isolation.naming, [ACCEPTED])
    legacy = new_invitation(
        invitation_id="6650f0c0ffee0000000000aa",
        email="legacy@example.com",
        invited_by=None,
        inviter_email=None,
        now=datetime.now(UTC),
        ttl=timedelta(days=1),
    )
    await service.runtime.commit(lambda session: service.repo.insert(legacy, session))
    await service.sign_up("u-legacy", "legacy@example.com", legacy.token)
    await tap.wait_for(lambda msgs: len(msgs) == 1)
    [payload] = tap.of_type(ACCEPTED)
    assert payload["invited_by"] is None and payload["accepted_user_id"] == "u-legacy"


async def test_concurrent_signups_with_one_token_accept_it_exactly_once(
    service: Service,
) -> None:
    tap = await EventTap.open(service.amqp, service.isolation.naming, [ACCEPTED])
    created = await service.created("shared@example.com")
    deliveries = [signup(f"user-{i}", "shared@example.com", created["token"]) for i in range(12)]
    await asyncio.gather(
        *(service.invitations.on_user_signed_up(event, env) for event, env in deliveries)
    )
    invitation = await service.repo.get(created["id"])
    assert invitation is not None and invitation.status == "accepted"
    assert invitation.accepted_user_id in {f"user-{i}" for i in range(12)}
    await tap.wait_for(lambda msgs: len(msgs) >= 1)
    await service.runtime.relay.flush()
    assert await outbox_events(service, created["id"]) == 1
    assert [p["accepted_user_id"] for p in tap.of_type(ACCEPTED)] == [invitation.accepted_user_id]


async def test_one_signup_delivered_many_times_at_once_accepts_and_publishes_once(
    service: Service,
) -> None:
    tap = await EventTap.open(service.amqp, service.isolation.naming, [ACCEPTED])
    created = await service.created("twice@example.com")
    event, envelope = signup("bob-2", "twice@example.com", created["token"])
    await asyncio.gather(
        *(service.invitations.on_user_signed_up(event, envelope) for _ in range(8))
    )
    await tap.wait_for(lambda msgs: len(msgs) >= 1)
    await service.runtime.relay.flush()
    assert await outbox_events(service, created["id"]) == 1
    assert len(tap.of_type(ACCEPTED)) == 1


async def test_a_replayed_signup_does_not_accept_twice_and_publishes_nothing_new(
    service: Service, logs: list[dict[str, Any]]
) -> None:
    tap = await EventTap.open(service.amqp, service.isolation.naming, [ACCEPTED])
    created = await service.created("friend@example.com")
    first = await service.sign_up("bob-3", "friend@example.com", created["token"])
    await tap.wait_for(lambda msgs: len(msgs) == 1)
    first_accepted_at = (await service.repo.get(created["id"])).accepted_at  # type: ignore[union-attr]

    await service.sign_up("bob-3", "friend@example.com", created["token"], envelope=first)
    refusal = await logged_refusal(logs, "bob-3")
    assert refusal["reason"] == "already_accepted"
    assert refusal["event_id"] == first.id
    await service.runtime.relay.flush()
    assert await outbox_events(service, created["id"]) == 1
    assert len(tap.messages) == 1
    invitation = await service.repo.get(created["id"])
    assert invitation is not None and invitation.accepted_at == first_accepted_at
    assert await service.dead_letters() == 0


async def test_expired_or_revoked_tokens_accept_nothing_and_are_logged_not_dead_lettered(
    service: Service, logs: list[dict[str, Any]]
) -> None:
    expired = await service.created("late@example.com")
    past = datetime.now(UTC) - timedelta(seconds=1)
    await service.collection.update_one({"token": expired["token"]}, {"$set": {"expires_at": past}})
    revoked = await service.created("gone@example.com")
    await service.http.delete(f"/invitations/{revoked['id']}", headers=ALICE)

    await service.sign_up("u-late", "late@example.com", expired["token"])
    await service.sign_up("u-gone", "gone@example.com", revoked["token"])

    assert (await logged_refusal(logs, "u-late"))["reason"] == "expired"
    assert (await logged_refusal(logs, "u-gone"))["reason"] == "revoked"
    assert await status_of(service, expired["id"]) == "pending"
    assert await status_of(service, revoked["id"]) == "revoked"
    assert await outbox_events(service, expired["id"]) == 0
    assert await outbox_events(service, revoked["id"]) == 0
    assert await service.dead_letters() == 0
    await service.wait_for_user("u-late")  # the signup itself is still recorded


async def test_another_email_an_unknown_or_a_malformed_token_accepts_nothing(
    service: Service, logs: list[dict[str, Any]]
) -> None:
    created = await service.created("friend@example.com")
    await service.sign_up("u-other", "someone-else@example.com", created["token"])
    await service.sign_up("u-unknown", "x@example.com", "0" * 40)
    await service.sign_up("u-malformed", "y@example.com", "not-a-token")

    assert (await logged_refusal(logs, "u-other"))["reason"] == "email_mismatch"
    assert (await logged_refusal(logs, "u-unknown"))["reason"] == "unknown_token"
    assert (await logged_refusal(logs, "u-malformed"))["reason"] == "malformed_token"
    assert await status_of(service, created["id"]) == "pending"
    assert await service.dead_letters() == 0


async def test_a_stale_claim_is_released_and_a_later_signup_accepts_the_invite(
    service: Service,
) -> None:
    tap = await EventTap.open(service.amqp, service.isolation.naming, [ACCEPTED])
    created = await service.created("friend@example.com")
    # A first signup claimed the invite 16 minutes ago and never finalized (it crashed).
    sixteen_minutes_ago = datetime.now(UTC) - timedelta(minutes=16)
    await service.collection.update_one(
        {"token": created["token"]},
        {"$set": {"claimed_at": sixteen_minutes_ago, "claimed_by": "ghost"}},
    )
    await service.sign_up("bob-4", "friend@example.com", created["token"])
    await tap.wait_for(lambda msgs: len(msgs) == 1)
    assert tap.of_type(ACCEPTED)[0]["accepted_user_id"] == "bob-4"
    invitation = await service.repo.get(created["id"])
    assert invitation is not None and invitation.claimed_by == "bob-4"


async def test_a_fresh_claim_by_another_signup_is_respected(
    service: Service, logs: list[dict[str, Any]]
) -> None:
    created = await service.created("friend@example.com")
    five_minutes_ago = datetime.now(UTC) - timedelta(minutes=5)
    await service.collection.update_one(
        {"token": created["token"]},
        {"$set": {"claimed_at": five_minutes_ago, "claimed_by": "in-flight"}},
    )
    await service.sign_up("bob-5", "friend@example.com", created["token"])
    assert (await logged_refusal(logs, "bob-5"))["reason"] == "claimed_by_another_signup"
    assert await status_of(service, created["id"]) == "pending"


async def test_a_revoke_between_claim_and_finalize_wins_and_nothing_is_published(
    service: Service,
) -> None:
    created = await service.created("friend@example.com")
    repo = service.repo
    claimed = await repo.claim(
        token=created["token"],
        email="friend@example.com",
        user_id="bob-6",
        now=datetime.now(UTC),
        stale_after=timedelta(minutes=15),
    )
    assert claimed is not None
    assert (await service.http.delete(f"/invitations/{created['id']}", headers=ALICE)).is_success

    async def finalize(session: Any) -> bool:
        return await repo.finalize(
            claimed.id, user_id="bob-6", now=datetime.now(UTC), session=session
        )

    assert await service.runtime.commit(finalize) is False
    assert await status_of(service, created["id"]) == "revoked"
    assert await outbox_events(service, created["id"]) == 0


async def test_finalize_of_an_already_accepted_invite_does_nothing(service: Service) -> None:
    created = await service.created("friend@example.com")
    repo = service.repo
    now = datetime.now(UTC)
    for _ in range(2):  # two deliveries of one signup both hold the (resumable) claim
        claim = await repo.claim(
            token=created["token"],
            email="friend@example.com",
            user_id="bob-7",
            now=now,
            stale_after=timedelta(minutes=15),
        )
        assert claim is not None

    async def finalize_at(at: datetime) -> bool:
        async def work(session: Any) -> bool:
            return await repo.finalize(created["id"], user_id="bob-7", now=at, session=session)

        return await service.runtime.commit(work)

    assert await finalize_at(now) is True
    assert await finalize_at(now + timedelta(seconds=5)) is False
    invitation = await repo.get(created["id"])
    assert invitation is not None and invitation.accepted_at == now.replace(
        microsecond=now.microsecond // 1000 * 1000
    )
