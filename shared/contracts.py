"""Event contracts: the public payloads other teams code against.

Each event is a pydantic model with its routing key (``event_type``) and a
``major.minor`` schema version. Consumers accept any minor version of a major they
know (unknown fields are ignored) and dead-letter an unknown major version.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")


def normalize_email(value: str) -> str:
    """Lowercase and trim an email, the one comparison form every service uses."""
    return value.strip().lower()


class Event(BaseModel):
    """Base of every event payload (the CloudEvents ``data``)."""

    model_config = ConfigDict(frozen=True, extra="ignore", str_strip_whitespace=True)

    event_type: ClassVar[str]
    schema_version: ClassVar[str] = "1.0"


class UserSignedUp(Event):
    """Published by the identity service when a user signs up."""

    event_type: ClassVar[str] = "user.signed_up"

    user_id: str = Field(min_length=1, max_length=128)
    email: str = Field(max_length=320)
    first_name: str = Field(default="", max_length=200)
    last_name: str = Field(default="", max_length=200)
    email_verified: bool
    invite_token: str | None = Field(default=None, max_length=128)

    @field_validator("email")
    @classmethod
    def _email_is_well_formed(cls, value: str) -> str:
        value = normalize_email(value)
        if not _EMAIL.match(value):
            raise ValueError("email must look like local@domain")
        return value


class UserEmailVerified(Event):
    """Published by the identity service when a user verifies their email."""

    event_type: ClassVar[str] = "user.email_verified"

    user_id: str = Field(min_length=1, max_length=128)


class OrganizationCreated(Event):
    """A new organization exists (published once per organization)."""

    event_type: ClassVar[str] = "organization.created"

    organization_id: str = Field(min_length=1)
    plan_id: str = Field(min_length=1)


class OrganizationProvisioned(Event):
    """A user has an organization; may be published again for the same pair."""

    event_type: ClassVar[str] = "organization.provisioned"

    user_id: str = Field(min_length=1)
    organization_id: str = Field(min_length=1)


class InvitationAccepted(Event):
    """An invitation was accepted; published once per invitation."""

    event_type: ClassVar[str] = "invitation.accepted"

    invitation_id: str = Field(min_length=1)
    email: str
    invited_by: str | None
    accepted_user_id: str = Field(min_length=1)


class CreditsGranted(Event):
    """Billing applied a credit to an organization's ledger."""

    event_type: ClassVar[str] = "billing.credits_granted"

    organization_id: str = Field(min_length=1)
    ref_id: str = Field(min_length=1)
    source: Literal["signup_grant", "referral", "adjustment"]
    amount: int
    balance: int
    expires_at: datetime | None = None
    invitation_id: str | None = None
    side: Literal["referrer", "referee"] | None = None


EVENT_MODELS: dict[str, type[Event]] = {
    model.event_type: model
    for model in (
        UserSignedUp,
        UserEmailVerified,
        OrganizationCreated,
        OrganizationProvisioned,
        InvitationAccepted,
        CreditsGranted,
    )
}


def model_for(event_type: str) -> type[Event]:
    """Return the contract model of an event type; ``KeyError`` when unknown."""
    return EVENT_MODELS[event_type]


def major_version(version: str) -> int:
    """The major part of a ``major.minor`` schema version; ``ValueError`` when malformed."""
    return int(version.split(".", 1)[0])
