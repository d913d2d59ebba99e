"""All of billing's MongoDB access: the ledger, accounts, and the two projections.

Collections
- ``ledger``: one document per entry ``{_id, ref_id, organization_id, kind, amount, source,
  at, expires_at, invitation_id?, side?, expiry_open?}``; ``ref_id`` is unique over the
  whole ledger. ``expiry_open`` marks a topup whose expiry is not settled yet.
- ``accounts``: ``{_id: organization_id, balance, updated_at}``; the balance changes only in
  the transaction that appends an entry, so it always equals the sum of the entries.
- ``referrals``: accepted invitations ``{_id: invitation_id, inviter, referee, accepted_at,
  sides: {referee|referrer: {state, outcome, organization_id, at}}, open}``; ``open`` is
  true while a side is open (reconcile walks those); the provisioned listener reads the
  referrals where its user's own side is open.
- ``memberships``: user -> organization pairs seen in ``organization.provisioned``
  ``{user_id, organization_id, first_seen, last_provisioned_at}``. A user's organization is
  the one provisioned most recently (by event time: organizations publishes it when it sets
  the user's current organization, and again on convergence); ties go to the oldest pair.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, IndexModel, ReturnDocument, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase

from services.billing.domain import (
    SIDES,
    SIGN_RULES,
    Grant,
    LedgerCursor,
    Referral,
    SideOutcome,
    SideRecord,
    SideResult,
    side_state,
)
from shared.mongo import Document

LEDGER = "ledger"
ACCOUNTS = "accounts"
REFERRALS = "referrals"
MEMBERSHIPS = "memberships"
REF_ID_INDEX = "ref_id_unique"

INDEXES: dict[str, list[IndexModel]] = {
    LEDGER: [
        IndexModel([("ref_id", ASCENDING)], unique=True, name=REF_ID_INDEX),
        IndexModel(
            [("organization_id", ASCENDING), ("at", DESCENDING), ("_id", DESCENDING)],
            name="ledger_page",
        ),
        IndexModel(
            [("expires_at", ASCENDING), ("_id", ASCENDING)],
            partialFilterExpression={"expiry_open": True},
            name="expiry_due",
        ),
    ],
    ACCOUNTS: [],
    REFERRALS: [
        IndexModel([("open", ASCENDING), ("_id", ASCENDING)], name="open_walk"),
        IndexModel([("referee", ASCENDING), ("sides.referee.state", ASCENDING)], name="by_referee"),
        IndexModel(
            [("inviter", ASCENDING), ("sides.referrer.state", ASCENDING)], name="by_inviter"
        ),
    ],
    MEMBERSHIPS: [
        IndexModel(
            [("user_id", ASCENDING), ("organization_id", ASCENDING)],
            unique=True,
            name="one_pair",
        ),
        IndexModel(
            [
                ("user_id", ASCENDING),
                ("last_provisioned_at", DESCENDING),
                ("first_seen", ASCENDING),
            ],
            name="current_first",
        ),
    ],
}


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _referral(doc: Document) -> Referral:
    sides = doc.get("sides") or {}
    return Referral(
        invitation_id=str(doc["_id"]),
        inviter=doc.get("inviter"),
        referee=doc.get("referee"),
        sides={
            side: SideRecord(
                state=sides.get(side, {}).get("state", "open"),
                outcome=sides.get(side, {}).get("outcome"),
                organization_id=sides.get(side, {}).get("organization_id"),
            )
            for side in SIDES
        },
    )


class BillingStore:
    """Billing's database, one use-case-sized operation per method."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.db = db
        self.ledger = db[LEDGER]
        self.accounts = db[ACCOUNTS]
        self.referrals = db[REFERRALS]
        self.memberships = db[MEMBERSHIPS]

    # -- ledger writes (inside the caller's transaction) ---------------------------
    async def append_entry(self, session: AsyncClientSession, entry: Document) -> int:
        """Insert ``entry`` and move its account's balance; returns the balance after.

        The insert goes first so a duplicate ``ref_id`` fails before anything else is written.
        """
        await self.ledger.insert_one(entry, session=session)
        account = await self.accounts.find_one_and_update(
            {"_id": entry["organization_id"]},
            {"$inc": {"balance": entry["amount"]}, "$set": {"updated_at": entry["at"]}},
            projection={"balance": True},
            upsert=True,
            return_document=ReturnDocument.AFTER,
            session=session,
        )
        return int(cast(Document, account)["balance"])

    async def append_entries(
        self, session: AsyncClientSession, entries: Sequence[Document]
    ) -> list[int]:
        """Insert ``entries`` and move their accounts' balances; the balance after each entry.

        Three round trips whatever the number of entries (two when they share one account):
        the inserts, one ``$inc`` per account, and the balances read back inside the
        transaction, unwound entry by entry.
        """
        if not entries:
            return []
        if len(entries) == 1:
            return [await self.append_entry(session, entries[0])]
        await self.ledger.insert_many(entries, ordered=True, session=session)
        totals: dict[str, int] = {}
        for entry in entries:
            totals[entry["organization_id"]] = totals.get(entry["organization_id"], 0) + int(
                entry["amount"]
            )
        at = max(entry["at"] for entry in entries)
        await self.accounts.bulk_write(
            [
                UpdateOne(
                    {"_id": org},
                    {"$inc": {"balance": total}, "$set": {"updated_at": at}},
                    upsert=True,
                )
                for org, total in totals.items()
            ],
            ordered=False,
            session=session,
        )
        remaining = {
            doc["_id"]: int(doc["balance"])
            async for doc in self.accounts.find(
                {"_id": {"$in": list(totals)}}, {"balance": True}, session=session
            )
        }
        balances = [0] * len(entries)
        for i in range(len(entries) - 1, -1, -1):
            org = entries[i]["organization_id"]
            balances[i] = remaining[org]
            remaining[org] -= int(entries[i]["amount"])
        return balances

    async def existing_keys(self, session: AsyncClientSession, ref_ids: Iterable[str]) -> set[str]:
        """Which of ``ref_ids`` the ledger holds already (read in the caller's transaction)."""
        keys = list(dict.fromkeys(ref_ids))
        if not keys:
            return set()
        cursor = self.ledger.find(
            {"ref_id": {"$in": keys}}, {"ref_id": True, "_id": False}, session=session
        )
        return {doc["ref_id"] async for doc in cursor}

    async def balance_in(self, session: AsyncClientSession, organization_id: str) -> int:
        account = await self.accounts.find_one(
            {"_id": organization_id}, {"balance": True}, session=session
        )
        return int(account["balance"]) if account else 0

    async def settle_expiry_in(
        self, session: AsyncClientSession | None, topup_id: ObjectId
    ) -> None:
        await self.ledger.update_one(
            {"_id": topup_id}, {"$unset": {"expiry_open": ""}}, session=session
        )

    # -- ledger reads ----------------------------------------------------------------
    async def balance(self, organization_id: str) -> int:
        account = await self.accounts.find_one({"_id": organization_id}, {"balance": True})
        return int(account["balance"]) if account else 0

    async def ledger_page(
        self, organization_id: str, limit: int, after: LedgerCursor | None
    ) -> list[Document]:
        """Entries of an organization, newest first, after ``after`` (exclusive)."""
        query: dict[str, Any] = {"organization_id": organization_id}
        if after is not None:
            at = datetime.fromtimestamp(after.at_ms / 1000, UTC)
            query["$or"] = [
                {"at": {"$lt": at}},
                {"at": at, "_id": {"$lt": ObjectId(after.entry_id)}},
            ]
        cursor = (
            self.ledger.find(query).sort([("at", DESCENDING), ("_id", DESCENDING)]).limit(limit)
        )
        return await cursor.to_list()

    @staticmethod
    def cursor_after(entry: Document) -> LedgerCursor:
        return LedgerCursor(_ms(entry["at"]), str(entry["_id"]))

    async def due_topups(
        self, now: datetime, limit: int, exclude: Sequence[ObjectId] = ()
    ) -> list[Document]:
        """Topups whose expiry passed and is not settled yet, soonest first."""
        query: dict[str, Any] = {"expiry_open": True, "expires_at": {"$lte": now}}
        if exclude:
            query["_id"] = {"$nin": list(exclude)}
        cursor = self.ledger.find(query).sort([("expires_at", ASCENDING), ("_id", ASCENDING)])
        return await cursor.limit(limit).to_list()

    # -- projections -----------------------------------------------------------------
    async def record_referral(
        self, invitation_id: str, inviter: str | None, referee: str | None, at: datetime
    ) -> Referral:
        """Record an accepted invitation (first time only) and return what billing knows."""
        doc = await self.referrals.find_one_and_update(
            {"_id": invitation_id},
            {"$setOnInsert": _new_referral(inviter, referee, at)},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        return _referral(cast(Document, doc))

    async def record_sides(
        self, invitation_id: str, results: Sequence[SideResult], at: datetime
    ) -> None:
        """Store side outcomes; a granted side is never overwritten (its key is in the ledger)."""
        if results:
            await self.referrals.update_one({"_id": invitation_id}, _sides_update(results, at))

    async def record_sides_of(
        self,
        session: AsyncClientSession | None,
        changes: Sequence[tuple[str, Sequence[SideResult]]],
        at: datetime,
    ) -> None:
        """``record_sides`` for many referrals (invitation id, results) in one round trip."""
        updates = [
            UpdateOne({"_id": invitation_id}, _sides_update(results, at))
            for invitation_id, results in changes
            if results
        ]
        if updates:
            await self.referrals.bulk_write(updates, ordered=False, session=session)

    async def close_open_sides(self, outcome: SideOutcome, at: datetime) -> int:
        """Close every open side with ``outcome``; returns how many referrals changed."""
        record = {"state": side_state(outcome), "outcome": outcome, "at": at}
        sides = {
            f"sides.{side}": {
                "$cond": [
                    {"$eq": [f"$sides.{side}.state", "open"]},
                    {"$literal": record},
                    f"$sides.{side}",
                ]
            }
            for side in SIDES
        }
        states = [f"$sides.{side}.state" for side in SIDES]
        result = await self.referrals.update_many(
            {"open": True}, [{"$set": sides}, {"$set": {"open": {"$in": ["open", states]}}}]
        )
        return result.modified_count

    async def record_referrals(
        self, accepted: Sequence[tuple[str, str | None, str | None]], at: datetime
    ) -> None:
        """``record_referral`` for many (invitation id, inviter, referee) in one round trip."""
        if not accepted:
            return
        await self.referrals.bulk_write(
            [
                UpdateOne(
                    {"_id": invitation_id},
                    {"$setOnInsert": _new_referral(inviter, referee, at)},
                    upsert=True,
                )
                for invitation_id, inviter, referee in accepted
            ],
            ordered=False,
        )

    async def referrals_to_grant(
        self, invitation_ids: Iterable[str], user_ids: Iterable[str]
    ) -> list[Referral]:
        """The referrals ``invitation_ids``, and those where a user of ``user_ids`` has an
        open side of their own (one round trip for a batch of events)."""
        ids, users = list(dict.fromkeys(invitation_ids)), list(dict.fromkeys(user_ids))
        clauses: list[dict[str, Any]] = []
        if ids:
            clauses.append({"_id": {"$in": ids}})
        if users:
            clauses.append({"referee": {"$in": users}, "sides.referee.state": "open"})
            clauses.append({"inviter": {"$in": users}, "sides.referrer.state": "open"})
        if not clauses:
            return []
        return [_referral(doc) async for doc in self.referrals.find({"$or": clauses})]

    async def record_memberships(
        self, provisioned: Sequence[tuple[str, str, datetime]], seen_at: datetime
    ) -> None:
        """``record_membership`` for many (user, organization, provisioned at), one round trip."""
        if not provisioned:
            return
        await self.memberships.bulk_write(
            [
                UpdateOne(*_membership_change(user, org, at, seen_at), upsert=True)
                for user, org, at in provisioned
            ],
            ordered=False,
        )

    async def open_referrals_of(self, user_id: str) -> list[Referral]:
        """Referrals where ``user_id``'s own side is open (as referee or as referrer)."""
        query = {
            "$or": [
                {"referee": user_id, "sides.referee.state": "open"},
                {"inviter": user_id, "sides.referrer.state": "open"},
            ]
        }
        return [_referral(doc) async for doc in self.referrals.find(query)]

    async def open_referrals_after(self, after: str | None, limit: int) -> list[Referral]:
        """The next batch of referrals with an open side, by invitation id."""
        query: dict[str, Any] = {"open": True}
        if after is not None:
            query["_id"] = {"$gt": after}
        cursor = self.referrals.find(query).sort("_id", ASCENDING).limit(limit)
        return [_referral(doc) async for doc in cursor]

    async def count_due_topups(self, now: datetime) -> int:
        return await self.ledger.count_documents({"expiry_open": True, "expires_at": {"$lte": now}})

    async def count_open_referrals(self) -> int:
        return await self.referrals.count_documents({"open": True})

    async def record_membership(
        self, user_id: str, organization_id: str, provisioned_at: datetime, seen_at: datetime
    ) -> None:
        match, update = _membership_change(user_id, organization_id, provisioned_at, seen_at)
        await self.memberships.update_one(match, update, upsert=True)

    async def organizations_of(self, user_ids: Iterable[str]) -> dict[str, str]:
        """Each user's organization (most recently provisioned; ties: the oldest pair)."""
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return {}
        found: dict[str, str] = {}
        cursor = self.memberships.find(
            {"user_id": {"$in": ids}}, {"user_id": True, "organization_id": True}
        ).sort([("user_id", ASCENDING), ("last_provisioned_at", DESCENDING), ("first_seen", 1)])
        async for doc in cursor:
            found.setdefault(doc["user_id"], doc["organization_id"])
        return found

    # -- audit -----------------------------------------------------------------------
    async def balance_mismatches(self) -> list[Document]:
        """Accounts whose balance differs from the sum of their entries (either side missing)."""
        pipeline: list[Mapping[str, Any]] = [
            {"$group": {"_id": "$organization_id", "sum": {"$sum": "$amount"}}},
            {
                "$unionWith": {
                    "coll": ACCOUNTS,
                    "pipeline": [{"$project": {"_id": 1, "balance": 1}}],
                }
            },
            {
                "$group": {
                    "_id": "$_id",
                    "ledger_sum": {"$sum": {"$ifNull": ["$sum", 0]}},
                    "balance": {"$sum": {"$ifNull": ["$balance", 0]}},
                }
            },
            {"$match": {"$expr": {"$ne": ["$ledger_sum", "$balance"]}}},
            {"$sort": {"_id": 1}},
        ]
        cursor = await self.ledger.aggregate(pipeline, allowDiskUse=True)
        return await cursor.to_list()

    async def duplicate_keys(self) -> list[Document]:
        pipeline: list[Mapping[str, Any]] = [
            {"$group": {"_id": "$ref_id", "count": {"$sum": 1}}},
            {"$match": {"count": {"$gt": 1}}},
            {"$sort": {"_id": 1}},
        ]
        cursor = await self.ledger.aggregate(pipeline, allowDiskUse=True)
        return await cursor.to_list()

    async def sign_rule_violations(self, limit: int) -> list[Document]:
        """Entries whose amount breaks its kind's sign rule, or whose kind is unknown."""
        broken: list[dict[str, Any]] = [{"kind": {"$nin": list(SIGN_RULES)}}]
        for kind, (low, high) in SIGN_RULES.items():
            if low is not None:
                broken.append({"kind": kind, "amount": {"$lt": low}})
            if high is not None:
                broken.append({"kind": kind, "amount": {"$gt": high}})
        projection = {"ref_id": True, "kind": True, "amount": True, "organization_id": True}
        return await self.ledger.find({"$or": broken}, projection).limit(limit).to_list()

    async def has_unique_ref_id_index(self) -> bool:
        info = await self.ledger.index_information()
        return any(spec.get("unique") and spec["key"] == [("ref_id", 1)] for spec in info.values())

    async def count_entries(self) -> int:
        return await self.ledger.estimated_document_count()

    async def count_accounts(self) -> int:
        return await self.accounts.estimated_document_count()


def _new_referral(inviter: str | None, referee: str | None, at: datetime) -> Document:
    return {
        "inviter": inviter,
        "referee": referee,
        "accepted_at": at,
        "sides": {side: {"state": "open"} for side in SIDES},
        "open": True,
    }


def _sides_update(results: Sequence[SideResult], at: datetime) -> list[Document]:
    """The pipeline update storing side outcomes; a granted side is kept as it is."""
    sides: dict[str, Any] = {}
    for result in results:
        path = f"sides.{result.side}"
        record = {
            "state": side_state(result.outcome),
            "outcome": result.outcome,
            "organization_id": result.organization_id,
            "at": at,
        }
        granted = {"$eq": [f"${path}.state", "granted"]}
        sides[path] = {"$cond": [granted, f"${path}", {"$literal": record}]}
    states = [f"$sides.{side}.state" for side in SIDES]
    return [{"$set": sides}, {"$set": {"open": {"$in": ["open", states]}}}]


def _membership_change(
    user_id: str, organization_id: str, provisioned_at: datetime, seen_at: datetime
) -> tuple[Document, Document]:
    """(filter, update) recording that ``user_id`` was provisioned into ``organization_id``."""
    return (
        {"user_id": user_id, "organization_id": organization_id},
        {"$setOnInsert": {"first_seen": seen_at}, "$max": {"last_provisioned_at": provisioned_at}},
    )


def entry_document(grant: Grant, *, at: datetime, entry_id: ObjectId | None = None) -> Document:
    """The ledger document of a grant (a topup)."""
    doc: Document = {
        "_id": entry_id or ObjectId(),
        "ref_id": grant.ref_id,
        "organization_id": grant.organization_id,
        "kind": "topup",
        "amount": grant.units,
        "source": grant.source,
        "at": at,
        "expires_at": grant.expires_at,
    }
    if grant.expires_at is not None:
        doc["expiry_open"] = True
    if grant.invitation_id is not None:
        doc["invitation_id"] = grant.invitation_id
        doc["side"] = grant.side
    return doc
