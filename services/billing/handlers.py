"""Billing use cases: referral and signup grants, the three listeners, expiry, ledger reads.

Order independence: each listener records its own fact first (a committed write), then
looks for its partner. When ``invitation.accepted`` and ``organization.provisioned`` race,
at least one of them sees the other's fact and grants; the ledger key makes the other a
``duplicate_grant``. Reconcile covers what a crash between the two steps leaves open.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol, TypeVar, cast

import structlog
from bson import ObjectId
from prometheus_client import Counter, Histogram
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.billing.domain import (
    Grant,
    GrantResult,
    LedgerCursor,
    Referral,
    ReferralConfig,
    changed_sides,
    check_entry,
    conclude,
    decide_grants,
    expiry_key,
    signup_grant,
    unspent_units,
    users_to_resolve,
)
from services.billing.grant_batch import (
    AcceptedReferral,
    CausedGrant,
    CreatedOrganization,
    GrantBatches,
    GrantWork,
    ProvisionedUser,
    SidesWriter,
    WorkResult,
    credits_granted,
)
from services.billing.repository import BillingStore, entry_document
from services.billing.settings import BillingSettings
from shared import tracing
from shared.batching import GroupCommit
from shared.consumer import Handler
from shared.contracts import (
    Event,
    InvitationAccepted,
    OrganizationCreated,
    OrganizationProvisioned,
)
from shared.envelope import Envelope
from shared.logging import log_outcome
from shared.mongo import Document
from shared.outbox import stage_event_batch, stage_events

T = TypeVar("T")
R = TypeVar("R")
Clock = Callable[[], datetime]
SignupOutcome = Literal["applied", "duplicate_grant", "no_signup_grant"]
log = structlog.get_logger("grantwire.billing")

GRANTS = Counter(
    "grantwire_grants_total",
    "Grants by outcome: applied, or duplicate (already granted: projection or ledger key).",
    ["side", "source", "outcome"],
)
CREDIT_LATENCY = Histogram(
    "grantwire_credit_latency_seconds",
    "Time from the first event of a causation chain (e.g. the signup) to its grant committed.",
    ["side", "source"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400),
)


class BillingDatabase(Protocol):
    """What the use cases need: billing's database and a transaction runner.

    The service's ``ServiceRuntime`` is one; the jobs use a MongoDB-only one (their staged
    events are published by the service's outbox relay).
    """

    @property
    def db(self) -> AsyncDatabase[Document]: ...

    async def commit(self, work: Callable[[AsyncClientSession], Awaitable[T]]) -> T: ...


def count_grant(side: str, source: str, outcome: str) -> None:
    """Count a listener's applied or duplicate grant (a side decided otherwise is no grant).

    Listeners count, not the use cases: a duplicate is an event granting again what was
    granted, not the partner side a referral re-evaluation reports as granted already.
    """
    if outcome == "applied":
        GRANTS.labels(side, source, "applied").inc()
    elif outcome == "duplicate_grant":
        GRANTS.labels(side, source, "duplicate").inc()


def utcnow() -> datetime:
    return datetime.now(UTC)


def observe_credit_latency(grant: Grant, cause: Envelope | None) -> None:
    if cause is not None:
        waited = (utcnow() - cause.origin_time()).total_seconds()
        CREDIT_LATENCY.labels(grant.side or "none", grant.source).observe(max(0.0, waited))


def _is_ref_id_conflict(exc: DuplicateKeyError) -> bool:
    """True when the duplicate is a ledger key (not some other unique index)."""
    pattern = (exc.details or {}).get("keyPattern") or {}
    return "ref_id" in pattern


class AccountLocks:
    """One lock per account in this process: grants to a hot account queue up here instead
    of aborting each other with WriteConflict (other replicas still may; the driver retries)."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def __call__(self, organization_id: str) -> asyncio.Lock:
        lock = self._locks.get(organization_id)
        if lock is None:
            lock = self._locks[organization_id] = asyncio.Lock()
        return lock

    @contextlib.asynccontextmanager
    async def all_of(self, organization_ids: Sequence[str]) -> AsyncIterator[None]:
        """Hold the locks of several accounts, taken in one order (no deadlock)."""
        async with contextlib.AsyncExitStack() as stack:
            for organization_id in sorted(set(organization_ids)):
                await stack.enter_async_context(self(organization_id))
            yield


@dataclass(frozen=True)
class LedgerPage:
    entries: list[Document]
    next_cursor: str | None


class Billing:
    """Billing's use cases over one database; built once by the composition root."""

    def __init__(
        self, database: BillingDatabase, settings: BillingSettings, clock: Clock = utcnow
    ) -> None:
        self._database = database
        self._settings = settings
        self.config: ReferralConfig = settings.referral_config()
        self._clock = clock
        self._account_lock = AccountLocks()
        # The listeners' work, batched when events arrive together (grant_batch.py).
        self._batches = GroupCommit[GrantWork, WorkResult](
            "billing-grants",
            GrantBatches(self).run,
            max_batch=settings.grant_batch_max,
            concurrency=settings.grant_batch_concurrency,
        )

    @property
    def store(self) -> BillingStore:
        return BillingStore(self._database.db)

    def now(self) -> datetime:
        return self._clock()

    async def _submit(self, work: GrantWork, kind: type[R]) -> R:
        return cast(R, await self._batches.submit(work))

    def listeners(self) -> dict[str, Handler]:
        """Event type -> message handler, for the service's work queue."""
        return {
            InvitationAccepted.event_type: self.on_invitation_accepted,
            OrganizationProvisioned.event_type: self.on_organization_provisioned,
            OrganizationCreated.event_type: self.on_organization_created,
        }

    # -- listeners -------------------------------------------------------------------
    async def on_invitation_accepted(self, event: Event, envelope: Envelope) -> None:
        assert isinstance(event, InvitationAccepted)
        result = await self._submit(
            AcceptedReferral(
                event.invitation_id,
                event.invited_by,
                event.accepted_user_id,
                cause=envelope,
                trace=tracing.current_context(),
            ),
            GrantResult,
        )
        for side in result.sides:
            count_grant(side.side, "referral", side.outcome)
        log_outcome(
            log,
            "referral grant",
            context=envelope.log_context(),
            invitation_id=event.invitation_id,
            **result.summary(),
        )

    async def on_organization_provisioned(self, event: Event, envelope: Envelope) -> None:
        assert isinstance(event, OrganizationProvisioned)
        results = await self._submit(
            ProvisionedUser(
                event.user_id,
                event.organization_id,
                envelope.time,
                cause=envelope,
                trace=tracing.current_context(),
            ),
            list[GrantResult],
        )
        for side in (s for r in results for s in r.sides):
            if side.organization_id == event.organization_id:  # this user's own side
                count_grant(side.side, "referral", side.outcome)
        log_outcome(
            log,
            "organization provisioned",
            context=envelope.log_context(),
            user_id=event.user_id,
            organization_id=event.organization_id,
            referrals=[r.summary() for r in results],
        )

    async def on_organization_created(self, event: Event, envelope: Envelope) -> None:
        assert isinstance(event, OrganizationCreated)
        outcome = await self._submit(
            CreatedOrganization(
                event.organization_id,
                event.plan_id,
                cause=envelope,
                trace=tracing.current_context(),
            ),
            str,
        )
        count_grant("none", "signup_grant", outcome)
        log_outcome(
            log,
            "signup grant",
            context=envelope.log_context(),
            organization_id=event.organization_id,
            plan_id=event.plan_id,
            outcome=outcome,
        )

    # -- grants ----------------------------------------------------------------------
    async def grant_for_invitation(
        self,
        invitation_id: str,
        invited_by: str | None,
        accepted_user_id: str | None,
        *,
        cause: Envelope | None = None,
    ) -> GrantResult:
        """Record the accepted referral (the fact first), then grant what can be granted."""
        if invitation_id:
            referral = await self.store.record_referral(
                invitation_id, invited_by, accepted_user_id, self._clock()
            )
        else:
            referral = Referral(invitation_id="", inviter=invited_by, referee=accepted_user_id)
        return await self.grant_for_referral(referral, cause=cause)

    async def grant_for_provisioned(
        self,
        user_id: str,
        organization_id: str,
        *,
        provisioned_at: datetime,
        cause: Envelope | None = None,
    ) -> list[GrantResult]:
        """Record user -> organization (the fact first), then grant the user's open referrals."""
        store = self.store
        await store.record_membership(user_id, organization_id, provisioned_at, self._clock())
        if not self.config.enabled:
            return []
        return [
            await self.grant_for_referral(referral, cause=cause)
            for referral in await store.open_referrals_of(user_id)
        ]

    async def grant_for_referral(
        self,
        referral: Referral,
        *,
        cause: Envelope | None = None,
        organizations: Mapping[str, str] | None = None,
    ) -> GrantResult:
        """Decide (pure), apply each grant, remember the side outcomes in the projection.

        ``organizations`` (user -> organization) may be resolved by the caller for a batch.
        """
        store = self.store
        if organizations is None:
            users = users_to_resolve(self.config, referral)
            organizations = await store.organizations_of(users) if users else {}
        now = self._clock()
        decision = decide_grants(self.config, referral, organizations, now)
        outcomes = await asyncio.gather(
            *(self.apply_grant(grant, cause) for grant in decision.grants),
            return_exceptions=True,
        )
        failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failure is not None:
            raise failure
        applied = {g.ref_id: o is True for g, o in zip(decision.grants, outcomes, strict=True)}
        result = conclude(decision, applied)
        await store.record_sides(referral.invitation_id, changed_sides(referral, result), now)
        return result

    def signup_grant_of(self, organization_id: str, plan_id: str) -> Grant | None:
        """The signup grant of an organization's plan, or None when the plan has none."""
        return signup_grant(
            organization_id,
            plan_id,
            self._settings.signup_grant_units,
            self._clock(),
            self._settings.signup_grant_expiry_days,
        )

    async def grant_signup(
        self, organization_id: str, plan_id: str, *, cause: Envelope | None = None
    ) -> SignupOutcome:
        """Credit a new organization's plan signup grant once (not gated by the referral switch)."""
        grant = self.signup_grant_of(organization_id, plan_id)
        if grant is None:
            return "no_signup_grant"
        return "applied" if await self.apply_grant(grant, cause) else "duplicate_grant"

    async def apply_grant(self, grant: Grant, cause: Envelope | None = None) -> bool:
        """Entry + balance + ``billing.credits_granted`` in one transaction; False: duplicate.

        Four round trips: insert, balance update, outbox insert, commit. Concurrent grants to
        one account conflict (WriteConflict) and are retried by the driver.
        """
        check_entry("topup", grant.units)
        store = self.store
        entry = entry_document(grant, at=self._clock())

        async def work(session: AsyncClientSession) -> None:
            balance = await store.append_entry(session, entry)
            envelope = credits_granted(grant, balance, cause)
            await stage_events(store.db, session, [envelope], aggregate_id=grant.organization_id)

        try:
            async with self._account_lock(grant.organization_id):
                await self._database.commit(work)
        except DuplicateKeyError as exc:
            if not _is_ref_id_conflict(exc):
                raise
            return False
        observe_credit_latency(grant, cause)
        return True

    async def apply_batch(
        self, grants: Sequence[CausedGrant], sides: SidesWriter
    ) -> dict[str, bool]:
        """Apply many grants in one transaction, with the side outcomes ``sides`` writes;
        ``{ref_id: applied}`` (False: the key was in the ledger already, a duplicate).

        Seven round trips whatever the number of grants. A key another process commits
        meanwhile aborts the transaction with ``DuplicateKeyError``; the caller splits the
        batch then.
        """
        store = self.store
        if not grants:
            await sides(None, {})
            return {}

        async def work(session: AsyncClientSession) -> dict[str, bool]:
            held = await store.existing_keys(session, [g.ref_id for g, _, _ in grants])
            fresh = [caused for caused in grants if caused[0].ref_id not in held]
            at = self._clock()
            balances = await store.append_entries(
                session, [entry_document(g, at=at) for g, _, _ in fresh]
            )
            await stage_event_batch(
                store.db,
                session,
                [
                    (credits_granted(g, balance, cause, trace), g.organization_id)
                    for (g, cause, trace), balance in zip(fresh, balances, strict=True)
                ],
            )
            applied = {g.ref_id: g.ref_id not in held for g, _, _ in grants}
            await sides(session, applied)
            return applied

        async with self._account_lock.all_of([g.organization_id for g, _, _ in grants]):
            applied = await self._database.commit(work)
        for grant, cause, _ in grants:
            if applied[grant.ref_id]:
                observe_credit_latency(grant, cause)
        return applied

    # -- expiry ----------------------------------------------------------------------
    async def expire_topup(self, topup: Document, now: datetime) -> int | None:
        """Write the ``expiration`` entry of a due topup; units expired, None if already done."""
        store = self.store
        entry_id = ObjectId()

        async def work(session: AsyncClientSession) -> int:
            balance = await store.balance_in(session, topup["organization_id"])
            units = unspent_units(int(topup["amount"]), balance)
            check_entry("expiration", -units)
            entry = {
                "_id": entry_id,
                "ref_id": expiry_key(str(topup["_id"])),
                "organization_id": topup["organization_id"],
                "kind": "expiration",
                "amount": -units,
                "source": topup["source"],
                "at": now,
                "expires_at": None,
                "expired_entry_id": topup["_id"],
            }
            await store.append_entry(session, entry)
            await store.settle_expiry_in(session, topup["_id"])
            return units

        try:
            async with self._account_lock(topup["organization_id"]):
                return await self._database.commit(work)
        except DuplicateKeyError as exc:
            if not _is_ref_id_conflict(exc):
                raise
            await store.settle_expiry_in(None, topup["_id"])  # the key exists: settled already
            return None

    # -- reads -----------------------------------------------------------------------
    async def balance(self, organization_id: str) -> int:
        return await self.store.balance(organization_id)

    async def ledger_page(self, organization_id: str, limit: int, cursor: str | None) -> LedgerPage:
        """A page of entries, newest first; ``InvalidCursorError`` for a foreign cursor."""
        after = LedgerCursor.decode(cursor) if cursor else None
        entries = await self.store.ledger_page(organization_id, limit + 1, after)
        more = len(entries) > limit
        entries = entries[:limit]
        next_cursor = BillingStore.cursor_after(entries[-1]).encode() if more else None
        return LedgerPage(entries, next_cursor)
