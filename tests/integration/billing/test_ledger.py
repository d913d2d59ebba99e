"""Ledger invariants under concurrency, and the use-case outcomes events cannot express."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from services.billing.domain import Grant
from shared.outbox import OUTBOX
from tests.integration.billing.conftest import REFERRAL_ON, BillingUnderTest, StartBilling

pytestmark = pytest.mark.integration


def grant(key: str, units: int = 100, org: str = "org-a") -> Grant:
    return Grant(ref_id=key, organization_id=org, units=units, source="adjustment", expires_at=None)


async def ledger_sum(billing: BillingUnderTest, org: str) -> int:
    return sum([d["amount"] async for d in billing.store.ledger.find({"organization_id": org})])


async def test_concurrent_grants_of_one_key_apply_exactly_once(start_billing: StartBilling) -> None:
    billing = await start_billing()
    outcomes = await asyncio.gather(*(billing.billing.apply_grant(grant("k1")) for _ in range(20)))

    assert outcomes.count(True) == 1 and outcomes.count(False) == 19
    assert await billing.balance("org-a") == 100 == await ledger_sum(billing, "org-a")
    assert (
        await billing.runtime.db[OUTBOX].count_documents({"type": "billing.credits_granted"}) == 1
    )


async def test_concurrent_grants_to_one_account_all_apply_and_balance_equals_the_ledger(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing()
    # every transaction touches the same account document: WriteConflict, retried by the driver
    keys = [f"k{i}" for i in range(30)]
    outcomes = await asyncio.gather(
        *(billing.billing.apply_grant(grant(k, i)) for i, k in enumerate(keys, 1))
    )

    assert all(outcomes)
    assert await billing.balance("org-a") == sum(range(1, 31)) == await ledger_sum(billing, "org-a")
    credits = await billing.wait_credits(30)
    assert sorted(c["balance"] for c in credits)[-1] == sum(range(1, 31))
    assert len({c["balance"] for c in credits}) == 30  # each credit reports its own balance after


async def test_a_duplicate_key_is_duplicate_grant_even_for_another_organization(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing()
    assert await billing.billing.apply_grant(grant("referral:inv1:referee", org="org-a"))
    # the user's organization changed between attempts: the key still counts once, forever
    assert not await billing.billing.apply_grant(grant("referral:inv1:referee", org="org-b"))
    assert await billing.balance("org-b") == 0


async def test_grant_for_invitation_without_id_or_accepted_user(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing(**REFERRAL_ON)
    await billing.billing.grant_for_provisioned(
        "inviter", "org-a", provisioned_at=datetime.now(UTC)
    )
    no_id = await billing.billing.grant_for_invitation("", "inviter", "friend")
    no_user = await billing.billing.grant_for_invitation("inv9", "inviter", None)

    assert no_id.summary() == {"skipped": "no_invitation_id"}
    assert await billing.store.referrals.count_documents({"_id": ""}) == 0
    assert no_user.summary() == {"referee": "no_accepted_user", "referrer": "applied"}
    assert await billing.balance("org-a") == 1000


async def test_user_organization_is_the_most_recently_provisioned(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing(**REFERRAL_ON)
    early, late = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)
    use_cases = billing.billing
    await use_cases.grant_for_provisioned("friend", "org-new", provisioned_at=late)
    await use_cases.grant_for_provisioned("friend", "org-old", provisioned_at=early)  # arrives late

    assert await billing.store.organizations_of(["friend", "nobody"]) == {"friend": "org-new"}
    result = await use_cases.grant_for_invitation("inv1", None, "friend")
    assert result.sides[0].organization_id == "org-new"
