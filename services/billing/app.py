"""Composition root of billing: runtime, work queue, listeners, HTTP routes (``api.py``).
Wiring only."""

from __future__ import annotations

from fastapi import FastAPI

from services.billing import SERVICE, jobs, repository
from services.billing.api import billing_router
from services.billing.handlers import Billing
from services.billing.settings import BillingSettings
from shared.auth import TokenVerifier
from shared.contracts import (
    CreditsGranted,
    InvitationAccepted,
    OrganizationCreated,
    OrganizationProvisioned,
)
from shared.http import create_service_app
from shared.runtime import ServiceRuntime
from shared.topology import WorkQueue

# One queue: the three events share one consumer and its prefetch; no handler relies on order.
GRANTS_QUEUE = WorkQueue(
    SERVICE,
    "grants",
    (
        InvitationAccepted.event_type,
        OrganizationProvisioned.event_type,
        OrganizationCreated.event_type,
    ),
)


def build(settings: BillingSettings) -> tuple[ServiceRuntime, FastAPI]:
    runtime = ServiceRuntime(
        service=SERVICE,
        settings=settings,
        indexes=repository.INDEXES,
        publishes=(CreditsGranted.event_type,),
    )
    billing = Billing(runtime, settings)
    runtime.subscribe(GRANTS_QUEUE, billing.listeners())
    runtime.on_scrape(lambda: jobs.show_job_runs(runtime.db))  # grantwire_job_* gauges
    app = create_service_app(runtime, title="Grantwire billing")
    verifier = TokenVerifier.from_settings(settings)  # no key: every token refused (fail closed)
    app.include_router(billing_router(billing, verifier, admin_role=settings.admin_role))
    app.state.billing = billing  # the use cases, for in-process tests and tools
    return runtime, app
