"""Leases in MongoDB: at most one holder at a time across processes and machines.

Used by the outbox relay (one active relay per service) and the jobs (one reconcile at
a time). A holder renews before expiry; a crashed holder's lease lapses by itself.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from shared.mongo import Document


class Lease:
    """A named lease in ``collection``, held by ``owner`` for ``ttl`` at a time."""

    def __init__(
        self, collection: AsyncCollection[Document], name: str, owner: str, ttl: timedelta
    ) -> None:
        self._collection = collection
        self.name = name
        self.owner = owner
        self.ttl = ttl

    async def acquire(self) -> bool:
        """Take or renew the lease; False when another live owner holds it."""
        now = datetime.now(UTC)
        try:
            await self._collection.find_one_and_update(
                {"_id": self.name, "$or": [{"owner": self.owner}, {"expires_at": {"$lt": now}}]},
                {"$set": {"owner": self.owner, "expires_at": now + self.ttl, "renewed_at": now}},
                upsert=True,
            )
        except DuplicateKeyError:
            return False  # the document exists and another owner's lease is still live
        return True

    async def release(self) -> None:
        """Give the lease up (only if still ours)."""
        await self._collection.delete_one({"_id": self.name, "owner": self.owner})

    async def holder(self) -> str | None:
        """The current live owner, if any."""
        doc = await self._collection.find_one({"_id": self.name})
        if doc is None or doc["expires_at"] < datetime.now(UTC):
            return None
        return str(doc["owner"])
