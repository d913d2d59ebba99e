"""Invitation rules as plain Python: validity, the create rules and their order, tokens.

No IO here. Times are passed in (``now``), so every rule is a pure function.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from shared.contracts import normalize_email

Status = Literal["pending", "accepted", "revoked"]
Validity = Literal["valid", "accepted", "revoked", "expired"]
AcceptRefusal = Literal[
    "malformed_token",
    "unknown_token",
    "already_accepted",  # by this same user: a replayed signup
    "accepted_by_another_user",
    "revoked",
    "expired",
    "email_mismatch",
    "claimed_by_another_signup",
]

TOKEN_BYTES = 20
_TOKEN = re.compile(rf"[0-9a-f]{{{TOKEN_BYTES * 2}}}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
MAX_EMAIL_LENGTH = 320


# -- errors (mapped to HTTP statuses once, at the edge) ------------------------------------
class InvitationError(Exception):
    """A request the invitation rules refuse; ``code`` is the stable error code."""

    code = "invitation_error"


class InvalidEmail(InvitationError):
    code = "invalid_email"


class SelfInvite(InvitationError):
    code = "self_invite"


class AlreadyAUser(InvitationError):
    code = "already_a_user"


class DuplicatePendingInvitation(InvitationError):
    code = "duplicate_pending_invitation"


class InviteCapReached(InvitationError):
    code = "invite_cap_reached"


class RateLimited(InvitationError):
    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InvitationNotFound(InvitationError):
    code = "not_found"


class NotPending(InvitationError):
    code = "not_pending"


class InvitationExpired(InvitationError):
    code = "invitation_expired"


class NoMailer(InvitationError):
    code = "no_mailer"


class NotAllowed(InvitationError):
    code = "forbidden"


class MailNotSent(InvitationError):
    code = "mail_failed"


# -- the invitation ------------------------------------------------------------------------
@dataclass(frozen=True)
class Invitation:
    """One invitation; ``email`` is normalized; ``token`` is the secret the invitee holds."""

    id: str
    email: str
    token: str
    invited_by: str | None
    created_at: datetime
    expires_at: datetime
    status: Status = "pending"
    accepted_at: datetime | None = None
    accepted_user_id: str | None = None
    revoked_at: datetime | None = None
    claimed_at: datetime | None = None
    claimed_by: str | None = None
    inviter_email: str | None = None  # for the mail text only


def new_token() -> str:
    """40 hex characters from 20 random bytes."""
    return secrets.token_hex(TOKEN_BYTES)


def is_well_formed_token(value: str) -> bool:
    """True for exactly 40 lowercase hex characters (what ``new_token`` makes)."""
    return bool(_TOKEN.fullmatch(value))


def is_email(value: str) -> bool:
    """A plausible address: ``local@domain.tld`` without spaces, at most 320 characters."""
    return len(value) <= MAX_EMAIL_LENGTH and bool(_EMAIL.fullmatch(value))


def new_invitation(
    *,
    invitation_id: str,
    email: str,
    invited_by: str | None,
    inviter_email: str | None,
    now: datetime,
    ttl: timedelta,
) -> Invitation:
    """A pending invitation for ``email`` (normalized) expiring ``ttl`` from ``now``."""
    return Invitation(
        id=invitation_id,
        email=normalize_email(email),
        token=new_token(),
        invited_by=invited_by,
        created_at=now,
        expires_at=now + ttl,
        inviter_email=inviter_email,
    )


def validity(invitation: Invitation, now: datetime) -> Validity:
    """Whether the invite can still be accepted; past ``expires_at`` a pending one cannot."""
    if invitation.status != "pending":
        return invitation.status
    return "valid" if now < invitation.expires_at else "expired"


def is_claim_stale(claimed_at: datetime | None, now: datetime, stale_after: timedelta) -> bool:
    """An unclaimed invite, or a claim older than ``stale_after`` that never finalized."""
    return claimed_at is None or claimed_at <= now - stale_after


def accept_refusal(
    invitation: Invitation | None,
    *,
    email: str,
    user_id: str,
    now: datetime,
    stale_after: timedelta,
) -> AcceptRefusal | None:
    """Why a signup (``user_id``, ``email``) cannot claim ``invitation``; None when it can.

    The claim in the database applies the same conditions atomically; this function names
    the reason when it matched nothing. A claim held by the same user is resumable: a
    redelivered signup finishes what its first delivery started.
    """
    if invitation is None:
        return "unknown_token"
    if invitation.status == "accepted":
        same_user = invitation.accepted_user_id == user_id
        return "already_accepted" if same_user else "accepted_by_another_user"
    if invitation.status == "revoked":
        return "revoked"
    if validity(invitation, now) == "expired":
        return "expired"
    if invitation.email != normalize_email(email):
        return "email_mismatch"
    held_by_other = invitation.claimed_by not in (None, user_id)
    if held_by_other and not is_claim_stale(invitation.claimed_at, now, stale_after):
        return "claimed_by_another_signup"
    return None


# -- creating ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CreatePolicy:
    """Per-inviter limits: ``lifetime_cap`` None = off, 0 = nobody; ``rate_limit`` None = off."""

    lifetime_cap: int | None
    rate_limit: int | None
    rate_window: timedelta

    def __post_init__(self) -> None:
        if self.lifetime_cap is not None and self.lifetime_cap < 0:
            raise ValueError("lifetime_cap must be None or >= 0")
        if self.rate_limit is not None and self.rate_limit < 1:
            raise ValueError("rate_limit must be None or >= 1")
        if self.rate_window <= timedelta(0):
            raise ValueError("rate_window must be positive")


@dataclass(frozen=True)
class CreateFacts:
    """What the database says at the moment of the create.

    ``recent_created`` holds the creation times of the inviter's invites inside the rate
    window, newest first; only the newest ``rate_limit`` of them matter.
    """

    email_is_user: bool
    live_pending_exists: bool
    invites_ever: int
    recent_created: Sequence[datetime]


def check_create(
    *, inviter_email: str, email: str, facts: CreateFacts, policy: CreatePolicy, now: datetime
) -> None:
    """Raise the first rule a new invite breaks, in this order (the API's contract):

    self-invite (422), invalid email (422), existing user (422), live pending invite for the
    email (409), lifetime cap (403), rate limit (429).
    """
    email = normalize_email(email)
    if email == normalize_email(inviter_email):
        raise SelfInvite("you cannot invite yourself")
    if not is_email(email):
        raise InvalidEmail(f"{email!r} is not an email address")
    if facts.email_is_user:
        raise AlreadyAUser(f"{email} already belongs to a user")
    if facts.live_pending_exists:
        raise DuplicatePendingInvitation(f"{email} already has a pending invitation")
    cap = policy.lifetime_cap
    if cap is not None and facts.invites_ever >= cap:
        raise InviteCapReached(f"the limit of {cap} invitations per member is reached")
    retry_after = rate_limit_retry_after(
        facts.recent_created, limit=policy.rate_limit, window=policy.rate_window, now=now
    )
    if retry_after is not None:
        raise RateLimited(
            f"at most {policy.rate_limit} invitations per {int(policy.rate_window.total_seconds())}"
            " s; try again later",
            retry_after,
        )


def rate_limit_retry_after(
    recent_newest_first: Sequence[datetime],
    *,
    limit: int | None,
    window: timedelta,
    now: datetime,
) -> float | None:
    """Seconds until one more invite fits the window, or None when it fits now."""
    if limit is None or len(recent_newest_first) < limit:
        return None
    # Once the limit-th newest invite leaves the window, fewer than ``limit`` remain in it.
    frees_at = recent_newest_first[limit - 1] + window
    return (frees_at - now).total_seconds() if frees_at > now else None


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` in whole seconds, rounded up, at least 1."""
    whole = int(seconds)
    return str(max(1, whole + (1 if seconds > whole else 0)))
