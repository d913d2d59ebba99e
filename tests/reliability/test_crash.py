"""Crash scenario: SIGKILL billing three times and organizations twice while 2,000 referral
stories flow; every credit arrives exactly once without reconcile (and reconcile then finds
nothing to do).

A story: an inviter (a verified user with an organization) invites a friend over HTTP; the
friend signs up with the token, verified at once (organization and acceptance race into
billing) or verifying afterwards (referrer credited first, referee on verification).
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import pytest

from services.billing import jobs
from services.billing.settings import BillingSettings
from tests.reliability.harness import (
    REFEREE_UNITS,
    REFERRER_UNITS,
    ChaosSystem,
    Driver,
    Summary,
    make_stories,
    monkey,
)

pytestmark = pytest.mark.e2e

STORIES = int(os.environ.get("GRANTWIRE_CHAOS_STORIES", "2000"))
RATE = float(os.environ.get("GRANTWIRE_CHAOS_RATE", "30"))  # stories started per second
SEED = 1101
CRASHES = {"billing": 3, "organizations": 2}


def crash_schedule(
    rng: random.Random, window_s: float, crashes: dict[str, int]
) -> list[tuple[float, str]]:
    """Random moments in the first 60 % of the load window (seconds from its start).

    Early enough that the ~60 s a killed billing's open transactions keep their documents
    locked (the server's ``transactionLifetimeLimitSeconds``) passes while stories still flow.
    """
    names = [name for name, count in crashes.items() for _ in range(count)]
    rng.shuffle(names)
    moments = sorted(rng.uniform(0.05, 0.6) * window_s for _ in names)
    return list(zip(moments, names, strict=True))


@pytest.mark.timeout(900)
async def test_killed_billing_and_organizations_lose_no_credit_and_credit_none_twice(
    chaos: ChaosSystem,
) -> None:
    summary = Summary("crash")
    rng = random.Random(SEED)
    inviters, stories = make_stories(STORIES, inviters=max(1, STORIES // 4), seed=SEED)
    driver = Driver(chaos, seed=SEED)
    window = len(stories) / RATE
    deadline = time.monotonic() + 3 * window + 120
    schedule = crash_schedule(rng, window, CRASHES)
    crashes: list[dict[str, object]] = []
    try:
        await driver.sign_up_inviters(inviters, rate=100)
        load_started = time.monotonic()
        await asyncio.gather(
            driver.play(stories, RATE, deadline),
            monkey(chaos, schedule, rng=rng, log=crashes),
        )
        load_s = time.monotonic() - load_started
        summary.faults = len(crashes)
        before = await chaos.converge(timeout=300)
        summary.details.update(
            stories=len(stories),
            load_s=round(load_s, 1),
            crashes=" ".join(f"{c['service']}@{c['at_s']}s" for c in crashes),
            converged_after_load_s=round(time.monotonic() - load_started - load_s, 1),
            referral_keys=before.referral_keys,
        )
        summary.violations = before.violations
        assert before.violations == 0, before.brief()
        assert before.referral_keys == 2 * len(stories), before.as_dict()

        reconcile = await jobs.reconcile(
            BillingSettings(
                mongo_url=chaos.mongo_url,
                mongo_db=chaos.databases.billing,
                referral_enabled=True,
                referral_referrer_units=REFERRER_UNITS,
                referral_referee_units=REFEREE_UNITS,
                reconcile_jitter_s=0,
            )
        )
        after = await chaos.converge(timeout=60)
        summary.violations += after.violations
        summary.details["reconcile_backfilled"] = reconcile.backfilled
        assert reconcile.errors == 0 and reconcile.backfilled == 0, reconcile.as_dict()
        assert after.violations == 0, after.brief()
    finally:
        summary.events_sent = driver.sent
        summary.duplicates = chaos.duplicates_seen()
        summary.publish()
    assert [c["service"] for c in crashes].count("billing") == 3
    assert [c["service"] for c in crashes].count("organizations") == 2
    assert all(float(str(c["at_s"])) < load_s for c in crashes), crashes
