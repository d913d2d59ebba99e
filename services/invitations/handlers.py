"""Use cases of the invitations service: one method each, called by the API or the consumer."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import structlog
from bson import ObjectId
from pymongo.asynchronous.client_session import AsyncClientSession

from services.invitations import SERVICE
from services.invitations.domain import (
    CreateFacts,
    Invitation,
    InvitationExpired,
    InvitationNotFound,
    MailNotSent,
    NoMailer,
    NotAllowed,
    NotPending,
    Validity,
    accept_refusal,
    check_create,
    is_well_formed_token,
    new_invitation,
    validity,
)
from services.invitations.mailer import InvitationMail, Mailer
from services.invitations.repository import InvitationRepository
from services.invitations.settings import InvitationsSettings
from shared.auth import Principal
from shared.contracts import Event, InvitationAccepted, UserSignedUp, normalize_email
from shared.envelope import Envelope
from shared.logging import log_outcome
from shared.outbox import stage_events
from shared.runtime import ServiceRuntime

log = structlog.get_logger("grantwire.invitations")


def utcnow() -> datetime:
    """Now, to the millisecond MongoDB stores, so responses equal what is read back later."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


@dataclass(frozen=True)
class Created:
    invitation: Invitation
    mail_sent: bool


@dataclass(frozen=True)
class Verification:
    valid: bool
    reason: Validity | Literal["unknown"]
    invitation: Invitation | None


class Invitations:
    """The invitations use cases over one service runtime (database and outbox)."""

    def __init__(
        self, runtime: ServiceRuntime, settings: InvitationsSettings, mailer: Mailer | None
    ) -> None:
        self._runtime = runtime
        self._settings = settings
        self._mailer = mailer

    @property
    def _repo(self) -> InvitationRepository:
        return InvitationRepository(self._runtime.db)  # the database exists once started

    def is_admin(self, principal: Principal) -> bool:
        return self._settings.admin_role in principal.roles

    # -- HTTP use cases --------------------------------------------------------------------
    async def create(self, principal: Principal, email: str, *, send_mail: bool) -> Created:
        """Create an invite under the create rules; mail it when asked and a mailer exists."""
        repo, settings = self._repo, self._settings
        email = normalize_email(email)

        async def work(session: AsyncClientSession) -> Invitation:
            now = utcnow()
            policy = settings.create_policy()
            await repo.lock_inviter(principal.user_id, now, session)
            facts = CreateFacts(
                email_is_user=await repo.email_is_user(email, session),
                live_pending_exists=await repo.live_pending_exists(email, now, session),
                invites_ever=(
                    await repo.count_by_inviter(principal.user_id, session)
                    if policy.lifetime_cap is not None
                    else 0
                ),
                recent_created=(
                    await repo.created_since(
                        principal.user_id, now - policy.rate_window, policy.rate_limit, session
                    )
                    if policy.rate_limit is not None
                    else []
                ),
            )
            check_create(
                inviter_email=principal.email, email=email, facts=facts, policy=policy, now=now
            )
            invitation = new_invitation(
                invitation_id=str(ObjectId()),
                email=email,
                invited_by=principal.user_id,
                inviter_email=normalize_email(principal.email),
                now=now,
                ttl=settings.invite_ttl(),
            )
            await repo.insert(invitation, session)
            return invitation

        invitation = await self._runtime.commit(work)
        log.info("invitation created", invitation_id=invitation.id, invited_by=principal.user_id)
        mail_sent = False
        if send_mail and self._mailer is not None:
            try:
                await self._mailer.send_invitation(self._mail(invitation))
                mail_sent = True
            except Exception:
                # The invite exists and its token is in the response: shared by hand or resent.
                log.exception("invitation mail failed", invitation_id=invitation.id)
        return Created(invitation, mail_sent)

    async def list_for(
        self, principal: Principal, *, before: str | None, limit: int
    ) -> list[Invitation]:
        """Admins see every invite, others the invites they sent; newest first."""
        invited_by = None if self.is_admin(principal) else principal.user_id
        return await self._repo.newest_first(invited_by=invited_by, before=before, limit=limit)

    async def revoke(self, principal: Principal, invitation_id: str) -> Invitation:
        """Revoke a pending invite (its inviter or an admin); never an accepted one."""
        repo = self._repo
        invitation = await self._visible(principal, invitation_id)
        revoked = await repo.revoke(invitation.id, utcnow())
        if revoked is None:
            current = await repo.get(invitation.id) or invitation
            raise NotPending(f"only a pending invitation can be revoked; it is {current.status}")
        log.info("invitation revoked", invitation_id=invitation.id, by=principal.user_id)
        return revoked

    async def resend(self, principal: Principal, invitation_id: str) -> Invitation:
        """Mail a pending, unexpired invite again with the same token (admins only)."""
        if not self.is_admin(principal):
            raise NotAllowed("only an admin may resend an invitation")
        if self._mailer is None:
            raise NoMailer("no mailer is configured (GRANTWIRE_MAILER=none)")
        invitation = await self._visible(principal, invitation_id)
        if invitation.status != "pending":
            raise NotPending(f"only a pending invitation can be resent; it is {invitation.status}")
        if validity(invitation, utcnow()) == "expired":
            raise InvitationExpired("the invitation has expired; create a new one")
        try:
            await self._mailer.send_invitation(self._mail(invitation))
        except Exception as exc:
            log.exception("invitation mail failed", invitation_id=invitation.id)
            raise MailNotSent(f"the mail could not be sent: {type(exc).__name__}") from exc
        log.info("invitation resent", invitation_id=invitation.id, by=principal.user_id)
        return invitation

    async def verify(self, token: str) -> Verification:
        """Public: whether a token can still be used, and the email it is pinned to."""
        invitation = await self._repo.by_token(token) if is_well_formed_token(token) else None
        if invitation is None:
            return Verification(False, "unknown", None)
        state = validity(invitation, utcnow())
        return Verification(state == "valid", state, invitation)

    # -- message handlers ------------------------------------------------------------------
    async def on_user_signed_up(self, event: Event, envelope: Envelope) -> None:
        """Record the user; with an invite token, claim then accept the invite.

        A token that cannot be accepted (unknown, revoked, expired, another email, already
        accepted) is a valid message with nothing to do: logged with the reason, acked.
        """
        assert isinstance(event, UserSignedUp)
        repo, settings = self._repo, self._settings
        bound = log.bind(**envelope.log_context(), user_id=event.user_id)
        await repo.record_user(event.user_id, event.email, utcnow())
        token = event.invite_token
        if token is None:
            return
        if not is_well_formed_token(token):
            bound.warning("invitation not accepted", reason="malformed_token")
            return
        now = utcnow()
        stale_after = settings.claim_stale_after()
        claimed = await repo.claim(
            token=token, email=event.email, user_id=event.user_id, now=now, stale_after=stale_after
        )
        if claimed is None:
            current = await repo.by_token(token)
            reason = accept_refusal(
                current, email=event.email, user_id=event.user_id, now=now, stale_after=stale_after
            )
            bound.warning(
                "invitation not accepted",
                reason=reason or "claim_race",
                invitation_id=current.id if current else None,
            )
            return
        accepted = envelope.caused(
            InvitationAccepted(
                invitation_id=claimed.id,
                email=claimed.email,
                invited_by=claimed.invited_by,
                accepted_user_id=event.user_id,
            ),
            source=SERVICE,
        )

        async def finalize(session: AsyncClientSession) -> bool:
            done = await repo.finalize(
                claimed.id, user_id=event.user_id, now=utcnow(), session=session
            )
            if done:
                await stage_events(self._runtime.db, session, [accepted], aggregate_id=claimed.id)
            return done

        if await self._runtime.commit(finalize):
            log_outcome(
                log,
                "invitation accepted",
                context={**envelope.log_context(), "user_id": event.user_id},
                invitation_id=claimed.id,
            )
        else:
            # Revoked or finalized by a concurrent delivery between the claim and now.
            bound.warning("invitation not accepted", reason="claim_lost", invitation_id=claimed.id)

    # -- helpers -----------------------------------------------------------------------------
    async def _visible(self, principal: Principal, invitation_id: str) -> Invitation:
        invitation = await self._repo.get(invitation_id)
        if invitation is None:
            raise InvitationNotFound(f"no invitation {invitation_id!r}")
        if not self.is_admin(principal) and invitation.invited_by != principal.user_id:
            raise NotAllowed("only the inviter or an admin may change this invitation")
        return invitation

    def _mail(self, invitation: Invitation) -> InvitationMail:
        return InvitationMail(
            invitation_id=invitation.id,
            to=invitation.email,
            link=self._settings.invite_url_template.replace("{token}", invitation.token),
            inviter_email=invitation.inviter_email,
            expires_at=invitation.expires_at,
        )
