"""The replay's claim survives a failover: transient database errors are tried again."""

from __future__ import annotations

import pytest
from pymongo.errors import AutoReconnect, NotPrimaryError, OperationFailure

from grantwire.dlq import retry_transient


class Flaky:
    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "claimed"


async def test_a_primary_stepping_down_is_tried_again() -> None:
    step_down = NotPrimaryError("not primary")
    labelled = OperationFailure("interrupted at shutdown", 11600)
    labelled._add_error_label("RetryableWriteError")
    flaky = Flaky(step_down, labelled)
    assert await retry_transient(flaky, pause_s=0) == "claimed"
    assert flaky.calls == 3


async def test_it_gives_up_after_its_attempts() -> None:
    flaky = Flaky(*(AutoReconnect("gone") for _ in range(3)))
    with pytest.raises(AutoReconnect):
        await retry_transient(flaky, attempts=3, pause_s=0)
    assert flaky.calls == 3


async def test_an_error_that_is_not_transient_is_not_repeated() -> None:
    flaky = Flaky(OperationFailure("bad query", 2))
    with pytest.raises(OperationFailure):
        await retry_transient(flaky, pause_s=0)
    assert flaky.calls == 1
