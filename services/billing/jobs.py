"""Billing jobs: reconcile, expire, audit, preseed.

Each job is ``async def job(settings, *, progress=None) -> report``. ``grantwire <job>``
runs one (a Kubernetes CronJob runs the same command), prints the report as one JSON line
on stdout and exits with ``report.exit_code``; logs go to stderr. Jobs need only MongoDB:
the events they stage (``billing.credits_granted``) are published by the billing service's
outbox relay, which wakes on the insert.

A job is a short process Prometheus cannot scrape, so ``run_reported`` records each run's
result in billing's ``job_runs`` collection, which the billing service exposes on its
``/metrics`` (``grantwire_job_*{job_name}``), and pushes the same gauges to a Pushgateway
when ``GRANTWIRE_PUSHGATEWAY_URL`` is set.
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
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, pushadd_to_gateway
from pydantic_settings import BaseSettings, SettingsConfigDict
from pymongo import ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase

from services.billing import SERVICE
from services.billing.domain import GrantResult, Referral, users_to_resolve
from services.billing.handlers import Billing, Clock, utcnow
from services.billing.repository import INDEXES
from services.billing.settings import BillingSettings
from shared import tracing
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
    tracing.configure_tracing(f"grantwire-{SERVICE}-{name}")
    with terminal_progress(f"billing {name}") as progress:
        return asyncio.run(run_reported(name, settings, progress=progress))


# -- job results for Prometheus -------------------------------------------------------
JOB_RUNS = "job_runs"
PUSH_JOB = "grantwire-billing-jobs"


class JobReporting(BaseSettings):
    """Where job results go besides MongoDB (``GRANTWIRE_PUSHGATEWAY_URL``; empty: nowhere)."""

    model_config = SettingsConfigDict(env_prefix="GRANTWIRE_", extra="ignore")
    pushgateway_url: str = ""


class JobGauges:
    """The last run of each job as gauges. The label is ``job_name``: ``job`` is Prometheus'
    own target label (and the Pushgateway's grouping key), which would rename ours."""

    def __init__(self, registry: CollectorRegistry) -> None:
        label = ["job_name"]
        self.last_run = Gauge(
            "grantwire_job_last_run_timestamp_seconds",
            "When the job last finished (any outcome), Unix time.",
            label,
            registry=registry,
        )
        self.last_success = Gauge(
            "grantwire_job_last_success_timestamp_seconds",
            "When the job last finished with exit code 0 and did its work, Unix time.",
            label,
            registry=registry,
        )
        self.last_errors = Gauge(
            "grantwire_job_last_errors",
            "Errors (audit: findings) of the job's last run.",
            label,
            registry=registry,
        )
        self.last_exit_code = Gauge(
            "grantwire_job_last_exit_code",
            "Exit code of the job's last run (a crash counts as 1).",
            label,
            registry=registry,
        )
        self.last_duration = Gauge(
            "grantwire_job_last_duration_seconds",
            "How long the job's last run took.",
            label,
            registry=registry,
        )
        self.last_report = Gauge(
            "grantwire_job_last_report",
            "Numeric fields of the job's last report (backfilled, pending, expired, ...).",
            ["job_name", "field"],
            registry=registry,
        )

    def show(self, run: Document) -> None:
        name = str(run["_id"])
        self.last_run.labels(name).set(run["last_run_at"].timestamp())
        if run.get("last_success_at") is not None:
            self.last_success.labels(name).set(run["last_success_at"].timestamp())
        self.last_errors.labels(name).set(run["last_errors"])
        self.last_exit_code.labels(name).set(run["last_exit_code"])
        self.last_duration.labels(name).set(run["last_duration_s"])
        for key, value in (run.get("last_report") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.last_report.labels(name, key).set(value)


EXPOSED = JobGauges(REGISTRY)  # billing's /metrics, refreshed from job_runs on each scrape


async def show_job_runs(db: AsyncDatabase[Document]) -> None:
    """Refresh billing's ``grantwire_job_*`` gauges from the recorded runs."""
    async for run in db[JOB_RUNS].find():
        EXPOSED.show(run)


def error_count(report: JobReport) -> int:
    """Errors of a run as one number (audit: its findings; preseed: 1 when refused)."""
    if isinstance(report, AuditReport):
        return sum(report.finding_counts.values())
    errors = getattr(report, "errors", None)
    if isinstance(errors, int):
        return errors
    return 0 if report.exit_code == 0 else 1


async def run_reported(
    name: str,
    settings: BillingSettings,
    *,
    progress: ProgressHook | None = None,
    pushgateway_url: str | None = None,
) -> JobReport:
    """Run job ``name`` in a trace span, then record its result (a crash is recorded too)."""
    started_at = utcnow()
    with tracing.tracer().start_as_current_span(f"billing {name}"):
        try:
            report = await JOBS[name](settings, progress=progress)
        except Exception as exc:
            await record_run(settings, name, None, started_at, pushgateway_url, crash=exc)
            raise
    await record_run(settings, name, report, started_at, pushgateway_url)
    return report


async def record_run(
    settings: BillingSettings,
    name: str,
    report: JobReport | None,
    started_at: datetime,
    pushgateway_url: str | None = None,
    *,
    crash: BaseException | None = None,
) -> Document:
    """Upsert the run into ``job_runs`` and push it; a failure to record is logged only."""
    finished_at = utcnow()
    succeeded = report is not None and report.exit_code == 0 and report.status != "lock_held"
    fields: Document = {
        "last_run_at": finished_at,
        "last_started_at": started_at,
        "last_status": report.status if report is not None else "crashed",
        "last_exit_code": report.exit_code if report is not None else 1,
        "last_errors": error_count(report) if report is not None else 1,
        "last_duration_s": (finished_at - started_at).total_seconds(),
        "last_report": report.as_dict() if report is not None else {},
        "last_error": None if crash is None else f"{type(crash).__name__}: {crash}"[:1000],
    }
    if succeeded:
        fields["last_success_at"] = finished_at
    run: Document = {"_id": name, **fields}
    try:
        database = JobDatabase(settings)
        try:
            stored = await database.db[JOB_RUNS].find_one_and_update(
                {"_id": name},
                {"$set": fields},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
            run = stored or run
        finally:
            await database.close()
    except Exception as exc:
        log.warning("could not record the job run", job_name=name, error=repr(exc))
    url = JobReporting().pushgateway_url if pushgateway_url is None else pushgateway_url
    if url:
        await _push(url, run)
    return run


async def _push(url: str, run: Document) -> None:
    registry = CollectorRegistry()
    JobGauges(registry).show(run)
    grouping = {"job_name": str(run["_id"])}
    try:
        # pushadd: a failed run leaves the group's last success timestamp in place
        await asyncio.to_thread(
            pushadd_to_gateway,
            url,
            job=PUSH_JOB,
            grouping_key=grouping,
            registry=registry,
            timeout=10,
        )
    except Exception as exc:
        log.warning("could not push the job run", job_name=run["_id"], error=repr(exc))
