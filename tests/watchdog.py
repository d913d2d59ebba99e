"""A last-resort limit per test, for hangs pytest-timeout cannot end.

pytest-timeout (``timeout`` in pyproject, or a test's own mark) interrupts a test once. A
test interrupted that way can still hang in its teardown (closing its event loop waits for a
task that does not finish on cancel), and the run would then wait out CI's own limit with no
word of why. This watchdog allows each test its timeout plus a grace for teardown; past it,
it prints every thread's stack and every pending asyncio task's, then ends the run with exit
status 70, so CI fails at once and says where it hung.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import io
import os
import sys
import threading
from collections.abc import Iterator

import pytest

EXIT_HUNG = 70


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "teardown_grace",
        "seconds a test may run past its timeout before the watchdog ends the run",
        default="120",
    )


def _limit_s(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    return float(item.config.getini("timeout") or 120)


def _running_loops() -> list[asyncio.AbstractEventLoop]:
    return [
        o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop) and o.is_running()
    ]


def _dump_tasks(loop: asyncio.AbstractEventLoop, done: threading.Event) -> None:
    out = io.StringIO()
    for task in asyncio.all_tasks(loop):
        out.write(f"--- {task!r}\n")
        task.print_stack(file=out)
    sys.stderr.write(out.getvalue())
    done.set()


def _hung(item: pytest.Item, limit_s: float) -> None:
    capture = item.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:  # what is written now must reach the terminal, not a capture
        capture.suspend_global_capture(in_=True)
    nodeid = item.nodeid
    sys.stderr.write(
        f"\n=== watchdog: {nodeid} still running {limit_s:.0f} s after it started "
        "(its timeout plus the teardown grace); thread stacks, then asyncio tasks ===\n"
    )
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    for loop in _running_loops():
        done = threading.Event()
        loop.call_soon_threadsafe(_dump_tasks, loop, done)
        done.wait(5.0)
    sys.stderr.flush()
    os._exit(EXIT_HUNG)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    if _limit_s(item) <= 0:  # no timeout asked for: no watchdog either
        yield
        return
    limit_s = _limit_s(item) + float(item.config.getini("teardown_grace"))
    timer = threading.Timer(limit_s, _hung, args=(item, limit_s))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
