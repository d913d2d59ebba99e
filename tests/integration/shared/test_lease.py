"""Leases on a real MongoDB: ``hold`` renews once per third of the TTL, not on every call."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from pymongo import AsyncMongoClient

from shared.lease import Lease
from shared.mongo import Document
from tests.support import Isolation, wait_until

pytestmark = pytest.mark.integration


async def renewed_at(lease: Lease, mongo: AsyncMongoClient[Document], db: str) -> object:
    doc = await mongo[db]["leases"].find_one({"_id": lease.name})
    assert doc is not None
    return doc["renewed_at"]


def two_owners(
    isolation: Isolation, mongo: AsyncMongoClient[Document], ttl: timedelta
) -> tuple[str, Lease, Lease]:
    """The test's database, and one lease as seen by its two would-be owners."""
    db = f"t{isolation.token}_lease"
    return (
        db,
        Lease(mongo[db]["leases"], "relay", "me", ttl),
        Lease(mongo[db]["leases"], "relay", "other", ttl),
    )


async def test_hold_renews_only_when_a_third_of_the_ttl_has_passed(
    isolation: Isolation, mongo: AsyncMongoClient[Document]
) -> None:
    ttl = timedelta(seconds=3)  # a third of it (1 s) outlasts a loaded machine's round trips
    db, lease, other = two_owners(isolation, mongo, ttl)

    started = time.monotonic()
    assert await lease.hold()  # first call: a real acquire
    first = await renewed_at(lease, mongo, db)
    assert await lease.hold()  # within ttl/3: no round trip, the document is unchanged
    assert time.monotonic() - started < ttl.total_seconds() / 3, "too slow to tell"
    assert await renewed_at(lease, mongo, db) == first
    assert not await other.hold()  # and the lease is still ours for everyone else

    async def renewed() -> bool:
        assert await lease.hold()
        return await renewed_at(lease, mongo, db) != first

    await wait_until(renewed, timeout=5)
    assert time.monotonic() - started >= ttl.total_seconds() / 3  # not before ttl/3


async def test_after_release_or_losing_the_lease_hold_asks_the_database_again(
    isolation: Isolation, mongo: AsyncMongoClient[Document]
) -> None:
    _, lease, other = two_owners(isolation, mongo, timedelta(minutes=5))

    assert await lease.hold()
    await lease.release()
    assert await other.hold()  # released: another owner takes it
    assert not await lease.hold()  # and hold does not trust its stale renewal
    assert await lease.holder() == "other"
