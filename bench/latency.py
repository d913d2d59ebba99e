"""Part 3, the headline: email verification to credit, across organizations and billing.

Before the clock starts, every referee has signed up unverified (organizations recorded
the user and, strict gate, created nothing) and billing has their accepted referral (the
referee side waits as `no_organization`; referrer units are 0, so the referee grant is the
only one). That state is made with the services' own use cases, called from the bench (see
``seed``), so the clock measures only the story.

Then the bench publishes `user.email_verified` at a fixed 200 stories/s for 60 s. Each one
makes organizations create the workspace and publish `organization.created` and
`organization.provisioned` (one transaction, outbox, relay); billing grants the signup
grant and the referee's referral credit, and publishes `billing.credits_granted`. The
latency of a story is from the publish call of its `user.email_verified` to the arrival of
the referee's `billing.credits_granted` (matched by invitation id) on a tap queue in the
bench. Percentiles are over every story.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from typing import Any

import aio_pika
from pymongo import AsyncMongoClient

from bench.common import (
    Bench,
    CpuMeter,
    CreditTap,
    Pipelined,
    ProvisionedTap,
    UseCaseDatabase,
    cleanup_part,
    clone_story_state,
    infra_pids,
    latency_summary,
    out,
    percentile,
    pids,
    proc_memory_mb,
    start_system,
    stop_system,
    story_token,
)
from grantwire.system import LocalSystem
from shared.contracts import UserEmailVerified, UserSignedUp
from shared.envelope import Envelope

PART = "latency"
SOURCE = "bench-identity"


def story(i: int, tag: str) -> dict[str, str]:
    token = story_token(i)
    return {
        "user_id": f"user-{tag}-{token}",
        "email": f"friend.{tag}.{token}@gmail.com",
        "first_name": "Grace",
        "invitation_id": f"inv-{tag}-{token}",
        "inviter": f"inviter-{tag}-{token}",
    }


async def seed(mongo: AsyncMongoClient[Any], prefix: str, n: int, tag: str) -> float:
    """Unverified signups (organizations) and accepted referrals (billing); seconds taken.

    Story 0 goes through the services' own use cases (the code their message handlers
    run: ``SignupOrganizations.signed_up``, ``Billing.grant_for_invitation``) in this
    process; the other stories are copies of the documents it wrote, with their own ids
    (``clone_story_state``). Through the queues, seeding 12,000 stories would take about
    90 s on this machine, most of the part's time budget.
    """
    from services.billing.handlers import Billing
    from services.billing.settings import BillingSettings
    from services.organizations.handlers import SignupOrganizations
    from services.organizations.settings import OrganizationsSettings

    started = time.perf_counter()
    databases = [f"{prefix}_organizations", f"{prefix}_billing"]
    organizations = SignupOrganizations(
        UseCaseDatabase(mongo, databases[0]),  # type: ignore[arg-type]
        OrganizationsSettings(organizations_email_verification="strict").policy(),
    )
    billing = Billing(
        UseCaseDatabase(mongo, databases[1]),
        BillingSettings(
            referral_enabled=True, referral_referrer_units=0, referral_referee_units=500
        ),
    )
    s = story(0, tag)
    signup = UserSignedUp(
        user_id=s["user_id"], email=s["email"], first_name=s["first_name"], email_verified=False
    )
    provisioning = await organizations.signed_up(signup, Envelope.new(signup, source=SOURCE))
    if provisioning.outcome != "gated":
        raise RuntimeError(f"an unverified signup was not gated: {provisioning}")
    result = await billing.grant_for_invitation(s["invitation_id"], s["inviter"], s["user_id"])
    outcomes = {side.side: side.outcome for side in result.sides}
    if outcomes != {"referee": "no_organization", "referrer": "zero_units"}:
        raise RuntimeError(f"unexpected seeding outcome {result}")
    await clone_story_state(mongo, databases, n)
    users = await mongo[databases[0]]["users"].count_documents({})
    pending = await mongo[databases[1]]["referrals"].count_documents(
        {"sides.referee.outcome": "no_organization"}
    )
    if users != n or pending != n:
        raise RuntimeError(f"seeded {users} users and {pending} pending referrals, not {n}")
    return time.perf_counter() - started


async def drive(
    publisher: Pipelined, tap: CreditTap, stories: list[dict[str, str]], rate: float
) -> tuple[dict[str, float], float]:
    """Publish `user.email_verified` at ``rate``/s; (publish time per invitation, max lag)."""
    sent: dict[str, float] = {}
    start = time.perf_counter()
    lag = 0.0
    for i, s in enumerate(stories):
        target = start + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.perf_counter()
        lag = max(lag, now - target)
        sent[s["invitation_id"]] = now
        await publisher.send(Envelope.new(UserEmailVerified(user_id=s["user_id"]), source=SOURCE))
    return sent, lag


# The story's path in four stages, from the taps' arrival times (bench clock) and the
# ``ce-time`` each service stamped when it staged its event (wall clock, millisecond).
STAGES = (
    ("1. publish -> organizations staged organization.provisioned", "sent", "org_staged"),
    ("2. its commit, outbox relay, broker -> the bench's tap", "org_staged", "provisioned"),
    (
        "3. billing's delivery and handler -> staged billing.credits_granted",
        "provisioned",
        "billing_staged",
    ),
    ("4. its commit, outbox relay, broker -> the bench's tap", "billing_staged", "credited"),
)


def stage_breakdown(
    stories: list[dict[str, str]],
    sent: dict[str, float],
    provisioned: ProvisionedTap,
    credits: CreditTap,
    wall_offset: float,
) -> dict[str, Any]:
    """p50 / p99 of each stage over the stories with all five times (wall clock = bench
    clock + ``wall_offset``): where a story's latency goes."""
    per_stage: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
    for s in stories:
        invitation_id, user_id = s["invitation_id"], s["user_id"]
        on_bench_clock = {
            "sent": sent.get(invitation_id),
            "provisioned": provisioned.arrived.get(user_id),
            "credited": credits.referee.get(invitation_id),
        }
        stamped = {
            "org_staged": provisioned.staged.get(user_id),
            "billing_staged": credits.staged.get(invitation_id),
        }
        wall = {k: t + wall_offset for k, t in on_bench_clock.items() if t is not None}
        wall |= {k: t for k, t in stamped.items() if t is not None}
        if len(wall) < len(on_bench_clock) + len(stamped):
            continue
        for name, start, end in STAGES:
            per_stage[name].append((wall[end] - wall[start]) * 1000)
    return {
        name: {
            k: v
            for k, v in latency_summary(values).items()
            if k in ("samples", "p50_ms", "p99_ms", "mean_ms")
        }
        for name, values in per_stage.items()
    }


def timeline(sent: dict[str, float], arrived: dict[str, float]) -> list[dict[str, Any]]:
    """Per second of the run: stories sent, and p50 / p99 / max of their latency."""
    start = min(sent.values())
    buckets: dict[int, list[float]] = defaultdict(list)
    for invitation_id, at in sent.items():
        if invitation_id in arrived:
            buckets[int(at - start)].append((arrived[invitation_id] - at) * 1000)
    rows = []
    for second in sorted(buckets):
        values = sorted(buckets[second])
        rows.append(
            {
                "second": second,
                "stories": len(values),
                "p50_ms": round(percentile(values, 50), 1),
                "p99_ms": round(percentile(values, 99), 1),
                "max_ms": round(values[-1], 1),
            }
        )
    return rows


async def run(bench: Bench, baseline: dict[str, Any] | None) -> dict[str, Any]:
    rate = bench.latency_rate or 200.0
    seconds = bench.latency_seconds or (10.0 if bench.quick else 60.0)
    drain_s = 20.0 if bench.quick else 30.0
    n = int(rate * seconds)
    tag = bench.run_id
    stories = [story(i, tag) for i in range(n)]
    system: LocalSystem | None = None
    connection = None
    mongo: AsyncMongoClient[Any] = AsyncMongoClient(bench.mongo_url)
    out(f"  starting the services (namespace {bench.naming(PART).namespace})")
    try:
        system = await start_system(bench, PART)
        service_pids = pids(system)
        idle_memory = {name: proc_memory_mb(pid)["rss_mb"] for name, pid in service_pids.items()}
        named = {**service_pids, **infra_pids()}
        connection = await aio_pika.connect_robust(bench.amqp_url)
        naming = bench.naming(PART)
        tap = await CreditTap.open(connection, naming)
        provisioned = await ProvisionedTap.open(connection, naming)
        publisher = await Pipelined.open(connection, naming)
        seed_s = await seed(mongo, bench.db_prefix(PART), n, tag)
        out(
            f"  seeded {n:,} unverified signups and {n:,} accepted referrals with the "
            f"services' own use cases in {seed_s:.1f} s"
        )
        tap.expect(s["invitation_id"] for s in stories)
        meter = CpuMeter(named)
        out(f"  driving {n:,} email verifications at {rate:.0f}/s for {seconds:.0f} s")
        wall_offset = time.time() - time.perf_counter()
        sent, lag = await drive(publisher, tap, stories, rate)
        drive_cpu = meter.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tap.done.wait(), drain_s)
        gave_up_at = time.perf_counter()
        await publisher.close()
        memory = {
            name: {"idle_rss_mb": idle_memory[name], **proc_memory_mb(pid)}
            for name, pid in service_pids.items()
        }
    finally:
        codes = await stop_system(system) if system is not None else {}
        if connection is not None:
            await connection.close()
        await mongo.close()
        await cleanup_part(bench, PART)
    arrived = tap.referee
    samples = [(arrived[i] - at) * 1000 for i, at in sent.items() if i in arrived]
    # A story not credited when the bench stopped waiting counts with the time it had
    # waited by then: the percentiles are then lower bounds, and say so.
    waited = [(gave_up_at - at) * 1000 for i, at in sent.items() if i not in arrived]
    summary = latency_summary(samples + waited)
    summary["lower_bound"] = bool(waited)
    rows = timeline(sent, arrived)
    stages = stage_breakdown(stories, sent, provisioned, tap, wall_offset)
    for name, stage in stages.items():
        out(f"    stage {name}: p50 {stage.get('p50_ms')} ms, p99 {stage.get('p99_ms')} ms")
    credited_at = [arrived[i] for i in sent if i in arrived]
    completion = len(credited_at) / (max(credited_at) - min(sent.values())) if credited_at else 0
    out(
        f"  {len(samples):,}/{n:,} credited: p50 {summary.get('p50_ms')} ms, "
        f"p99 {summary.get('p99_ms')} ms, max {summary.get('max_ms')} ms"
        + (" (lower bounds: some never arrived)" if waited else "")
        + f"; credits arrived at {completion:,.0f} stories/s"
    )
    base = (baseline or {}).get("latency", {})
    return {
        "what": "user.email_verified for a pending referee -> matching billing.credits_granted "
        "(referee side, by invitation id), crossing organizations and billing; offered "
        f"{rate:.0f} stories/s for {seconds:.0f} s; shipped defaults; INFO logs",
        "command": bench.figure_command(PART),
        "offered_per_s": rate,
        "seconds": seconds,
        "stories": n,
        "credited": len(samples),
        "missing": n - len(samples),
        "drain_deadline_s": drain_s,
        "completed_stories_per_s": round(completion, 1),
        "duplicate_credits": tap.duplicates,
        "signup_grants_seen": tap.other,
        "latency": summary,
        "target_p99_ms": 50.0,
        "baseline_p99_ms_at_1000_per_s": base.get("p99_ms"),
        "publisher_max_lag_ms": round(lag * 1000, 1),
        "seeding_seconds": round(seed_s, 1),
        "cpu_cores_busy_while_driving": drive_cpu,
        "stages_ms": stages,
        "per_second": rows,
        "memory": memory,
        "exit_codes": codes,
        "publish_errors": len(publisher.errors),
        "_latency_samples_ms": samples + waited,
    }
