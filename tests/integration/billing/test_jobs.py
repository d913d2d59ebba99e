"""The jobs as functions: reconcile, expire, audit, preseed, on the real database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId

from services.billing import jobs
from services.billing.domain import Grant
from services.billing.handlers import Billing
from services.billing.repository import REF_ID_INDEX
from services.billing.settings import BillingSettings
from shared.lease import Lease
from shared.outbox import LEASES
from tests.integration.billing.conftest import (
    REFERRAL_ON,
    BillingUnderTest,
    StartBilling,
    accepted,
    provisioned,
)
from tests.support import wait_until

pytestmark = pytest.mark.integration


def job_settings(billing: BillingUnderTest, **overrides: Any) -> BillingSettings:
    return billing.settings.model_copy(update={"reconcile_jitter_s": 0, **overrides})


async def set_up_referrals(billing: BillingUnderTest, count: int, *, with_orgs: bool) -> None:
    await billing.publish(provisioned("inviter", "org-a"))
    for i in range(count):
        if with_orgs:
            await billing.publish(provisioned(f"friend{i}", f"org-{i}"))
        await billing.publish(accepted(i))
    await billing.settled()


# -- reconcile ----------------------------------------------------------------------------
async def test_reconcile_backfills_a_grant_whose_message_was_dead_lettered(
    start_billing: StartBilling, monkeypatch: pytest.MonkeyPatch
) -> None:
    billing = await start_billing(**REFERRAL_ON)
    await billing.publish(provisioned("inviter", "org-a"))
    await billing.publish(provisioned("friend1", "org-b"))
    await billing.settled()

    async def database_down(*args: object, **kwargs: object) -> bool:
        raise ConnectionError("primary stepped down")

    # both write paths: the batched one, and the single one a failed batch falls back to
    monkeypatch.setattr(billing.billing, "apply_batch", database_down)
    monkeypatch.setattr(billing.billing, "apply_grant", database_down)
    await billing.publish(accepted(1))  # its fact is recorded; every grant attempt fails

    async def dead_lettered() -> bool:
        return await billing.dead_letter_count() == 1

    await wait_until(dead_lettered)
    monkeypatch.undo()
    assert await billing.balance("org-b") == 0

    report = await jobs.reconcile(job_settings(billing))

    assert (report.status, report.accepted, report.backfilled, report.pending) == (
        "completed",
        1,
        2,
        0,
    )
    assert report.errors == 0 and report.exit_code == 0 and report.duration_ms >= 0
    assert await billing.balance("org-a") == 1000 and await billing.balance("org-b") == 500
    credits = await billing.wait_credits(2)  # published by the service's relay
    assert {c["ref_id"] for c in credits} == {"referral:inv1:referee", "referral:inv1:referrer"}
    assert set(report.as_dict()) >= {"accepted", "backfilled", "pending", "errors", "duration_ms"}


async def test_reconcile_walks_only_open_referrals_in_batches_and_reports_pending(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing(**REFERRAL_ON)
    await set_up_referrals(billing, 5, with_orgs=False)  # referrers credited, referees waiting
    settings = job_settings(billing, reconcile_batch_size=2)

    first = await jobs.reconcile(settings)
    assert (first.accepted, first.backfilled, first.pending, first.errors) == (5, 0, 5, 0)

    # the referees' organizations became known, but their grants never ran (a crash)
    for i in range(3):
        await billing.store.record_membership(
            f"friend{i}", f"org-{i}", datetime.now(UTC), datetime.now(UTC)
        )
    second = await jobs.reconcile(settings)
    assert (second.accepted, second.backfilled, second.pending) == (5, 3, 2)
    third = await jobs.reconcile(settings)
    assert (third.accepted, third.backfilled, third.pending) == (2, 0, 2)  # only open work
    assert [await billing.balance(f"org-{i}") for i in range(5)] == [500, 500, 500, 0, 0]
    assert await billing.balance("org-a") == 5000


async def test_reconcile_exits_0_when_another_runner_holds_the_lock(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing(**REFERRAL_ON)
    leases = billing.runtime.db[LEASES]
    other = Lease(leases, jobs.RECONCILE_LEASE, "other-runner", timedelta(minutes=10))
    assert await other.acquire()

    report = await jobs.reconcile(job_settings(billing))

    assert (report.status, report.lock_holder, report.exit_code) == ("lock_held", "other-runner", 0)
    await other.release()
    crashed = Lease(leases, jobs.RECONCILE_LEASE, "crashed-runner", timedelta(seconds=-1))
    assert await crashed.acquire()  # a lease that already lapsed does not block
    assert (await jobs.reconcile(job_settings(billing))).status == "completed"
    assert await Lease(leases, jobs.RECONCILE_LEASE, "x", timedelta(1)).holder() is None


async def test_reconcile_counts_errors_and_exits_1_but_finishes_the_others(
    start_billing: StartBilling, monkeypatch: pytest.MonkeyPatch
) -> None:
    billing = await start_billing(referral_enabled=False)
    await set_up_referrals(billing, 3, with_orgs=True)
    real_apply = Billing.apply_grant

    async def failing_for_inv1(self: Billing, grant: Grant, cause: object = None) -> bool:
        if grant.invitation_id == "inv1":
            raise RuntimeError("boom")
        return await real_apply(self, grant)

    monkeypatch.setattr(Billing, "apply_grant", failing_for_inv1)
    report = await jobs.reconcile(job_settings(billing, **REFERRAL_ON))

    assert (report.accepted, report.backfilled, report.errors, report.exit_code) == (3, 4, 1, 1)


async def test_reconcile_is_gated_on_the_referral_switch_and_jitters_its_start(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing()
    await set_up_referrals(billing, 1, with_orgs=True)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    disabled = await jobs.reconcile(job_settings(billing), sleep=sleep)
    assert (disabled.status, disabled.exit_code, slept) == ("disabled", 0, [])

    enabled = job_settings(billing, **REFERRAL_ON, reconcile_jitter_s=60)
    assert (await jobs.reconcile(enabled, sleep=sleep)).backfilled == 2  # the first enable
    assert len(slept) == 1 and 0 <= slept[0] <= 60


async def test_preseed_before_the_first_enable_keeps_old_referrals_uncredited(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing(**REFERRAL_ON)
    switched_off = job_settings(billing, referral_enabled=False)
    before = Billing(billing.runtime, switched_off)  # the history, from before the first enable
    now = datetime.now(UTC)
    await before.grant_for_provisioned("inviter", "org-a", provisioned_at=now)
    for i in range(2):
        await before.grant_for_provisioned(f"friend{i}", f"org-{i}", provisioned_at=now)
        assert (await before.grant_for_invitation(f"inv{i}", "inviter", f"friend{i}")).skipped

    refused = await jobs.preseed(job_settings(billing))  # the switch is already on: refused
    assert (refused.status, refused.exit_code) == ("refused", 1)
    report = await jobs.preseed(switched_off)
    assert (report.status, report.referrals, report.exit_code) == ("completed", 2, 0)

    assert (await jobs.reconcile(job_settings(billing))).accepted == 0
    await billing.publish(provisioned("friend0", "org-0"))  # a replayed provisioning
    await billing.publish(accepted(7))  # a referral after the enable
    await billing.publish(provisioned("friend7", "org-7"))
    await billing.settled()
    assert await billing.referral_sides("inv0") == {"referee": "preseeded", "referrer": "preseeded"}
    assert await billing.ledger_keys() == ["referral:inv7:referee", "referral:inv7:referrer"]


# -- expire -------------------------------------------------------------------------------
async def test_expire_writes_one_expiration_per_expired_topup_once(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing(**REFERRAL_ON)
    await billing.publish(provisioned("inviter", "org-a"))
    await billing.publish(provisioned("friend1", "org-b"))
    await billing.publish(accepted(1))
    await billing.settled()
    assert await billing.billing.grant_signup("org-b", "free") == "applied"  # never expires
    settings = job_settings(billing)

    not_yet = await jobs.expire(settings)
    assert (not_yet.expired, not_yet.units) == (0, 0)
    later = datetime.now(UTC) + timedelta(days=366)
    report = await jobs.expire(settings, now=later)
    again = await jobs.expire(settings, now=later)

    assert (report.expired, report.units, report.errors, report.exit_code) == (2, 1500, 0, 0)
    assert (again.expired, again.already_expired) == (0, 0)
    assert await billing.balance("org-a") == 0 and await billing.balance("org-b") == 500
    topup = await billing.store.ledger.find_one({"ref_id": "referral:inv1:referee"})
    assert topup is not None
    expiration = await billing.store.ledger.find_one({"ref_id": f"expire:{topup['_id']}"})
    assert expiration is not None
    assert (expiration["kind"], expiration["amount"], expiration["organization_id"]) == (
        "expiration",
        -500,
        "org-b",
    )
    assert (await jobs.audit(settings)).findings == []


async def spend(billing: BillingUnderTest, org: str, units: int) -> None:
    entry = {
        "_id": ObjectId(),
        "ref_id": f"debit:{ObjectId()}",
        "organization_id": org,
        "kind": "debit",
        "amount": -units,
        "source": "adjustment",
        "at": datetime.now(UTC),
        "expires_at": None,
    }
    await billing.runtime.commit(lambda session: billing.store.append_entry(session, entry))


async def test_expire_removes_only_unspent_units_and_zero_when_fully_spent(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing()
    soon = datetime.now(UTC) + timedelta(days=1)
    for org in ("org-spent", "org-partly"):
        assert await billing.billing.apply_grant(Grant(f"g:{org}", org, 1000, "referral", soon))
    await spend(billing, "org-spent", 1000)
    await spend(billing, "org-partly", 700)

    report = await jobs.expire(job_settings(billing), now=soon + timedelta(seconds=1))

    assert (report.expired, report.units) == (2, 300)
    amounts = {
        doc["organization_id"]: doc["amount"]
        async for doc in billing.store.ledger.find({"kind": "expiration"})
    }
    assert amounts == {"org-spent": 0, "org-partly": -300}
    assert await billing.balance("org-spent") == 0 and await billing.balance("org-partly") == 0


async def test_concurrent_expire_runs_expire_each_topup_once(start_billing: StartBilling) -> None:
    billing = await start_billing()
    soon = datetime.now(UTC) + timedelta(days=1)
    for i in range(20):
        assert await billing.billing.apply_grant(
            Grant(f"g{i}", f"org-{i % 3}", 10, "referral", soon)
        )
    settings = job_settings(billing, reconcile_batch_size=7)

    import asyncio

    reports = await asyncio.gather(*(jobs.expire(settings, now=soon) for _ in range(3)))

    assert sum(r.expired for r in reports) == 20
    assert sum(r.units for r in reports) == 200
    assert await billing.store.ledger.count_documents({"kind": "expiration"}) == 20
    assert (await jobs.audit(settings)).findings == []


# -- audit --------------------------------------------------------------------------------
async def test_audit_of_a_sound_ledger_finds_nothing(start_billing: StartBilling) -> None:
    billing = await start_billing(**REFERRAL_ON)
    await set_up_referrals(billing, 2, with_orgs=True)

    report = await jobs.audit(job_settings(billing))

    assert (report.findings, report.exit_code) == ([], 0)
    assert (report.accounts, report.entries) == (3, 4)


async def test_audit_finds_balance_mismatches_bad_signs_and_duplicate_keys(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing(**REFERRAL_ON)
    await set_up_referrals(billing, 1, with_orgs=True)
    store = billing.store
    await store.accounts.update_one({"_id": "org-a"}, {"$inc": {"balance": 5}})  # no entry
    await store.ledger.insert_one(
        {"ref_id": "orphan", "organization_id": "org-x", "kind": "topup", "amount": 7}
    )
    await store.ledger.drop_index(REF_ID_INDEX)
    await store.ledger.insert_one(
        {
            "ref_id": "referral:inv0:referee",
            "organization_id": "org-0",
            "kind": "debit",
            "amount": 0,
        }
    )

    report = await jobs.audit(job_settings(billing))

    assert report.exit_code == 1
    found = {(f["finding"], f.get("organization_id") or f.get("ref_id")) for f in report.findings}
    assert found == {
        ("missing_unique_index", None),
        ("duplicate_key", "referral:inv0:referee"),
        ("balance_mismatch", "org-a"),
        ("balance_mismatch", "org-x"),
        ("sign_rule", "referral:inv0:referee"),
    }
    mismatch = next(f for f in report.findings if f.get("organization_id") == "org-a")
    assert (mismatch["balance"], mismatch["ledger_sum"]) == (1005, 1000)
    assert report.finding_counts == {
        "missing_unique_index": 1,
        "duplicate_key": 1,
        "balance_mismatch": 2,
        "sign_rule": 1,
    }
