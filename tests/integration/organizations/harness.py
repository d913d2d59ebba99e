"""What the organizations integration tests share: events to send, state to read."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from services.organizations.handlers import SignupOrganizations
from services.organizations.repository import MEMBERSHIPS, ORGANIZATIONS, USERS
from shared.contracts import UserEmailVerified, UserSignedUp
from shared.envelope import Envelope
from shared.mongo import Document
from shared.outbox import OUTBOX
from shared.runtime import ServiceRuntime
from tests.support import EventTap


def signup(
    user_id: str, email: str, *, first_name: str = "Ada", verified: bool = True
) -> UserSignedUp:
    return UserSignedUp(
        user_id=user_id,
        email=email,
        first_name=first_name,
        last_name="Lovelace",
        email_verified=verified,
    )


def verified(user_id: str) -> UserEmailVerified:
    return UserEmailVerified(user_id=user_id)


def envelope(event: UserSignedUp | UserEmailVerified) -> Envelope:
    return Envelope.new(event, source="identity-tests")


@dataclass(frozen=True)
class StagedEvent:
    type: str
    data: dict[str, Any]
    causation_id: str | None
    correlation_id: str
    aggregate_id: str


@dataclass
class Harness:
    """The service's use cases on a started runtime (real database, no consumers)."""

    runtime: ServiceRuntime
    organizations: SignupOrganizations
    published: EventTap  # what the relay published (events are routable through it)

    @property
    def db(self) -> AsyncDatabase[Document]:
        return self.runtime.db


async def all_organizations(db: AsyncDatabase[Document]) -> list[Document]:
    return await db[ORGANIZATIONS].find().sort("created_at").to_list()


async def all_memberships(db: AsyncDatabase[Document]) -> list[Document]:
    return await db[MEMBERSHIPS].find().sort("created_at").to_list()


async def user_doc(db: AsyncDatabase[Document], user_id: str) -> Document | None:
    return await db[USERS].find_one({"_id": user_id})


async def staged_events(db: AsyncDatabase[Document]) -> list[StagedEvent]:
    """Every event the service committed to its outbox, in commit order."""
    docs = await db[OUTBOX].find().sort("_id").to_list()
    return [
        StagedEvent(
            type=doc["type"],
            data=json.loads(bytes(doc["body"])),
            causation_id=doc["causation_id"],
            correlation_id=doc["correlation_id"],
            aggregate_id=doc["aggregate_id"],
        )
        for doc in docs
    ]


StartHarness = Callable[..., Awaitable[Harness]]
