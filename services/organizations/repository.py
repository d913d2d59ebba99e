"""MongoDB access of the organizations service: users projection, organizations, memberships."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from bson import ObjectId
from pymongo import ASCENDING, IndexModel, ReturnDocument, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase

from services.organizations.domain import (
    MEMBERSHIP_ACTIVE,
    PLAN_FREE,
    ROLE_OWNER,
    Organization,
    SuggestedJoin,
    User,
    WorkspacePlan,
)
from shared.contracts import UserEmailVerified, UserSignedUp
from shared.mongo import Document

USERS = "users"
ORGANIZATIONS = "organizations"
MEMBERSHIPS = "memberships"

INDEXES: dict[str, list[IndexModel]] = {
    USERS: [],
    ORGANIZATIONS: [
        IndexModel([("slug", ASCENDING)], unique=True, name="slug_unique"),
        IndexModel([("domain", ASCENDING), ("created_at", ASCENDING)], name="domain_oldest"),
    ],
    MEMBERSHIPS: [
        IndexModel(
            [("user_id", ASCENDING), ("organization_id", ASCENDING)],
            unique=True,
            name="user_organization_unique",
        ),
    ],
}


@dataclass(frozen=True)
class OrganizationOfUser:
    """What the HTTP API shows: the user's current organization and their place in it."""

    organization: Organization
    role: str
    suggested_join: SuggestedJoin | None


class OrganizationsRepository:
    """Every read and write of the service; writes take the transaction's session."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._users = db[USERS]
        self._organizations = db[ORGANIZATIONS]
        self._memberships = db[MEMBERSHIPS]

    # -- users projection ---------------------------------------------------------------
    # Both writes bump `version`: concurrent transactions for one user conflict on this
    # document first, so the driver retries the loser, which then sees the winner's work.
    async def record_signup(self, session: AsyncClientSession, event: UserSignedUp) -> User:
        doc = await self._users.find_one_and_update(
            {"_id": event.user_id},
            _user_fact_update(event, datetime.now(UTC)),
            upsert=True,
            return_document=ReturnDocument.AFTER,
            session=session,
        )
        return _user(doc)

    async def record_email_verified(self, session: AsyncClientSession, user_id: str) -> User:
        doc = await self._users.find_one_and_update(
            {"_id": user_id},
            _user_fact_update(UserEmailVerified(user_id=user_id), datetime.now(UTC)),
            upsert=True,
            return_document=ReturnDocument.AFTER,
            session=session,
        )
        return _user(doc)

    async def record_user_facts(
        self, session: AsyncClientSession, events: Sequence[UserSignedUp | UserEmailVerified]
    ) -> dict[str, User]:
        """``record_signup`` / ``record_email_verified`` for many users (at most one event
        each) in two round trips: the writes, then the users read back."""
        now = datetime.now(UTC)
        await self._users.bulk_write(
            [UpdateOne({"_id": e.user_id}, _user_fact_update(e, now), upsert=True) for e in events],
            ordered=False,
            session=session,
        )
        docs = self._users.find({"_id": {"$in": [e.user_id for e in events]}}, session=session)
        return {doc["_id"]: _user(doc) async for doc in docs}

    async def set_current_organization(
        self,
        session: AsyncClientSession,
        user_id: str,
        organization_id: str,
        suggested_join: SuggestedJoin | None,
    ) -> None:
        await self._users.update_one(
            {"_id": user_id},
            _current_organization_update(organization_id, suggested_join),
            session=session,
        )

    async def set_current_organizations(
        self,
        session: AsyncClientSession,
        changes: Sequence[tuple[str, str, SuggestedJoin | None]],
    ) -> None:
        """``set_current_organization`` for many (user, organization, hint) in one round trip."""
        if changes:
            await self._users.bulk_write(
                [
                    UpdateOne({"_id": user_id}, _current_organization_update(org_id, hint))
                    for user_id, org_id, hint in changes
                ],
                ordered=False,
                session=session,
            )

    # -- organizations and memberships --------------------------------------------------
    async def active_organization(
        self, session: AsyncClientSession, user: User
    ) -> Organization | None:
        """The user's current organization if active, else their oldest active one."""
        memberships = await (
            self._memberships.find(
                {"user_id": user.user_id, "status": MEMBERSHIP_ACTIVE}, session=session
            )
            .sort([("created_at", ASCENDING), ("_id", ASCENDING)])
            .to_list()
        )
        if not memberships:
            return None
        chosen = _chosen_membership(memberships, user.current_organization_id)
        return await self.organization(chosen["organization_id"], session=session)

    async def active_organizations(
        self, session: AsyncClientSession, users: Sequence[User]
    ) -> dict[str, Organization]:
        """``active_organization`` of many users in one round trip (user id -> organization;
        users without one are absent)."""
        if not users:
            return {}
        cursor = await self._memberships.aggregate(
            [
                {
                    "$match": {
                        "user_id": {"$in": [u.user_id for u in users]},
                        "status": MEMBERSHIP_ACTIVE,
                    }
                },
                {"$sort": {"created_at": 1, "_id": 1}},
                {
                    "$lookup": {
                        "from": ORGANIZATIONS,
                        "localField": "organization_id",
                        "foreignField": "_id",
                        "as": "organization",
                    }
                },
            ],
            session=session,
        )
        memberships: dict[str, list[Document]] = {}
        async for row in cursor:
            memberships.setdefault(row["user_id"], []).append(row)
        found: dict[str, Organization] = {}
        for user in users:
            if user.user_id in memberships:
                chosen = _chosen_membership(memberships[user.user_id], user.current_organization_id)
                if chosen["organization"]:  # as on the single path: a lost organization is none
                    found[user.user_id] = _organization(chosen["organization"][0])
        return found

    async def organization(
        self, organization_id: str, *, session: AsyncClientSession | None = None
    ) -> Organization | None:
        doc = await self._organizations.find_one({"_id": organization_id}, session=session)
        return _organization(doc) if doc else None

    async def oldest_with_domain(
        self, session: AsyncClientSession, domain: str
    ) -> SuggestedJoin | None:
        doc = await self._organizations.find_one(
            {"domain": domain},
            sort=[("created_at", ASCENDING), ("_id", ASCENDING)],
            projection={"name": 1},
            session=session,
        )
        return SuggestedJoin(organization_id=doc["_id"], name=doc["name"]) if doc else None

    async def oldest_with_domains(
        self, session: AsyncClientSession, domains: Sequence[str]
    ) -> dict[str, SuggestedJoin]:
        """``oldest_with_domain`` for many domains in one round trip (domain -> oldest)."""
        if not domains:
            return {}
        cursor = await self._organizations.aggregate(
            [
                {"$match": {"domain": {"$in": list(domains)}}},
                {"$sort": {"domain": 1, "created_at": 1, "_id": 1}},
                {
                    "$group": {
                        "_id": "$domain",
                        "organization_id": {"$first": "$_id"},
                        "name": {"$first": "$name"},
                    }
                },
            ],
            session=session,
        )
        return {
            row["_id"]: SuggestedJoin(organization_id=row["organization_id"], name=row["name"])
            async for row in cursor
        }

    async def taken_slugs(self, session: AsyncClientSession, slugs: Sequence[str]) -> set[str]:
        docs = self._organizations.find(
            {"slug": {"$in": list(slugs)}}, projection={"slug": 1}, session=session
        )
        return {doc["slug"] async for doc in docs}

    async def create_workspace(
        self, session: AsyncClientSession, plan: WorkspacePlan, slug: str, owner_id: str
    ) -> Organization:
        """A new free organization with ``owner_id`` as its active owner."""
        organization = new_organization(plan, slug)
        now = datetime.now(UTC)
        await self._organizations.insert_one(
            _organization_document(organization, owner_id, now), session=session
        )
        await self._memberships.insert_one(
            _owner_membership(organization, owner_id, now), session=session
        )
        return organization

    async def create_workspaces(
        self, session: AsyncClientSession, workspaces: Sequence[tuple[Organization, str]]
    ) -> None:
        """``create_workspace`` for many (organization, owner id) in two round trips; one
        creation time, so the organizations' ids (increasing) order them as created."""
        if not workspaces:
            return
        now = datetime.now(UTC)
        await self._organizations.insert_many(
            [_organization_document(org, owner, now) for org, owner in workspaces],
            ordered=True,
            session=session,
        )
        await self._memberships.insert_many(
            [_owner_membership(org, owner, now) for org, owner in workspaces],
            ordered=True,
            session=session,
        )

    # -- read side ----------------------------------------------------------------------
    async def organization_of_user(self, user_id: str) -> OrganizationOfUser | None:
        user = await self._users.find_one({"_id": user_id})
        organization_id = (user or {}).get("current_organization_id")
        if user is None or organization_id is None:
            return None
        organization = await self.organization(organization_id)
        membership = await self._memberships.find_one(
            {"user_id": user_id, "organization_id": organization_id}
        )
        if organization is None or membership is None:
            return None
        hint = user.get("suggested_join")
        return OrganizationOfUser(
            organization=organization,
            role=membership["role"],
            suggested_join=SuggestedJoin(**hint) if hint else None,
        )


def new_organization(plan: WorkspacePlan, slug: str) -> Organization:
    """A new free organization (not written yet) with a fresh id."""
    return Organization(
        id=str(ObjectId()), name=plan.name, slug=slug, domain=plan.domain, plan_id=PLAN_FREE
    )


def _user_fact_update(event: UserSignedUp | UserEmailVerified, now: datetime) -> Document:
    # Both bump `version`: concurrent transactions for one user conflict on this document.
    if isinstance(event, UserEmailVerified):
        return {"$set": {"email_verified": True, "updated_at": now}, "$inc": {"version": 1}}
    return {
        "$set": {
            "email": event.email,
            "first_name": event.first_name,
            "last_name": event.last_name,
            "updated_at": now,
        },
        # A verification seen before (or with) this signup is never undone.
        "$max": {"email_verified": event.email_verified},
        "$inc": {"version": 1},
    }


def _current_organization_update(
    organization_id: str, suggested_join: SuggestedJoin | None
) -> Document:
    hint = None
    if suggested_join is not None:
        hint = {"organization_id": suggested_join.organization_id, "name": suggested_join.name}
    return {"$set": {"current_organization_id": organization_id, "suggested_join": hint}}


def _chosen_membership(memberships: Sequence[Document], current: str | None) -> Document:
    """The membership of the current organization if active, else the oldest active one."""
    return next((m for m in memberships if m["organization_id"] == current), memberships[0])


def _organization_document(organization: Organization, owner_id: str, now: datetime) -> Document:
    return {
        "_id": organization.id,
        "name": organization.name,
        "slug": organization.slug,
        "domain": organization.domain,
        "plan_id": organization.plan_id,
        "created_by": owner_id,
        "created_at": now,
    }


def _owner_membership(organization: Organization, owner_id: str, now: datetime) -> Document:
    return {
        "_id": str(ObjectId()),
        "user_id": owner_id,
        "organization_id": organization.id,
        "role": ROLE_OWNER,
        "status": MEMBERSHIP_ACTIVE,
        "created_at": now,
    }


def _user(doc: Document | None) -> User:
    assert doc is not None, "an upsert returning the document after always finds one"
    return User(
        user_id=doc["_id"],
        email=doc.get("email"),
        first_name=doc.get("first_name", ""),
        email_verified=bool(doc.get("email_verified", False)),
        current_organization_id=doc.get("current_organization_id"),
    )


def _organization(doc: Document) -> Organization:
    return Organization(
        id=doc["_id"],
        name=doc["name"],
        slug=doc["slug"],
        domain=doc.get("domain"),
        plan_id=doc["plan_id"],
    )
