"""Organizations' user events, batched: the events that arrive together share one transaction.

The two message handlers hand their event to one ``GroupCommit``; a batch of events (one
per user) costs a fixed number of round trips, not one set per event, all in one
transaction:

1. the users' facts (one bulk write), the users read back (one query);
2. the gate (pure), then the active organizations of the users it lets through (one query);
3. for the users who get a workspace: the oldest organization of each corporate domain
   (one query) and the taken slugs of every candidate (one query); then, in batch order,
   the names, hints and slugs (pure), also against the workspaces created earlier in the
   batch, as if the events ran one after another;
4. the organizations and memberships (one insert each), the users' current organizations
   (one bulk write), every outbox event (one insert); the commit.

Several events of one user in a batch: the first runs in the batch, the later ones run
alone on the single path after it, in order. A batch that fails as a whole (a slug
committed by another replica meanwhile, exhausted slugs, a database error) runs each
event alone on the single path, so it gets its own outcome, retry or dead letter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from opentelemetry.context import Context
from pymongo.asynchronous.client_session import AsyncClientSession

from services.organizations import SERVICE
from services.organizations.domain import (
    Organization,
    Provisioning,
    ProvisioningPolicy,
    SuggestedJoin,
    User,
    first_free_slug,
    may_provision,
    plan_workspace,
    slug_candidates,
)
from services.organizations.repository import OrganizationsRepository, new_organization
from shared import tracing
from shared.contracts import (
    Event,
    OrganizationCreated,
    OrganizationProvisioned,
    UserEmailVerified,
    UserSignedUp,
)
from shared.envelope import Envelope
from shared.outbox import stage_event_batch
from shared.runtime import ServiceRuntime


@dataclass(frozen=True)
class UserEvent:
    """One ``user.signed_up`` or ``user.email_verified`` message to provision for."""

    event: UserSignedUp | UserEmailVerified
    envelope: Envelope
    trace: Context | None = None  # the handler's trace context: the events it causes continue it

    @property
    def user_id(self) -> str:
        return self.event.user_id


class OrganizationsCore(Protocol):
    """What the batches need of ``SignupOrganizations`` (handlers.py)."""

    @property
    def runtime(self) -> ServiceRuntime: ...

    @property
    def policy(self) -> ProvisioningPolicy: ...

    @property
    def repository(self) -> OrganizationsRepository: ...

    @property
    def random_suffix(self) -> Callable[[], str]: ...

    async def provision_alone(self, item: UserEvent) -> Provisioning: ...


def provisioning_events(
    cause: Envelope,
    user_id: str,
    organization: Organization,
    *,
    created: bool,
    trace: Context | None = None,
) -> list[Envelope]:
    """``organization.created`` (for a new organization), then ``organization.provisioned``;
    in ``trace`` (by default the current trace context)."""
    events: list[Event] = []
    if created:
        events.append(
            OrganizationCreated(organization_id=organization.id, plan_id=organization.plan_id)
        )
    events.append(OrganizationProvisioned(user_id=user_id, organization_id=organization.id))
    return [cause.caused(event, source=SERVICE, trace_context=trace) for event in events]


def first_of_each_user(items: Sequence[UserEvent]) -> tuple[list[int], list[int]]:
    """Indexes of each user's first event in the batch, and of the later ones."""
    seen: set[str] = set()
    firsts: list[int] = []
    later: list[int] = []
    for index, item in enumerate(items):
        (later if item.user_id in seen else firsts).append(index)
        seen.add(item.user_id)
    return firsts, later


class ProvisionBatches:
    """Runs a batch of user events in one transaction with a fixed number of round trips."""

    def __init__(self, organizations: OrganizationsCore) -> None:
        self._organizations = organizations

    async def run(self, items: Sequence[UserEvent]) -> list[Provisioning | BaseException]:
        """One result (or exception) per item; see the module docstring."""
        results: dict[int, Provisioning | BaseException] = {}
        firsts, later = first_of_each_user(items)
        if len(firsts) == 1:
            later = [firsts[0], *later]  # nothing to share: the single path as it is
        else:
            try:
                batched = await self._run_batch([items[i] for i in firsts])
                for index, result in zip(firsts, batched, strict=True):
                    results[index] = result
            except Exception:
                later = sorted([*firsts, *later])
        # Alone: each user's events in order, the users at once (one user's event waiting on
        # a locked document must not hold up the others).
        chains: dict[str, list[int]] = {}
        for index in sorted(later):
            chains.setdefault(items[index].user_id, []).append(index)

        async def run_chain(chain: list[int]) -> None:
            for index in chain:
                results[index] = await self._run_alone(items[index])

        await asyncio.gather(*(run_chain(chain) for chain in chains.values()))
        return [results[index] for index in range(len(items))]

    async def _run_alone(self, item: UserEvent) -> Provisioning | BaseException:
        try:
            with tracing.attached(item.trace):
                return await self._organizations.provision_alone(item)
        except Exception as exc:
            return exc

    async def _run_batch(self, items: Sequence[UserEvent]) -> list[Provisioning]:
        """Provision users (one event each) in one transaction."""
        organizations = self._organizations
        repo = organizations.repository

        async def work(session: AsyncClientSession) -> list[Provisioning]:
            users = await repo.record_user_facts(session, [item.event for item in items])
            return await self._provision(repo, session, items, users)

        return await organizations.runtime.commit(work)

    async def _provision(
        self,
        repo: OrganizationsRepository,
        session: AsyncClientSession,
        items: Sequence[UserEvent],
        users: dict[str, User],
    ) -> list[Provisioning]:
        """``handle_signup_organization`` for every user of the batch, in batch order."""
        policy = self._organizations.policy
        results: dict[int, Provisioning] = {}
        admitted: list[int] = []
        for index, item in enumerate(items):
            user = users[item.user_id]
            if user.email is None:
                results[index] = Provisioning("awaiting_signup")
            elif not may_provision(policy, user):
                results[index] = Provisioning("gated")
            else:
                admitted.append(index)
        existing = await repo.active_organizations(
            session, [users[items[i].user_id] for i in admitted]
        )
        to_create = [i for i in admitted if items[i].user_id not in existing]
        plans = {
            i: plan_workspace(policy, email, users[items[i].user_id].first_name)
            for i in to_create
            if (email := users[items[i].user_id].email) is not None
        }
        domains = sorted({p.domain for p in plans.values() if p.domain is not None})
        oldest: dict[str, SuggestedJoin] = await repo.oldest_with_domains(session, domains)
        candidates = {
            i: slug_candidates(plan.slug_base, self._organizations.random_suffix)
            for i, plan in plans.items()
        }
        all_candidates = [c for cs in candidates.values() for c in cs]
        taken = await repo.taken_slugs(session, all_candidates) if all_candidates else set()

        staged: list[tuple[Envelope, str]] = []
        workspaces: list[tuple[Organization, str]] = []
        current: list[tuple[str, str, SuggestedJoin | None]] = []
        for index in admitted:
            item = items[index]
            found = existing.get(item.user_id)
            if found is not None:
                results[index] = Provisioning("converged", found)
                staged += self._staged(item, found, created=False)
                continue
            plan = plans[index]
            suggested = oldest.get(plan.domain) if plan.domain else None
            slug = first_free_slug(candidates[index], taken)  # exhausted: the batch fails
            taken.add(slug)  # not for a later user of this batch
            organization = new_organization(plan, slug)
            if plan.domain and plan.domain not in oldest:
                # the first workspace of a new domain is the oldest for the rest of the batch
                oldest[plan.domain] = SuggestedJoin(organization.id, organization.name)
            workspaces.append((organization, item.user_id))
            current.append((item.user_id, organization.id, suggested))
            results[index] = Provisioning("created", organization, suggested)
            staged += self._staged(item, organization, created=True)
        await repo.create_workspaces(session, workspaces)
        await repo.set_current_organizations(session, current)
        await stage_event_batch(self._organizations.runtime.db, session, staged)
        return [results[index] for index in range(len(items))]

    @staticmethod
    def _staged(
        item: UserEvent, organization: Organization, *, created: bool
    ) -> list[tuple[Envelope, str]]:
        envelopes = provisioning_events(
            item.envelope, item.user_id, organization, created=created, trace=item.trace
        )
        return [(envelope, organization.id) for envelope in envelopes]
