"""Composition root of billing: runtime, work queue, listeners, HTTP routes. Wiring only."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, FastAPI, Query
from pydantic import BaseModel

from services.billing import repository
from services.billing.domain import MAX_LEDGER_PAGE, InvalidCursorError
from services.billing.handlers import SERVICE, Billing
from services.billing.settings import BillingSettings
from shared.contracts import (
    CreditsGranted,
    InvitationAccepted,
    OrganizationCreated,
    OrganizationProvisioned,
)
from shared.http import ApiError, create_service_app
from shared.mongo import Document
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


class Balance(BaseModel):
    organization_id: str
    balance: int


class LedgerEntry(BaseModel):
    id: str
    ref_id: str
    kind: str
    amount: int
    source: str
    at: datetime
    expires_at: datetime | None = None
    invitation_id: str | None = None
    side: str | None = None

    @classmethod
    def of(cls, doc: Document) -> LedgerEntry:
        return cls(id=str(doc["_id"]), **{k: v for k, v in doc.items() if k in cls.model_fields})


class LedgerPage(BaseModel):
    organization_id: str
    entries: list[LedgerEntry]
    next_cursor: str | None


def routes(billing: Billing) -> APIRouter:
    router = APIRouter(tags=["billing"])

    @router.get("/organizations/{organization_id}/balance")
    async def balance(organization_id: str) -> Balance:
        """The organization's balance; 0 for an organization without ledger entries."""
        return Balance(
            organization_id=organization_id, balance=await billing.balance(organization_id)
        )

    @router.get("/organizations/{organization_id}/ledger")
    async def ledger(
        organization_id: str,
        limit: Annotated[int, Query(ge=1, le=MAX_LEDGER_PAGE)] = 50,
        cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    ) -> LedgerPage:
        """Ledger entries, newest first; follow ``next_cursor`` for older ones."""
        try:
            page = await billing.ledger_page(organization_id, limit, cursor)
        except InvalidCursorError as exc:
            raise ApiError(422, "invalid_cursor", str(exc)) from exc
        return LedgerPage(
            organization_id=organization_id,
            entries=[LedgerEntry.of(doc) for doc in page.entries],
            next_cursor=page.next_cursor,
        )

    return router


def build(settings: BillingSettings) -> tuple[ServiceRuntime, FastAPI]:
    runtime = ServiceRuntime(
        service=SERVICE,
        settings=settings,
        indexes=repository.INDEXES,
        publishes=(CreditsGranted.event_type,),
    )
    billing = Billing(runtime, settings)
    runtime.subscribe(GRANTS_QUEUE, billing.listeners())
    app = create_service_app(runtime, title="Grantwire billing")
    app.include_router(routes(billing))
    app.state.billing = billing  # the use cases, for in-process tests and tools
    return runtime, app
