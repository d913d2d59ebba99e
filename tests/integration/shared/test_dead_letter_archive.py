"""The dead-letter archive keeps each letter once: by its letter id, not its message id and time.

Real RabbitMQ and MongoDB: the consumer stamps every letter it dead-letters; a letter the
broker dead-letters itself gets an id derived from what all its redeliveries share.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pymongo import ASCENDING, AsyncMongoClient

from shared.consumer import (
    H_ATTEMPTS,
    H_LAST_FAILURE_AT,
    H_LETTER_ID,
    H_ORIGINAL_EXCHANGE,
    H_ORIGINAL_ROUTING_KEY,
    H_REASON,
    PermanentError,
)
from shared.contracts import Event, UserSignedUp
from shared.deadletters import (
    DEAD_LETTERS,
    DeadLetterKeeper,
    dead_letter_document,
    dead_letter_indexes,
)
from shared.envelope import Envelope
from shared.mongo import Document, ensure_indexes
from shared.publisher import to_message
from shared.runtime import ServiceRuntime
from shared.settings import ServiceSettings
from shared.topology import RetryPolicy, WorkQueue, declare_work_queue
from tests.support import Isolation, wait_until

pytestmark = pytest.mark.integration

WORK = WorkQueue("kit", "work", (UserSignedUp.event_type,))


async def rejecting(event: Event, envelope: Envelope) -> None:
    raise PermanentError("domain_rejected", "never")


@pytest.fixture
async def kit(isolation: Isolation) -> AsyncIterator[ServiceRuntime]:
    runtime = ServiceRuntime(
        service="kit", settings=isolation.settings(ServiceSettings, "kit"), indexes={}
    )
    runtime.subscribe(WORK, {UserSignedUp.event_type: rejecting})
    isolation.track_runtime(runtime)
    await runtime.start()
    yield runtime
    await runtime.stop()


async def archived(runtime: ServiceRuntime, count: int) -> bool:
    return await runtime.db[DEAD_LETTERS].count_documents({}) >= count


def signup() -> UserSignedUp:
    return UserSignedUp(user_id="u1", email="u1@example.com", email_verified=True)


async def test_the_consumer_stamps_each_letter_so_one_message_failing_twice_is_kept_twice(
    kit: ServiceRuntime, amqp: AbstractRobustConnection, isolation: Isolation
) -> None:
    envelope = Envelope.new(signup(), source="tests")
    channel = await amqp.channel(publisher_confirms=True)
    events = await channel.get_exchange(isolation.naming.events_exchange)
    for _ in range(2):  # the same event twice (a duplicate delivery), rejected each time
        await events.publish(to_message(envelope), routing_key=UserSignedUp.event_type)
    await wait_until(lambda: archived(kit, 2), timeout=15)
    letters = await kit.db[DEAD_LETTERS].find().to_list()
    assert [letter["message_id"] for letter in letters] == [envelope.id] * 2
    stamps = [letter["properties"]["headers"][H_LETTER_ID] for letter in letters]
    assert len(set(stamps)) == 2
    assert sorted(letter["letter_id"] for letter in letters) == sorted(stamps)
    await channel.close()


async def test_two_letters_alike_but_for_their_letter_ids_are_both_kept_and_each_only_once(
    kit: ServiceRuntime, amqp: AbstractRobustConnection, isolation: Isolation
) -> None:
    channel = await amqp.channel(publisher_confirms=True)
    dead_letters = await channel.get_exchange(isolation.naming.dead_letter_exchange)
    failed_at = datetime.now(UTC).isoformat()  # one failure time: the same millisecond

    def letter(letter_id: str) -> aio_pika.Message:
        headers = {H_REASON: "schema_violation", H_LAST_FAILURE_AT: failed_at}
        return aio_pika.Message(
            b"{}",
            message_id="m-1",
            type="user.signed_up",
            headers={**headers, H_LETTER_ID: letter_id},
        )

    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    for letter_id in (first, second, first):  # the third: a redelivery before the keeper's ack
        await dead_letters.publish(letter(letter_id), routing_key=WORK.dlq_name(isolation.naming))
    keeper = kit._keeper
    assert keeper is not None

    async def all_settled() -> bool:
        return keeper.kept == 3

    await wait_until(all_settled)
    kept = await kit.db[DEAD_LETTERS].find({"message_id": "m-1"}).to_list()
    assert sorted(letter["letter_id"] for letter in kept) == sorted([first, second])
    await channel.close()


async def test_a_letter_the_broker_dead_letters_gets_one_derived_id_for_all_its_redeliveries(
    isolation: Isolation, amqp: AbstractRobustConnection, mongo: AsyncMongoClient[Document]
) -> None:
    channel = await amqp.channel(publisher_confirms=True)
    retry = RetryPolicy((0.05,), 2)
    isolation.track(WORK, retry)
    work = await declare_work_queue(channel, isolation.naming, WORK, retry, delivery_limit=1)
    dlq = await channel.get_queue(WORK.dlq_name(isolation.naming))
    message = to_message(Envelope.new(signup(), source="tests"))
    message.headers = {
        **message.headers,
        H_LETTER_ID: "claimed-by-the-publisher",
        # a publisher's claims of an earlier failure: replay must not follow them
        H_ORIGINAL_EXCHANGE: "",
        H_ORIGINAL_ROUTING_KEY: "some.other.queue",
        H_REASON: "forged_reason",
        H_ATTEMPTS: 99,
    }
    events = await channel.get_exchange(isolation.naming.events_exchange)
    await events.publish(message, routing_key=UserSignedUp.event_type)

    async def returned_past_its_delivery_limit() -> AbstractIncomingMessage | None:
        delivery = await work.get(fail=False)
        if delivery is not None:
            await delivery.nack(requeue=True)  # what a process crashing on it amounts to
            return None
        return await dlq.get(fail=False)

    letter = await wait_until(returned_past_its_delivery_limit, timeout=15)
    first = dead_letter_document(letter, service="kit")
    await letter.nack(requeue=True)  # as if the keeper crashed before its ack
    redelivered = await dlq.get(timeout=5)
    assert redelivered.redelivered
    again = dead_letter_document(redelivered, service="kit")
    await redelivered.nack(requeue=True)
    await channel.close()
    assert first["reason"] == "broker:delivery_limit"
    assert first["letter_id"].startswith("derived-")  # the publisher's claim is not ours
    # where it came from and why it failed: the broker's record, not the publisher's headers
    assert (first["original_exchange"], first["original_routing_key"]) == (
        isolation.naming.events_exchange,
        UserSignedUp.event_type,
    )
    assert first["attempts"] == 1 and first["error_type"] == "broker:delivery_limit"
    assert again["letter_id"] == first["letter_id"]

    db = mongo[isolation.db_name("kit")]
    await ensure_indexes(db, dead_letter_indexes(timedelta(days=1)))
    keeper = DeadLetterKeeper(
        service="kit", connection=amqp, db=db, naming=isolation.naming, work_queues=[WORK]
    )
    await keeper.start()
    try:

        async def kept() -> bool:
            return keeper.kept == 1

        await wait_until(kept)
        [stored] = await db[DEAD_LETTERS].find().to_list()
        assert stored["letter_id"] == first["letter_id"]
    finally:
        await keeper.stop()


async def test_startup_replaces_the_old_one_copy_per_failure_index(
    isolation: Isolation, mongo: AsyncMongoClient[Document]
) -> None:
    db = mongo[isolation.db_name("kit")]
    old_key = [("queue", ASCENDING), ("message_id", ASCENDING), ("failed_at", ASCENDING)]
    await db[DEAD_LETTERS].create_index(old_key, unique=True, name="one_copy_per_failure")
    failed_at = datetime.now(UTC).replace(microsecond=0)
    old_letter = {"queue": "kit.work.dlq", "message_id": "m-1", "failed_at": failed_at}
    await db[DEAD_LETTERS].insert_one(dict(old_letter))  # archived before letter ids
    runtime = ServiceRuntime(
        service="kit", settings=isolation.settings(ServiceSettings, "kit"), indexes={}
    )
    await runtime.start(consume=False)
    try:
        names = set(await db[DEAD_LETTERS].index_information())
        assert "one_copy_per_failure" not in names and "one_copy_per_letter" in names
        for letter_id in ("a", "b"):  # the old index refused the second one
            await db[DEAD_LETTERS].insert_one({**old_letter, "letter_id": letter_id})
        assert await db[DEAD_LETTERS].count_documents({}) == 3
    finally:
        await runtime.stop()
