"""Billing's HTTP API: balance, the paginated ledger, and the operations routes."""

from __future__ import annotations

import pytest

from services.billing.domain import Grant
from tests.integration.billing.conftest import BillingUnderTest, StartBilling

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
    response = await billing.service.http.get("/organizations/org-a/balance")
    assert response.json() == {"organization_id": "org-a", "balance": 6}
    unknown = await billing.service.http.get("/organizations/nobody/balance")
    assert (unknown.status_code, unknown.json()["balance"]) == (200, 0)


async def test_ledger_pages_newest_first_until_the_last_page(start_billing: StartBilling) -> None:
    billing = await start_billing()
    await grant_many(billing, 7)
    await grant_many(billing, 1, org="org-b")
    http = billing.service.http

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
