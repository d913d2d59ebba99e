"""Test support: infrastructure discovery, isolated namespaces, event taps, waiting."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from shared.contracts import Event
from shared.envelope import Envelope
from shared.runtime import ServiceRuntime
from shared.settings import ServiceSettings
from shared.topology import Naming, RetryPolicy, WorkQueue, delete_work_queue

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")
S = TypeVar("S", bound=ServiceSettings)


@dataclass(frozen=True)
class InfraUrls:
    amqp_url: str
    mongo_url: str


def discover_infra() -> InfraUrls:
    """Environment first, then the project's local servers, then testcontainers."""
    amqp = os.environ.get("GRANTWIRE_TEST_AMQP_URL")
    mongo = os.environ.get("GRANTWIRE_TEST_MONGO_URL")
    if amqp and mongo:
        return InfraUrls(amqp, mongo)
    env_file = ROOT / ".infra" / "env"
    if not env_file.exists():
        subprocess.run([sys.executable, str(ROOT / "deploy/local/infra.py"), "up"], check=False)
    if env_file.exists():
        values = dict(
            line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line
        )
        return InfraUrls(values["GRANTWIRE_AMQP_URL"], values["GRANTWIRE_MONGO_URL"])
    if shutil.which("docker") and _docker_answers():
        return _testcontainers()
    raise RuntimeError(
        "no broker/database: set GRANTWIRE_TEST_AMQP_URL and GRANTWIRE_TEST_MONGO_URL, "
        "or run `make infra-up`"
    )


def _docker_answers() -> bool:
    result = subprocess.run(["docker", "info"], capture_output=True, check=False)
    return result.returncode == 0


def _testcontainers() -> InfraUrls:  # pragma: no cover - only where a Docker engine runs
    from testcontainers.mongodb import MongoDbContainer
    from testcontainers.rabbitmq import RabbitMqContainer

    rabbit = RabbitMqContainer("rabbitmq:3.13-management").start()
    mongo = MongoDbContainer("mongo:7.0").with_command("--replSet rs0 --bind_ip_all").start()
    mongo.exec(["mongosh", "--quiet", "--eval", "rs.initiate()"])
    host, port = rabbit.get_container_host_ip(), rabbit.get_exposed_port(5672)
    mongo_port = mongo.get_exposed_port(27017)
    return InfraUrls(
        f"amqp://guest:guest@{host}:{port}/",
        f"mongodb://{host}:{mongo_port}/?replicaSet=rs0&directConnection=true",
    )


@dataclass
class Isolation:
    """One test's private names: a broker namespace and database names."""

    urls: InfraUrls
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    tracked: list[tuple[WorkQueue, RetryPolicy]] = field(default_factory=list)

    @property
    def naming(self) -> Naming:
        return Naming(f"t{self.token}.")

    def db_name(self, service: str) -> str:
        return f"t{self.token}_{service}"

    def env(self, service: str, **extra: str) -> dict[str, str]:
        """Environment variables for a service process under this isolation."""
        return {
            "GRANTWIRE_AMQP_URL": self.urls.amqp_url,
            "GRANTWIRE_MONGO_URL": self.urls.mongo_url,
            "GRANTWIRE_NAMESPACE": self.naming.namespace,
            "GRANTWIRE_MONGO_DB": self.db_name(service),
            **extra,
        }

    def settings(self, cls: type[S], service: str, **overrides: Any) -> S:
        """Service settings pointing at this isolation, with test-friendly timings."""
        values: dict[str, Any] = {
            "amqp_url": self.urls.amqp_url,
            "mongo_url": self.urls.mongo_url,
            "mongo_db": self.db_name(service),
            "namespace": self.naming.namespace,
            "retry_delays_s": (0.05, 0.1),
            "max_attempts": 3,
            "outbox_poll_interval_s": 0.2,
            "shutdown_grace_s": 5.0,
        }
        values.update(overrides)
        return cls(**values)

    def track_runtime(self, runtime: ServiceRuntime) -> None:
        """Delete every queue family of ``runtime`` at teardown."""
        for work_queue in runtime.work_queues:
            self.track(work_queue, runtime.settings.consumer_settings().retry)

    def track(self, work_queue: WorkQueue, retry: RetryPolicy) -> None:
        """Delete this queue family at teardown."""
        self.tracked.append((work_queue, retry))

    async def cleanup(self, connection: AbstractRobustConnection) -> None:
        channel = await connection.channel()
        for work_queue, retry in self.tracked:
            await delete_work_queue(channel, self.naming, work_queue, retry)
        await channel.queue_delete(self.naming.event_log)
        await channel.exchange_delete(self.naming.events_exchange)
        await channel.exchange_delete(self.naming.dead_letter_exchange)
        await channel.close()


PROBE_GRACE_S = 5.0


async def wait_until(
    probe: Callable[[], Awaitable[T]], *, timeout: float = 10.0, interval: float = 0.02
) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds,
    also when a probe itself has not answered a few seconds after that."""
    deadline = time.monotonic() + timeout

    async def answer() -> T:
        # a probe under way at the deadline may finish (a get and its nack, say)
        limit = asyncio.timeout(max(deadline - time.monotonic(), 0.0) + PROBE_GRACE_S)
        try:
            async with limit:
                return await probe()
        except TimeoutError:
            if not limit.expired():
                raise  # the probe's own
            raise AssertionError(
                f"the probe did not answer within {timeout}s + {PROBE_GRACE_S}s"
            ) from None

    last: T = await answer()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {last!r})")
        await asyncio.sleep(interval)
        last = await answer()
    return last


class EventTap:
    """A private queue bound to event types; collects what the services publish."""

    def __init__(self) -> None:
        self.messages: list[AbstractIncomingMessage] = []
        self._changed = asyncio.Event()

    @classmethod
    async def open(
        cls, connection: AbstractRobustConnection, naming: Naming, routing_keys: list[str]
    ) -> EventTap:
        tap = cls()
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            naming.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in routing_keys:
            await queue.bind(exchange, routing_key=key)
        await queue.consume(tap._collect, no_ack=True)
        return tap

    async def _collect(self, message: AbstractIncomingMessage) -> None:
        self.messages.append(message)
        self._changed.set()

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        import json

        return [json.loads(m.body) for m in self.messages if m.type == event_type]

    async def wait_for(
        self, predicate: Callable[[list[AbstractIncomingMessage]], bool], timeout: float = 10.0
    ) -> list[AbstractIncomingMessage]:
        async def probe() -> bool:
            return predicate(self.messages)

        await wait_until(probe, timeout=timeout)
        return self.messages


async def publish_event(
    connection: AbstractRobustConnection,
    naming: Naming,
    event: Event,
    *,
    envelope: Envelope | None = None,
) -> Envelope:
    """Publish an event as the identity service would (persistent, confirmed)."""
    from shared.publisher import ConfirmingPublisher

    envelope = envelope or Envelope.new(event, source="tests")
    publisher = await ConfirmingPublisher.open(connection, naming.events_exchange)
    await publisher.publish(envelope)
    await publisher.channel.close()
    return envelope


@dataclass
class RunningService:
    """A service started in-process: its runtime and an HTTP client on its app."""

    runtime: ServiceRuntime
    http: Any  # httpx.AsyncClient


@asynccontextmanager
async def running_service(
    runtime: ServiceRuntime, app: Any, isolation: Isolation
) -> AsyncIterator[RunningService]:
    """Start ``runtime`` (consumers, relay) and serve ``app`` over an in-memory transport."""
    import httpx

    isolation.track_runtime(runtime)
    await runtime.start()
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
            yield RunningService(runtime, http)
    finally:
        await runtime.stop()


def bearer(
    secret: str, user_id: str, *, roles: tuple[str, ...] = (), email: str | None = None
) -> dict[str, str]:
    """``Authorization`` header of a valid HS256 token (``sub``, ``email``, ``roles``, 5 min)."""
    import jwt

    claims = {
        "sub": user_id,
        "email": email or f"{user_id}@example.com",
        "roles": list(roles),
        "exp": int(time.time()) + 300,
    }
    return {"Authorization": f"Bearer {jwt.encode(claims, secret, algorithm='HS256')}"}


def batches_seen(batch: str) -> tuple[float, float]:
    """(batches, items) a ``GroupCommit`` named ``batch`` ran so far, in this process."""
    from prometheus_client import REGISTRY

    count = REGISTRY.get_sample_value("grantwire_batch_size_count", {"batch": batch})
    total = REGISTRY.get_sample_value("grantwire_batch_size_sum", {"batch": batch})
    return count or 0.0, total or 0.0
