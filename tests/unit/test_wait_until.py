"""wait_until: a condition met in time, one never met, and a probe that never answers."""

from __future__ import annotations

import asyncio

import pytest

from tests import support
from tests.support import wait_until


async def test_returns_the_first_truthy_answer() -> None:
    answers = iter([0, 0, 7])

    async def probe() -> int:
        return next(answers)

    assert await wait_until(probe, timeout=5, interval=0) == 7


async def test_a_condition_never_met_fails_with_its_last_value() -> None:
    async def probe() -> int:
        return 0

    with pytest.raises(AssertionError, match=r"not met within 0\.05s"):
        await wait_until(probe, timeout=0.05)


async def test_a_probe_that_never_answers_fails_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(support, "PROBE_GRACE_S", 0.05)

    async def probe() -> bool:
        await asyncio.Event().wait()  # a client whose lock was never released, say
        return True

    with pytest.raises(AssertionError, match="did not answer"):
        await asyncio.wait_for(wait_until(probe, timeout=0.05), 5)


async def test_a_timeout_raised_by_the_probe_itself_is_its_own() -> None:
    async def probe() -> bool:
        raise TimeoutError("the probe's own")

    with pytest.raises(TimeoutError, match="the probe's own"):
        await wait_until(probe, timeout=5)
