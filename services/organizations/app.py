"""Composition root of the organizations service: queue, handlers, HTTP routes."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from services.organizations import SERVICE
from services.organizations.handlers import SignupOrganizations
from services.organizations.repository import INDEXES
from services.organizations.settings import OrganizationsSettings
from shared.contracts import (
    OrganizationCreated,
    OrganizationProvisioned,
    UserEmailVerified,
    UserSignedUp,
)
from shared.http import ApiError, create_service_app
from shared.runtime import ServiceRuntime
from shared.topology import WorkQueue

USERS_QUEUE = WorkQueue(SERVICE, "users", (UserSignedUp.event_type, UserEmailVerified.event_type))


class SuggestedJoinView(BaseModel):
    organization_id: str
    name: str


class OrganizationOfUserView(BaseModel):
    organization_id: str
    name: str
    slug: str
    domain: str | None
    plan_id: str
    role: str
    suggested_join: SuggestedJoinView | None


def build(settings: OrganizationsSettings) -> tuple[ServiceRuntime, FastAPI]:
    runtime = ServiceRuntime(
        service=SERVICE,
        settings=settings,
        indexes=INDEXES,
        publishes=(OrganizationCreated.event_type, OrganizationProvisioned.event_type),
    )
    organizations = SignupOrganizations(
        runtime,
        settings.policy(),
        batch_max=settings.provision_batch_max,
        batch_concurrency=settings.provision_batch_concurrency,
    )
    runtime.subscribe(
        USERS_QUEUE,
        {
            UserSignedUp.event_type: organizations.on_user_signed_up,
            UserEmailVerified.event_type: organizations.on_user_email_verified,
        },
    )
    app = create_service_app(runtime, title="Grantwire organizations")

    @app.get("/users/{user_id}/organization", response_model=OrganizationOfUserView)
    async def organization_of_user(user_id: str) -> OrganizationOfUserView:
        found = await organizations.organization_of_user(user_id)
        if found is None:
            raise ApiError(404, "not_found", f"user {user_id!r} has no organization yet")
        hint = found.suggested_join
        return OrganizationOfUserView(
            organization_id=found.organization.id,
            name=found.organization.name,
            slug=found.organization.slug,
            domain=found.organization.domain,
            plan_id=found.organization.plan_id,
            role=found.role,
            suggested_join=SuggestedJoinView(organization_id=hint.organization_id, name=hint.name)
            if hint
            else None,
        )

    return runtime, app
