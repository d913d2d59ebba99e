"""Infrastructure scenario: the broker and the database go away under load and come back.

RabbitMQ and mongod are shared with other test runs on this machine, so they are never
restarted here: every service reaches them through a TCP proxy in this test process, and
cutting a proxy (every connection dropped, every new one closed at once) is what a server
restart looks like from the service. Each service's ``/readyz`` must turn 503 during a cut and 200
again afterwards, without any restart of the services; then the invariants hold.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from urllib.parse import urlparse, urlunparse

import pytest
from aio_pika.abc import AbstractRobustConnection

from grantwire.system import SERVICES
from tests.proxy import CuttableProxy
from tests.reliability.conftest import running_system
from tests.reliability.harness import ChaosSystem, Driver, LoopWatch, Summary, make_stories
from tests.support import Isolation

pytestmark = pytest.mark.e2e

STORIES = int(os.environ.get("GRANTWIRE_CHAOS_INFRA_STORIES", "600"))
RATE = 15.0
SEED = 1102
CUT_S = 5.0  # how long each server stays away


class HeldProxy(CuttableProxy):
    """A ``CuttableProxy`` that keeps its port while cut: every connection is dropped and
    each new one closed at once, but the listening socket stays bound, so no other process
    on this busy machine can take the port meanwhile (the services would reconnect to it)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self.away = False

    async def cut(self) -> None:
        self.away = True
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def restore(self) -> None:
        self.away = False

    async def close(self) -> None:
        await super().cut()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.away:
            writer.close()
            return
        await super()._serve(reader, writer)


@pytest.fixture
async def proxies(isolation: Isolation) -> AsyncIterator[dict[str, HeldProxy]]:
    found = {}
    for name, url, default_port in (
        ("broker", isolation.urls.amqp_url, 5672),
        ("database", isolation.urls.mongo_url, 27017),
    ):
        target = urlparse(url)
        proxy = HeldProxy(target.hostname or "127.0.0.1", target.port or default_port)
        await proxy.start()
        found[name] = proxy
    yield found
    for proxy in found.values():
        await proxy.close()


@pytest.fixture
async def proxied(
    request: pytest.FixtureRequest,
    isolation: Isolation,
    amqp: AbstractRobustConnection,
    proxies: dict[str, HeldProxy],
) -> AsyncIterator[ChaosSystem]:
    """The three services, reaching the broker and the database only through the proxies."""
    broker = urlparse(isolation.urls.amqp_url)
    credentials = f"{broker.username}:{broker.password}@" if broker.username else ""
    amqp_url = urlunparse(
        broker._replace(netloc=f"{credentials}127.0.0.1:{proxies['broker'].port}")
    )
    mongo_url = (
        f"mongodb://127.0.0.1:{proxies['database'].port}/"
        "?directConnection=true&heartbeatFrequencyMS=500&serverSelectionTimeoutMS=2000"
    )
    system = ChaosSystem(isolation, amqp, service_amqp_url=amqp_url, service_mongo_url=mongo_url)
    async with running_system(request, system) as running:
        yield running


async def answered(system: ChaosSystem, name: str) -> tuple[int | str, float]:
    """``/readyz`` of ``name`` and how long it took to answer.

    The client waits up to 15 s: while the database is away, ``/readyz`` answers only when
    its ping gives up (the driver's server selection timeout, 10 s: see the report).
    """
    started = time.monotonic()
    answer = await system.readiness(name, timeout=15.0)
    return answer, time.monotonic() - started


async def readiness_becomes(
    system: ChaosSystem, status: int, timeout: float, slowest: dict[str, float] | None = None
) -> dict[str, float]:
    """Seconds until each service's ``/readyz`` answered ``status``; fails past ``timeout``.

    ``slowest`` collects the longest time an answer took, per service.
    """
    started = time.monotonic()
    seen: dict[str, float] = {}
    answers: list[int | str] = []
    last: dict[str, int | str] = {}
    while len(seen) < len(SERVICES):
        timed = await asyncio.gather(*(answered(system, name) for name in SERVICES))
        answers = [answer for answer, _ in timed]
        if slowest is not None:
            for name, (_, took) in zip(SERVICES, timed, strict=True):
                slowest[name] = round(max(slowest.get(name, 0.0), took), 1)
        now = dict(zip(SERVICES, answers, strict=True))
        if now != last:
            system.trace(f"readyz {now}")
            last = now
        for name, answer in zip(SERVICES, answers, strict=True):
            if answer == status and name not in seen:
                seen[name] = round(time.monotonic() - started, 1)
        if time.monotonic() - started > timeout:
            raise AssertionError(
                f"/readyz never answered {status} within {timeout}s: seen {seen}, "
                f"last answers {dict(zip(SERVICES, answers, strict=True))}"
            )
        await asyncio.sleep(0.2)
    return seen


@pytest.mark.timeout(600)
async def test_services_ride_out_a_broker_and_a_database_outage_under_load(
    proxied: ChaosSystem, proxies: dict[str, HeldProxy]
) -> None:
    summary = Summary("infrastructure")
    inviters, stories = make_stories(STORIES, inviters=max(1, STORIES // 4), seed=SEED)
    driver = Driver(proxied, seed=SEED)
    deadline = time.monotonic() + 3 * STORIES / RATE + 120
    outages: list[dict[str, object]] = []
    pids = {p.name: p.process.pid for p in proxied.processes() if p.process is not None}

    async def outage(name: str) -> None:
        proxy = proxies[name]
        cut_at = time.monotonic()
        await proxy.cut()
        proxied.trace(f"{name} cut")
        slowest: dict[str, float] = {}
        down = await readiness_becomes(proxied, 503, timeout=45, slowest=slowest)
        await asyncio.sleep(max(0.0, cut_at + CUT_S - time.monotonic()))
        await proxy.restore()
        proxied.trace(f"{name} restored")
        restored_at = time.monotonic()
        up = await readiness_becomes(proxied, 200, timeout=120)
        outages.append(
            {
                "server": name,
                "away_s": round(restored_at - cut_at, 1),
                "not_ready_after_s": max(down.values()),
                "ready_again_after_s": max(up.values()),
                "slowest_readyz_s": max(slowest.values()),
            }
        )

    async def faults() -> None:
        await asyncio.sleep(6)
        await outage("broker")
        await asyncio.sleep(4)
        await outage("database")

    try:
        await driver.sign_up_inviters(inviters, rate=50)
        load_started = time.monotonic()
        async with LoopWatch(proxied.trace) as watch:
            await asyncio.gather(driver.play(stories, RATE, deadline), faults())
        summary.details["worst_loop_lag_s"] = round(watch.worst_s, 2)
        load_s = time.monotonic() - load_started
        summary.faults = len(outages)
        report = await proxied.converge(timeout=240)
        summary.violations = report.violations
        summary.details.update(
            stories=len(stories),
            load_s=round(load_s, 1),
            outages=" ".join(
                f"{o['server']}: away {o['away_s']}s, all 503 after {o['not_ready_after_s']}s "
                f"(slowest /readyz answer {o['slowest_readyz_s']}s), all 200 "
                f"{o['ready_again_after_s']}s after restore"
                for o in outages
            ),
            http_errors=dict(driver.http_errors),
            invites_recreated=driver.revoked_lost,
            referral_keys=report.referral_keys,
        )
        assert report.violations == 0, report.brief()
        assert report.referral_keys == 2 * len(stories), report.as_dict()
    finally:
        summary.events_sent = driver.sent
        summary.duplicates = proxied.duplicates_seen()
        summary.publish()
    assert [o["server"] for o in outages] == ["broker", "database"]
    now = {p.name: p.process.pid for p in proxied.processes() if p.process is not None}
    assert now == pids, f"a service was restarted: {pids} -> {now}"  # they reconnected alone
    assert all(p.process is not None and p.process.poll() is None for p in proxied.processes())


@pytest.mark.timeout(120)
async def test_a_service_stops_within_its_grace_while_the_broker_is_away(
    isolation: Isolation,
) -> None:
    from services.billing.app import build
    from services.billing.settings import BillingSettings

    target = urlparse(isolation.urls.amqp_url)
    broker = HeldProxy(target.hostname or "127.0.0.1", target.port or 5672)
    await broker.start()
    credentials = f"{target.username}:{target.password}@" if target.username else ""
    settings = isolation.settings(
        BillingSettings,
        "billing",
        amqp_url=f"amqp://{credentials}127.0.0.1:{broker.port}/",
        shutdown_grace_s=6.0,
        jwt_secret="s" * 32,
    )
    runtime, _ = build(settings)
    isolation.track_runtime(runtime)
    await runtime.start()
    try:
        await broker.cut()
        await asyncio.sleep(2)  # the service knows the broker is gone
        stopping = asyncio.create_task(runtime.stop())
        done, _ = await asyncio.wait({stopping}, timeout=settings.shutdown_grace_s + 2)
        if not done:
            stopping.cancel()
        assert done, f"stop did not finish within the grace ({settings.shutdown_grace_s:g} s)"
    finally:
        await broker.close()
