"""MongoDB helpers: one client per process, transactions with driver retries, indexes."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import pymongo.lock
from pymongo import AsyncMongoClient, IndexModel, ReadPreference
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    ConnectionFailure,
    ExecutionTimeout,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
    WTimeoutError,
)
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

Document = dict[str, Any]
T = TypeVar("T")


async def _wait_for_in_the_callers_task(awaitable: Awaitable[T], timeout: float | None) -> T:
    """``asyncio.wait_for`` as Python 3.12 has it: the awaitable runs in the caller's task."""
    async with asyncio.timeout(timeout):
        return await awaitable


def _make_condition_waits_cancel_safely() -> None:
    """Make PyMongo's waits on its own conditions safe to cancel, on Python 3.11.

    PyMongo's connection pool and server selection wait on asyncio conditions through
    ``asyncio.wait_for``. On Python 3.11 that runs the wait as a task of its own. When the
    caller is cancelled twice before that task ends (a handler's time limit and a batch
    cancelled by each of its callers, say), the caller leaves first and lets go of a lock it
    no longer holds; the wait's task then takes the condition's lock back and ends holding
    it. Nothing releases it, and every later operation of that client waits for ever (seen
    here: a service and a test run that hung). Python 3.12's ``wait_for`` waits in the
    caller's task, where the lock is taken back before the caller leaves; this gives
    PyMongo that one. Left alone on 3.12 and later, or when PyMongo no longer waits this way.
    """
    if sys.version_info < (3, 12) and getattr(pymongo.lock, "wait_for", None) is asyncio.wait_for:
        pymongo.lock.wait_for = _wait_for_in_the_callers_task  # type: ignore[attr-defined,assignment]


_make_condition_waits_cancel_safely()


def create_client(
    url: str,
    *,
    app_name: str,
    timeout_ms: int = 10_000,
    tls_options: Mapping[str, Any] | None = None,
) -> AsyncMongoClient[Document]:
    """The process's one client: majority writes, retryable writes, aware datetimes."""
    return AsyncMongoClient(
        url,
        **dict(tls_options or {}),
        appname=app_name,
        w="majority",
        retryWrites=True,
        retryReads=True,
        tz_aware=True,
        serverSelectionTimeoutMS=timeout_ms,
        timeoutMS=None,
    )


async def run_in_transaction(
    client: AsyncMongoClient[Document],
    work: Callable[[AsyncClientSession], Awaitable[T]],
) -> T:
    """Run ``work`` in a majority transaction; transient errors are retried by the driver.

    ``work`` may run more than once, so it must only touch the database through the
    session it is given.
    """
    async with client.start_session() as session:
        return await session.with_transaction(
            work,
            read_concern=ReadConcern("snapshot"),
            write_concern=WriteConcern("majority"),
            read_preference=ReadPreference.PRIMARY,
        )


async def ensure_indexes(
    db: AsyncDatabase[Document], indexes: Mapping[str, Sequence[IndexModel]]
) -> None:
    """Create every index (idempotent) and the collections (transactions need them)."""
    existing = set(await db.list_collection_names())
    for collection, models in indexes.items():
        if collection not in existing:
            try:
                await db.create_collection(collection)
            except OperationFailure as exc:
                if exc.code != 48:  # NamespaceExists: a peer created it first
                    raise
        if models:
            await db[collection].create_indexes(list(models))


async def drop_retired_indexes(
    db: AsyncDatabase[Document], retired: Mapping[str, Sequence[str]]
) -> None:
    """Drop indexes (by name) a newer definition replaced; those already gone are fine."""
    for collection, names in retired.items():
        for name in names:
            try:
                await db[collection].drop_index(name)
            except OperationFailure as exc:
                if exc.code not in (26, 27):  # NamespaceNotFound, IndexNotFound: nothing to drop
                    raise


def is_duplicate_key(exc: BaseException) -> bool:
    """True for a unique index violation (E11000), also inside a bulk/transaction error."""
    return isinstance(exc, OperationFailure) and exc.code == 11000


def is_transient(exc: BaseException) -> bool:
    """True for database failures that may succeed later (retry, don't dead-letter)."""
    if isinstance(
        exc, ConnectionFailure | ServerSelectionTimeoutError | ExecutionTimeout | WTimeoutError
    ):
        return True
    if isinstance(exc, PyMongoError):
        return exc.has_error_label("TransientTransactionError") or exc.has_error_label(
            "RetryableWriteError"
        )
    return False


async def ping(client: AsyncMongoClient[Document]) -> None:
    """Raise when the database does not answer."""
    await client.admin.command("ping")
