"""Part 2: billing's grant pipeline at full speed, against the raw-broker baseline.

Seeding (through the real path, not by writing billing's database): the bench publishes
one `invitation.accepted` per referee whose organization billing does not know yet, and
waits until billing has recorded every one (the referee side is `no_organization`).
Billing runs with referee 500 units and referrer 0 units, so each referral has exactly one
grant left to make.

The burst: one `organization.provisioned` per referee, published as fast as the broker
confirms them. Each applies one grant through the whole path: consume, record the
membership, read the open referral, resolve the organization, the transaction (ledger
entry, balance, outbox), record the side, ack; the relay publishes
`billing.credits_granted`, which a tap queue in the bench receives. Grants/s = referrals /
(last credit received - first event published).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from pymongo import AsyncMongoClient

from bench import ceiling, profiling
from bench.common import (
    Bench,
    CpuMeter,
    CreditTap,
    Pipelined,
    cleanup_part,
    infra_pids,
    out,
    pids,
    proc_memory_mb,
    spread,
    start_system,
    stop_system,
    wait_until,
)
from grantwire.system import LocalSystem
from shared.contracts import InvitationAccepted, OrganizationProvisioned
from shared.envelope import Envelope
from shared.settings import ServiceSettings
from shared.topology import Naming, declare_event_log

PART = "pipeline"
# One indicative run without batching (one event per transaction, the old prefetch).
VARIANT_ENV = {"GRANTWIRE_GRANT_BATCH_MAX": "1", "GRANTWIRE_PREFETCH": "32"}
SOURCE = "bench"


async def mongo_ops(mongo: AsyncMongoClient[Any]) -> dict[str, int]:
    """The server's operation and transaction counters (whole server: noisy, indicative)."""
    status = await mongo.admin.command("serverStatus")
    ops = {k: int(v) for k, v in status["opcounters"].items()}
    ops["transactions_committed"] = int(status.get("transactions", {}).get("totalCommitted", 0))
    return ops


def ops_delta(before: dict[str, int], after: dict[str, int], per: int) -> dict[str, float]:
    return {k: round((after[k] - before.get(k, 0)) / per, 2) for k in after}


async def seed_referrals(
    publisher: Pipelined,
    mongo: AsyncMongoClient[Any],
    billing_db: str,
    run_tag: str,
    n: int,
) -> tuple[list[str], float]:
    """``n`` accepted referrals whose referee has no organization yet; (ids, accepted/s)."""
    ids = [f"inv-{run_tag}-{i:06d}" for i in range(n)]
    started = time.perf_counter()
    for i, invitation_id in enumerate(ids):
        event = InvitationAccepted(
            invitation_id=invitation_id,
            email=f"referee-{run_tag}-{i}@example.org",
            invited_by=f"inviter-{run_tag}-{i % 97}",
            accepted_user_id=f"referee-{run_tag}-{i:06d}",
        )
        await publisher.send(Envelope.new(event, source=SOURCE))
    await publisher.drain()
    referrals = mongo[billing_db]["referrals"]

    async def recorded() -> bool:
        query = {"_id": {"$regex": f"^inv-{run_tag}-"}, "sides.referee.outcome": "no_organization"}
        return await referrals.count_documents(query) >= n

    if not await wait_until(recorded, timeout=150, interval=0.25):
        raise TimeoutError(f"billing did not record {n} accepted referrals in time")
    return ids, n / (time.perf_counter() - started)


async def burst(
    publisher: Pipelined,
    tap: CreditTap,
    run_tag: str,
    ids: list[str],
    named_pids: dict[str, int],
    mongo: AsyncMongoClient[Any],
    timeout: float,
) -> dict[str, Any]:
    """Publish one `organization.provisioned` per referee; time until every credit arrived."""
    tap.expect(ids)
    before = await mongo_ops(mongo)
    meter = CpuMeter(named_pids)
    started = time.perf_counter()
    for invitation_id in ids:
        i = invitation_id.rsplit("-", 1)[1]
        event = OrganizationProvisioned(
            user_id=f"referee-{run_tag}-{i}", organization_id=f"org-{run_tag}-{i}"
        )
        await publisher.send(Envelope.new(event, source=SOURCE))
    await publisher.drain()
    published = time.perf_counter()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(tap.done.wait(), timeout)
    cpu = meter.stop()
    after = await mongo_ops(mongo)
    arrived = [tap.referee[i] for i in ids if i in tap.referee]
    complete = len(arrived) == len(ids)
    elapsed = (max(arrived) - started) if arrived else float("inf")
    return {
        "grants": len(ids),
        "credited": len(arrived),
        "grants_per_s": len(ids) / elapsed if complete else 0.0,
        "seconds": round(elapsed, 2),
        "publish_per_s": round(len(ids) / (published - started)),
        "cpu_cores_busy": cpu,
        "mongo_ops_per_grant": ops_delta(before, after, len(ids)),
    }


async def run(bench: Bench, baseline: dict[str, Any] | None) -> dict[str, Any]:
    runs = 3
    n = 1_000 if bench.quick else 2_000
    system: LocalSystem | None = None
    connection = None
    mongo: AsyncMongoClient[Any] = AsyncMongoClient(bench.mongo_url)
    try:
        connection = await aio_pika.connect_robust(bench.amqp_url)
        naming = bench.naming(PART)
        tap = await CreditTap.open(connection, naming)
        publisher = await Pipelined.open(connection, naming)
        base = (baseline or {}).get("throughput_msgs_per_s", {}).get("median")
        out("  ceiling: the same messages with no database and no Grantwire code (a raw")
        out("  aio-pika echo process in billing's place, bench/ceiling.py)")
        ceiling_figure = await _ceiling(bench, connection, naming, publisher, tap, mongo, n, base)
        out(f"  starting the services (namespace {naming.namespace})")
        system = await start_system(bench, PART)  # the shipped defaults
        service_pids = pids(system)
        idle_memory = {name: proc_memory_mb(pid)["rss_mb"] for name, pid in service_pids.items()}
        named = {**service_pids, **infra_pids()}
        billing_db = f"{bench.db_prefix(PART)}_billing"
        tags = [f"r{k}" for k in range(runs)] + (["prof"] if bench.profile else []) + ["var"]
        seeded: dict[str, list[str]] = {}
        seed_rates = []
        for tag in tags:
            size = n
            seeded[tag], rate = await seed_referrals(publisher, mongo, billing_db, tag, size)
            seed_rates.append(rate)
        out(
            f"  seeded {sum(len(v) for v in seeded.values()):,} accepted referrals through "
            f"billing ({min(seed_rates):,.0f}-{max(seed_rates):,.0f} accepted/s)"
        )
        results = []
        for k in range(runs):
            await asyncio.sleep(1.0)  # let the previous run's relay mark its events sent
            result = await burst(publisher, tap, f"r{k}", seeded[f"r{k}"], named, mongo, 120)
            out(
                f"  pipeline run {k + 1}: {result['grants_per_s']:,.0f} grants/s "
                f"({result['credited']}/{result['grants']} in {result['seconds']} s; billing "
                f"{result['cpu_cores_busy'].get('billing', 0):.2f} cores, mongod "
                f"{result['cpu_cores_busy'].get('mongod', 0):.2f} cores)"
            )
            results.append(result)
        profile: dict[str, Any] = {"skipped": "--no-profile"}
        if bench.profile and profiling.available():
            profile = await _profiled_burst(
                bench, publisher, tap, seeded["prof"], named, mongo, service_pids["billing"]
            )
        memory = {
            name: {"idle_rss_mb": idle_memory[name], **proc_memory_mb(pid)}
            for name, pid in service_pids.items()
        }
        # One indicative run without batching (billing restarted; not counted).
        billing = system["billing"]
        await asyncio.to_thread(billing.stop)
        billing.env.update(VARIANT_ENV)
        system.restart("billing")
        await asyncio.to_thread(system.wait_ready, 60.0, ("billing",))
        named = {**named, "billing": pids(system)["billing"]}
        variant = await burst(publisher, tap, "var", seeded["var"], named, mongo, 120)
        out(
            "  variant, one event per transaction (GRANTWIRE_GRANT_BATCH_MAX=1, prefetch 32; "
            "one run, not counted): "
            f"{variant['grants_per_s']:,.0f} grants/s"
        )
        await publisher.close()
    finally:
        codes = await stop_system(system) if system is not None else {}
        if connection is not None:
            await connection.close()
        await mongo.close()
        await cleanup_part(bench, PART)
    rates = [r["grants_per_s"] for r in results]
    figure = spread(rates, 0)
    return {
        "what": "organization.provisioned burst for referees with a pending accepted referral "
        "(seeded through billing with invitation.accepted); one referee grant per event "
        "through consume, transaction (ledger entry, balance, outbox), relay, "
        "billing.credits_granted on a tap; shipped defaults (billing: prefetch 256, batches of "
        "up to 128 events, 4 in flight); INFO logs",
        "command": bench.figure_command(PART),
        "grants_per_run": n,
        "grants_per_s": figure,
        "baseline_msgs_per_s": base,
        "ratio_to_baseline": round(figure["median"] / base, 3) if base else None,
        "target_ratio": 0.35,
        "ceiling": ceiling_figure,
        "share_of_ceiling": round(figure["median"] / ceiling_figure["grants_per_s"]["median"], 3),
        "runs": results,
        "seeding_accepted_per_s": spread(seed_rates, 0),
        "profile": profile,
        "variant_unbatched": variant,
        "memory": memory,
        "exit_codes": codes,
        "publish_errors": len(publisher.errors),
    }


async def _ceiling(
    bench: Bench,
    connection: AbstractRobustConnection,
    naming: Naming,
    publisher: Pipelined,
    tap: CreditTap,
    mongo: AsyncMongoClient[Any],
    n: int,
    baseline: float | None,
) -> dict[str, Any]:
    """The pipeline's messages alone (``bench/ceiling.py``), before the services start:
    first without the event-log stream, then with it, as the services declare it."""
    echo = ceiling.EchoProcess(
        bench.amqp_url, naming.events_exchange, naming.namespace + ceiling.WORK_QUEUE
    )
    figures: dict[str, dict[str, Any]] = {}
    try:
        await echo.ready()
        named = {"echo": echo.pid, **infra_pids()}
        for variant in ("without_event_log", "as_shipped"):
            if variant == "as_shipped":
                channel = await connection.channel()
                max_age = ServiceSettings.model_fields["event_log_max_age"].default
                await declare_event_log(channel, naming, max_age)
                await channel.close()
            results = []
            for k in range(3):
                tag = f"{variant[0]}{k}"
                ids = [f"inv-{tag}-{i:06d}" for i in range(n)]
                results.append(await burst(publisher, tap, tag, ids, named, mongo, 60))
            figures[variant] = figure = ceiling.summary(results, baseline)
            rates = figure["grants_per_s"]
            out(
                f"  ceiling {variant.replace('_', ' ')}: {rates['median']:,.0f} grants/s "
                f"(min {rates['min']:,.0f}, max {rates['max']:,.0f}); ratio "
                f"{figure['ratio_to_baseline']} of the baseline"
            )
    finally:
        await asyncio.to_thread(echo.stop)
    return {
        "what": ceiling.WHAT,
        **figures["as_shipped"],
        "without_event_log": figures["without_event_log"],
    }


async def _profiled_burst(
    bench: Bench,
    publisher: Pipelined,
    tap: CreditTap,
    ids: list[str],
    named: dict[str, int],
    mongo: AsyncMongoClient[Any],
    billing_pid: int,
) -> dict[str, Any]:
    """One more burst (not counted) with py-spy sampling billing."""
    path = bench.logs(PART) / "billing.pyspy.txt"
    recording = profiling.Recording(billing_pid, path)
    await recording.started()
    result = await burst(publisher, tap, "prof", ids, named, mongo, 120)
    error = await recording.stop()
    if error:
        return {"error": error}
    summary = profiling.summarize(path)
    out(
        f"  profiled run (py-spy, not counted): {result['grants_per_s']:,.0f} grants/s; "
        f"{summary.get('samples', 0)} samples"
    )
    return {
        "tool": "py-spy record --format raw --nolineno --rate 100 --pid <billing>",
        "grants_per_s_while_sampled": round(result["grants_per_s"]),
        "cpu_cores_busy": result["cpu_cores_busy"],
        "raw_samples": str(path.relative_to(bench_root())),
        **summary,
    }


def bench_root() -> Any:
    from bench.common import ROOT

    return ROOT
