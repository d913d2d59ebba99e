"""Fixtures: real infrastructure, chosen once; isolated names for every test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from pymongo import AsyncMongoClient

from shared.mongo import Document, create_client
from tests.support import InfraUrls, Isolation, discover_infra

pytest_plugins = ["tests.watchdog"]

# The reliability scenarios (tests/reliability) run with `make chaos`, which sets
# GRANTWIRE_CHAOS=1; the default `make test` run leaves them out.
if not os.environ.get("GRANTWIRE_CHAOS"):
    collect_ignore = ["reliability"]


@pytest.fixture(scope="session")
def infra() -> InfraUrls:
    return discover_infra()


@pytest.fixture
async def amqp(infra: InfraUrls) -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(infra.amqp_url)
    yield connection
    await connection.close()


@pytest.fixture
async def mongo(infra: InfraUrls) -> AsyncIterator[AsyncMongoClient[Document]]:
    client = create_client(infra.mongo_url, app_name="tests")
    yield client
    await client.close()


@pytest.fixture
async def isolation(
    infra: InfraUrls, amqp: AbstractRobustConnection, mongo: AsyncMongoClient[Document]
) -> AsyncIterator[Isolation]:
    scope = Isolation(infra)
    yield scope
    await scope.cleanup(amqp)
    for name in await mongo.list_database_names():
        if name.startswith(f"t{scope.token}_"):
            await mongo.drop_database(name)
