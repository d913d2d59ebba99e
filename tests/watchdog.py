"""A last-resort limit per test, for hangs pytest-timeout cannot end.

pytest-timeout (``timeout`` in pyproject, ``--timeout``, ``PYTEST_TIMEOUT`` or a test's own
mark) interrupts a test once. A test interrupted that way can still hang in its teardown
(closing its event loop waits for a task that does not finish on cancel), and the run would
then wait out CI's own limit with no word of why. This watchdog allows each test the timeout
pytest-timeout applies to it plus a grace for teardown; past it, it prints every thread's
stack and every pending asyncio task's, then ends the run with exit status 70, so CI fails at
once and says where it hung. No timeout, no watchdog; a debugger session is left alone.
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
_debugging = threading.Event()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "teardown_grace",
        "seconds a test may run past its timeout before the watchdog ends the run",
        default="120",
    )


def pytest_enter_pdb() -> None:
    _debugging.set()


def _timeout_s(item: pytest.Item) -> float | None:
    """The timeout pytest-timeout applies to ``item`` (mark, option, environment, ini)."""
    try:
        from pytest_timeout import _get_item_settings  # its own resolution (pinned 2.4.0)

        timeout = _get_item_settings(item).timeout
    except Exception:  # another version: the mark's first argument, else the ini value
        marker = item.get_closest_marker("timeout")
        timeout = marker.args[0] if marker is not None and marker.args else None
        timeout = timeout if timeout is not None else item.config.getini("timeout")
    return float(timeout) if timeout else None


def _running_loops() -> list[asyncio.AbstractEventLoop]:
    return [
        o
        for o in gc.get_objects()
        if issubclass(type(o), asyncio.AbstractEventLoop) and o.is_running()
    ]


def _dump_tasks(loop: asyncio.AbstractEventLoop, done: threading.Event) -> None:
    try:
        out = io.StringIO()
        for task in asyncio.all_tasks(loop):
            out.write(f"--- {task!r}\n")
            task.print_stack(file=out)
        sys.stderr.write(out.getvalue())
    finally:
        done.set()


def _report(item: pytest.Item, limit_s: float) -> None:
    capture = item.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:  # what is written now must reach the terminal, not a capture
        captured = capture.read_global_capture()
        capture.suspend_global_capture(in_=True)
        sys.stderr.write(f"{captured.out}{captured.err}")
    sys.stderr.write(
        f"\n=== watchdog: {item.nodeid} still running {limit_s:.0f} s after it started "
        "(its timeout plus the teardown grace); thread stacks, then asyncio tasks ===\n"
    )
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    for loop in _running_loops():
        done = threading.Event()
        try:
            loop.call_soon_threadsafe(_dump_tasks, loop, done)
        except RuntimeError:  # closed meanwhile
            continue
        done.wait(5.0)


def _hung(item: pytest.Item, limit_s: float) -> None:
    if _debugging.is_set():
        return
    try:
        _report(item, limit_s)
    finally:
        sys.stderr.flush()
        os._exit(EXIT_HUNG)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    timeout_s = _timeout_s(item)
    if timeout_s is None or timeout_s <= 0:
        yield
        return
    limit_s = timeout_s + float(item.config.getini("teardown_grace"))
    timer = threading.Timer(limit_s, _hung, args=(item, limit_s))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
