"""POST /invitations: every create rule on the real database (and broker for the users)."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import pytest

from tests.integration.invitations.conftest import ALICE, BOB, Service, StartService, bearer

pytestmark = pytest.mark.integration


async def test_create_returns_the_token_once_pending_for_14_days_and_mails_the_link(
    service: Service,
) -> None:
    before = datetime.now(UTC)
    response = await service.invite("  Friend@Example.COM ")
    assert response.status_code == 201, response.text
    body = response.json()
    assert re.fullmatch(r"[0-9a-f]{40}", body["token"])
    assert body["email"] == "friend@example.com"
    assert body["status"] == "pending" and body["expired"] is False
    assert body["invited_by"] == "alice"
    expires_at = datetime.fromisoformat(body["expires_at"])
    assert abs(expires_at - (before + timedelta(days=14))) < timedelta(seconds=5)
    assert body["mail_sent"] is True
    assert service.mailer is not None
    [mail] = service.mailer.sent
    assert mail.to == "friend@example.com" and body["token"] in mail.link
    assert mail.inviter_email == "alice@example.com"
    stored = await service.repo.get(body["id"])
    assert stored is not None and stored.token == body["token"]


async def test_expiry_follows_the_configured_ttl(start_service: StartService) -> None:
    service = await start_service(invite_ttl_days=2)
    body = await service.created("friend@example.com")
    created_at = datetime.fromisoformat(body["created_at"])
    assert datetime.fromisoformat(body["expires_at"]) - created_at == timedelta(days=2)


async def test_inviting_yourself_is_refused_first_even_when_other_rules_also_apply(
    start_service: StartService,
) -> None:
    service = await start_service(invite_lifetime_cap=0)
    await service.sign_up("alice", "alice@example.com")
    await service.wait_for_user("alice")
    response = await service.invite("ALICE@example.com")
    assert response.status_code == 422
    assert response.json() == {"error": "self_invite", "message": "you cannot invite yourself"}


async def test_an_email_that_belongs_to_a_user_cannot_be_invited(service: Service) -> None:
    await service.sign_up("u-7", "Known@Example.com")
    await service.wait_for_user("u-7")
    response = await service.invite("known@example.com")
    assert response.status_code == 422
    assert response.json()["error"] == "already_a_user"


async def test_a_live_pending_invite_for_the_email_refuses_another_from_anyone(
    service: Service,
) -> None:
    await service.created("friend@example.com", ALICE)
    for inviter in (ALICE, BOB):
        response = await service.invite("FRIEND@example.com", inviter)
        assert response.status_code == 409
        assert response.json()["error"] == "duplicate_pending_invitation"


async def test_an_expired_or_revoked_pending_invite_does_not_block_a_new_one(
    service: Service,
) -> None:
    expired = await service.created("late@example.com")
    past = datetime.now(UTC) - timedelta(seconds=1)
    await service.collection.update_one({"token": expired["token"]}, {"$set": {"expires_at": past}})
    renewed = await service.created("late@example.com")
    assert renewed["id"] != expired["id"]
    old = await service.repo.get(expired["id"])
    assert old is not None and old.status == "pending"  # no "expired" status: just unusable

    revoked = await service.created("gone@example.com")
    assert (await service.http.delete(f"/invitations/{revoked['id']}", headers=ALICE)).is_success
    await service.created("gone@example.com")


async def test_concurrent_creates_for_one_email_leave_exactly_one_pending_invite(
    service: Service,
) -> None:
    inviters = [bearer(f"inviter-{i}") for i in range(8)]
    responses = await asyncio.gather(*(service.invite("race@example.com", h) for h in inviters))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 7
    assert await service.collection.count_documents({"email": "race@example.com"}) == 1


async def test_lifetime_cap_counts_every_invite_ever_created_whatever_its_status(
    start_service: StartService,
) -> None:
    service = await start_service(invite_lifetime_cap=2)
    first = await service.created("one@example.com")
    await service.http.delete(f"/invitations/{first['id']}", headers=ALICE)
    await service.created("two@example.com")
    response = await service.invite("three@example.com")
    assert response.status_code == 403
    assert response.json()["error"] == "invite_cap_reached"
    assert (await service.invite("three@example.com", BOB)).status_code == 201  # per inviter


async def test_lifetime_cap_zero_means_nobody_may_invite(start_service: StartService) -> None:
    service = await start_service(invite_lifetime_cap=0)
    response = await service.invite("friend@example.com")
    assert response.status_code == 403
    assert response.json()["error"] == "invite_cap_reached"


async def test_lifetime_cap_holds_under_concurrent_creates(start_service: StartService) -> None:
    service = await start_service(invite_lifetime_cap=3, invite_rate_limit=None)
    responses = await asyncio.gather(*(service.invite(f"c{i}@example.com") for i in range(8)))
    assert sorted(r.status_code for r in responses) == [201] * 3 + [403] * 5
    assert await service.collection.count_documents({"invited_by": "alice"}) == 3


async def test_rate_limit_answers_429_with_retry_after_until_the_window_slides(
    start_service: StartService,
) -> None:
    service = await start_service(invite_rate_limit=2, invite_rate_window_s=600)
    await service.created("r1@example.com")
    await service.created("r2@example.com")
    limited = await service.invite("r3@example.com")
    assert limited.status_code == 429
    assert limited.json()["error"] == "rate_limited"
    assert 590 <= int(limited.headers["Retry-After"]) <= 600
    assert (await service.invite("r3@example.com", BOB)).status_code == 201  # per inviter

    # The older invite leaves the window: one more fits, and Retry-After follows the newer one.
    eleven_minutes_ago = datetime.now(UTC) - timedelta(minutes=11)
    await service.collection.update_one(
        {"email": "r1@example.com"}, {"$set": {"created_at": eleven_minutes_ago}}
    )
    assert (await service.invite("r4@example.com")).status_code == 201
    assert (await service.invite("r5@example.com")).status_code == 429


async def test_rate_limit_holds_under_concurrent_creates(start_service: StartService) -> None:
    service = await start_service(invite_rate_limit=3)
    responses = await asyncio.gather(*(service.invite(f"c{i}@example.com") for i in range(8)))
    assert sorted(r.status_code for r in responses) == [201] * 3 + [429] * 5
    assert all("Retry-After" in r.headers for r in responses if r.status_code == 429)


async def test_malformed_email_and_missing_fields_are_422(service: Service) -> None:
    response = await service.invite("not-an-email")
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_email"
    missing = await service.http.post("/invitations", json={}, headers=ALICE)
    assert missing.status_code == 422
    assert missing.json()["error"] == "invalid_request"


async def test_mail_is_optional_per_request(service: Service) -> None:
    body = await service.http.post(
        "/invitations", json={"email": "quiet@example.com", "send_email": False}, headers=ALICE
    )
    assert body.status_code == 201 and body.json()["mail_sent"] is False
    assert service.mailer is not None and service.mailer.sent == []


async def test_without_a_mailer_the_invite_is_created_and_not_mailed(
    start_service: StartService,
) -> None:
    service = await start_service(record_mail=False, mailer="none")
    body = await service.created("friend@example.com")
    assert body["mail_sent"] is False and len(body["token"]) == 40


async def test_a_mail_failure_keeps_the_invite_and_says_it_was_not_mailed(
    service: Service,
) -> None:
    assert service.mailer is not None
    service.mailer.failing = True
    body = await service.created("friend@example.com")
    assert body["mail_sent"] is False
    assert await service.repo.get(body["id"]) is not None
