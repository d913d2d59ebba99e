"""`grantwire dlq` against the real broker and database: find, inspect, fix, replay."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import ServerSelectionTimeoutError
from typer.testing import CliRunner

from grantwire import dlq
from grantwire.cli import app
from grantwire.dlq import DeadLetterStore, ExchangeCheck, Filter
from shared.consumer import H_LAST_FAILURE_AT, H_REASON
from shared.contracts import Event, UserSignedUp
from shared.deadletters import DEAD_LETTER_AUDIT, DEAD_LETTERS
from shared.envelope import Envelope
from shared.publisher import ConfirmingPublisher
from shared.runtime import ServiceRuntime
from shared.settings import ServiceSettings
from shared.topology import WorkQueue
from tests.support import Isolation, publish_event, wait_until

pytestmark = pytest.mark.integration

WORK = WorkQueue("kit", "work", (UserSignedUp.event_type,))


class FlakyDependency:
    """A handler whose database is 'down' until fixed; counts the effects it applied."""

    def __init__(self) -> None:
        self.broken = True
        self.applied: list[str] = []

    async def handle(self, event: Event, envelope: Envelope) -> None:
        if self.broken:
            raise ConnectionError("billing database unreachable")
        if envelope.id not in self.applied:  # idempotent, like every real consumer
            self.applied.append(envelope.id)


@pytest.fixture
async def kit(isolation: Isolation) -> AsyncIterator[tuple[ServiceRuntime, FlakyDependency]]:
    dependency = FlakyDependency()
    settings = isolation.settings(ServiceSettings, "kit", retry_delays_s=(0.05,), max_attempts=2)
    runtime = ServiceRuntime(service="kit", settings=settings, indexes={})
    runtime.subscribe(WORK, {UserSignedUp.event_type: dependency.handle})
    isolation.track_runtime(runtime)
    await runtime.start()
    yield runtime, dependency
    await runtime.stop()


def cli(isolation: Isolation, *args: str, input: str | None = None) -> Any:
    env = {
        "GRANTWIRE_AMQP_URL": isolation.urls.amqp_url,
        "GRANTWIRE_MONGO_URL": isolation.urls.mongo_url,
        "GRANTWIRE_DLQ_DATABASES": json.dumps({"kit": isolation.db_name("kit")}),
        "GRANTWIRE_OPERATOR": "ops-test",
    }
    return CliRunner().invoke(app, list(args), env=env, input=input)


async def run(isolation: Isolation, *args: str) -> Any:
    result = await asyncio.to_thread(cli, isolation, *args)
    assert result.exit_code == 0, result.output
    return result


def report_of(result: Any) -> Any:
    """The replay report: the one JSON line among the command's output and notes."""
    return json.loads(next(line for line in result.output.splitlines() if line[:1] == "{"))


async def archived(runtime: ServiceRuntime, count: int) -> bool:
    return await runtime.db[DEAD_LETTERS].count_documents({}) >= count


async def dead_signups(
    runtime: ServiceRuntime, amqp: AbstractRobustConnection, isolation: Isolation, n: int
) -> list[Envelope]:
    """``n`` sign-ups published while the kit's dependency is broken, once all are archived."""
    sent = [await publish_event(amqp, isolation.naming, _signup(i)) for i in range(n)]
    await wait_until(lambda: archived(runtime, n), timeout=15)
    return sent


async def queue_depths(amqp: AbstractRobustConnection, isolation: Isolation) -> tuple[int, int]:
    channel = await amqp.channel()
    work = await channel.declare_queue(WORK.name(isolation.naming), passive=True)
    dlq = await channel.declare_queue(WORK.dlq_name(isolation.naming), passive=True)
    depths = (work.declaration_result.message_count, dlq.declaration_result.message_count)
    await channel.close()
    return depths


async def test_operator_finds_fixes_and_replays_dead_letters_exactly_once(
    kit: tuple[ServiceRuntime, FlakyDependency],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
) -> None:
    runtime, dependency = kit
    old = await dead_signups(runtime, amqp, isolation, 3)
    cut_off = datetime.now(UTC)
    newer = await publish_event(amqp, isolation.naming, _signup(99))
    await wait_until(lambda: archived(runtime, 4), timeout=15)

    # find: listing reads the archive and leaves the broker's queues as they were
    depths_before = await queue_depths(amqp, isolation)
    listed = json.loads((await run(isolation, "dlq", "list", "--json")).output)
    assert {row["message_id"] for row in listed} == {e.id for e in [*old, newer]}
    assert all(row["error_type"] == "ConnectionError" and row["attempts"] == 2 for row in listed)
    groups = json.loads((await run(isolation, "dlq", "list", "--group", "--json")).output)
    assert groups == [
        {
            "queue": WORK.dlq_name(isolation.naming),
            "event_type": "user.signed_up",
            "error_type": "ConnectionError",
            "count": 4,
        }
    ]
    assert await queue_depths(amqp, isolation) == depths_before

    # inspect
    shown = json.loads((await run(isolation, "dlq", "show", listed[0]["id"], "--json")).output)
    assert shown["body"]["user_id"] == "u0"
    assert shown["properties"]["headers"][H_REASON] == "retries_exhausted"

    # dry run changes nothing anywhere
    dry = await run(
        isolation,
        "dlq",
        "replay",
        "--service",
        "kit",
        "--before",
        cut_off.isoformat(),
        "--reason",
        "database is back",
        "--dry-run",
    )
    assert dry.output.count("would replay") == 3 and newer.id not in dry.output
    assert await runtime.db[DEAD_LETTERS].count_documents({"status": "dead"}) == 4
    assert await runtime.db[DEAD_LETTER_AUDIT].count_documents({}) == 0

    # fix the cause, replay what failed before the cut-off
    dependency.broken = False
    result = await run(
        isolation,
        "dlq",
        "replay",
        "--service",
        "kit",
        "--before",
        cut_off.isoformat(),
        "--reason",
        "database is back",
        "--batch-size",
        "2",
        "--rate",
        "50",
    )
    report = json.loads(result.output.splitlines()[-1])
    assert (report["selected"], report["replayed"], report["failed"]) == (3, 3, 0)

    async def applied_three() -> bool:
        return len(dependency.applied) == 3

    await wait_until(applied_three)
    assert sorted(dependency.applied) == sorted(e.id for e in old)  # same ids as originally

    # replaying the same selection again sends nothing
    again = json.loads(
        (
            await run(
                isolation,
                "dlq",
                "replay",
                "--service",
                "kit",
                "--before",
                cut_off.isoformat(),
                "--reason",
                "again",
            )
        ).output.splitlines()[-1]
    )
    assert again["selected"] == 0 and again["replayed"] == 0
    still_dead = json.loads((await run(isolation, "dlq", "list", "--json")).output)
    assert [row["message_id"] for row in still_dead] == [newer.id]

    # purge archives instead of destroying
    purge = await run(
        isolation, "dlq", "purge", still_dead[0]["id"], "--reason", "test data", "--yes"
    )
    assert json.loads(purge.output)["purged"] == 1
    doc = await runtime.db[DEAD_LETTERS].find_one({"message_id": newer.id})
    assert doc is not None and doc["status"] == "purged" and doc["purged_at"] is not None
    audit = await runtime.db[DEAD_LETTER_AUDIT].find({}, {"_id": 0}).sort("at", 1).to_list()
    assert [(a["action"], a["operator"]) for a in audit] == [
        ("replay", "ops-test"),
        ("replay", "ops-test"),
        ("purge", "ops-test"),
    ]
    assert audit[0]["reason"] == "database is back" and audit[0]["replayed"] == 3


async def test_replayed_message_keeps_id_correlation_and_body_and_says_who_replayed(
    kit: tuple[ServiceRuntime, FlakyDependency],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
) -> None:
    runtime, _ = kit
    original = await publish_event(amqp, isolation.naming, _signup(1))
    await wait_until(lambda: archived(runtime, 1), timeout=15)
    channel = await amqp.channel()
    redirect = await channel.declare_queue(exclusive=True)
    [row] = json.loads((await run(isolation, "dlq", "list", "--json")).output)
    await run(
        isolation, "dlq", "replay", row["id"], "--to-queue", redirect.name, "--reason", "look"
    )
    message = await redirect.get(timeout=5)
    assert message is not None
    assert message.message_id == original.id
    assert message.correlation_id == original.correlation_id
    assert message.body == original.body
    replay = json.loads(message.headers["x-grantwire-replay"])
    assert replay["by"] == "ops-test" and replay["reason"] == "look"
    assert "x-grantwire-attempts" not in message.headers  # a replay starts its retries afresh


async def test_batches_the_broker_partly_refuses_mark_each_letter_by_its_own_outcome(
    kit: tuple[ServiceRuntime, FlakyDependency],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
) -> None:
    runtime, dependency = kit
    sent = await dead_signups(runtime, amqp, isolation, 5)
    by_message = {d["message_id"]: d for d in await runtime.db[DEAD_LETTERS].find({}).to_list()}
    letters = [by_message[e.id] for e in sent]
    # letters 1 and 3 came straight to a queue that is gone since (the default exchange)
    refused = {letters[1]["_id"], letters[3]["_id"]}
    await runtime.db[DEAD_LETTERS].update_many(
        {"_id": {"$in": list(refused)}},
        {"$set": {"original_exchange": "", "original_routing_key": "gone." + sent[0].id}},
    )
    # letter 2 carries letter 1's message id (an event dead-lettered twice): the broker's
    # return of letter 1 must not be taken for letter 2's
    await runtime.db[DEAD_LETTERS].update_one(
        {"_id": letters[2]["_id"]},
        {"$set": {"message_id": sent[1].id, "properties.message_id": sent[1].id}},
    )
    dependency.broken = False
    result = await asyncio.to_thread(
        cli,
        isolation,
        "dlq",
        "replay",
        "--service",
        "kit",
        "--reason",
        "fixed",
        "--batch-size",
        "3",
    )
    assert result.exit_code == 1, result.output  # an operator sees that some failed
    report = report_of(result)
    assert (report["selected"], report["replayed"], report["failed"]) == (5, 3, 2)
    assert (report["skipped"], report["in_doubt"]) == (0, 0)
    assert {e.split(":")[0] for e in report["errors"]} == {str(i) for i in refused}
    assert all("UnroutableError" in e for e in report["errors"])

    async def delivered_three() -> bool:
        return len(dependency.applied) == 3

    await wait_until(delivered_three)
    after = {d["_id"]: d for d in await runtime.db[DEAD_LETTERS].find({}).to_list()}
    assert {i: d["status"] for i, d in after.items()} == {
        d["_id"]: ("dead" if d["_id"] in refused else "replayed") for d in letters
    }
    assert all("claim" not in d for d in after.values())
    for letter_id, doc in after.items():
        last = doc["history"][-1]
        if letter_id in refused:
            assert last["action"] == "replay_failed" and "gone." in last["error"]
        else:
            assert last["action"] == "replayed" and last["dead_letter_id"] == str(letter_id)


async def test_a_letter_whose_exchange_is_gone_fails_alone(
    kit: tuple[ServiceRuntime, FlakyDependency],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
) -> None:
    runtime, dependency = kit
    sent = await dead_signups(runtime, amqp, isolation, 3)
    gone = "gone." + sent[1].id
    await runtime.db[DEAD_LETTERS].update_one(
        {"message_id": sent[1].id}, {"$set": {"original_exchange": gone}}
    )
    dependency.broken = False
    result = await asyncio.to_thread(
        cli, isolation, "dlq", "replay", "--service", "kit", "--reason", "fixed"
    )
    assert result.exit_code == 1, result.output
    report = report_of(result)
    assert (report["replayed"], report["failed"], report["in_doubt"]) == (2, 1, 0)
    letter = await runtime.db[DEAD_LETTERS].find_one({"message_id": sent[1].id})
    assert letter is not None and letter["status"] == "dead" and "claim" not in letter
    assert letter["history"][-1]["action"] == "replay_failed"
    assert f"exchange '{gone}' does not exist" in letter["history"][-1]["error"]
    await wait_until(lambda: _applied(dependency, [sent[0].id, sent[2].id]))


async def test_a_connection_lost_under_a_batch_leaves_its_letters_in_doubt_not_dead(
    kit: tuple[ServiceRuntime, FlakyDependency],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime, dependency = kit
    sent = await dead_signups(runtime, amqp, isolation, 3)
    letter = await runtime.db[DEAD_LETTERS].find_one({"message_id": sent[1].id})
    assert letter is not None

    async def still_there(self: ExchangeCheck, name: str) -> bool:
        return True

    # its exchange is deleted right after the replay checked it: the broker closes the
    # replay's channel, and with it every confirm still pending there, whether or not the
    # broker had taken that message
    monkeypatch.setattr(ExchangeCheck, "exists", still_there)
    await runtime.db[DEAD_LETTERS].update_one(
        {"_id": letter["_id"]}, {"$set": {"original_exchange": "gone." + sent[1].id}}
    )
    dependency.broken = False
    result = await asyncio.to_thread(
        cli, isolation, "dlq", "replay", "--service", "kit", "--reason", "fixed"
    )
    assert result.exit_code == 1, result.output
    report = report_of(result)
    assert report["in_doubt"] >= 1 and report["failed"] == 0
    status = {
        d["message_id"]: d["status"] for d in await runtime.db[DEAD_LETTERS].find({}).to_list()
    }
    assert status[sent[1].id] == "replaying"  # may have been delivered: not dead, not re-sent
    assert set(status.values()) <= {"replaying", "replayed"}
    # the run stopped: it lets go of them, so --include-interrupted may take them at once
    assert await runtime.db[DEAD_LETTERS].count_documents({"claim": {"$exists": True}}) == 0

    # the next run sends none of them by itself; the operator fixes the cause and asks
    quiet = report_of(
        await run(isolation, "dlq", "replay", "--service", "kit", "--reason", "again")
    )
    assert quiet["selected"] == 0 and quiet["interrupted_before"] == report["in_doubt"]
    await runtime.db[DEAD_LETTERS].update_one(
        {"_id": letter["_id"]}, {"$set": {"original_exchange": letter["original_exchange"]}}
    )
    fixed = report_of(
        await run(
            isolation,
            "dlq",
            "replay",
            "--service",
            "kit",
            "--reason",
            "exchange back",
            "--include-interrupted",
        )
    )
    assert fixed["replayed"] == report["in_doubt"] and fixed["in_doubt"] == 0

    async def all_three() -> bool:
        return sorted(dependency.applied) == sorted(e.id for e in sent)

    await wait_until(all_three)


async def test_include_interrupted_takes_only_claims_no_run_may_still_be_sending(
    kit: tuple[ServiceRuntime, FlakyDependency],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
) -> None:
    runtime, dependency = kit
    running, crashed, dead, older = await dead_signups(runtime, amqp, isolation, 4)
    letters = runtime.db[DEAD_LETTERS]
    now = datetime.now(UTC)
    # and one was claimed by an older version of the command, which kept no claim time
    await letters.update_one(
        {"message_id": older.id}, {"$set": {"status": "replaying", "claim": "old-command"}}
    )
    # one letter is being sent by a run going on right now, one was claimed by a run that
    # died ten minutes ago
    await letters.update_one(
        {"message_id": running.id},
        {"$set": {"status": "replaying", "claim": "live-run", "claimed_at": now}},
    )
    await letters.update_one(
        {"message_id": crashed.id},
        {
            "$set": {
                "status": "replaying",
                "claim": "dead-run",
                "claimed_at": now - timedelta(minutes=10),
            }
        },
    )
    dependency.broken = False
    args = ("dlq", "replay", "--service", "kit", "--reason", "fixed", "--include-interrupted")
    result = await run(isolation, *args)
    report = report_of(result)
    assert (report["replayed"], report["claimed_by_running"]) == (3, 1)
    assert "claimed by a replay that may still be running" in result.output
    live = await letters.find_one({"message_id": running.id})
    assert live is not None
    assert (live["status"], live["claim"]) == ("replaying", "live-run")

    await wait_until(lambda: _applied(dependency, [crashed.id, dead.id, older.id]))
    # the operator who knows that run is gone says so
    taken = report_of(await run(isolation, *args, "--stale-claim-after", "0"))
    assert taken["replayed"] == 1
    assert (await letters.find_one({"message_id": running.id}) or {})["status"] == "replayed"


async def test_a_letter_a_running_replay_claims_after_selection_is_left_to_it(
    kit: tuple[ServiceRuntime, FlakyDependency],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime, dependency = kit
    first, second = await dead_signups(runtime, amqp, isolation, 2)
    select = DeadLetterStore.find

    async def select_then_lose_the_race(self: DeadLetterStore, flt: Filter, limit: int = 0) -> Any:
        found = await select(self, flt, limit)
        # between this run's selection and its claim, another run claims the first letter
        await self.db("kit")[DEAD_LETTERS].update_one(
            {"message_id": first.id},
            {
                "$set": {
                    "status": "replaying",
                    "claim": "other-run",
                    "claimed_at": datetime.now(UTC),
                }
            },
        )
        return found

    monkeypatch.setattr(DeadLetterStore, "find", select_then_lose_the_race)
    dependency.broken = False
    report = report_of(
        await run(
            isolation,
            *("dlq", "replay", "--service", "kit", "--reason", "race", "--include-interrupted"),
        )
    )
    assert (report["selected"], report["replayed"], report["skipped"]) == (2, 1, 1)
    other = await runtime.db[DEAD_LETTERS].find_one({"message_id": first.id})
    assert other is not None
    assert (other["status"], other["claim"]) == ("replaying", "other-run")
    await wait_until(lambda: _applied(dependency, [second.id]))


async def _applied(dependency: FlakyDependency, ids: list[str]) -> bool:
    return sorted(dependency.applied) == sorted(ids)


async def test_purge_needs_confirmation_off_a_terminal(
    kit: tuple[ServiceRuntime, FlakyDependency],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
) -> None:
    runtime, _ = kit
    await publish_event(amqp, isolation.naming, _signup(1))
    await wait_until(lambda: archived(runtime, 1), timeout=15)
    refused = await asyncio.to_thread(
        cli, isolation, "dlq", "purge", "--service", "kit", "--reason", "x"
    )
    assert refused.exit_code == 2
    assert await runtime.db[DEAD_LETTERS].count_documents({"status": "dead"}) == 1


async def test_a_dead_letter_redelivered_after_a_keeper_crash_is_kept_once(
    kit: tuple[ServiceRuntime, FlakyDependency],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
) -> None:
    runtime, _ = kit
    channel = await amqp.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(isolation.naming.dead_letter_exchange)
    headers = {H_REASON: "schema_violation", H_LAST_FAILURE_AT: datetime.now(UTC).isoformat()}
    for _ in range(2):  # the same letter twice: archived, then redelivered before its ack
        await exchange.publish(
            aio_pika.Message(b"{}", message_id="m-1", type="user.signed_up", headers=headers),
            routing_key=WORK.dlq_name(isolation.naming),
        )
    keeper = runtime._keeper
    assert keeper is not None

    async def both_settled() -> bool:
        return keeper.kept == 2  # the second delivery was acked too, as a duplicate

    await wait_until(both_settled)
    assert (await queue_depths(amqp, isolation))[1] == 0
    assert await runtime.db[DEAD_LETTERS].count_documents({"message_id": "m-1"}) == 1


def _signup(n: int) -> UserSignedUp:
    return UserSignedUp(user_id=f"u{n}", email=f"u{n}@example.com", email_verified=True)


def test_an_unreachable_database_is_a_clear_error_with_the_password_masked() -> None:
    env = {"GRANTWIRE_MONGO_URL": "mongodb://ops:s3cret@127.0.0.1:1/?serverSelectionTimeoutMS=300"}
    result = CliRunner().invoke(app, ["dlq", "list"], env=env)
    assert result.exit_code == 1
    assert "unavailable" in result.output and "s3cret" not in result.output


async def test_an_exchange_check_asks_each_name_once_and_leaves_no_channel_open(
    amqp: AbstractRobustConnection, isolation: Isolation
) -> None:
    channel = await amqp.channel()
    await channel.declare_exchange(isolation.naming.events_exchange, "topic", durable=True)
    underlay = amqp.transport
    assert underlay is not None
    channels = underlay.connection.channels
    before = len(channels)
    check = ExchangeCheck(amqp)
    # the broker closes the channel of each "not found": a robust channel would reopen
    # itself and stay open, one per missing exchange
    for n in range(30):
        assert not await check.exists(f"gone.{isolation.naming.namespace}{n}")
    assert await check.exists(isolation.naming.events_exchange)
    assert await check.exists("")
    assert len(channels) <= before + 1
    await channel.exchange_delete(isolation.naming.events_exchange)
    assert await check.exists(isolation.naming.events_exchange)  # asked once per run
    await channel.close()


async def test_letters_never_sent_go_back_to_the_status_they_were_claimed_from(
    kit: tuple[ServiceRuntime, FlakyDependency],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime, dependency = kit
    _, lost, later = await dead_signups(runtime, amqp, isolation, 3)
    letters = runtime.db[DEAD_LETTERS]
    by_message = {d["message_id"]: d["_id"] for d in await letters.find({}).to_list()}
    lost_id, later_id = by_message[lost.id], by_message[later.id]
    # `later` carries `lost`'s message id, so it waits for a second wave; `lost` goes to an
    # exchange deleted right after the check, so the first wave ends in doubt
    await letters.update_one(
        {"_id": later_id}, {"$set": {"message_id": lost.id, "properties.message_id": lost.id}}
    )
    await letters.update_one({"_id": lost_id}, {"$set": {"original_exchange": "gone." + lost.id}})

    async def still_there(self: ExchangeCheck, name: str) -> bool:
        return True

    select = DeadLetterStore.find

    async def select_then_another_run_lets_go(
        self: DeadLetterStore, flt: Filter, limit: int = 0
    ) -> Any:
        found = await select(self, flt, limit)
        # meanwhile another run claimed `later`, sent it, and let it go in doubt
        await self.db("kit")[DEAD_LETTERS].update_one(
            {"_id": later_id}, {"$set": {"status": "replaying"}}
        )
        return found

    monkeypatch.setattr(ExchangeCheck, "exists", still_there)
    monkeypatch.setattr(DeadLetterStore, "find", select_then_another_run_lets_go)
    dependency.broken = False
    args = ("dlq", "replay", "--service", "kit", "--reason", "x", "--include-interrupted")
    result = await asyncio.to_thread(cli, isolation, *args)
    assert result.exit_code == 1, result.output
    assert report_of(result)["in_doubt"] >= 1
    after = await letters.find_one({"_id": later_id})
    assert after is not None
    # never sent by this run: back to where this run found it (in doubt), not to dead
    assert after["status"] == "replaying"
    assert not {"claim", "claimed_at", "claimed_from"} & set(after)


async def test_a_batch_held_up_by_the_broker_keeps_its_claim_fresh(
    kit: tuple[ServiceRuntime, FlakyDependency],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime, dependency = kit
    (sent,) = await dead_signups(runtime, amqp, isolation, 1)
    monkeypatch.setattr(dlq, "CLAIM_RENEWAL", timedelta(seconds=0.05))
    publish = ConfirmingPublisher.publish_message
    url, name = isolation.urls.mongo_url, isolation.db_name("kit")

    async def blocked_until_renewed(self: ConfirmingPublisher, message: Any, **kw: Any) -> None:
        # the broker holds the publish (a memory alarm, say) until the claim was renewed
        client: AsyncMongoClient[Any] = AsyncMongoClient(url, tz_aware=True)
        try:
            letters = client[name][DEAD_LETTERS]
            first = (await letters.find_one({"message_id": sent.id}) or {})["claimed_at"]

            async def renewed() -> bool:
                now = (await letters.find_one({"message_id": sent.id}) or {})["claimed_at"]
                return bool(now > first)

            await wait_until(renewed, timeout=5)
        finally:
            await client.close()
        await publish(self, message, **kw)

    monkeypatch.setattr(ConfirmingPublisher, "publish_message", blocked_until_renewed)
    dependency.broken = False
    report = report_of(await run(isolation, "dlq", "replay", "--service", "kit", "--reason", "r"))
    assert (report["replayed"], report["in_doubt"]) == (1, 0)
    await wait_until(lambda: _applied(dependency, [sent.id]))


async def test_a_run_that_cannot_go_on_reports_and_audits_what_it_did(
    kit: tuple[ServiceRuntime, FlakyDependency],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime, _ = kit
    await dead_signups(runtime, amqp, isolation, 2)

    async def broker_gone(self: ExchangeCheck, name: str) -> bool:
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(ExchangeCheck, "exists", broker_gone)
    result = await asyncio.to_thread(
        cli, isolation, "dlq", "replay", "--service", "kit", "--reason", "r"
    )
    assert result.exit_code == 1, result.output
    report = report_of(result)
    assert "ConnectionError: broker unreachable" in report["stopped"]
    assert "the run stopped early" in result.output
    letters = await runtime.db[DEAD_LETTERS].find({}).to_list()
    assert [d["status"] for d in letters] == ["dead", "dead"]  # checked before any claim
    assert not any("claim" in d for d in letters)
    audit = await runtime.db[DEAD_LETTER_AUDIT].find_one({"operation_id": report["operation_id"]})
    assert audit is not None and audit["replayed"] == 0


@pytest.mark.parametrize("broker_lost_too", [False, True])
async def test_a_database_lost_at_the_marks_still_reports_what_was_delivered(
    kit: tuple[ServiceRuntime, FlakyDependency],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
    monkeypatch: pytest.MonkeyPatch,
    broker_lost_too: bool,
) -> None:
    runtime, dependency = kit
    sent = await dead_signups(runtime, amqp, isolation, 2)
    letters = {d["message_id"]: d["_id"] for d in await runtime.db[DEAD_LETTERS].find().to_list()}
    write = AsyncCollection.bulk_write

    async def database_gone(self: AsyncCollection[Any], requests: Any, **kw: Any) -> Any:
        if self.name == DEAD_LETTERS and self.database.name == isolation.db_name("kit"):
            raise ServerSelectionTimeoutError("no primary")
        return await write(self, requests, **kw)

    async def no_audit(self: DeadLetterStore, services: Any, record: Any) -> None:
        raise ServerSelectionTimeoutError("no primary")

    async def channel_closed(self: ConfirmingPublisher, message: Any, **kw: Any) -> None:
        raise ConnectionError("channel closed")  # maybe after the broker took it

    monkeypatch.setattr(AsyncCollection, "bulk_write", database_gone)
    monkeypatch.setattr(DeadLetterStore, "audit", no_audit)
    monkeypatch.setattr(dlq, "retry_transient", _once)
    if broker_lost_too:
        monkeypatch.setattr(ConfirmingPublisher, "publish_message", channel_closed)
    dependency.broken = False
    result = await asyncio.to_thread(
        cli, isolation, "dlq", "replay", "--service", "kit", "--reason", "r"
    )
    assert result.exit_code == 1, result.output
    report = report_of(result)
    assert "ServerSelectionTimeoutError" in report["stopped"]
    assert report["replayed"] == 0  # nothing is marked replayed
    assert report["in_doubt"] == (2 if broker_lost_too else 0)
    maybe_sent = next(e for e in report["errors"] if e.startswith("delivered or in doubt"))
    assert all(str(letters[e.id]) in maybe_sent for e in sent)
    assert any(e.startswith("audit record not written") for e in report["errors"])
    assert "could not be written" in result.output
    if not broker_lost_too:
        await wait_until(lambda: _applied(dependency, [e.id for e in sent]))


async def _once(operation: Any, attempts: int = 3, pause_s: float = 0.5) -> Any:
    return await operation()


async def test_a_claim_tried_again_keeps_the_status_it_took_the_letter_from(
    kit: tuple[ServiceRuntime, FlakyDependency],
    amqp: AbstractRobustConnection,
    isolation: Isolation,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime, _ = kit
    first, second = await dead_signups(runtime, amqp, isolation, 2)
    letters = runtime.db[DEAD_LETTERS]
    # the second carries the first's message id: it waits for a second wave, which never
    # comes (the first wave ends in doubt), so it is given back unsent
    await letters.update_one(
        {"message_id": second.id},
        {"$set": {"message_id": first.id, "properties.message_id": first.id}},
    )
    retry = dlq.retry_transient

    async def reply_lost_once(operation: Any, attempts: int = 3, pause_s: float = 0.5) -> Any:
        await operation()  # applied, but its answer is lost: the claim runs again
        return await retry(operation, attempts, 0)

    async def broker_gone(self: ConfirmingPublisher, message: Any, **kw: Any) -> None:
        raise ConnectionError("channel closed")

    monkeypatch.setattr(dlq, "retry_transient", reply_lost_once)
    monkeypatch.setattr(ConfirmingPublisher, "publish_message", broker_gone)
    args = ("dlq", "replay", "--service", "kit", "--reason", "r", "--include-interrupted")
    result = await asyncio.to_thread(cli, isolation, *args, "--stale-claim-after", "0")
    assert result.exit_code == 1, result.output
    report = report_of(result)
    assert (report["in_doubt"], report["taken_over"]) == (1, 0)  # no other run took any
    docs = await letters.find({}).sort("failed_at", 1).to_list()
    assert [d["status"] for d in docs] == ["replaying", "dead"]  # in doubt; given back
    assert docs[0]["history"][-1]["action"] == "in_doubt"
    assert not any({"claim", "claimed_at", "claimed_from"} & set(d) for d in docs)
