"""Billing's HTTP API: balance, the paginated ledger, who may read them, the ops routes."""

from __future__ import annotations

import time

import jwt
import pytest

from services.billing.domain import Grant
from tests.integration.billing.conftest import (
    ADMIN,
    JWT_SECRET,
    BillingUnderTest,
    StartBilling,
    provisioned,
)
from tests.support import bearer

pytestmark = pytest.mark.integration


async def grant_many(billing: BillingUnderTest, count: int, org: str = "org-a") -> None:
    for i in range(1, count + 1):
        grant = Grant(f"{org}:k{i}", org, i, "adjustment", None)
        assert await billing.billing.apply_grant(grant)


async def test_balance_of_an_organization_and_zero_for_one_without_entries(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing()
    await grant_many(billing, 3)
    response = await billing.service.http.get("/organizations/org-a/balance", headers=ADMIN)
    assert response.json() == {"organization_id": "org-a", "balance": 6}
    unknown = await billing.service.http.get("/organizations/nobody/balance", headers=ADMIN)
    assert (unknown.status_code, unknown.json()["balance"]) == (200, 0)


async def test_ledger_pages_newest_first_until_the_last_page(start_billing: StartBilling) -> None:
    billing = await start_billing()
    await grant_many(billing, 7)
    await grant_many(billing, 1, org="org-b")
    http = billing.service.http
    http.headers.update(ADMIN)

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = (await http.get("/organizations/org-a/ledger", params=params)).json()
        seen += [entry["ref_id"] for entry in page["entries"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert pages == 3
    assert seen == [f"org-a:k{i}" for i in range(7, 0, -1)]  # newest first, no gap, no repeat
    first = (await http.get("/organizations/org-a/ledger", params={"limit": 1})).json()
    entry = first["entries"][0]
    assert (entry["kind"], entry["amount"], entry["source"]) == ("topup", 7, "adjustment")
    assert set(entry) >= {"id", "ref_id", "at", "expires_at"}


async def test_ledger_refuses_a_limit_above_200_and_a_foreign_cursor(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing()
    http = billing.service.http
    http.headers.update(ADMIN)
    assert (await http.get("/organizations/o/ledger", params={"limit": 200})).status_code == 200
    too_many = await http.get("/organizations/o/ledger", params={"limit": 201})
    assert too_many.status_code == 422 and too_many.json()["error"] == "invalid_request"
    assert (await http.get("/organizations/o/ledger", params={"limit": 0})).status_code == 422
    foreign = await http.get("/organizations/o/ledger", params={"cursor": "page-2"})
    assert foreign.status_code == 422 and foreign.json()["error"] == "invalid_cursor"


async def test_health_readiness_and_metrics(start_billing: StartBilling) -> None:
    billing = await start_billing()
    http = billing.service.http
    assert (await http.get("/healthz")).json() == {"status": "ok", "service": "billing"}
    ready = await http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    metrics = await http.get("/metrics")
    assert metrics.status_code == 200 and "grantwire_outbox_pending" in metrics.text


READS = ("/organizations/org-a/balance", "/organizations/org-a/ledger")


def expired(user_id: str) -> dict[str, str]:
    claims = {"sub": user_id, "email": f"{user_id}@example.com", "exp": int(time.time()) - 120}
    return {"Authorization": f"Bearer {jwt.encode(claims, JWT_SECRET, algorithm='HS256')}"}


@pytest.mark.parametrize(
    ("headers", "case"),
    [
        ({}, "no token"),
        ({"Authorization": "Basic YWxpY2U6c2VjcmV0"}, "not a bearer"),
        ({"Authorization": "Bearer not-a-jwt"}, "garbage"),
        (bearer("another-secret-of-at-least-32-bytes!", "u", roles=("admin",)), "wrong secret"),
        (expired("member-a"), "expired"),
    ],
)
async def test_reads_answer_401_with_a_bearer_challenge_without_a_valid_token(
    start_billing: StartBilling, headers: dict[str, str], case: str
) -> None:
    billing = await start_billing()
    for path in READS:
        response = await billing.service.http.get(path, headers=headers)
        assert response.status_code == 401, (case, path)
        assert response.json()["error"] == "unauthorized" and response.json()["message"]
        assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_members_read_their_own_organization_only_and_admins_read_any(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing()
    await grant_many(billing, 2)  # org-a: 1 + 2
    await billing.publish(provisioned("member-a", "org-a"))
    await billing.publish(provisioned("member-b", "org-b"))
    await billing.settled()
    member_a, member_b = bearer(JWT_SECRET, "member-a"), bearer(JWT_SECRET, "member-b")
    stranger = bearer(JWT_SECRET, "stranger", roles=("member", "billing"))  # not the admin role
    http = billing.service.http
    for path in READS:
        assert (await http.get(path, headers=member_a)).status_code == 200, path
        assert (await http.get(path, headers=ADMIN)).status_code == 200, path
        for caller in (member_b, stranger):
            refused = await http.get(path, headers=caller)
            assert refused.status_code == 403, path
            assert refused.json()["error"] == "forbidden"
    balance = await http.get("/organizations/org-a/balance", headers=member_a)
    assert balance.json() == {"organization_id": "org-a", "balance": 3}
    assert (await http.get("/organizations/org-b/balance", headers=member_b)).status_code == 200


async def test_a_member_who_moved_reads_the_new_organization_not_the_old_one(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing()
    await billing.publish(provisioned("mover", "org-old"))
    await billing.settled()
    mover = bearer(JWT_SECRET, "mover")
    http = billing.service.http
    assert (await http.get("/organizations/org-old/balance", headers=mover)).status_code == 200
    await billing.publish(provisioned("mover", "org-new"))  # provisioned later: current org
    await billing.settled()
    assert (await http.get("/organizations/org-new/balance", headers=mover)).status_code == 200
    assert (await http.get("/organizations/org-old/balance", headers=mover)).status_code == 403


async def test_without_a_configured_key_every_read_is_refused(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing(jwt_secret=None)  # in-process only: the process refuses
    response = await billing.service.http.get("/organizations/org-a/balance", headers=ADMIN)
    assert response.status_code == 401
