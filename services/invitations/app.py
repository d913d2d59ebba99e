"""Composition root of the invitations service: wiring only."""

from __future__ import annotations

from fastapi import FastAPI

from services.invitations import SERVICE, repository
from services.invitations.api import install_invitation_errors, invitations_router
from services.invitations.handlers import Invitations
from services.invitations.mailer import Mailer, build_mailer
from services.invitations.settings import InvitationsSettings
from shared.auth import TokenVerifier
from shared.contracts import InvitationAccepted, UserSignedUp
from shared.http import create_service_app
from shared.limits import BodySizeLimit
from shared.runtime import ServiceRuntime
from shared.topology import WorkQueue

SIGNUPS = WorkQueue(SERVICE, "signups", (UserSignedUp.event_type,))


def build(
    settings: InvitationsSettings, *, mailer: Mailer | None = None
) -> tuple[ServiceRuntime, FastAPI]:
    """The runtime (consumer, outbox relay) and the HTTP app; ``mailer`` replaces the
    settings' mailer (tests record mail with it)."""
    runtime = ServiceRuntime(
        service=SERVICE,
        settings=settings,
        indexes=repository.INDEXES,
        publishes=(InvitationAccepted.event_type,),
    )
    invitations = Invitations(runtime, settings, mailer or build_mailer(settings))
    runtime.subscribe(SIGNUPS, {UserSignedUp.event_type: invitations.on_user_signed_up})
    app = create_service_app(runtime, title="Grantwire invitations")
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_http_body_bytes)  # 413 above it
    install_invitation_errors(app)
    app.include_router(invitations_router(invitations, TokenVerifier.from_settings(settings)))
    app.state.invitations = invitations  # the use cases, for in-process tests and tools
    return runtime, app
