"""Listing, revoking, resending and verifying invitations over HTTP."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.integration.invitations.conftest import (
    ADMIN,
    ALICE,
    BOB,
    Service,
    StartService,
)
from tests.support import wait_until

pytestmark = pytest.mark.integration


async def expire(service: Service, invitation_id: str) -> None:
    past = datetime.now(UTC) - timedelta(seconds=1)
    invitation = await service.repo.get(invitation_id)
    assert invitation is not None
    await service.collection.update_one({"token": invitation.token}, {"$set": {"expires_at": past}})


# -- list ------------------------------------------------------------------------------------
async def test_members_list_their_own_invites_and_admins_list_all_without_tokens(
    service: Service,
) -> None:
    a1 = await service.created("a1@example.com", ALICE)
    a2 = await service.created("a2@example.com", ALICE)
    b1 = await service.created("b1@example.com", BOB)

    mine = await service.http.get("/invitations", headers=ALICE)
    assert mine.status_code == 200
    assert [i["id"] for i in mine.json()["invitations"]] == [a2["id"], a1["id"]]  # newest first
    everyone = await service.http.get("/invitations", headers=ADMIN)
    assert {i["id"] for i in everyone.json()["invitations"]} == {a1["id"], a2["id"], b1["id"]}
    for response in (mine, everyone):
        assert all("token" not in i for i in response.json()["invitations"])
        for created in (a1, a2, b1):
            assert created["token"] not in response.text


async def test_listing_pages_with_before(service: Service) -> None:
    ids = [(await service.created(f"p{i}@example.com"))["id"] for i in range(5)]
    first = (await service.http.get("/invitations?limit=2", headers=ALICE)).json()
    assert [i["id"] for i in first["invitations"]] == ids[:2:-1][:2]
    second = await service.http.get(
        "/invitations", params={"limit": 2, "before": first["next_before"]}, headers=ALICE
    )
    assert [i["id"] for i in second.json()["invitations"]] == [ids[2], ids[1]]
    last = await service.http.get(
        "/invitations", params={"limit": 2, "before": ids[1]}, headers=ALICE
    )
    assert [i["id"] for i in last.json()["invitations"]] == [ids[0]]
    assert last.json()["next_before"] is None


# -- revoke ----------------------------------------------------------------------------------
async def test_inviter_revokes_a_pending_invite_once_then_409(service: Service) -> None:
    created = await service.created("friend@example.com")
    response = await service.http.delete(f"/invitations/{created['id']}", headers=ALICE)
    assert response.status_code == 200
    assert response.json()["status"] == "revoked" and response.json()["revoked_at"]
    again = await service.http.delete(f"/invitations/{created['id']}", headers=ALICE)
    assert again.status_code == 409
    assert again.json()["error"] == "not_pending"


async def test_an_expired_pending_invite_can_still_be_revoked(service: Service) -> None:
    created = await service.created("friend@example.com")
    await expire(service, created["id"])
    response = await service.http.delete(f"/invitations/{created['id']}", headers=ALICE)
    assert response.status_code == 200


async def test_an_accepted_invite_can_never_be_revoked(service: Service) -> None:
    created = await service.created("friend@example.com")
    await service.sign_up("friend-1", "friend@example.com", created["token"])

    async def accepted() -> bool:
        invitation = await service.repo.get(created["id"])
        return invitation is not None and invitation.status == "accepted"

    await wait_until(accepted)
    for who in (ALICE, ADMIN):
        response = await service.http.delete(f"/invitations/{created['id']}", headers=who)
        assert response.status_code == 409
    invitation = await service.repo.get(created["id"])
    assert invitation is not None and invitation.status == "accepted"


async def test_only_the_inviter_or_an_admin_may_revoke(service: Service) -> None:
    created = await service.created("friend@example.com", ALICE)
    response = await service.http.delete(f"/invitations/{created['id']}", headers=BOB)
    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"
    by_admin = await service.http.delete(f"/invitations/{created['id']}", headers=ADMIN)
    assert by_admin.status_code == 200


@pytest.mark.parametrize("invitation_id", ["0" * 24, "not-an-id"])
async def test_revoking_an_unknown_invite_is_404(service: Service, invitation_id: str) -> None:
    response = await service.http.delete(f"/invitations/{invitation_id}", headers=ADMIN)
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


# -- resend ----------------------------------------------------------------------------------
async def test_admin_resends_a_pending_invite_with_the_same_token(service: Service) -> None:
    created = await service.created("friend@example.com", ALICE)
    response = await service.http.post(f"/invitations/{created['id']}/resend", headers=ADMIN)
    assert response.status_code == 200
    assert "token" not in response.json()
    assert service.mailer is not None
    first, second = service.mailer.sent
    assert first.link == second.link and created["token"] in second.link


async def test_only_an_admin_may_resend_not_even_the_inviter(service: Service) -> None:
    created = await service.created("friend@example.com", ALICE)
    response = await service.http.post(f"/invitations/{created['id']}/resend", headers=ALICE)
    assert response.status_code == 403


async def test_resend_is_for_pending_unexpired_invites_only(service: Service) -> None:
    revoked = await service.created("gone@example.com")
    await service.http.delete(f"/invitations/{revoked['id']}", headers=ALICE)
    response = await service.http.post(f"/invitations/{revoked['id']}/resend", headers=ADMIN)
    assert response.status_code == 409 and response.json()["error"] == "not_pending"

    expired = await service.created("late@example.com")
    await expire(service, expired["id"])
    response = await service.http.post(f"/invitations/{expired['id']}/resend", headers=ADMIN)
    assert response.status_code == 409 and response.json()["error"] == "invitation_expired"

    unknown = await service.http.post(f"/invitations/{'0' * 24}/resend", headers=ADMIN)
    assert unknown.status_code == 404


async def test_resend_without_a_mailer_is_422(start_service: StartService) -> None:
    service = await start_service(record_mail=False, mailer="none")
    created = await service.created("friend@example.com")
    response = await service.http.post(f"/invitations/{created['id']}/resend", headers=ADMIN)
    assert response.status_code == 422
    assert response.json()["error"] == "no_mailer"


async def test_resend_reports_a_mail_failure_as_502(service: Service) -> None:
    created = await service.created("friend@example.com")
    assert service.mailer is not None
    service.mailer.failing = True
    response = await service.http.post(f"/invitations/{created['id']}/resend", headers=ADMIN)
    assert response.status_code == 502 and response.json()["error"] == "mail_failed"


# -- verify ----------------------------------------------------------------------------------
async def test_verify_is_public_and_gives_validity_and_the_pinned_email(service: Service) -> None:
    created = await service.created("Friend@Example.com")
    response = await service.http.get(f"/invitations/verify/{created['token']}")
    assert response.status_code == 200
    body = response.json()
    assert body["valid"] is True and body["reason"] == "valid"
    assert body["email"] == "friend@example.com"
    assert body["expires_at"] == created["expires_at"]


@pytest.mark.parametrize("token", ["0" * 40, "short", "Z" * 40])
async def test_verify_of_an_unknown_or_malformed_token_is_not_valid(
    service: Service, token: str
) -> None:
    response = await service.http.get(f"/invitations/verify/{token}")
    assert response.status_code == 200
    assert response.json() == {
        "valid": False,
        "reason": "unknown",
        "email": None,
        "expires_at": None,
    }


async def test_verify_of_a_revoked_or_expired_token_is_not_valid(service: Service) -> None:
    revoked = await service.created("gone@example.com")
    await service.http.delete(f"/invitations/{revoked['id']}", headers=ALICE)
    expired = await service.created("late@example.com")
    await expire(service, expired["id"])
    for created, reason in ((revoked, "revoked"), (expired, "expired")):
        body = (await service.http.get(f"/invitations/verify/{created['token']}")).json()
        assert body["valid"] is False and body["reason"] == reason
