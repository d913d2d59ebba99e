"""Part 5: 10,000 dead letters replayed by filter; the credits change exactly once.

How the dead letters come about (the real path, no hand-made letters): billing runs with a
handler timeout of 1 microsecond and one attempt (``GRANTWIRE_HANDLER_TIMEOUT_S``,
``GRANTWIRE_MAX_ATTEMPTS``), an outage in miniature. The bench publishes 10,000
`invitation.accepted` events for referees whose organizations billing already knows; every
handler times out (after, perhaps, recording the referral: a partial effect), the consumer
dead-letters each with reason `retries_exhausted` / `TimeoutError`, and billing's
dead-letter keeper archives them in its `dead_letters` collection. 200 malformed
`invitation.accepted` (no `accepted_user_id`) are dead-lettered beside them as
`schema_violation`: the filter must leave those alone. Billing then restarts with its
normal settings.

Replay is the operator's command, `grantwire dlq replay --service billing --event-type
invitation.accepted --error TimeoutError`, as its own process. Three runs:

1. the first replay of all 10,000: billing credits each referee once;
2. and 3. the crash window of a replay: 1,000 letters each (a different tenth each time)
   are set back to ``replaying``, as a run that died after publishing them and before
   marking them leaves them, and replayed with ``--include-interrupted``, so billing
   receives those events a second time. (Three full replays would not fit the part's two
   minutes; the crash window of a real run is at most one batch anyway.)

The proof: after run 1 the ledger has exactly one `referral:<id>:referee` entry per letter,
every referee balance is 500, the tap saw 10,000 distinct credits; after runs 2 and 3
nothing changed (entries, balances, no new credit event), the decoys are still dead, and
`grantwire audit` (every balance equals its entries, no key twice) exits 0. The replay
rate of each run is the command's own (``replayed / duration_s``, without start-up).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import httpx
from pymongo import AsyncMongoClient

from bench.common import (
    Bench,
    CreditTap,
    Pipelined,
    UseCaseDatabase,
    cleanup_part,
    clone_story_state,
    out,
    spread,
    start_system,
    stop_system,
    story_token,
    wait_until,
)
from grantwire.system import LocalSystem
from shared.contracts import InvitationAccepted
from shared.envelope import Envelope

PART = "dlq"
DECOYS = 200
OUTAGE = {"GRANTWIRE_HANDLER_TIMEOUT_S": "0.000001", "GRANTWIRE_MAX_ATTEMPTS": "1"}
REPLAY_FILTER = ["--service", "billing", "--event-type", "invitation.accepted"]
REPLAY_FILTER += ["--error", "TimeoutError"]


async def seed_memberships(mongo: AsyncMongoClient[Any], database: str, tag: str, n: int) -> None:
    """Billing knows each referee's organization: story 0 through billing's own use case
    (as on `organization.provisioned`), the others copied from it (``clone_story_state``)."""
    from services.billing.handlers import Billing
    from services.billing.settings import BillingSettings

    billing = Billing(UseCaseDatabase(mongo, database), BillingSettings(referral_enabled=True))
    user = referee(tag, 0)
    await billing.grant_for_provisioned(user, f"org-{user}", provisioned_at=datetime.now(UTC))
    await clone_story_state(mongo, [database], n)


def referee(tag: str, i: int) -> str:
    return f"referee-{tag}-{story_token(i)}"


def _grantwire() -> str:
    local = Path(sys.executable).parent / "grantwire"
    return str(local) if local.exists() else "grantwire"


async def replay(bench: Bench, database: str, *extra: str) -> dict[str, Any]:
    """`grantwire dlq replay` by filter, as its own process; its JSON report + wall time."""
    env = {
        **os.environ,
        "GRANTWIRE_AMQP_URL": bench.amqp_url,
        "GRANTWIRE_MONGO_URL": bench.mongo_url,
        "GRANTWIRE_DLQ_DATABASES": json.dumps({"billing": database}),
        "GRANTWIRE_OPERATOR": "bench",
    }
    args = [_grantwire(), "dlq", "replay", *REPLAY_FILTER, "--batch-size", "500", "--json"]
    args += ["--reason", "bench: replay after the outage", *extra]
    started = time.perf_counter()
    process = await asyncio.to_thread(
        subprocess.run, args, env=env, capture_output=True, timeout=300, check=False
    )
    wall = time.perf_counter() - started
    lines = [line for line in process.stdout.decode().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"dlq replay exited {process.returncode}: {process.stderr[-800:]!r}")
    report: dict[str, Any] = json.loads(lines[-1])
    report["exit_code"] = process.returncode
    report["wall_s"] = round(wall, 2)
    report["msgs_per_s"] = report["replayed"] / report["duration_s"] if report["duration_s"] else 0
    report.pop("errors", None)
    return report


async def handled(http: httpx.AsyncClient, url: str) -> float:
    """invitation.accepted messages billing has handled so far (its /metrics)."""
    text = (await http.get(f"{url}/metrics")).text
    pattern = (
        r'^grantwire_messages_total\{[^}]*event_type="invitation.accepted"[^}]*'
        r'outcome="handled"[^}]*\} ([0-9.e+]+)$'
    )
    return sum(float(v) for v in re.findall(pattern, text, flags=re.MULTILINE))


async def ledger_state(mongo: AsyncMongoClient[Any], database: str, tag: str) -> dict[str, Any]:
    db = mongo[database]
    prefix = f"^referral:dlq-{tag}-"
    entries = await db["ledger"].count_documents({"ref_id": {"$regex": prefix}})
    pipeline = [
        {"$match": {"_id": {"$regex": f"^org-referee-{tag}-"}}},
        {"$group": {"_id": "$balance", "accounts": {"$sum": 1}}},
    ]
    balances = {
        str(doc["_id"]): doc["accounts"]
        for doc in await (await db["accounts"].aggregate(pipeline)).to_list()
    }
    letters = {
        status: await db["dead_letters"].count_documents({"status": status})
        for status in ("dead", "replaying", "replayed")
    }
    decoys_dead = await db["dead_letters"].count_documents(
        {"status": "dead", "reason": "schema_violation"}
    )
    return {
        "ledger_entries": entries,
        "accounts_by_balance": balances,
        "letters": letters,
        "decoys_still_dead": decoys_dead,
    }


async def audit(bench: Bench, database: str) -> dict[str, Any]:
    env = {
        **os.environ,
        "GRANTWIRE_MONGO_URL": bench.mongo_url,
        "GRANTWIRE_MONGO_DB": database,
        "GRANTWIRE_LOG_LEVEL": "WARNING",
    }
    process = await asyncio.to_thread(
        subprocess.run, [_grantwire(), "audit"], env=env, capture_output=True, timeout=60
    )
    lines = [line for line in process.stdout.decode().splitlines() if line.startswith("{")]
    report = json.loads(lines[-1]) if lines else {}
    return {
        "exit_code": process.returncode,
        "findings": report.get("finding_counts", {}),
        "entries": report.get("entries"),
    }


async def make_dead_letters(
    connection: aio_pika.abc.AbstractRobustConnection,
    bench: Bench,
    mongo: AsyncMongoClient[Any],
    database: str,
    tag: str,
    n: int,
) -> tuple[list[str], float]:
    """``n`` accepted referrals dead-lettered by the outage, plus the decoys; (ids, seconds)."""
    naming = bench.naming(PART)
    publisher = await Pipelined.open(connection, naming)
    ids = [f"dlq-{tag}-{story_token(i)}" for i in range(n)]
    started = time.perf_counter()
    for i, invitation_id in enumerate(ids):
        event = InvitationAccepted(
            invitation_id=invitation_id,
            email=f"referee-{tag}-{i}@example.org",
            invited_by=f"inviter-{tag}-{i % 101}",
            accepted_user_id=referee(tag, i),
        )
        await publisher.send(Envelope.new(event, source="bench-invitations"))
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(naming.events_exchange)
    for i in range(DECOYS):  # malformed: no accepted_user_id
        event_id = str(uuid.uuid4())
        body = json.dumps({"invitation_id": f"bad-{i}", "email": "x@example.org"}).encode()
        await exchange.publish(
            aio_pika.Message(
                body,
                message_id=event_id,
                type="invitation.accepted",
                headers={"cloudEvents:type": "invitation.accepted", "cloudEvents:id": event_id},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key="invitation.accepted",
        )
    await channel.close()
    await publisher.close()
    letters = mongo[database]["dead_letters"]

    async def archived() -> bool:
        return await letters.count_documents({}) >= n + DECOYS

    if not await wait_until(archived, timeout=120, interval=0.25):
        count = await letters.count_documents({})
        raise TimeoutError(f"only {count} of {n + DECOYS} dead letters were archived")
    return ids, time.perf_counter() - started


async def run(bench: Bench, baseline: dict[str, Any] | None) -> dict[str, Any]:
    n = 2_000 if bench.quick else 10_000
    crash_n = n // 10  # letters in the crash window of runs 2 and 3
    tag = bench.run_id
    database = f"{bench.db_prefix(PART)}_billing"
    system: LocalSystem | None = None
    connection = None
    mongo: AsyncMongoClient[Any] = AsyncMongoClient(bench.mongo_url)
    http = httpx.AsyncClient(timeout=5.0)
    runs: list[dict[str, Any]] = []
    states: list[dict[str, Any]] = []
    out(f"  starting the services, billing in outage mode ({OUTAGE})")
    try:
        system = await start_system(bench, PART, {"billing": dict(OUTAGE)})
        connection = await aio_pika.connect_robust(bench.amqp_url)
        tap = await CreditTap.open(connection, bench.naming(PART))
        await seed_memberships(mongo, database, tag, n)
        ids, dead_s = await make_dead_letters(connection, bench, mongo, database, tag, n)
        before = await ledger_state(mongo, database, tag)
        out(
            f"  {n:,} accepted referrals dead-lettered by the outage and archived (+{DECOYS} "
            f"schema violations) in {dead_s:.1f} s; ledger entries for them: "
            f"{before['ledger_entries']}"
        )
        billing = system["billing"]
        await asyncio.to_thread(billing.stop)
        for key in OUTAGE:
            billing.env.pop(key, None)
        system.restart("billing")
        await asyncio.to_thread(system.wait_ready, 60.0, ("billing",))
        out("  billing restarted with its normal settings")

        tap.expect(ids)
        replay_started = time.perf_counter()
        first = await replay(bench, database)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tap.done.wait(), 120)
        credited_at = [tap.referee[i] for i in ids if i in tap.referee]
        first["credited"] = len(credited_at)
        if credited_at:
            first["end_to_end_credits_per_s"] = round(
                len(credited_at) / (max(credited_at) - replay_started), 1
            )
        runs.append(first)
        states.append(await ledger_state(mongo, database, tag))
        out(
            f"  replay 1: {first['replayed']:,} of {first['selected']:,} selected at "
            f"{first['msgs_per_s']:,.0f} msg/s (wall {first['wall_s']} s); {len(credited_at):,} "
            f"credited; ledger entries {states[-1]['ledger_entries']:,}"
        )
        credits_after_first = tap.total
        letters = mongo[database]["dead_letters"]
        for k in (2, 3):
            base = await handled(http, billing.url)
            # The crash window: a replay died after publishing these, before marking them.
            window = await (
                letters.find(
                    {"status": "replayed", "event_type": "invitation.accepted"}, {"_id": 1}
                )
                .sort("_id", 1)
                .skip((k - 2) * crash_n)
                .limit(crash_n)
                .to_list()
            )
            await letters.update_many(
                {"_id": {"$in": [doc["_id"] for doc in window]}}, {"$set": {"status": "replaying"}}
            )
            again = await replay(bench, database, "--include-interrupted")

            async def billing_saw_all(base: float = base, count: int = again["replayed"]) -> bool:
                return await handled(http, billing.url) >= base + count

            again["billing_handled_all"] = await wait_until(billing_saw_all, timeout=100)
            await asyncio.sleep(1.0)  # a stray credit would be on the tap by now
            runs.append(again)
            states.append(await ledger_state(mongo, database, tag))
            out(
                f"  replay {k} (crash window, --include-interrupted): {again['replayed']:,} at "
                f"{again['msgs_per_s']:,.0f} msg/s; ledger entries "
                f"{states[-1]['ledger_entries']:,}; new credit events "
                f"{tap.total - credits_after_first}"
            )
        audited = await audit(bench, database)
        new_credits = tap.total - credits_after_first
    finally:
        await http.aclose()
        codes = await stop_system(system) if system is not None else {}
        if connection is not None:
            await connection.close()
        await mongo.close()
        await cleanup_part(bench, PART)
    exact = {"500": n}
    proof = {
        "ledger_entries_before_replay": before["ledger_entries"],
        "after_each_run": states,
        "distinct_credit_events_first_replay": runs[0]["credited"],
        "duplicate_credit_events": tap.duplicates,
        "credit_events_after_the_first_replay": new_credits,
        "audit": audited,
    }
    exactly_once = (
        before["ledger_entries"] == 0
        and all(s["ledger_entries"] == n and s["accounts_by_balance"] == exact for s in states)
        and all(s["decoys_still_dead"] == DECOYS for s in states)
        and runs[0]["credited"] == n
        and tap.duplicates == 0
        and new_credits == 0
        and audited["exit_code"] == 0
        and runs[0]["replayed"] == n
        and all(r["replayed"] == crash_n and r["billing_handled_all"] for r in runs[1:])
        and all(r["failed"] == 0 for r in runs)
    )
    rates = spread([r["msgs_per_s"] for r in runs], 0)
    base_rate = (baseline or {}).get("throughput_msgs_per_s", {}).get("median")
    return {
        "what": f"{n:,} invitation.accepted dead-lettered by a billing outage (handler timeout) "
        f"and {DECOYS} schema-violation decoys; `grantwire dlq replay "
        f"{' '.join(REPLAY_FILTER)}`; run 1 first replay, runs 2-3 the crash window "
        f"(--include-interrupted) of {crash_n:,} letters each",
        "command": bench.figure_command(PART),
        "dead_letters": n,
        "decoys": DECOYS,
        "dead_lettering_seconds": round(dead_s, 1),
        "replay_msgs_per_s": rates,
        "replay_runs": runs,
        "baseline_msgs_per_s": base_rate,
        "ratio_to_baseline": round(rates["median"] / base_rate, 3) if base_rate else None,
        "exactly_once": exactly_once,
        "proof": proof,
        "exit_codes": codes,
    }
