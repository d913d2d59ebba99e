"""The three listeners through the real broker: every outcome and both event orders."""

from __future__ import annotations

import pytest

from services.billing import SERVICE
from shared.contracts import InvitationAccepted, OrganizationCreated, OrganizationProvisioned
from tests.integration.billing.conftest import (
    REFERRAL_ON,
    StartBilling,
    accepted,
    created,
    provisioned,
)

pytestmark = pytest.mark.integration

ACCEPTED = InvitationAccepted.event_type
PROVISIONED = OrganizationProvisioned.event_type
CREATED = OrganizationCreated.event_type


async def test_accepted_referral_credits_both_organizations_and_publishes_each_credit(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing(**REFERRAL_ON)
    await billing.publish(provisioned("inviter", "org-a"))
    await billing.publish(provisioned("friend1", "org-b"))
    await billing.wait_handled(PROVISIONED, 2)
    cause = await billing.publish(accepted(1))

    await billing.settled()
    assert await billing.balance("org-a") == 1000
    assert await billing.balance("org-b") == 500
    assert await billing.referral_sides("inv1") == {"referee": "applied", "referrer": "applied"}
    credits = {c["side"]: c for c in await billing.wait_credits(2)}
    assert credits["referee"] == {
        "organization_id": "org-b",
        "ref_id": "referral:inv1:referee",
        "source": "referral",
        "amount": 500,
        "balance": 500,
        "expires_at": credits["referee"]["expires_at"],
        "invitation_id": "inv1",
        "side": "referee",
    }
    assert credits["referee"]["expires_at"] is not None
    assert credits["referrer"]["amount"] == 1000 and credits["referrer"]["balance"] == 1000
    message = billing.tap.messages[0]
    assert message.correlation_id == cause.correlation_id
    assert message.headers["cloudEvents:causationid"] == cause.id
    assert message.headers["cloudEvents:source"] == SERVICE


async def test_with_a_mailer_the_referee_is_credited_at_provisioning_without_reconcile(
    start_billing: StartBilling,
) -> None:
    """The seed's regression: the referee's organization exists only after email verification."""
    billing = await start_billing(**REFERRAL_ON)
    await billing.publish(created("org-a"))
    await billing.publish(provisioned("inviter", "org-a"))
    await billing.wait_handled(PROVISIONED, 1)
    await billing.publish(accepted(1))  # the friend signed up; unverified, no organization yet
    await billing.settled()
    assert await billing.balance("org-a") == 500 + 1000
    assert await billing.referral_sides("inv1") == {
        "referee": "no_organization",
        "referrer": "applied",
    }

    await billing.publish(created("org-b"))  # the friend verified their email
    await billing.publish(provisioned("friend1", "org-b"))

    await billing.settled()  # no reconcile involved: the provisioned event itself credits
    assert await billing.balance("org-b") == 500 + 500
    assert await billing.referral_sides("inv1") == {"referee": "applied", "referrer": "applied"}
    assert await billing.ledger_keys("org-b") == ["referral:inv1:referee", "signup_grant:org-b"]


@pytest.mark.parametrize("first", ["accepted", "provisioned"])
async def test_either_event_order_credits_the_same_totals(
    start_billing: StartBilling, first: str
) -> None:
    billing = await start_billing(**REFERRAL_ON)
    events = {
        "accepted": [accepted(1)],
        "provisioned": [provisioned("inviter", "org-a"), provisioned("friend1", "org-b")],
    }
    second = "provisioned" if first == "accepted" else "accepted"
    for event in events[first]:
        await billing.publish(event)
    await billing.wait_handled(ACCEPTED if first == "accepted" else PROVISIONED, len(events[first]))
    for event in events[second]:
        await billing.publish(event)

    await billing.settled()
    assert await billing.balance("org-a") == 1000
    assert await billing.balance("org-b") == 500
    assert await billing.ledger_keys() == ["referral:inv1:referee", "referral:inv1:referrer"]
    assert len(await billing.wait_credits(2)) == 2


async def test_provisioning_the_inviter_later_credits_the_referrer_side(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing(**REFERRAL_ON)
    await billing.publish(provisioned("friend1", "org-b"))
    await billing.wait_handled(PROVISIONED, 1)
    await billing.publish(accepted(1))
    await billing.settled()
    assert await billing.balance("org-b") == 500
    assert (await billing.referral_sides("inv1"))["referrer"] == "no_organization"

    await billing.publish(provisioned("inviter", "org-a"))

    await billing.settled()
    assert await billing.balance("org-a") == 1000
    assert await billing.referral_sides("inv1") == {"referee": "applied", "referrer": "applied"}


async def test_the_same_events_delivered_three_times_credit_once_and_never_dead_letter(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing(**REFERRAL_ON)
    for _ in range(3):
        await billing.publish(provisioned("inviter", "org-a"))
        await billing.publish(provisioned("friend1", "org-b"))
        await billing.publish(created("org-b"))
    envelope = await billing.publish(accepted(1))
    for _ in range(2):  # the very same message (same id) redelivered
        await billing.publish(accepted(1), envelope=envelope)
    await billing.publish(accepted(1))  # and a replay under a new id

    await billing.settled()
    assert billing.handled(ACCEPTED) == 4 and billing.handled(PROVISIONED) == 6
    assert await billing.balance("org-a") == 1000
    assert await billing.balance("org-b") == 500 + 500
    assert await billing.ledger_keys() == [
        "referral:inv1:referee",
        "referral:inv1:referrer",
        "signup_grant:org-b",
    ]
    assert len(await billing.wait_credits(3)) == 3
    assert await billing.dead_letter_count() == 0


async def test_disabled_referrals_are_recorded_not_credited_but_the_signup_grant_is(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing(referral_referrer_units=1000, referral_referee_units=500)
    await billing.publish(provisioned("inviter", "org-a"))
    await billing.publish(provisioned("friend1", "org-b"))
    await billing.publish(accepted(1))
    await billing.publish(created("org-b"))
    await billing.settled()

    assert await billing.balance("org-b") == 500  # the signup grant only
    assert await billing.balance("org-a") == 0
    assert await billing.ledger_keys() == ["signup_grant:org-b"]
    assert await billing.referral_sides("inv1") == {"referee": None, "referrer": None}


async def test_self_referral_no_inviter_and_zero_units_credit_nothing_on_that_side(
    start_billing: StartBilling,
) -> None:
    billing = await start_billing(referral_enabled=True, referral_referee_units=500)
    await billing.publish(provisioned("friend1", "org-b"))
    await billing.publish(provisioned("friend2", "org-c"))
    await billing.publish(provisioned("inviter", "org-a"))
    await billing.wait_handled(PROVISIONED, 3)
    await billing.publish(accepted(1, inviter="friend1"))  # invited themselves
    await billing.publish(accepted(2, inviter=None))  # an invite with no inviter
    await billing.publish(accepted(3, inviter="inviter", referee="friend3"))
    await billing.settled()

    assert await billing.referral_sides("inv1") == {
        "referee": "applied",
        "referrer": "self_referral",
    }
    assert await billing.referral_sides("inv2") == {"referee": "applied", "referrer": "no_inviter"}
    assert await billing.referral_sides("inv3") == {
        "referee": "no_organization",
        "referrer": "zero_units",
    }
    assert await billing.balance("org-a") == 0  # referrer units are 0
    assert await billing.ledger_keys() == ["referral:inv1:referee", "referral:inv2:referee"]


async def test_signup_grant_only_for_plans_that_have_one(start_billing: StartBilling) -> None:
    billing = await start_billing(signup_grant_units={"free": 500, "team": 0})
    await billing.publish(created("org-free"))
    await billing.publish(created("org-team", plan="team"))
    await billing.publish(created("org-pro", plan="pro"))
    await billing.settled()
    assert await billing.balance("org-free") == 500
    assert await billing.ledger_keys() == ["signup_grant:org-free"]
    [credit] = await billing.wait_credits(1)
    assert credit["source"] == "signup_grant" and credit["side"] is None
