"""Fixtures: the organizations use cases, or the whole service, on real infrastructure."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
from aio_pika.abc import AbstractRobustConnection

from services.organizations import SERVICE
from services.organizations.app import build
from services.organizations.handlers import SignupOrganizations
from services.organizations.repository import INDEXES
from services.organizations.settings import OrganizationsSettings
from shared.runtime import ServiceRuntime
from tests.integration.organizations.harness import Harness, StartHarness
from tests.support import EventTap, Isolation, RunningService, running_service

StartService = Callable[..., Awaitable[RunningService]]


@pytest.fixture
async def start_harness(
    isolation: Isolation, amqp: AbstractRobustConnection
) -> AsyncIterator[StartHarness]:
    """Start the use cases on a runtime that does not consume (tests call them directly).

    Keyword arguments ``repository`` and ``random_suffix`` go to the use cases; the rest
    are settings overrides.
    """
    started: list[ServiceRuntime] = []

    async def start(**overrides: Any) -> Harness:
        wiring = {k: overrides.pop(k) for k in ("repository", "random_suffix") if k in overrides}
        settings = isolation.settings(OrganizationsSettings, SERVICE, **overrides)
        runtime = ServiceRuntime(service=SERVICE, settings=settings, indexes=INDEXES)
        organizations = SignupOrganizations(runtime, settings.policy(), **wiring)
        tap = await EventTap.open(amqp, isolation.naming, ["organization.*"])
        await runtime.start(consume=False)
        started.append(runtime)
        return Harness(runtime, organizations, tap)

    yield start
    for runtime in started:
        await runtime.stop()


@pytest.fixture
async def start_service(isolation: Isolation) -> AsyncIterator[StartService]:
    """Start the whole service as ``build`` wires it (consumers, relay, HTTP in memory)."""
    async with AsyncExitStack() as stack:

        async def start(**overrides: Any) -> RunningService:
            settings = isolation.settings(OrganizationsSettings, SERVICE, **overrides)
            runtime, app = build(settings)
            return await stack.enter_async_context(running_service(runtime, app, isolation))

        yield start
