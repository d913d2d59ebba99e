"""Billing's listeners, batched: the events that arrive together are granted together.

The three listeners hand their event to one ``GroupCommit``; a batch of events costs a fixed
number of round trips, not one set per event:

1. the facts, in parallel: accepted referrals and user -> organization memberships (bulk
   upserts, committed before anything is granted, as on the single path);
2. the referrals to decide: those accepted in the batch and those where a provisioned user
   has an open side (one query), and the organizations of their users (one query);
3. the decisions (pure: ``decide_grants``, ``signup_grant``);
4. one transaction for every grant of the batch: which keys the ledger holds already, the
   entries, one balance update per account, the balances read back, the
   ``billing.credits_granted`` outbox documents, and the referrals' side outcomes.

A key committed by another process between (4)'s read and its insert aborts the whole
transaction (a duplicate key): then each event runs again on the single path, alone, so it
gets its own outcome and, if it fails, its own retry or dead letter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from opentelemetry.context import Context
from pymongo.asynchronous.client_session import AsyncClientSession

from services.billing import SERVICE
from services.billing.domain import (
    Grant,
    GrantDecision,
    GrantResult,
    Referral,
    ReferralConfig,
    changed_sides,
    check_entry,
    conclude,
    decide_grants,
    users_to_resolve,
)
from services.billing.repository import BillingStore
from shared import tracing
from shared.contracts import CreditsGranted
from shared.envelope import Envelope


@dataclass(frozen=True)
class AcceptedReferral:
    """``invitation.accepted``: record the referral, then grant what can be granted."""

    invitation_id: str
    invited_by: str | None
    accepted_user_id: str | None
    cause: Envelope | None = None
    trace: Context | None = None  # the handler's trace context: the credits continue it


@dataclass(frozen=True)
class ProvisionedUser:
    """``organization.provisioned``: record the membership, then grant the user's open sides."""

    user_id: str
    organization_id: str
    provisioned_at: datetime
    cause: Envelope | None = None
    trace: Context | None = None


@dataclass(frozen=True)
class CreatedOrganization:
    """``organization.created``: the plan's signup grant."""

    organization_id: str
    plan_id: str
    cause: Envelope | None = None
    trace: Context | None = None


GrantWork = AcceptedReferral | ProvisionedUser | CreatedOrganization
# A grant, the envelope of the event that caused it, and that handler's trace context.
CausedGrant = tuple[Grant, Envelope | None, Context | None]
# What each kind of work returns: a GrantResult, one per open referral, a signup outcome.
WorkResult = GrantResult | list[GrantResult] | str


SidesWriter = Callable[[AsyncClientSession | None, dict[str, bool]], Awaitable[None]]


class BillingCore(Protocol):
    """What the batches need of ``Billing`` (handlers.py): its store, rules and single path."""

    @property
    def store(self) -> BillingStore: ...

    @property
    def config(self) -> ReferralConfig: ...

    def now(self) -> datetime: ...

    def signup_grant_of(self, organization_id: str, plan_id: str) -> Grant | None: ...

    async def apply_batch(
        self, grants: Sequence[CausedGrant], sides: SidesWriter
    ) -> dict[str, bool]: ...

    async def grant_for_invitation(
        self,
        invitation_id: str,
        invited_by: str | None,
        accepted_user_id: str | None,
        *,
        cause: Envelope | None = None,
    ) -> GrantResult: ...

    async def grant_for_provisioned(
        self,
        user_id: str,
        organization_id: str,
        *,
        provisioned_at: datetime,
        cause: Envelope | None = None,
    ) -> list[GrantResult]: ...

    async def grant_signup(
        self, organization_id: str, plan_id: str, *, cause: Envelope | None = None
    ) -> str: ...


@dataclass
class _Plan:
    """The decisions of one batch, before the transaction."""

    referrals: dict[str, Referral]
    decisions: dict[str, GrantDecision]
    grants: list[CausedGrant]
    signups: dict[int, Grant | None]  # item index -> its signup grant (None: the plan has none)


def caused(grant: Grant, work: GrantWork | None) -> CausedGrant:
    """A grant with the event that caused it and the trace its credit continues."""
    return (grant, work.cause, work.trace) if work else (grant, None, None)


def entry_is_valid(grant: Grant) -> Grant:
    check_entry("topup", grant.units)
    return grant


def credits_granted(
    grant: Grant, balance: int, cause: Envelope | None, trace: Context | None = None
) -> Envelope:
    """The ``billing.credits_granted`` envelope of an applied grant."""
    event = CreditsGranted(
        organization_id=grant.organization_id,
        ref_id=grant.ref_id,
        source=grant.source,
        amount=grant.units,
        balance=balance,
        expires_at=grant.expires_at,
        invitation_id=grant.invitation_id,
        side=grant.side,
    )
    if cause is None:
        return Envelope.new(event, source=SERVICE, trace_context=trace)
    return cause.caused(event, source=SERVICE, trace_context=trace)


class GrantBatches:
    """Runs a batch of billing's listener work with a fixed number of round trips."""

    def __init__(self, billing: BillingCore) -> None:
        self._billing = billing

    async def run(self, items: Sequence[GrantWork]) -> list[WorkResult | BaseException]:
        """One result (or exception) per item; see the module docstring."""
        try:
            return list(await self._run_batch(items))
        except Exception as exc:
            if len(items) == 1:
                return [exc]
        # Alone, and at once: an event waiting on a locked document (say, one a crashed
        # replica's transaction still holds) must not hold up the others.
        return list(await asyncio.gather(*(self._run_alone(item) for item in items)))

    async def _run_alone(self, item: GrantWork) -> WorkResult | BaseException:
        """The single path, for one item of a batch that failed as a whole."""
        billing = self._billing
        try:
            with tracing.attached(item.trace):
                return await self._alone(billing, item)
        except Exception as exc:
            return exc

    @staticmethod
    async def _alone(billing: BillingCore, item: GrantWork) -> WorkResult:
        if isinstance(item, AcceptedReferral):
            return await billing.grant_for_invitation(
                item.invitation_id, item.invited_by, item.accepted_user_id, cause=item.cause
            )
        if isinstance(item, ProvisionedUser):
            return await billing.grant_for_provisioned(
                item.user_id,
                item.organization_id,
                provisioned_at=item.provisioned_at,
                cause=item.cause,
            )
        return await billing.grant_signup(item.organization_id, item.plan_id, cause=item.cause)

    async def _run_batch(self, items: Sequence[GrantWork]) -> list[WorkResult]:
        billing = self._billing
        store = billing.store
        now = billing.now()
        accepted = [i for i in items if isinstance(i, AcceptedReferral) and i.invitation_id]
        provisioned = [i for i in items if isinstance(i, ProvisionedUser)]
        # 1. the facts first
        await store.record_referrals(
            [(i.invitation_id, i.invited_by, i.accepted_user_id) for i in accepted], now
        )
        await store.record_memberships(
            [(i.user_id, i.organization_id, i.provisioned_at) for i in provisioned], now
        )
        # 2-3. what to decide, and the decisions
        plan = await self._plan(items, accepted, provisioned, now)
        # 4. one transaction for every grant and side outcome
        applied = await billing.apply_batch(plan.grants, self._sides_writer(plan, now))
        results: list[WorkResult] = []
        for index, item in enumerate(items):
            if isinstance(item, AcceptedReferral):
                if not item.invitation_id:
                    empty = Referral(
                        invitation_id="", inviter=item.invited_by, referee=item.accepted_user_id
                    )
                    results.append(conclude(decide_grants(billing.config, empty, {}, now), {}))
                else:
                    results.append(self._result(plan, item.invitation_id, applied))
            elif isinstance(item, ProvisionedUser):
                results.append(
                    [
                        self._result(plan, invitation_id, applied)
                        for invitation_id in plan.referrals
                        if self._belongs(plan, invitation_id, item)
                    ]
                )
            else:
                grant = plan.signups[index]
                if grant is None:
                    results.append("no_signup_grant")
                else:
                    results.append("applied" if applied[grant.ref_id] else "duplicate_grant")
        return results

    async def _plan(
        self,
        items: Sequence[GrantWork],
        accepted: Sequence[AcceptedReferral],
        provisioned: Sequence[ProvisionedUser],
        now: datetime,
    ) -> _Plan:
        billing = self._billing
        config = billing.config
        store = billing.store
        referrals: dict[str, Referral] = {}
        if config.enabled and (accepted or provisioned):
            found = await store.referrals_to_grant(
                [i.invitation_id for i in accepted], [i.user_id for i in provisioned]
            )
            referrals = {r.invitation_id: r for r in found}
        users = [u for r in referrals.values() for u in users_to_resolve(config, r)]
        organizations = await store.organizations_of(users) if users else {}
        decisions = {
            invitation_id: decide_grants(config, referral, organizations, now)
            for invitation_id, referral in referrals.items()
        }
        grants: list[CausedGrant] = []
        seen: set[str] = set()
        for invitation_id, decision in decisions.items():
            cause = self._cause_of(referrals[invitation_id], items)
            for grant in decision.grants:
                if grant.ref_id not in seen:
                    seen.add(grant.ref_id)
                    grants.append(caused(entry_is_valid(grant), cause))
        signups: dict[int, Grant | None] = {}
        for index, item in enumerate(items):
            if isinstance(item, CreatedOrganization):
                signup = billing.signup_grant_of(item.organization_id, item.plan_id)
                signups[index] = signup
                if signup is not None and signup.ref_id not in seen:
                    seen.add(signup.ref_id)
                    grants.append(caused(entry_is_valid(signup), item))
        return _Plan(referrals, decisions, grants, signups)

    @staticmethod
    def _cause_of(referral: Referral, items: Sequence[GrantWork]) -> GrantWork | None:
        """The first event of the batch that asked for this referral."""
        for item in items:
            if isinstance(item, AcceptedReferral) and item.invitation_id == referral.invitation_id:
                return item
            if isinstance(item, ProvisionedUser) and item.user_id in (
                referral.referee,
                referral.inviter,
            ):
                return item
        return None

    @staticmethod
    def _belongs(plan: _Plan, invitation_id: str, item: ProvisionedUser) -> bool:
        return plan.referrals[invitation_id].has_open_side_of(item.user_id)

    @staticmethod
    def _result(plan: _Plan, invitation_id: str, applied: dict[str, bool]) -> GrantResult:
        """A referral's result (no decision: referrals are off, as the single path says)."""
        decision = plan.decisions.get(invitation_id)
        if decision is None:
            return GrantResult(skipped="disabled")
        return conclude(decision, applied)

    def _sides_writer(self, plan: _Plan, now: datetime) -> SidesWriter:
        store = self._billing.store

        async def write(session: AsyncClientSession | None, applied: dict[str, bool]) -> None:
            changes = [
                (
                    invitation_id,
                    changed_sides(plan.referrals[invitation_id], conclude(decision, applied)),
                )
                for invitation_id, decision in plan.decisions.items()
            ]
            await store.record_sides_of(session, changes, now)

        return write
