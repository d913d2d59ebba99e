"""Billing jobs: reconcile, expire, audit, preseed.

Each job is ``async def job(settings, *, progress=None) -> report``. ``grantwire <job>``
runs one (a Kubernetes CronJob runs the same command), prints the report as one JSON line
on stdout and exits with ``report.exit_code``; logs go to stderr. Jobs need only MongoDB:
the events they stage (``billing.credits_granted``) are published by the billing service's
outbox relay, which wakes on the insert.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol, TypeVar

import structlog
from bson import ObjectId
from pymongo.asynchronous.client_session import AsyncClientSession

from services.billing.domain import GrantResult, Referral, users_to_resolve
from services.billing.handlers import SERVICE, Billing, Clock, utcnow
from services.billing.repository import INDEXES
from services.billing.settings import BillingSettings
from shared.lease import Lease
from shared.logging import configure_logging
from shared.mongo import Document, create_client, ensure_indexes, run_in_transaction
from shared.outbox import LEASES, outbox_indexes

T = TypeVar("T")
ProgressHook = Callable[[int, int], None]
"""Called with (done, total) as a job advances."""
RECONCILE_LEASE = "billing-reconcile"
MAX_FINDINGS_PER_CHECK = 100
log = structlog.get_logger("grantwire.billing.jobs")


# -- reports --------------------------------------------------------------------------
@dataclass
class JobReport:
    status: str = "completed"
    duration_ms: int = 0

    @property
    def exit_code(self) -> int:
        return 0

    def finish(self, started: float) -> None:
        self.duration_ms = round((time.perf_counter() - started) * 1000)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class ReconcileReport(JobReport):
    """``accepted``: referrals walked (each with a side open); ``backfilled``: sides credited;
    ``pending``: sides still ``no_organization``; ``errors``: referrals that failed."""

    status: Literal["completed", "disabled", "lock_held"] = "completed"
    accepted: int = 0
    backfilled: int = 0
    pending: int = 0
    errors: int = 0
    lock_holder: str | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0

    def count(self, result: GrantResult) -> None:
        self.accepted += 1
        self.backfilled += sum(side.outcome == "applied" for side in result.sides)
        self.pending += sum(side.outcome == "no_organization" for side in result.sides)


@dataclass
class ExpireReport(JobReport):
    """``expired``: expiration entries written; ``units``: units they removed;
    ``already_expired``: topups another run settled first."""

    expired: int = 0
    units: int = 0
    already_expired: int = 0
    errors: int = 0

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0


@dataclass
class AuditReport(JobReport):
    """Findings: ``balance_mismatch``, ``duplicate_key``, ``missing_unique_index``,
    ``sign_rule`` (at most 100 listed per check; ``finding_counts`` has the totals)."""

    accounts: int = 0
    entries: int = 0
    finding_counts: dict[str, int] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.findings else 0

    def add(self, check: str, found: list[dict[str, Any]]) -> None:
        if found:
            self.finding_counts[check] = len(found)
            self.findings += [{"finding": check, **f} for f in found[:MAX_FINDINGS_PER_CHECK]]


@dataclass
class PreseedReport(JobReport):
    status: Literal["completed", "refused"] = "completed"
    referrals: int = 0
    reason: str | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.status == "refused" else 0


# -- the database of a job --------------------------------------------------------------
class JobDatabase:
    """Billing's database without a broker (a ``handlers.BillingDatabase``)."""

    def __init__(self, settings: BillingSettings) -> None:
        url = settings.mongo_url.get_secret_value()
        self._client = create_client(url, app_name=f"{SERVICE}-job")
        self.db = self._client[settings.mongo_db]

    async def commit(self, work: Callable[[AsyncClientSession], Awaitable[T]]) -> T:
        return await run_in_transaction(self._client, work)

    async def close(self) -> None:
        await self._client.close()


@asynccontextmanager
async def open_billing(
    settings: BillingSettings, clock: Clock = utcnow, *, writes: bool = True
) -> AsyncIterator[Billing]:
    """Billing's use cases over a job's own connection, closed after.

    A writing job ensures the indexes first (the service may never have run); a read-only
    one (audit) must not, so it can inspect a damaged ledger as it is.
    """
    database = JobDatabase(settings)
    try:
        if writes:
            indexes = {**outbox_indexes(settings.sent_retention()), **INDEXES}
            await ensure_indexes(database.db, indexes)
        yield Billing(database, settings, clock)
    finally:
        await database.close()


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


# -- reconcile ------------------------------------------------------------------------
async def reconcile(
    settings: BillingSettings,
    *,
    progress: ProgressHook | None = None,
    clock: Clock = utcnow,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> ReconcileReport:
    """Grant every referral side still open; one runner at a time (a lease in MongoDB)."""
    report = ReconcileReport()
    if not settings.referral_enabled:
        log.info("referral is disabled; nothing to reconcile")
        report.status = "disabled"
        return report
    # Many clusters' CronJobs fire at 04:00 sharp; spread them out.
    await sleep(random.uniform(0, settings.reconcile_jitter_s))
    started = time.perf_counter()
    async with open_billing(settings, clock) as billing:
        ttl = timedelta(minutes=settings.reconcile_lock_minutes)
        lease = Lease(billing.store.db[LEASES], RECONCILE_LEASE, _owner(), ttl)
        if not await lease.acquire():
            report.status = "lock_held"
            report.lock_holder = await lease.holder()
            log.warning("reconcile lock is held; exiting", holder=report.lock_holder)
        else:
            try:
                await _walk_open_referrals(billing, settings, lease, report, progress)
            finally:
                await lease.release()
    report.finish(started)
    return report


async def _walk_open_referrals(
    billing: Billing,
    settings: BillingSettings,
    lease: Lease,
    report: ReconcileReport,
    progress: ProgressHook | None,
) -> None:
    """Batches of open referrals by invitation id; the cost follows the open work."""
    store = billing.store
    total = await store.count_open_referrals()
    slots = asyncio.Semaphore(settings.job_concurrency)
    after: str | None = None
    while batch := await store.open_referrals_after(after, settings.reconcile_batch_size):
        after = batch[-1].invitation_id
        users = {user for r in batch for user in users_to_resolve(billing.config, r)}
        organizations = await store.organizations_of(users)  # one query for the batch
        grants = (_reconcile_one(billing, r, organizations, slots) for r in batch)
        for result in await asyncio.gather(*grants):
            if result is None:
                report.errors += 1
                report.accepted += 1
            else:
                report.count(result)
        if progress:
            progress(report.accepted, max(total, report.accepted))
        if not await lease.acquire():  # renew; a lost lease means another runner took over
            log.error("reconcile lease lost; stopping")
            report.errors += 1
            return


async def _reconcile_one(
    billing: Billing,
    referral: Referral,
    organizations: Mapping[str, str],
    slots: asyncio.Semaphore,
) -> GrantResult | None:
    async with slots:
        try:
            return await billing.grant_for_referral(referral, organizations=organizations)
        except Exception:
            log.exception("reconcile failed", invitation_id=referral.invitation_id)
            return None


# -- expire ---------------------------------------------------------------------------
async def expire(
    settings: BillingSettings,
    *,
    progress: ProgressHook | None = None,
    now: datetime | None = None,
) -> ExpireReport:
    """One ``expiration`` entry per expired topup, keyed ``expire:<entry_id>`` (idempotent)."""
    started = time.perf_counter()
    report = ExpireReport()
    async with open_billing(settings) as billing:
        moment = now or utcnow()
        store = billing.store
        total = await store.count_due_topups(moment)
        slots = asyncio.Semaphore(settings.job_concurrency)
        failed: list[ObjectId] = []

        async def one(topup: Document) -> None:
            async with slots:
                try:
                    units = await billing.expire_topup(topup, moment)
                except Exception:
                    log.exception("expiry failed", entry_id=str(topup["_id"]))
                    report.errors += 1
                    failed.append(topup["_id"])
                    return
            if units is None:
                report.already_expired += 1
            else:
                report.expired += 1
                report.units += units

        # settled topups leave the "due" set, so each batch is simply the next due ones
        while batch := await store.due_topups(moment, settings.reconcile_batch_size, failed):
            await asyncio.gather(*(one(topup) for topup in batch))
            if progress:
                done = report.expired + report.already_expired + report.errors
                progress(done, max(total, done))
    report.finish(started)
    return report


# -- audit ----------------------------------------------------------------------------
async def audit(settings: BillingSettings, *, progress: ProgressHook | None = None) -> AuditReport:
    """Every balance equals its ledger sum, no key exists twice, every entry has its sign."""
    started = time.perf_counter()
    report = AuditReport()
    async with open_billing(settings, writes=False) as billing:
        store = billing.store
        report.accounts = await store.count_accounts()
        report.entries = await store.count_entries()
        if not await store.has_unique_ref_id_index():
            report.add("missing_unique_index", [{"collection": "ledger", "key": "ref_id"}])
        report.add(
            "duplicate_key",
            [{"ref_id": d["_id"], "count": d["count"]} for d in await store.duplicate_keys()],
        )
        report.add(
            "balance_mismatch",
            [
                {
                    "organization_id": d["_id"],
                    "balance": d["balance"],
                    "ledger_sum": d["ledger_sum"],
                }
                for d in await store.balance_mismatches()
            ],
        )
        violations = await store.sign_rule_violations(MAX_FINDINGS_PER_CHECK + 1)
        report.add(
            "sign_rule",
            [
                {"ref_id": d.get("ref_id"), "kind": d.get("kind"), "amount": d.get("amount")}
                for d in violations
            ],
        )
    for finding in report.findings:
        log.error("audit finding", **finding)
    report.finish(started)
    return report


# -- preseed --------------------------------------------------------------------------
async def preseed(
    settings: BillingSettings, *, progress: ProgressHook | None = None, clock: Clock = utcnow
) -> PreseedReport:
    """Before the first enable: close every open referral side (``preseeded``), so turning
    referrals on credits only invitations accepted from then on."""
    started = time.perf_counter()
    report = PreseedReport()
    if settings.referral_enabled:
        report.status = "refused"
        report.reason = "referral is enabled: open sides may be waiting for an organization"
    else:
        async with open_billing(settings, clock) as billing:
            report.referrals = await billing.store.close_open_sides("preseeded", clock())
    report.finish(started)
    return report


# -- command line ---------------------------------------------------------------------
class Job(Protocol):
    def __call__(
        self, settings: BillingSettings, *, progress: ProgressHook | None = None
    ) -> Coroutine[Any, Any, JobReport]: ...


JOBS: dict[str, Job] = {
    "reconcile": reconcile,
    "expire": expire,
    "audit": audit,
    "preseed": preseed,
}


@contextmanager
def terminal_progress(description: str) -> Iterator[ProgressHook | None]:
    """A progress bar on stderr when it is a terminal; nothing otherwise (CronJob logs)."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def run(name: str) -> JobReport:
    """Run job ``name`` configured from the environment (the `grantwire` commands)."""
    settings = BillingSettings()
    configure_logging(f"{SERVICE}-{name}", settings.log_level, settings.log_json)
    with terminal_progress(f"billing {name}") as progress:
        return asyncio.run(JOBS[name](settings, progress=progress))
