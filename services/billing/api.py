"""Billing's read API: an organization's balance and ledger, for its members and admins.

Every route needs a bearer JWT (``shared.auth``): 401 without a valid one. A caller may
read an organization when the token has the admin role (``GRANTWIRE_ADMIN_ROLE``), or when
that organization is the caller's current organization in billing's own ``memberships``
projection (built from ``organization.provisioned``: the organization provisioned most
recently for the token's ``sub``); 403 otherwise. Organization claims in the token are
not consulted: the identity provider does not know organizations, and the projection
follows a user who moves to another organization. Errors are ``{"error", "message"}``.
"""

# No ``from __future__ import annotations`` here: FastAPI resolves route annotations from
# module globals, and the auth dependencies are built per app inside ``billing_router``.
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from services.billing.domain import MAX_LEDGER_PAGE, InvalidCursorError
from services.billing.handlers import Billing
from shared.auth import Principal, TokenVerifier, bearer_principal
from shared.http import ApiError
from shared.mongo import Document


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
    def of(cls, doc: Document) -> "LedgerEntry":
        return cls(id=str(doc["_id"]), **{k: v for k, v in doc.items() if k in cls.model_fields})


class LedgerPage(BaseModel):
    organization_id: str
    entries: list[LedgerEntry]
    next_cursor: str | None


def billing_router(billing: Billing, verifier: TokenVerifier, *, admin_role: str) -> APIRouter:
    """``/organizations/{id}/balance`` and ``/ledger``, for members of that organization and
    admins."""
    router = APIRouter(tags=["billing"])
    authenticated = bearer_principal(verifier)

    async def reader(
        organization_id: str, caller: Annotated[Principal, Depends(authenticated)]
    ) -> Principal:
        if caller.has_role(admin_role):
            return caller
        current = await billing.store.organizations_of([caller.user_id])
        if current.get(caller.user_id) != organization_id:
            raise ApiError(403, "forbidden", "only members of this organization may read it")
        return caller

    Reader = Annotated[Principal, Depends(reader)]

    @router.get("/organizations/{organization_id}/balance")
    async def balance(organization_id: str, _caller: Reader) -> Balance:
        """The organization's balance; 0 for an organization without ledger entries."""
        return Balance(
            organization_id=organization_id, balance=await billing.balance(organization_id)
        )

    @router.get("/organizations/{organization_id}/ledger")
    async def ledger(
        organization_id: str,
        _caller: Reader,
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
