"""Reliability scenarios (`make chaos`): one summary line each, repeated at the end of the run.

The root conftest leaves this folder out of the default run unless ``GRANTWIRE_CHAOS`` is
set (the `make chaos` target sets it).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aio_pika.abc import AbstractRobustConnection

from tests.reliability.harness import SUMMARY_LINES, ChaosSystem
from tests.support import Isolation

PASSED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[PASSED] = report.passed
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SUMMARY_LINES:
        terminalreporter.write_sep("=", "chaos scenarios")
        for line in SUMMARY_LINES:
            terminalreporter.write_line(line)


@pytest.fixture
async def chaos(
    request: pytest.FixtureRequest, isolation: Isolation, amqp: AbstractRobustConnection
) -> AsyncIterator[ChaosSystem]:
    """The three services as processes on this test's isolation, started and ready."""
    async with running_system(request, ChaosSystem(isolation, amqp)) as system:
        yield system


@asynccontextmanager
async def running_system(
    request: pytest.FixtureRequest, system: ChaosSystem
) -> AsyncIterator[ChaosSystem]:
    """Start ``system``; stop it with SIGTERM after, every process must exit 0 (a restarted
    one included). Logs stay under ``.infra/logs/chaos-<token>`` when the test failed (or
    with ``GRANTWIRE_CHAOS_KEEP_LOGS=1``)."""
    try:
        await system.start()
        yield system
    finally:
        codes = await system.stop()
    assert all(code == 0 for code in codes.values()), f"unclean exits: {codes}; logs {system.logs}"
    if request.node.stash.get(PASSED, False) and not os.environ.get("GRANTWIRE_CHAOS_KEEP_LOGS"):
        system.remove_logs()
