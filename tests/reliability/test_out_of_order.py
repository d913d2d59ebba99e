"""Out-of-order storm: the events of one referral arrive in any order, concurrently, and
every referral still ends credited on both sides, exactly once.

- Billing's inputs: for each referral, ``invitation.accepted`` and both users'
  ``organization.created`` / ``organization.provisioned`` are published at the same moment
  in a random order, to two billing processes consuming the same queue (so the handlers
  of one referral really run at once, in two processes); the inviters' own events land at
  random places in the stream, often after their referrals. These events are injected as
  the upstream services would publish them, so the truth is given to the checker.
- Identity events, through all three services: the inviter's signup, the friend's signup
  with the token and the friend's verification are published in a random order, at once;
  organizations and invitations then race their events into billing.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid

import pytest

from grantwire.invariants import AcceptedReferral, ExtraTruth
from shared.contracts import (
    Event,
    InvitationAccepted,
    OrganizationCreated,
    OrganizationProvisioned,
)
from shared.envelope import Envelope
from tests.reliability.harness import (
    ChaosSystem,
    Driver,
    Story,
    Summary,
    make_stories,
    signup,
    verified,
)

pytestmark = pytest.mark.e2e

REFERRALS = int(os.environ.get("GRANTWIRE_CHAOS_ORDER_REFERRALS", "600"))
STORIES = int(os.environ.get("GRANTWIRE_CHAOS_ORDER_STORIES", "200"))
SEED = 1104


def organization_events(user: str, organization: str) -> list[Event]:
    return [
        OrganizationCreated(organization_id=organization, plan_id="free"),
        OrganizationProvisioned(user_id=user, organization_id=organization),
    ]


@pytest.mark.timeout(600)
async def test_billing_events_of_one_referral_in_any_order_at_once_on_two_replicas(
    chaos: ChaosSystem,
) -> None:
    summary = Summary("out-of-order storm (billing events, 2 billing processes)")
    rng = random.Random(SEED)
    tag = uuid.uuid4().hex[:6]
    inviters = [f"inviter-{tag}-{i}" for i in range(max(1, REFERRALS // 3))]
    truth = ExtraTruth(
        referrals=[
            AcceptedReferral(f"inv-{tag}-{n}", inviters[n % len(inviters)], f"friend-{tag}-{n}")
            for n in range(REFERRALS)
        ],
        memberships={
            **{user: frozenset({f"org-{user}"}) for user in inviters},
            **{f"friend-{tag}-{n}": frozenset({f"org-friend-{tag}-{n}"}) for n in range(REFERRALS)},
        },
        organizations={
            **{f"org-{user}": "free" for user in inviters},
            **{f"org-friend-{tag}-{n}": "free" for n in range(REFERRALS)},
        },
    )
    await chaos.add_replica("billing")
    # one burst per referral: its accepted event and the friend's organization events at once
    bursts: list[list[Event]] = []
    for referral in truth.referrals:
        assert referral.referee is not None
        burst: list[Event] = [
            InvitationAccepted(
                invitation_id=referral.invitation_id,
                email=f"{referral.referee}@example.com",
                invited_by=referral.inviter,
                accepted_user_id=referral.referee,
            ),
            *organization_events(referral.referee, f"org-{referral.referee}"),
        ]
        rng.shuffle(burst)
        bursts.append(burst)
    # the inviters' organizations join the stream anywhere, often after their referrals
    for user in inviters:
        bursts.insert(rng.randrange(len(bursts) + 1), organization_events(user, f"org-{user}"))
    sent = 0

    async def publish(event: Event) -> None:
        nonlocal sent
        await chaos.publish(Envelope.new(event, source="chaos-upstream"))
        sent += 1

    try:
        started = time.monotonic()
        for n in range(0, len(bursts), 8):  # eight bursts at a time, each all at once
            await asyncio.gather(
                *(publish(event) for burst in bursts[n : n + 8] for event in burst)
            )
        load_s = time.monotonic() - started
        report = await chaos.converge(timeout=180, extra=truth)
        summary.violations = report.violations
        summary.details.update(
            referrals=REFERRALS,
            publish_s=round(load_s, 1),
            billing_processes=2,
            referral_keys=report.referral_keys,
        )
        assert report.violations == 0, report.brief()
        assert report.referral_keys == 2 * REFERRALS, report.as_dict()
    finally:
        summary.events_sent = sent
        summary.duplicates = chaos.duplicates_seen()
        summary.publish()


@pytest.mark.timeout(600)
async def test_identity_events_of_a_story_in_any_order_credit_every_referral(
    chaos: ChaosSystem,
) -> None:
    summary = Summary("out-of-order storm (identity events)")
    rng = random.Random(SEED + 1)
    inviters, stories = make_stories(STORIES, inviters=max(1, STORIES // 4), seed=SEED)
    driver = Driver(chaos, seed=SEED)
    deadline = time.monotonic() + 300
    try:
        # the invitations exist first: the token a friend signs up with comes from one
        await driver.paced(stories, 40.0, lambda story: driver.invite(story, deadline))
        # about 40 % of the inviters sign up after all their friends; the others inside the
        # burst of one of their friends' stories, in a random place in it
        last = {i for i in range(len(inviters)) if rng.random() < 0.4}
        carrier = {
            i: rng.choice([s for s in stories if s.inviter is inviters[i]])
            for i in range(len(inviters))
            if i not in last
        }
        carried = {id(story): inviters[i] for i, story in carrier.items()}

        async def play(story: Story) -> None:
            events: list[Event] = [
                signup(story.friend, verified=rng.random() < 0.5, token=story.token),
                verified(story.friend),
            ]
            if id(story) in carried:
                events.append(signup(carried[id(story)], verified=True))
            rng.shuffle(events)
            await asyncio.gather(*(driver.send(event) for event in events))

        started = time.monotonic()
        await driver.paced(stories, 25.0, play)
        # the inviters kept for last arrive now: their referrals waited for them
        await asyncio.gather(
            *(driver.send(signup(inviters[i], verified=True)) for i in sorted(last))
        )
        load_s = time.monotonic() - started
        report = await chaos.converge(timeout=180)
        summary.violations = report.violations
        summary.details.update(
            stories=len(stories),
            load_s=round(load_s, 1),
            inviters_after_their_friends=len(last),
            referral_keys=report.referral_keys,
        )
        assert report.violations == 0, report.brief()
        assert report.referral_keys == 2 * len(stories), report.as_dict()
    finally:
        summary.events_sent = driver.sent
        summary.duplicates = chaos.duplicates_seen()
        summary.publish()
