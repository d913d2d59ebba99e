"""HTTP API of the invitations service: request/response shapes, auth, error mapping.

Every error leaves as ``{"error": code, "message": text}``. Only the verify route is
public; the others need a bearer JWT (401 without a valid one, 403 when not allowed).
"""

# No ``from __future__ import annotations`` here: FastAPI resolves route annotations from
# module globals, and the auth dependency is built per app inside ``invitations_router``.
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from services.invitations.domain import (
    AlreadyAUser,
    DuplicatePendingInvitation,
    InvalidEmail,
    Invitation,
    InvitationError,
    InvitationExpired,
    InvitationNotFound,
    InviteCapReached,
    MailNotSent,
    NoMailer,
    NotAllowed,
    NotPending,
    RateLimited,
    SelfInvite,
    retry_after_header,
)
from services.invitations.handlers import Invitations
from shared.auth import Principal, TokenVerifier, bearer_principal

HTTP_STATUS: dict[type[InvitationError], int] = {
    SelfInvite: 422,
    InvalidEmail: 422,
    AlreadyAUser: 422,
    DuplicatePendingInvitation: 409,
    InviteCapReached: 403,
    RateLimited: 429,
    InvitationNotFound: 404,
    NotAllowed: 403,
    NotPending: 409,
    InvitationExpired: 409,
    NoMailer: 422,
    MailNotSent: 502,
}


class CreateInvitation(BaseModel):
    email: str = Field(min_length=1, max_length=320)
    send_email: bool = True


class InvitationView(BaseModel):
    """An invitation as the API shows it: never its token."""

    id: str
    email: str
    status: str
    expired: bool
    invited_by: str | None
    created_at: datetime
    expires_at: datetime
    accepted_at: datetime | None
    accepted_user_id: str | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, invitation: Invitation) -> "InvitationView":
        return cls(
            id=invitation.id,
            email=invitation.email,
            status=invitation.status,
            expired=invitation.status == "pending" and invitation.expires_at <= datetime.now(UTC),
            invited_by=invitation.invited_by,
            created_at=invitation.created_at,
            expires_at=invitation.expires_at,
            accepted_at=invitation.accepted_at,
            accepted_user_id=invitation.accepted_user_id,
            revoked_at=invitation.revoked_at,
        )


class CreatedInvitation(InvitationView):
    """The create response: the only place the token is ever returned."""

    token: str
    mail_sent: bool


class InvitationPage(BaseModel):
    invitations: list[InvitationView]
    next_before: str | None  # pass as ``before`` for the next (older) page


class VerificationView(BaseModel):
    valid: bool
    reason: str  # valid | unknown | expired | accepted | revoked
    email: str | None
    expires_at: datetime | None


def invitations_router(invitations: Invitations, verifier: TokenVerifier) -> APIRouter:
    """The ``/invitations`` routes over the use cases."""
    router = APIRouter(prefix="/invitations", tags=["invitations"])
    Caller = Annotated[Principal, Depends(bearer_principal(verifier))]

    @router.post("", status_code=201, response_model=CreatedInvitation)
    async def create(body: CreateInvitation, caller: Caller) -> CreatedInvitation:
        created = await invitations.create(caller, body.email, send_mail=body.send_email)
        view = InvitationView.of(created.invitation).model_dump()
        return CreatedInvitation(
            **view, token=created.invitation.token, mail_sent=created.mail_sent
        )

    @router.get("", response_model=InvitationPage)
    async def list_invitations(
        caller: Caller,
        before: Annotated[str | None, Query(max_length=24)] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
    ) -> InvitationPage:
        page = await invitations.list_for(caller, before=before, limit=limit)
        return InvitationPage(
            invitations=[InvitationView.of(inv) for inv in page],
            next_before=page[-1].id if len(page) == limit else None,
        )

    @router.get("/verify/{token}", response_model=VerificationView)
    async def verify(token: str) -> VerificationView:
        result = await invitations.verify(token)
        invitation = result.invitation
        return VerificationView(
            valid=result.valid,
            reason=result.reason,
            email=invitation.email if invitation else None,
            expires_at=invitation.expires_at if invitation else None,
        )

    @router.delete("/{invitation_id}", response_model=InvitationView)
    async def revoke(invitation_id: str, caller: Caller) -> InvitationView:
        return InvitationView.of(await invitations.revoke(caller, invitation_id))

    @router.post("/{invitation_id}/resend", response_model=InvitationView)
    async def resend(invitation_id: str, caller: Caller) -> InvitationView:
        return InvitationView.of(await invitations.resend(caller, invitation_id))

    return router


def install_invitation_errors(app: FastAPI) -> None:
    """Map the invitation rules' errors to their HTTP status, once, at the edge."""

    @app.exception_handler(InvitationError)
    async def _refused(_: Request, exc: InvitationError) -> JSONResponse:
        headers = {}
        if isinstance(exc, RateLimited):
            headers["Retry-After"] = retry_after_header(exc.retry_after_s)
        return JSONResponse(
            {"error": exc.code, "message": str(exc)},
            status_code=HTTP_STATUS.get(type(exc), 400),
            headers=headers,
        )
