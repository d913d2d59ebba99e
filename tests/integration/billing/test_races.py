"""`invitation.accepted` and `organization.provisioned` racing: at least one always grants."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable

import pytest

from shared.contracts import Event
from shared.envelope import Envelope
from tests.integration.billing.conftest import (
    REFERRAL_ON,
    BillingUnderTest,
    StartBilling,
    accepted,
    provisioned,
)

pytestmark = pytest.mark.integration
ROUNDS = 30


async def after_a_moment(call: Awaitable[None]) -> None:
    await asyncio.sleep(random.random() * 0.004)  # either may start first, or both at once
    await call


async def assert_every_referral_credited_exactly_once(billing: BillingUnderTest) -> None:
    for i in range(ROUNDS):
        await billing.wait_balance(f"org-{i}", 500)
    await billing.wait_balance("org-a", 1000 * ROUNDS)
    keys = await billing.ledger_keys()
    assert len(keys) == len(set(keys)) == 2 * ROUNDS
    open_ = await billing.store.referrals.count_documents({"open": True})
    assert open_ == 0  # the projection knows both sides were granted


async def test_concurrent_accepted_and_provisioned_handlers_always_end_credited(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing(**REFERRAL_ON)
    use_cases = billing.billing

    def envelope(event: Event) -> Envelope:
        return Envelope.new(event, source="tests")

    inviter = provisioned("inviter", "org-a")
    await use_cases.on_organization_provisioned(inviter, envelope(inviter))
    for i in range(ROUNDS):
        accept, provision = accepted(i), provisioned(f"friend{i}", f"org-{i}")
        await asyncio.gather(
            after_a_moment(use_cases.on_invitation_accepted(accept, envelope(accept))),
            after_a_moment(use_cases.on_organization_provisioned(provision, envelope(provision))),
        )

    await assert_every_referral_credited_exactly_once(billing)


async def test_two_consumers_racing_on_one_queue_always_end_credited(
    start_billing: StartBilling,
) -> None:
    first = await start_billing(**REFERRAL_ON)
    await start_billing(**REFERRAL_ON)  # a second replica, competing on the same queue
    await first.publish(provisioned("inviter", "org-a"))
    await first.wait_handled("organization.provisioned", 1)

    await asyncio.gather(
        *(
            publish
            for i in range(ROUNDS)
            for publish in (
                first.publish(accepted(i)),
                first.publish(provisioned(f"friend{i}", f"org-{i}")),
            )
        )
    )

    await first.settled()  # the projection is written after each grant commits
    await assert_every_referral_credited_exactly_once(first)
    assert await first.dead_letter_count() == 0
