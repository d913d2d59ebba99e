"""A runtime stops within its grace whether the broker is gone or silently stops answering.

The runtime reaches the real RabbitMQ through a proxy: ``cut`` drops every connection and
refuses new ones (a broker restart, seen from the service), ``stall`` keeps the connections
open and forwards nothing (a network partition: no cancel, close or CloseOk ever comes).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import urlparse

import pytest

from shared.contracts import Event, UserSignedUp
from shared.envelope import Envelope
from shared.runtime import ServiceRuntime
from shared.settings import ServiceSettings
from shared.topology import WorkQueue
from tests.proxy import CuttableProxy
from tests.support import Isolation, wait_until

pytestmark = pytest.mark.integration

WORK = WorkQueue("kit", "work", (UserSignedUp.event_type,))
GRACE_S = 4.0
MARGIN_S = 1.5  # scheduling on a busy machine; a hanging step would take far longer


async def ignore(event: Event, envelope: Envelope) -> None:
    return None


@pytest.fixture
async def proxied_runtime(
    isolation: Isolation,
) -> AsyncIterator[tuple[ServiceRuntime, CuttableProxy]]:
    target = urlparse(isolation.urls.amqp_url)
    proxy = CuttableProxy(target.hostname or "127.0.0.1", target.port or 5672)
    await proxy.start()
    credentials = f"{target.username}:{target.password}@" if target.username else ""
    settings = isolation.settings(
        ServiceSettings,
        "kit",
        amqp_url=f"amqp://{credentials}127.0.0.1:{proxy.port}/",
        amqp_reconnect_interval_s=0.2,
        shutdown_grace_s=GRACE_S,
    )
    runtime = ServiceRuntime(service="kit", settings=settings, indexes={})
    runtime.subscribe(WORK, {UserSignedUp.event_type: ignore})
    isolation.track_runtime(runtime)
    await runtime.start()
    yield runtime, proxy
    await proxy.cut()


async def stop_time(runtime: ServiceRuntime) -> float:
    started = time.monotonic()
    stopping = asyncio.create_task(runtime.stop())
    done, _ = await asyncio.wait({stopping}, timeout=GRACE_S + 10)
    if not done:
        stopping.cancel()
        raise AssertionError("stop never finished")
    stopping.result()
    return time.monotonic() - started


async def test_a_runtime_stops_within_its_grace_while_the_broker_is_gone(
    proxied_runtime: tuple[ServiceRuntime, CuttableProxy],
) -> None:
    runtime, proxy = proxied_runtime
    await proxy.cut()

    async def knows_the_broker_is_gone() -> bool:
        return (await runtime.readiness())[1]["broker"] == "down"

    await wait_until(knows_the_broker_is_gone)
    assert await stop_time(runtime) < GRACE_S + MARGIN_S


async def test_a_runtime_stops_within_its_grace_while_the_broker_stops_answering(
    proxied_runtime: tuple[ServiceRuntime, CuttableProxy],
) -> None:
    runtime, proxy = proxied_runtime
    proxy.stall()
    assert (await runtime.readiness())[1]["broker"] == "ok"  # nothing tells it otherwise
    assert await stop_time(runtime) < GRACE_S + MARGIN_S
