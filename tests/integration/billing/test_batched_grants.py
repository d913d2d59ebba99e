"""Events that arrive together are granted together (one transaction per batch), and each
still gets its own outcome: duplicates, a key taken meanwhile, a failure of one event."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from services.billing.domain import Grant
from services.billing.grant_batch import (
    AcceptedReferral,
    CreatedOrganization,
    GrantBatches,
    ProvisionedUser,
)
from services.billing.handlers import Billing
from tests.integration.billing.conftest import (
    REFERRAL_ON,
    StartBilling,
    accepted,
    created,
    provisioned,
)
from tests.support import batches_seen, wait_until

pytestmark = pytest.mark.integration
N = 60


async def test_a_burst_of_events_is_granted_in_batches_each_key_exactly_once(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing(**REFERRAL_ON, grant_batch_concurrency=2)
    await billing.publish(provisioned("inviter", "org-a"))
    for i in range(N):
        await billing.publish(accepted(i))
    await billing.settled()
    before = batches_seen("billing-grants")

    # the burst, published all at once: each new organization's signup grant and its
    # referral grants, twice over
    burst = [
        event
        for _ in range(2)
        for i in range(N)
        for event in (created(f"org-{i}"), provisioned(f"friend{i}", f"org-{i}"))
    ]
    await asyncio.gather(*(billing.publish(event) for event in burst))
    await billing.settled(timeout=30)

    batches, items = (a - b for a, b in zip(batches_seen("billing-grants"), before, strict=True))
    assert items == 4 * N and batches < items  # some events shared a transaction
    for i in range(N):
        assert await billing.balance(f"org-{i}") == 500 + 500  # signup + referee, once each
    assert await billing.balance("org-a") == 1000 * N
    keys = await billing.ledger_keys()
    assert len(keys) == len(set(keys)) == 3 * N
    credits = await billing.wait_credits(3 * N)
    assert len({c["ref_id"] for c in credits}) == 3 * N
    # every balance the credits report is one the account really had, in order per account
    for i in range(N):
        reported = sorted(c["balance"] for c in credits if c["organization_id"] == f"org-{i}")
        assert reported == [500, 1000]
    assert await billing.store.referrals.count_documents({"open": True}) == 0


async def test_one_batch_answers_each_kind_of_event_as_the_single_path_would(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing(**REFERRAL_ON)
    use_cases = billing.billing
    now = datetime.now(UTC)
    await use_cases.grant_for_provisioned("inviter", "org-a", provisioned_at=now)
    await use_cases.grant_for_invitation("inv1", "inviter", "friend1")
    await use_cases.grant_for_invitation("inv2", "inviter", "friend2")

    results = await GrantBatches(use_cases).run(
        [
            ProvisionedUser("friend1", "org-1", now),
            CreatedOrganization("org-1", "free"),
            CreatedOrganization("org-1", "free"),  # the same key twice in one batch
            CreatedOrganization("org-x", "no-such-plan"),
            AcceptedReferral("", "inviter", "friend9"),
            AcceptedReferral("inv3", "inviter", "friend2"),  # friend2 has no organization yet
            ProvisionedUser("friend2", "org-2", now),  # ... until this one, same batch
        ]
    )

    # inv1's referrer side was granted when it was accepted (the inviter had org-a)
    assert [r.summary() for r in results[0]] == [
        {"referee": "applied", "referrer": "duplicate_grant"}
    ]
    assert results[1:4] == ["applied", "applied", "no_signup_grant"]
    assert results[4].summary() == {"skipped": "no_invitation_id"}
    # the facts are recorded before the decisions: inv3 sees friend2's organization
    assert results[5].summary() == {"referee": "applied", "referrer": "applied"}
    assert sorted(r.summary()["referee"] for r in results[6]) == ["applied", "applied"]
    assert await use_cases.balance("org-1") == 500 + 500
    assert await use_cases.balance("org-2") == 500 + 500
    assert await use_cases.balance("org-a") == 1000 * 3
    assert await billing.referral_sides("inv3") == {"referee": "applied", "referrer": "applied"}


async def test_a_key_committed_elsewhere_mid_batch_splits_the_batch_and_nothing_is_lost(
    start_billing: StartBilling, monkeypatch: pytest.MonkeyPatch
) -> None:
    billing = await start_billing(**REFERRAL_ON)
    use_cases = billing.billing
    store = use_cases.store
    real_existing_keys = type(store).existing_keys
    other_replica = Billing(billing.runtime, billing.settings)  # its own account locks
    raced = False

    async def another_process_wins(self: object, session: object, keys: object) -> set[str]:
        """Read the ledger, then let 'another replica' commit one of the keys."""
        nonlocal raced
        held = await real_existing_keys(self, session, keys)  # type: ignore[arg-type]
        if not raced:
            raced = True
            grant = Grant("signup_grant:org-2", "org-2", 500, "signup_grant", None)
            assert await other_replica.apply_grant(grant)
        return held

    monkeypatch.setattr(type(store), "existing_keys", another_process_wins)
    results = await GrantBatches(use_cases).run(
        [CreatedOrganization(f"org-{i}", "free") for i in range(1, 4)]
    )

    assert raced and results == ["applied", "duplicate_grant", "applied"]
    for org in ("org-1", "org-2", "org-3"):
        assert await use_cases.balance(org) == 500
    assert len(await billing.ledger_keys()) == 3


async def test_a_batch_that_fails_retries_each_event_alone_with_its_own_outcome(
    start_billing: StartBilling, monkeypatch: pytest.MonkeyPatch
) -> None:
    billing = await start_billing(**REFERRAL_ON)
    use_cases = billing.billing
    real_signup = type(use_cases).grant_signup

    async def broken_batch(*args: object, **kwargs: object) -> dict[str, bool]:
        raise ConnectionError("primary stepped down")

    async def org_2_broken(self: object, organization_id: str, plan_id: str, **kw: object) -> str:
        if organization_id == "org-2":
            raise ConnectionError("still down for org-2")
        return await real_signup(self, organization_id, plan_id, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(use_cases, "apply_batch", broken_batch)
    monkeypatch.setattr(type(use_cases), "grant_signup", org_2_broken)
    results = await GrantBatches(use_cases).run(
        [CreatedOrganization(f"org-{i}", "free") for i in range(1, 4)]
    )

    assert results[0] == "applied" and results[2] == "applied"
    assert isinstance(results[1], ConnectionError)  # only its message is retried
    assert await use_cases.balance("org-2") == 0


async def test_events_retried_alone_do_not_wait_for_each_other(
    start_billing: StartBilling, monkeypatch: pytest.MonkeyPatch
) -> None:
    billing = await start_billing(**REFERRAL_ON)
    use_cases = billing.billing
    release = asyncio.Event()
    finished: list[str] = []

    async def broken_batch(*args: object, **kwargs: object) -> dict[str, bool]:
        raise ConnectionError("primary stepped down")

    async def org_1_blocked(self: object, organization_id: str, plan_id: str, **kw: object) -> str:
        if organization_id == "org-1":  # e.g. its account locked by a crashed replica
            await release.wait()
        finished.append(organization_id)
        return "applied"

    monkeypatch.setattr(use_cases, "apply_batch", broken_batch)
    monkeypatch.setattr(type(use_cases), "grant_signup", org_1_blocked)
    run = asyncio.create_task(
        GrantBatches(use_cases).run([CreatedOrganization(f"org-{i}", "free") for i in range(1, 4)])
    )

    async def others_done() -> bool:
        return sorted(finished) == ["org-2", "org-3"]

    await wait_until(others_done, timeout=5)
    release.set()
    assert await run == ["applied", "applied", "applied"]
    assert finished[-1] == "org-1"
