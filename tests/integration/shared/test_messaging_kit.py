"""The messaging kit against the real RabbitMQ and a real MongoDB replica set."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from urllib.parse import urlparse

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import REGISTRY

from shared.consumer import (
    H_ATTEMPTS,
    H_ERROR_TYPE,
    H_FIRST_FAILURE_AT,
    H_LAST_FAILURE_AT,
    H_ORIGINAL_EXCHANGE,
    H_ORIGINAL_ROUTING_KEY,
    H_REASON,
    H_SERVICE,
    PermanentError,
)
from shared.contracts import Event, OrganizationProvisioned, UserSignedUp
from shared.envelope import H_SCHEMA_VERSION, Envelope
from shared.outbox import OUTBOX, OutboxRelay, stage_events
from shared.publisher import ConfirmingPublisher, UnroutableError, to_message
from shared.runtime import ServiceRuntime
from shared.settings import ServiceSettings
from shared.topology import WorkQueue
from tests.proxy import CuttableProxy
from tests.support import EventTap, Isolation, publish_event, wait_until

pytestmark = pytest.mark.integration

WORK = WorkQueue("kit", "work", (UserSignedUp.event_type,))
Handler = Callable[[Event, Envelope], Awaitable[None]]


def signup(n: int = 1) -> UserSignedUp:
    return UserSignedUp(user_id=f"u{n}", email=f"u{n}@example.com", email_verified=True)


def settings_for(isolation: Isolation, **overrides: object) -> ServiceSettings:
    values: dict[str, object] = {
        "amqp_url": isolation.urls.amqp_url,
        "mongo_url": isolation.urls.mongo_url,
        "mongo_db": isolation.db_name("kit"),
        "namespace": isolation.naming.namespace,
        "retry_delays_s": (0.05, 0.1),
        "max_attempts": 3,
        "outbox_poll_interval_s": 0.2,
        "keep_dead_letters": False,  # these tests read the dead-letter queue itself
    }
    values.update(overrides)
    return ServiceSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def make_runtime(
    isolation: Isolation,
) -> AsyncIterator[Callable[..., Awaitable[ServiceRuntime]]]:
    started: list[ServiceRuntime] = []

    async def make(handler: Handler | None = None, **overrides: object) -> ServiceRuntime:
        settings = settings_for(isolation, **overrides)
        runtime = ServiceRuntime(service="kit", settings=settings, indexes={})
        if handler is not None:
            runtime.subscribe(WORK, {UserSignedUp.event_type: handler})
            isolation.track(WORK, settings.consumer_settings().retry)
        await runtime.start()
        started.append(runtime)
        return runtime

    yield make
    for runtime in started:
        await runtime.stop()


async def dead_letters(
    amqp: AbstractRobustConnection, isolation: Isolation, expected: int
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    channel = await amqp.channel()
    queue = await channel.get_queue(WORK.dlq_name(isolation.naming))
    got: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def drained() -> bool:
        message = await queue.get(fail=False, no_ack=True)
        if message is not None:
            got.append(message)
        return len(got) >= expected

    await wait_until(drained, timeout=10)
    return got


async def test_aborted_transaction_publishes_nothing_and_committed_one_publishes_its_events(
    make_runtime: Callable[..., Awaitable[ServiceRuntime]],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
) -> None:
    runtime = await make_runtime()
    tap = await EventTap.open(amqp, isolation.naming, [OrganizationProvisioned.event_type])
    aborted = Envelope.new(OrganizationProvisioned(user_id="a", organization_id="o"), source="kit")
    committed = [
        Envelope.new(OrganizationProvisioned(user_id=f"c{i}", organization_id="o"), source="kit")
        for i in range(3)
    ]

    async def fail_after_staging(session: object) -> None:
        await stage_events(runtime.db, session, [aborted], aggregate_id="a")  # type: ignore[arg-type]
        raise RuntimeError("state change failed")

    with pytest.raises(RuntimeError):
        await runtime.commit(fail_after_staging)

    async def stage(session: object) -> None:
        await runtime.db["state"].insert_one({"_id": "c"}, session=session)  # type: ignore[arg-type]
        await stage_events(runtime.db, session, committed, aggregate_id="c")  # type: ignore[arg-type]

    await runtime.commit(stage)
    await tap.wait_for(lambda msgs: len(msgs) >= 3)
    await runtime.relay.flush()
    assert [m.message_id for m in tap.messages] == [e.id for e in committed]
    assert await runtime.db[OUTBOX].count_documents({"event_id": aborted.id}) == 0
    first = tap.messages[0]
    assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert first.headers["cloudEvents:specversion"] == "1.0"
    assert first.headers[H_SCHEMA_VERSION] == "1.0"
    assert json.loads(first.body) == {"user_id": "c0", "organization_id": "o"}


async def test_unroutable_publish_raises(
    make_runtime: Callable[..., Awaitable[ServiceRuntime]],
) -> None:
    runtime = await make_runtime(event_log_enabled=False)
    envelope = Envelope.new(OrganizationProvisioned(user_id="u", organization_id="o"), source="t")
    with pytest.raises(UnroutableError):
        await runtime.publisher.publish(envelope)


async def test_an_event_nobody_consumes_yet_is_kept_in_the_event_log_and_the_outbox_drains(
    make_runtime: Callable[..., Awaitable[ServiceRuntime]],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
) -> None:
    runtime = await make_runtime()
    envelope = Envelope.new(OrganizationProvisioned(user_id="u", organization_id="o"), source="t")

    async def stage(session: object) -> None:
        await stage_events(runtime.db, session, [envelope], aggregate_id="u")  # type: ignore[arg-type]

    await runtime.commit(stage)
    await wait_until(lambda: _count(runtime, {"status": "sent"}, 1))
    channel = await amqp.channel()
    await channel.set_qos(prefetch_count=10)
    log = await channel.get_queue(isolation.naming.event_log)
    logged: list[str | None] = []

    async def keep(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        logged.append(message.message_id)
        await message.ack()

    await log.consume(keep, arguments={"x-stream-offset": "first"})

    async def seen() -> bool:
        return envelope.id in logged

    await wait_until(seen)
    await channel.close()


async def test_relay_delivers_what_was_written_while_the_broker_was_unreachable(
    isolation: Isolation, amqp: AbstractRobustConnection, mongo: object
) -> None:
    target = urlparse(isolation.urls.amqp_url)
    proxy = CuttableProxy(target.hostname or "127.0.0.1", target.port or 5672)
    await proxy.start()
    via_proxy = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
    runtime = ServiceRuntime(
        service="kit",
        settings=settings_for(
            isolation,
            amqp_url=via_proxy,
            amqp_reconnect_interval_s=0.2,
            outbox_max_backoff_s=0.5,
        ),
        indexes={},
    )
    await runtime.start()
    tap = await EventTap.open(amqp, isolation.naming, [OrganizationProvisioned.event_type])
    try:
        await proxy.cut()
        envelopes = [
            Envelope.new(OrganizationProvisioned(user_id=f"u{i}", organization_id="o"), source="k")
            for i in range(20)
        ]
        for env in envelopes:

            async def stage(session: object, env: Envelope = env) -> None:
                await stage_events(runtime.db, session, [env], aggregate_id=env.id)  # type: ignore[arg-type]

            await runtime.commit(stage)

        async def still_pending() -> bool:
            return await runtime.db[OUTBOX].count_documents({"status": "pending"}) == 20

        assert await still_pending()

        async def not_ready() -> bool:
            ready, checks = await runtime.readiness()
            return not ready and checks["broker"] == "down"

        await wait_until(not_ready)
        await proxy.restore()
        await tap.wait_for(lambda msgs: len(msgs) >= 20, timeout=30)
        assert sorted(m.message_id or "" for m in tap.messages) == sorted(e.id for e in envelopes)
        await wait_until(lambda: _count(runtime, {"status": "sent"}, 20), timeout=10)

        async def ready_again() -> bool:
            return (await runtime.readiness())[0]

        await wait_until(ready_again)
    finally:
        await runtime.stop()
        await proxy.cut()


async def _count(runtime: ServiceRuntime, query: dict[str, object], expected: int) -> bool:
    return await runtime.db[OUTBOX].count_documents(query) == expected


async def test_poison_message_is_dead_lettered_with_its_reason_and_not_retried(
    make_runtime: Callable[..., Awaitable[ServiceRuntime]],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
) -> None:
    calls: list[str] = []

    async def handler(event: Event, envelope: Envelope) -> None:
        calls.append(envelope.id)
        raise PermanentError("domain_rejected", "this can never work")

    await make_runtime(handler)
    channel = await amqp.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(isolation.naming.events_exchange)
    bad_json = aio_pika.Message(
        b"{not json", message_id="bad-json", type="user.signed_up", headers={}
    )
    missing_field = aio_pika.Message(
        b'{"user_id": "u1"}', message_id="missing-field", type="user.signed_up"
    )
    future_major = aio_pika.Message(
        signup().model_dump_json().encode(),
        message_id="future-major",
        type="user.signed_up",
        headers={H_SCHEMA_VERSION: "2.0"},
    )
    # aiormq always sets a message_id; a missing id is covered by the envelope unit tests
    no_type = aio_pika.Message(signup().model_dump_json().encode(), message_id="no-type")
    xml = aio_pika.Message(
        signup().model_dump_json().encode(),
        message_id="xml",
        type="user.signed_up",
        content_type="application/xml",
    )
    too_deep = aio_pika.Message(
        b'{"user_id": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        message_id="too-deep",
        type="user.signed_up",
    )
    for message in (bad_json, missing_field, future_major, no_type, xml, too_deep):
        await exchange.publish(message, routing_key="user.signed_up")
    rejected = await publish_event(amqp, isolation.naming, signup(2))

    letters = await dead_letters(amqp, isolation, expected=7)
    reasons = {m.message_id: m.headers[H_REASON] for m in letters}
    assert reasons["bad-json"] == "invalid_json"
    assert reasons["missing-field"] == "schema_violation"
    assert reasons["future-major"] == "unsupported_version"
    assert reasons["no-type"] == "bad_envelope"
    assert reasons["xml"] == "unsupported_content_type"
    assert reasons["too-deep"] == "invalid_json"
    assert reasons[rejected.id] == "domain_rejected"
    assert calls == [rejected.id]  # poison never reached the handler; the rejection ran once
    by_id = {m.message_id: m for m in letters}
    assert by_id[rejected.id].headers[H_ATTEMPTS] == 1
    assert by_id[rejected.id].headers[H_SERVICE] == "kit"
    assert by_id[rejected.id].headers[H_ORIGINAL_ROUTING_KEY] == "user.signed_up"
    assert by_id[rejected.id].headers[H_ORIGINAL_EXCHANGE] == isolation.naming.events_exchange
    assert by_id[rejected.id].body == rejected.body


async def test_oversized_message_is_dead_lettered(
    make_runtime: Callable[..., Awaitable[ServiceRuntime]],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
) -> None:
    calls: list[str] = []

    async def handler(event: Event, envelope: Envelope) -> None:
        calls.append(envelope.id)

    await make_runtime(handler, max_message_bytes=1024)
    big = UserSignedUp(
        user_id="u1", email="u1@example.com", email_verified=True, first_name="x" * 200
    )
    payload = json.loads(big.model_dump_json()) | {"padding": "y" * 2000}
    envelope = Envelope.new(big, source="t")
    envelope = Envelope(**{**envelope.__dict__, "body": json.dumps(payload).encode()})
    await publish_event(amqp, isolation.naming, big, envelope=envelope)
    [letter] = await dead_letters(amqp, isolation, expected=1)
    assert letter.headers[H_REASON] == "oversize"
    assert letter.message_id == envelope.id
    assert calls == []


async def test_transient_failure_is_retried_with_delays_then_dead_lettered(
    make_runtime: Callable[..., Awaitable[ServiceRuntime]],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
) -> None:
    seen: list[tuple[str, float]] = []

    async def handler(event: Event, envelope: Envelope) -> None:
        seen.append((envelope.id, asyncio.get_running_loop().time()))
        raise ConnectionError("database unreachable")

    await make_runtime(handler, retry_delays_s=(0.2, 0.4), max_attempts=3)
    envelope = await publish_event(amqp, isolation.naming, signup())
    [letter] = await dead_letters(amqp, isolation, expected=1)
    assert [event_id for event_id, _ in seen] == [envelope.id] * 3
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(seen)]
    assert gaps[0] >= 0.18 and gaps[1] >= 0.38  # each retry waited for its delay tier
    assert letter.headers[H_REASON] == "retries_exhausted"
    assert letter.headers[H_ATTEMPTS] == 3
    assert letter.headers[H_ERROR_TYPE] == "ConnectionError"
    assert letter.headers[H_FIRST_FAILURE_AT] <= letter.headers[H_LAST_FAILURE_AT]
    assert letter.headers[H_ORIGINAL_ROUTING_KEY] == "user.signed_up"
    assert letter.message_id == envelope.id and letter.body == envelope.body


FORGED_FAILURE_HEADERS = {
    H_ATTEMPTS: 99,
    H_ORIGINAL_EXCHANGE: "elsewhere",
    H_ORIGINAL_ROUTING_KEY: "user.deleted",
    H_FIRST_FAILURE_AT: "2001-01-01T00:00:00+00:00",
    H_REASON: "ok",
}


async def publish_with_headers(
    amqp: AbstractRobustConnection,
    exchange_name: str,
    routing_key: str,
    envelope: Envelope,
    headers: dict[str, object],
) -> None:
    channel = await amqp.channel(publisher_confirms=True)
    message = to_message(envelope)
    message.headers = {**message.headers, **headers}  # type: ignore[dict-item]
    exchange = (
        channel.default_exchange
        if exchange_name == ""
        else await channel.get_exchange(exchange_name)
    )
    await exchange.publish(message, routing_key=routing_key)
    await channel.close()


async def test_failure_headers_a_publisher_sends_are_ignored_and_retries_count_from_one(
    make_runtime: Callable[..., Awaitable[ServiceRuntime]],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
) -> None:
    seen: list[str] = []

    async def handler(event: Event, envelope: Envelope) -> None:
        seen.append(envelope.id)
        raise ConnectionError("database unreachable")

    await make_runtime(handler, retry_delays_s=(0.05, 0.1), max_attempts=3)
    envelope = Envelope.new(signup(), source="tests")
    await publish_with_headers(
        amqp, isolation.naming.events_exchange, "user.signed_up", envelope, FORGED_FAILURE_HEADERS
    )
    [letter] = await dead_letters(amqp, isolation, expected=1)
    assert seen == [envelope.id] * 3  # every attempt ran: the forged 99 counted for nothing
    assert letter.headers[H_ATTEMPTS] == 3  # counted by the consumer's own retry tiers
    assert letter.headers[H_REASON] == "retries_exhausted"
    assert letter.headers[H_ORIGINAL_EXCHANGE] == isolation.naming.events_exchange
    assert letter.headers[H_ORIGINAL_ROUTING_KEY] == "user.signed_up"
    assert letter.headers[H_FIRST_FAILURE_AT] != FORGED_FAILURE_HEADERS[H_FIRST_FAILURE_AT]


async def test_failure_headers_sent_straight_to_the_work_queue_are_ignored_too(
    make_runtime: Callable[..., Awaitable[ServiceRuntime]],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
) -> None:
    async def handler(event: Event, envelope: Envelope) -> None:
        raise PermanentError("domain_rejected", "never")

    await make_runtime(handler)
    envelope = Envelope.new(signup(), source="tests")
    work_queue = WORK.name(isolation.naming)
    # the default exchange and the work queue's name, as a retry tier would, but no expiry
    await publish_with_headers(amqp, "", work_queue, envelope, FORGED_FAILURE_HEADERS)
    [letter] = await dead_letters(amqp, isolation, expected=1)
    assert letter.headers[H_ATTEMPTS] == 1
    assert letter.headers[H_REASON] == "domain_rejected"
    assert letter.headers[H_ORIGINAL_EXCHANGE] == ""
    assert letter.headers[H_ORIGINAL_ROUTING_KEY] == work_queue
    assert letter.headers[H_FIRST_FAILURE_AT] != FORGED_FAILURE_HEADERS[H_FIRST_FAILURE_AT]


async def test_redelivered_message_reaches_the_handler_with_the_same_message_id(
    make_runtime: Callable[..., Awaitable[ServiceRuntime]],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
) -> None:
    seen: list[str] = []

    async def flaky(event: Event, envelope: Envelope) -> None:
        seen.append(envelope.id)
        if len(seen) == 1:
            raise TimeoutError("first attempt times out")

    await make_runtime(flaky)
    envelope = await publish_event(amqp, isolation.naming, signup())

    async def twice() -> bool:
        return len(seen) == 2

    await wait_until(twice)
    assert seen == [envelope.id, envelope.id]


async def test_message_in_flight_when_the_consumer_dies_is_redelivered_with_its_id(
    isolation: Isolation, amqp: AbstractRobustConnection
) -> None:
    seen: list[str] = []
    hang = asyncio.Event()

    async def handler(event: Event, envelope: Envelope) -> None:
        seen.append(envelope.id)
        if len(seen) == 1:
            await hang.wait()  # never acked: the process "dies" now

    settings = settings_for(isolation)
    isolation.track(WORK, settings.consumer_settings().retry)
    first = ServiceRuntime(service="kit", settings=settings, indexes={})
    first.subscribe(WORK, {UserSignedUp.event_type: handler})
    await first.start()
    envelope = await publish_event(amqp, isolation.naming, signup())

    async def received() -> bool:
        return len(seen) == 1

    await wait_until(received)
    assert first._connection is not None
    await first._connection.close()  # connection gone with the message unacked
    second = ServiceRuntime(service="kit", settings=settings, indexes={})
    second.subscribe(WORK, {UserSignedUp.event_type: handler})
    await second.start()
    try:

        async def redelivered() -> bool:
            return len(seen) == 2

        await wait_until(redelivered)
        assert seen == [envelope.id, envelope.id]
    finally:
        hang.set()
        await second.stop()


async def test_two_relays_publish_each_outbox_document_once(
    isolation: Isolation, amqp: AbstractRobustConnection, mongo: object
) -> None:
    runtime = ServiceRuntime(service="kit", settings=settings_for(isolation), indexes={})
    await runtime.start()
    tap = await EventTap.open(amqp, isolation.naming, [OrganizationProvisioned.event_type])
    peer_publisher = await ConfirmingPublisher.open(amqp, isolation.naming.events_exchange)
    peer = OutboxRelay(
        runtime.db,
        peer_publisher,
        owner="peer",
        lease_ttl=timedelta(seconds=2),
        poll_interval_s=0.05,
    )
    await peer.start()
    total = 300
    try:
        for batch in range(10):
            envelopes = [
                Envelope.new(
                    OrganizationProvisioned(user_id=f"u{batch}-{i}", organization_id="o"),
                    source="kit",
                )
                for i in range(total // 10)
            ]

            async def stage(session: object, envelopes: list[Envelope] = envelopes) -> None:
                await stage_events(runtime.db, session, envelopes, aggregate_id="agg")  # type: ignore[arg-type]

            await runtime.commit(stage)
            peer.wake()
        await tap.wait_for(lambda msgs: len(msgs) >= total, timeout=30)
        await wait_until(lambda: _count(runtime, {"status": "sent"}, total), timeout=10)
        ids = [m.message_id for m in tap.messages]
        assert len(ids) == total and len(set(ids)) == total

        async def counted() -> bool:
            return runtime.relay.published + peer.published >= total

        await wait_until(counted)
        assert runtime.relay.published + peer.published == total
    finally:
        await peer.stop()
        await runtime.stop()


async def test_messages_in_flight_are_exported_while_their_handler_runs(
    isolation: Isolation,
    amqp: AbstractRobustConnection,
    make_runtime: Callable[..., Awaitable[ServiceRuntime]],
) -> None:
    release = asyncio.Event()

    async def held(event: Event, envelope: Envelope) -> None:
        await release.wait()

    await make_runtime(held)
    labels = {"service": "kit", "queue": WORK.name(isolation.naming)}

    def in_flight() -> float:
        return REGISTRY.get_sample_value("grantwire_messages_in_flight", labels) or 0.0

    for _ in range(2):
        await publish_event(amqp, isolation.naming, signup())

    async def both_held() -> bool:
        return in_flight() == 2

    await wait_until(both_held)
    release.set()

    async def settled() -> bool:
        return in_flight() == 0

    await wait_until(settled)
