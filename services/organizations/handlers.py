"""Use cases of the organizations service: provision a user's workspace, show it."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from services.organizations.domain import (
    Organization,
    Provisioning,
    ProvisioningPolicy,
    User,
    first_free_slug,
    may_provision,
    plan_workspace,
    slug_candidates,
)
from services.organizations.provision_batch import (
    ProvisionBatches,
    UserEvent,
    provisioning_events,
)
from services.organizations.repository import OrganizationOfUser, OrganizationsRepository
from shared import tracing
from shared.batching import GroupCommit
from shared.consumer import PermanentError
from shared.contracts import Event, UserEmailVerified, UserSignedUp
from shared.envelope import Envelope
from shared.logging import log_outcome
from shared.mongo import Document, is_duplicate_key
from shared.outbox import stage_events
from shared.runtime import ServiceRuntime

E = TypeVar("E", bound=Event)
T = TypeVar("T")
RecordFact = Callable[[OrganizationsRepository, AsyncClientSession], Awaitable[User]]
log = structlog.get_logger("grantwire.organizations")

# A slug taken by a concurrent commit surfaces as a duplicate key; the next attempt reads it.
COMMIT_ATTEMPTS = 3


def random_slug_suffix() -> str:
    return secrets.token_hex(5)  # 40 bits: a collision among same-named organizations is rare


class SignupOrganizations:
    """Runs ``handle_signup_organization`` for user events; answers who belongs where."""

    def __init__(
        self,
        runtime: ServiceRuntime,
        policy: ProvisioningPolicy,
        *,
        repository: Callable[[AsyncDatabase[Document]], OrganizationsRepository] = (
            OrganizationsRepository
        ),
        random_suffix: Callable[[], str] = random_slug_suffix,
        batch_max: int = 64,
        batch_concurrency: int = 4,
    ) -> None:
        self._runtime = runtime
        self._policy = policy
        self._repository = repository
        self._random_suffix = random_suffix
        # The message handlers' work, batched when events arrive together (provision_batch.py).
        self._batches = GroupCommit[UserEvent, Provisioning](
            "organizations-provision",
            ProvisionBatches(self).run,
            max_batch=batch_max,
            concurrency=batch_concurrency,
        )

    @property
    def runtime(self) -> ServiceRuntime:
        return self._runtime

    @property
    def policy(self) -> ProvisioningPolicy:
        return self._policy

    @property
    def random_suffix(self) -> Callable[[], str]:
        return self._random_suffix

    @property
    def repository(self) -> OrganizationsRepository:
        return self._repository(self._runtime.db)  # the database exists once the runtime started

    # -- message handlers (the kit's signature) ---------------------------------------------
    async def on_user_signed_up(self, event: Event, envelope: Envelope) -> None:
        item = UserEvent(_expect(event, UserSignedUp), envelope, tracing.current_context())
        log_handled(envelope, await self._batches.submit(item))

    async def on_user_email_verified(self, event: Event, envelope: Envelope) -> None:
        item = UserEvent(_expect(event, UserEmailVerified), envelope, tracing.current_context())
        log_handled(envelope, await self._batches.submit(item))

    # -- use cases ----------------------------------------------------------------------------
    async def signed_up(self, signup: UserSignedUp, envelope: Envelope) -> Provisioning:
        return await self.provision(
            envelope, lambda repo, session: repo.record_signup(session, signup)
        )

    async def email_verified(self, verified: UserEmailVerified, envelope: Envelope) -> Provisioning:
        # Arriving before the signup is fine: the fact is recorded and the signup provisions.
        return await self.provision(
            envelope, lambda repo, session: repo.record_email_verified(session, verified.user_id)
        )

    async def provision(self, envelope: Envelope, record_fact: RecordFact) -> Provisioning:
        """Record the user fact and run the signup rules, committed with their events."""
        result = await self._provision(envelope, record_fact)
        log_handled(envelope, result)
        return result

    async def provision_alone(self, item: UserEvent) -> Provisioning:
        """The single path for one message of a batch (its handler logs the outcome)."""
        event = item.event
        if isinstance(event, UserSignedUp):
            return await self._provision(
                item.envelope, lambda repo, session: repo.record_signup(session, event)
            )
        return await self._provision(
            item.envelope, lambda repo, session: repo.record_email_verified(session, event.user_id)
        )

    async def _provision(self, envelope: Envelope, record_fact: RecordFact) -> Provisioning:
        repo = self.repository

        async def work(session: AsyncClientSession) -> Provisioning:
            user = await record_fact(repo, session)
            return await self.handle_signup_organization(repo, session, user, envelope)

        return await self._commit(work)

    async def _commit(self, work: Callable[[AsyncClientSession], Awaitable[T]]) -> T:
        for attempt in range(1, COMMIT_ATTEMPTS):
            try:
                return await self._runtime.commit(work)
            except OperationFailure as exc:
                if not is_duplicate_key(exc):
                    raise
                log.info("duplicate key at commit, retrying", attempt=attempt, error=str(exc))
        return await self._runtime.commit(work)  # the last failure goes to the retry tiers

    async def handle_signup_organization(
        self,
        repo: OrganizationsRepository,
        session: AsyncClientSession,
        user: User,
        envelope: Envelope,
    ) -> Provisioning:
        """Gate, converge, or create the user's workspace (inside the transaction).

        ``SlugsExhaustedError`` is left to the retry tiers: the next try draws a new suffix.
        """
        if user.email is None:
            return Provisioning("awaiting_signup")
        if not may_provision(self._policy, user):
            return Provisioning("gated")
        existing = await repo.active_organization(session, user)
        if existing is not None:
            await self._publish(session, envelope, user, existing, created=False)
            return Provisioning("converged", existing)
        plan = plan_workspace(self._policy, user.email, user.first_name)
        suggested = await repo.oldest_with_domain(session, plan.domain) if plan.domain else None
        candidates = slug_candidates(plan.slug_base, self._random_suffix)
        slug = first_free_slug(candidates, await repo.taken_slugs(session, candidates))
        organization = await repo.create_workspace(session, plan, slug, user.user_id)
        await repo.set_current_organization(session, user.user_id, organization.id, suggested)
        await self._publish(session, envelope, user, organization, created=True)
        return Provisioning("created", organization, suggested)

    async def _publish(
        self,
        session: AsyncClientSession,
        cause: Envelope,
        user: User,
        organization: Organization,
        *,
        created: bool,
    ) -> None:
        await stage_events(
            self._runtime.db,
            session,
            provisioning_events(cause, user.user_id, organization, created=created),
            aggregate_id=organization.id,
        )

    # -- queries ----------------------------------------------------------------------------
    async def organization_of_user(self, user_id: str) -> OrganizationOfUser | None:
        return await self.repository.organization_of_user(user_id)


def log_handled(envelope: Envelope, result: Provisioning) -> None:
    """A handled user event's outcome, on its message's log line (a line of its own when
    called outside a consumer)."""
    log_outcome(
        log,
        "signup organization handled",
        context=envelope.log_context(),
        outcome=result.outcome,
        organization_id=result.organization.id if result.organization else None,
        suggested_join=result.suggested_join.organization_id if result.suggested_join else None,
    )


def _expect(event: Event, model: type[E]) -> E:
    if not isinstance(event, model):
        raise PermanentError(
            "unexpected_event", f"expected {model.event_type}, got {event.event_type}"
        )
    return event
