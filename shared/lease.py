"""Leases in MongoDB: at most one holder at a time across processes and machines.

Used by the outbox relay (one active relay per service) and the jobs (one reconcile at
a time). A holder renews before expiry; a crashed holder's lease lapses by itself.
"""

from __future__ import annotations

import time
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
        self._renewed_at: float | None = None  # monotonic time of our last successful renewal

    async def acquire(self) -> bool:
        """Take or renew the lease; False when another live owner holds it."""
        started = time.monotonic()
        now = datetime.now(UTC)
        try:
            await self._collection.find_one_and_update(
                {"_id": self.name, "$or": [{"owner": self.owner}, {"expires_at": {"$lt": now}}]},
                {"$set": {"owner": self.owner, "expires_at": now + self.ttl, "renewed_at": now}},
                upsert=True,
            )
        except DuplicateKeyError:
            self._renewed_at = None
            return False  # the document exists and another owner's lease is still live
        except BaseException:
            self._renewed_at = None  # unknown: renew on the next call
            raise
        self._renewed_at = started
        return True

    async def hold(self) -> bool:
        """``acquire``, but without a round trip while our last renewal is recent.

        A holder calling this before every unit of work (the outbox relay, hundreds of
        times a second under load) renews once per third of the TTL instead of each time:
        the lease is ours until at least ``renewed + ttl``, and we stop relying on it at
        ``renewed + ttl / 3`` (time measured from before the renewal was sent).
        """
        renewed = self._renewed_at
        if renewed is not None and time.monotonic() - renewed < self.ttl.total_seconds() / 3:
            return True
        return await self.acquire()

    async def release(self) -> None:
        """Give the lease up (only if still ours)."""
        self._renewed_at = None
        await self._collection.delete_one({"_id": self.name, "owner": self.owner})

    async def holder(self) -> str | None:
        """The current live owner, if any."""
        doc = await self._collection.find_one({"_id": self.name})
        if doc is None or doc["expires_at"] < datetime.now(UTC):
            return None
        return str(doc["owner"])
