"""The test watchdog ends a run whose test hangs in teardown after its timeout fired."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest_plugins = ["pytester"]

HANGS_IN_TEARDOWN = """
import asyncio
import pytest

@pytest.fixture
async def stubborn():
    yield
    # a task that ignores cancellation: closing the loop waits for it for ever
    async def ignore_cancel():
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass
    asyncio.get_running_loop().create_task(ignore_cancel(), name="stubborn-task")

async def test_times_out_then_hangs(stubborn):
    await asyncio.sleep(30)
"""


@pytest.fixture
def runner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\ntimeout = 1\nteardown_grace = 2\n"
        "asyncio_default_fixture_loop_scope = function\n"
    )
    return pytester


def test_a_test_hanging_after_its_timeout_ends_the_run_with_the_hung_task_named(
    runner: pytest.Pytester,
) -> None:
    runner.makepyfile(test_hang=HANGS_IN_TEARDOWN)
    result = runner.runpytest_subprocess("-p", "tests.watchdog", timeout=60)
    assert result.ret == 70
    err = result.stderr.str()
    assert "watchdog: test_hang.py::test_times_out_then_hangs still running 3 s" in err
    assert "stubborn-task" in err


def test_a_test_that_ends_in_time_is_left_alone(runner: pytest.Pytester) -> None:
    runner.makepyfile(test_quick="async def test_quick():\n    pass\n")
    result = runner.runpytest_subprocess("-p", "tests.watchdog", timeout=60)
    result.assert_outcomes(passed=1)


def test_a_longer_timeout_from_the_command_line_counts(runner: pytest.Pytester) -> None:
    # ini: timeout 1 s + grace 2 s; --timeout 10 makes a 4 s test fine for both limits
    runner.makepyfile(
        test_slow="import asyncio\n\nasync def test_slow():\n    await asyncio.sleep(4)\n"
    )
    result = runner.runpytest_subprocess("-p", "tests.watchdog", "--timeout=10", timeout=60)
    result.assert_outcomes(passed=1)
