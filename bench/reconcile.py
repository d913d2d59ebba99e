"""Part 4: reconcile's cost follows the open work, not the history.

Two billing databases: one holds only the open work (1,000 accepted referrals whose both
sides are open and whose users' organizations billing knows), the other the same open
work beside 200,000 fully granted referrals with their history (400,000 ledger entries,
accounts and memberships). The open work is identical in both: the same 1,000 referrals
(referee 500, referrer 1,000 units: 2,000 grants). Each run is the real job command,
`grantwire reconcile` (jitter 0), in its own process; the figure is the duration the job
reports (``duration_ms``: its walk, without interpreter start-up), the wall time of the
command is kept too. Runs alternate (alone, with history) so drift hits both alike.

The history is written straight into billing's collections in the shapes billing's
repository writes (``entry_document`` for the ledger); 200,000 referrals through the
services would take minutes. The open work is re-created before every run: the alone
database is dropped and re-seeded, the large one gets a fresh 1,000 (so its history grows
by 1,000 per run, 0.5 %).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from bench.common import Bench, drop_databases, out, spread
from services.billing.domain import Grant, referral_key
from services.billing.repository import entry_document
from services.billing.settings import BillingSettings

PART = "reconcile"
REFERRER_UNITS, REFEREE_UNITS = 1000, 500
CHUNK = 5_000


def job_env(bench: Bench, database: str) -> dict[str, str]:
    return {
        **os.environ,
        "GRANTWIRE_MONGO_URL": bench.mongo_url,
        "GRANTWIRE_MONGO_DB": database,
        "GRANTWIRE_REFERRAL_ENABLED": "true",
        "GRANTWIRE_REFERRAL_REFERRER_UNITS": str(REFERRER_UNITS),
        "GRANTWIRE_REFERRAL_REFEREE_UNITS": str(REFEREE_UNITS),
        "GRANTWIRE_RECONCILE_JITTER_S": "0",
        "GRANTWIRE_LOG_LEVEL": "WARNING",
    }


async def ensure_billing_indexes(bench: Bench, database: str) -> None:
    """The indexes billing creates at start (a job's ``open_billing`` does the same)."""
    from services.billing.jobs import open_billing

    settings = BillingSettings(mongo_url=bench.mongo_url, mongo_db=database)
    async with open_billing(settings):
        pass


def _granted_referral(i: int, at: datetime) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A fully granted history referral and its two ledger entries."""
    invitation_id = f"hist-{i:07d}"
    inviter, referee = f"hist-inviter-{i % 20_000}", f"hist-referee-{i}"
    orgs = {"referrer": f"org-{inviter}", "referee": f"org-{referee}"}
    entries = []
    for side, units in (("referrer", REFERRER_UNITS), ("referee", REFEREE_UNITS)):
        grant = Grant(
            ref_id=referral_key(invitation_id, side),
            organization_id=orgs[side],
            units=units,
            source="referral",
            expires_at=at + timedelta(days=365),
            invitation_id=invitation_id,
            side=side,
        )
        entries.append(entry_document(grant, at=at))
    sides = {
        side: {"state": "granted", "outcome": "applied", "organization_id": org, "at": at}
        for side, org in orgs.items()
    }
    referral = {
        "_id": invitation_id,
        "inviter": inviter,
        "referee": referee,
        "accepted_at": at,
        "sides": sides,
        "open": False,
    }
    return referral, entries


async def seed_history(mongo: AsyncMongoClient[Any], database: str, n: int) -> float:
    """``n`` fully granted referrals with ledger, accounts and memberships; seconds taken."""
    started = time.perf_counter()
    db = mongo[database]
    at = datetime.now(UTC) - timedelta(days=30)
    balances: dict[str, int] = {}
    slots = asyncio.Semaphore(3)
    tasks = []

    async def insert(collection: str, docs: list[dict[str, Any]]) -> None:
        async with slots:
            await db[collection].insert_many(docs, ordered=False)

    for start in range(0, n, CHUNK):
        referrals, entries = [], []
        for i in range(start, min(n, start + CHUNK)):
            referral, ledger = _granted_referral(i, at)
            referrals.append(referral)
            entries += ledger
            for entry in ledger:
                org = entry["organization_id"]
                balances[org] = balances.get(org, 0) + entry["amount"]
        tasks.append(asyncio.create_task(insert("referrals", referrals)))
        tasks.append(asyncio.create_task(insert("ledger", entries)))
    accounts = [{"_id": org, "balance": b, "updated_at": at} for org, b in balances.items()]
    memberships = [
        {
            "user_id": org.removeprefix("org-"),
            "organization_id": org,
            "first_seen": at,
            "last_provisioned_at": at,
        }
        for org in balances
    ]
    for start in range(0, len(accounts), CHUNK):
        tasks.append(asyncio.create_task(insert("accounts", accounts[start : start + CHUNK])))
        tasks.append(asyncio.create_task(insert("memberships", memberships[start : start + CHUNK])))
    await asyncio.gather(*tasks)
    return time.perf_counter() - started


async def seed_open(mongo: AsyncMongoClient[Any], database: str, tag: str, n: int) -> None:
    """``n`` accepted referrals with both sides open; every user's organization is known."""
    db = mongo[database]
    at = datetime.now(UTC)
    referrals, memberships = [], {}
    for j in range(n):
        inviter, referee = f"open-inviter-{tag}-{j % 250}", f"open-referee-{tag}-{j}"
        referrals.append(
            {
                "_id": f"open-{tag}-{j:05d}",
                "inviter": inviter,
                "referee": referee,
                "accepted_at": at,
                "sides": {"referee": {"state": "open"}, "referrer": {"state": "open"}},
                "open": True,
            }
        )
        for user in (inviter, referee):
            memberships[user] = {
                "user_id": user,
                "organization_id": f"org-{user}",
                "first_seen": at,
                "last_provisioned_at": at,
            }
    await db["referrals"].insert_many(referrals)
    await db["memberships"].insert_many(list(memberships.values()))


def _grantwire() -> str:
    local = Path(sys.executable).parent / "grantwire"
    return str(local) if local.exists() else "grantwire"


async def run_reconcile(bench: Bench, database: str) -> dict[str, Any]:
    """`grantwire reconcile` as its own process; its JSON report and the wall time."""
    started = time.perf_counter()
    process = await asyncio.to_thread(
        subprocess.run,
        [_grantwire(), "reconcile"],
        env=job_env(bench, database),
        capture_output=True,
        timeout=100,
        check=False,
    )
    wall = time.perf_counter() - started
    lines = [line for line in process.stdout.decode().splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(
            f"reconcile exited {process.returncode}: {process.stderr.decode()[-800:]}"
        )
    report: dict[str, Any] = json.loads(lines[-1])
    report["wall_s"] = round(wall, 2)
    return report


async def run(bench: Bench) -> dict[str, Any]:
    runs = 3
    open_n = 1_000
    history_n = 20_000 if bench.quick else 200_000
    prefix = bench.db_prefix(PART)
    alone_db, large_db = f"{prefix}_alone", f"{prefix}_history"
    mongo: AsyncMongoClient[Any] = AsyncMongoClient(bench.mongo_url, w="majority")
    alone: list[dict[str, Any]] = []
    large: list[dict[str, Any]] = []
    try:
        await ensure_billing_indexes(bench, large_db)
        seed_s = await seed_history(mongo, large_db, history_n)
        out(
            f"  history: {history_n:,} fully granted referrals, {2 * history_n:,} ledger "
            f"entries, accounts and memberships written in {seed_s:.1f} s"
        )
        for k in range(runs):
            await mongo.drop_database(alone_db)
            await ensure_billing_indexes(bench, alone_db)
            await seed_open(mongo, alone_db, f"r{k}", open_n)
            alone.append(await run_reconcile(bench, alone_db))
            await seed_open(mongo, large_db, f"r{k}", open_n)
            large.append(await run_reconcile(bench, large_db))
            out(
                f"  reconcile run {k + 1}: alone {alone[-1]['duration_ms']} ms "
                f"(wall {alone[-1]['wall_s']} s), with history {large[-1]['duration_ms']} ms "
                f"(wall {large[-1]['wall_s']} s); backfilled {alone[-1]['backfilled']} / "
                f"{large[-1]['backfilled']}"
            )
        history_total = await mongo[large_db]["referrals"].estimated_document_count()
        ledger_total = await mongo[large_db]["ledger"].estimated_document_count()
    finally:
        with contextlib.suppress(Exception):
            await drop_databases(mongo, prefix + "_")
        await mongo.close()
    alone_ms = spread([r["duration_ms"] for r in alone], 0)
    large_ms = spread([r["duration_ms"] for r in large], 0)
    expected = 2 * open_n
    all_granted = all(
        r["accepted"] == open_n and r["backfilled"] == expected and r["errors"] == 0
        for r in alone + large
    )
    return {
        "what": f"`grantwire reconcile` (jitter 0, batch 500, concurrency 16) over {open_n:,} "
        f"open referrals (2 grants each) alone, and beside {history_n:,} fully granted "
        "referrals (history written directly in billing's shapes)",
        "command": bench.figure_command(PART),
        "open_referrals": open_n,
        "history_referrals": history_n,
        "history_at_last_run": {"referrals": history_total, "ledger_entries": ledger_total},
        "history_seed_seconds": round(seed_s, 1),
        "alone_ms": alone_ms,
        "with_history_ms": large_ms,
        "alone_wall_s": spread([r["wall_s"] for r in alone], 2),
        "with_history_wall_s": spread([r["wall_s"] for r in large], 2),
        "ratio": round(large_ms["median"] / alone_ms["median"], 2),
        "target_ratio": 1.5,
        "all_granted": all_granted,
        "reports": {"alone": alone, "with_history": large},
    }
