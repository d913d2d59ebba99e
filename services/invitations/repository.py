"""MongoDB access of the invitations service: invitations, the users projection, inviters.

Duplicate pending invites under concurrency: ``pending_email`` is set only while an
invite is pending *and* live, and a unique partial index covers it, so two concurrent
creates for one email cannot both commit. Expiry is not a status, so an expired pending
invite still holds the field until a create for that email retires it (unsets the field,
the status stays ``pending``) in the same transaction as the new insert. Revoke and
accept unset it too.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId
from pymongo import ASCENDING, DESCENDING, IndexModel, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from services.invitations.domain import DuplicatePendingInvitation, Invitation
from shared.contracts import normalize_email
from shared.mongo import Document, is_duplicate_key

INVITATIONS = "invitations"
USERS = "users"
INVITERS = "inviters"

INDEXES: dict[str, list[IndexModel]] = {
    INVITATIONS: [
        IndexModel([("token", ASCENDING)], unique=True, name="token_unique"),
        IndexModel(
            [("pending_email", ASCENDING)],
            unique=True,
            partialFilterExpression={"pending_email": {"$type": "string"}},
            name="one_live_pending_per_email",
        ),
        # cap and rate-limit counts
        IndexModel([("invited_by", ASCENDING), ("created_at", DESCENDING)], name="by_inviter"),
        # a member's list, newest first (ObjectIds grow with time)
        IndexModel([("invited_by", ASCENDING), ("_id", DESCENDING)], name="by_inviter_newest"),
    ],
    USERS: [IndexModel([("email", ASCENDING)], name="by_email")],
    INVITERS: [],
}

_FIELDS = (
    "email",
    "token",
    "invited_by",
    "created_at",
    "expires_at",
    "status",
    "accepted_at",
    "accepted_user_id",
    "revoked_at",
    "claimed_at",
    "claimed_by",
    "inviter_email",
)


def object_id(invitation_id: str) -> ObjectId | None:
    """The ObjectId of an API id, None when it is not one."""
    try:
        return ObjectId(invitation_id)
    except (InvalidId, TypeError):
        return None


def _to_invitation(doc: Document) -> Invitation:
    fields: dict[str, Any] = {name: doc.get(name) for name in _FIELDS}
    return Invitation(id=str(doc["_id"]), **fields)


class InvitationRepository:
    """All reads and writes of the service's database."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._invitations = db[INVITATIONS]
        self._users = db[USERS]
        self._inviters = db[INVITERS]

    # -- create (inside one transaction) -----------------------------------------------
    async def lock_inviter(
        self, inviter_id: str, now: datetime, session: AsyncClientSession
    ) -> None:
        """Write the inviter's document so concurrent creates of one inviter conflict.

        The losing transaction retries and then counts the winner's invite, which makes
        the cap and the rate limit exact across replicas.
        """
        await self._inviters.update_one(
            {"_id": inviter_id}, {"$set": {"last_create_at": now}}, upsert=True, session=session
        )

    async def email_is_user(self, email: str, session: AsyncClientSession) -> bool:
        return await self._users.find_one({"email": email}, {"_id": 1}, session=session) is not None

    async def live_pending_exists(
        self, email: str, now: datetime, session: AsyncClientSession
    ) -> bool:
        live = {"pending_email": email, "expires_at": {"$gt": now}}
        return await self._invitations.find_one(live, {"_id": 1}, session=session) is not None

    async def count_by_inviter(self, inviter_id: str, session: AsyncClientSession) -> int:
        """Every invite the inviter ever created, whatever its status."""
        return await self._invitations.count_documents({"invited_by": inviter_id}, session=session)

    async def created_since(
        self, inviter_id: str, since: datetime, limit: int, session: AsyncClientSession
    ) -> list[datetime]:
        """Creation times of the inviter's newest ``limit`` invites after ``since``."""
        cursor = (
            self._invitations.find(
                {"invited_by": inviter_id, "created_at": {"$gt": since}},
                {"created_at": 1},
                session=session,
            )
            .sort("created_at", DESCENDING)
            .limit(limit)
        )
        return [doc["created_at"] async for doc in cursor]

    async def insert(self, invitation: Invitation, session: AsyncClientSession) -> None:
        """Retire the email's expired pending invite, then insert this one."""
        await self._invitations.update_many(
            {"pending_email": invitation.email, "expires_at": {"$lte": invitation.created_at}},
            {"$unset": {"pending_email": ""}},
            session=session,
        )
        doc: Document = {name: getattr(invitation, name) for name in _FIELDS}
        doc["_id"] = ObjectId(invitation.id)
        doc["pending_email"] = invitation.email
        try:
            await self._invitations.insert_one(doc, session=session)
        except OperationFailure as exc:
            if is_duplicate_key(exc) and "pending_email" in _key_pattern(exc):
                raise DuplicatePendingInvitation(
                    f"{invitation.email} already has a pending invitation"
                ) from exc
            raise

    # -- reads ---------------------------------------------------------------------------
    async def get(self, invitation_id: str) -> Invitation | None:
        oid = object_id(invitation_id)
        doc = await self._invitations.find_one({"_id": oid}) if oid else None
        return _to_invitation(doc) if doc else None

    async def by_token(self, token: str) -> Invitation | None:
        doc = await self._invitations.find_one({"token": token})
        return _to_invitation(doc) if doc else None

    async def newest_first(
        self, *, invited_by: str | None, before: str | None, limit: int
    ) -> list[Invitation]:
        """Newest first; ``invited_by`` None = everyone's; ``before`` = an id to page after."""
        query: dict[str, Any] = {}
        if invited_by is not None:
            query["invited_by"] = invited_by
        if before is not None:
            query["_id"] = {"$lt": object_id(before) or ObjectId("0" * 24)}
        cursor = self._invitations.find(query).sort("_id", DESCENDING).limit(limit)
        return [_to_invitation(doc) async for doc in cursor]

    # -- state changes -------------------------------------------------------------------
    async def revoke(self, invitation_id: str, now: datetime) -> Invitation | None:
        """Pending -> revoked (compare-and-set); None when it was not pending."""
        doc = await self._invitations.find_one_and_update(
            {"_id": object_id(invitation_id), "status": "pending"},
            {"$set": {"status": "revoked", "revoked_at": now}, "$unset": {"pending_email": ""}},
            return_document=ReturnDocument.AFTER,
        )
        return _to_invitation(doc) if doc else None

    async def claim(
        self, *, token: str, email: str, user_id: str, now: datetime, stale_after: timedelta
    ) -> Invitation | None:
        """Claim the invite for this signup, atomically; None when it is not claimable.

        Mirrors ``domain.accept_refusal``: pending, unexpired, same email, and unclaimed,
        claimed by this same user (a redelivery resumes), or claimed too long ago.
        """
        doc = await self._invitations.find_one_and_update(
            {
                "token": token,
                "status": "pending",
                "email": normalize_email(email),
                "expires_at": {"$gt": now},
                "$or": [
                    {"claimed_by": None},
                    {"claimed_by": user_id},
                    {"claimed_at": {"$lte": now - stale_after}},
                ],
            },
            {"$set": {"claimed_at": now, "claimed_by": user_id}},
            return_document=ReturnDocument.AFTER,
        )
        return _to_invitation(doc) if doc else None

    async def finalize(
        self, invitation_id: str, *, user_id: str, now: datetime, session: AsyncClientSession
    ) -> bool:
        """Claimed pending -> accepted (compare-and-set on the claim); False if lost."""
        result = await self._invitations.update_one(
            {"_id": object_id(invitation_id), "status": "pending", "claimed_by": user_id},
            {
                "$set": {"status": "accepted", "accepted_user_id": user_id, "accepted_at": now},
                "$unset": {"pending_email": ""},
            },
            session=session,
        )
        return result.modified_count == 1

    # -- users projection ----------------------------------------------------------------
    async def record_user(self, user_id: str, email: str, now: datetime) -> None:
        await self._users.update_one(
            {"_id": user_id},
            {"$set": {"email": normalize_email(email)}, "$setOnInsert": {"signed_up_at": now}},
            upsert=True,
        )


def _key_pattern(exc: OperationFailure) -> dict[str, Any]:
    details = exc.details or {}
    pattern = details.get("keyPattern") or {}
    return dict(pattern) if isinstance(pattern, dict) else {}
