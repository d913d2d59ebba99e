"""Bounded stop steps: a service finishes stopping even while the broker or database is away.

A broker round trip of a stop (cancel a consumer, close a channel or the connection) waits
for aio-pika's robust connection to come back, and a database one (release a lease) waits
for server selection: neither answers while its server is unreachable. Each such step is
awaited for at most a few seconds, with a warning when it does not finish, and the stop
goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

STOP_STEP_TIMEOUT_S = 5.0


async def bounded_step(
    step: Awaitable[Any], *, what: str, log: Any, timeout_s: float = STOP_STEP_TIMEOUT_S
) -> bool:
    """Await one step of a stop for at most ``timeout_s``; True when it completed.

    A step that times out or fails is logged as a warning (with ``what``) and abandoned:
    a stop never raises or hangs because of one of its steps.
    """
    try:
        await asyncio.wait_for(step, timeout_s)
    except TimeoutError:
        log.warning("stop step timed out; going on without it", step=what, timeout_s=timeout_s)
        return False
    except Exception as exc:
        log.warning("stop step failed; going on without it", step=what, error=repr(exc))
        return False
    return True
