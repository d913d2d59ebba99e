"""User events that arrive together are provisioned together (one transaction per batch), and
each still gets the outcome the single path gives it: slugs, hints, gate, convergence."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Sequence

import pytest
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import REGISTRY
from pymongo.asynchronous.client_session import AsyncClientSession

from services.organizations import SERVICE
from services.organizations.app import USERS_QUEUE
from services.organizations.domain import Provisioning
from services.organizations.handlers import SignupOrganizations
from services.organizations.provision_batch import ProvisionBatches, UserEvent
from services.organizations.repository import ORGANIZATIONS, OrganizationsRepository
from shared import tracing
from shared.contracts import (
    OrganizationCreated,
    OrganizationProvisioned,
    UserEmailVerified,
    UserSignedUp,
)
from shared.outbox import OUTBOX
from shared.publisher import ConfirmingPublisher
from tests.integration.organizations.conftest import StartService
from tests.integration.organizations.harness import (
    Harness,
    StartHarness,
    all_memberships,
    all_organizations,
    envelope,
    signup,
    staged_events,
    user_doc,
    verified,
)
from tests.support import Isolation, batches_seen, wait_until

pytestmark = pytest.mark.integration

BATCH = "organizations-provision"


def handled(isolation: Isolation, event_type: str) -> int:
    value = REGISTRY.get_sample_value(
        "grantwire_messages_total",
        {
            "service": SERVICE,
            "queue": USERS_QUEUE.name(isolation.naming),
            "event_type": event_type,
            "outcome": "handled",
        },
    )
    return int(value or 0)


async def test_a_burst_of_user_events_is_provisioned_in_batches_one_organization_per_user(
    start_service: StartService, amqp: AbstractRobustConnection, isolation: Isolation
) -> None:
    service = await start_service(provision_batch_concurrency=2)
    db = service.runtime.db
    personal = [signup(f"ada{n}", f"ada{n}@gmail.com") for n in range(24)]  # one slug base
    corporate = [signup(f"acme{n}", f"user{n}@acme.com") for n in range(12)]
    late = [
        signup(f"grace{n}", f"grace{n}@gmail.com", first_name="Grace", verified=False)
        for n in range(12)
    ]
    burst = [
        *(envelope(e) for e in personal),
        *(envelope(e) for e in corporate),
        *(envelope(e) for e in corporate),  # each delivered twice: the second converges
        *(envelope(e) for e in late),
        *(envelope(verified(e.user_id)) for e in late),  # in either order with the signup
    ]
    before = batches_seen(BATCH)
    publisher = await ConfirmingPublisher.open(amqp, isolation.naming.events_exchange)
    assert await publisher.publish_many(burst) == [None] * len(burst)
    await publisher.channel.close()

    async def all_handled() -> bool:
        return handled(isolation, "user.signed_up") + handled(
            isolation, "user.email_verified"
        ) == len(burst)

    await wait_until(all_handled, timeout=30)

    batches, items = (a - b for a, b in zip(batches_seen(BATCH), before, strict=True))
    assert items == len(burst) and batches < items  # some events shared a transaction
    users = [e.user_id for e in (*personal, *corporate, *late)]
    memberships = await all_memberships(db)
    assert sorted(m["user_id"] for m in memberships) == sorted(users)  # one each
    organizations = await all_organizations(db)
    assert len(organizations) == len(users)
    slugs = [o["slug"] for o in organizations]
    assert len(set(slugs)) == len(slugs)
    for base, count in (("adas-organization", 24), ("acme", 12), ("graces-organization", 12)):
        numbered = {base, *(f"{base}-{n}" for n in range(2, 7))}
        ours = {s for s in slugs if s == base or re.fullmatch(rf"{base}-[0-9a-f]+", s)}
        assert len(ours) == count and numbered <= ours
    # the colleagues of the first acme.com workspace are told about it, whatever the batch
    [first_acme] = [o for o in organizations if o["slug"] == "acme"]
    hints = [(await user_doc(db, e.user_id) or {}).get("suggested_join") for e in corporate]
    assert (
        sorted(hints, key=lambda h: h is not None)
        == [None] + [{"organization_id": first_acme["_id"], "name": "Acme"}] * 11
    )
    events = await staged_events(db)
    assert Counter(e.type for e in events) == {
        OrganizationCreated.event_type: len(users),
        OrganizationProvisioned.event_type: len(users) + len(corporate),
    }


async def test_one_batch_answers_each_case_as_the_single_path_does(
    start_harness: StartHarness, isolation: Isolation
) -> None:
    batched = await start_harness()
    single = await start_harness(mongo_db=isolation.db_name("organizations_single"))
    setup = [signup("old", "ada@gmail.com"), signup("first", "first@acme.com")]
    items: list[UserSignedUp | UserEmailVerified] = [
        signup("gated", "gil@gmail.com", first_name="Gil", verified=False),
        verified("nobody"),  # no signup seen yet
        signup("old", "ada@gmail.com"),  # already has a workspace
        signup("new1", "ada1@gmail.com"),  # "Ada's organization" is taken ...
        signup("new2", "ada2@gmail.com"),  # ... and so is -2 once new1 has it
        signup("bob", "bob@acme.com"),  # a colleague of an existing workspace
        signup("cy", "cy@newco.com"),  # the first of a new domain ...
        signup("dee", "dee@newco.com"),  # ... is the hint of the next, in the same batch
        verified("gated"),  # the same user again: now verified
        signup("new1", "ada1@gmail.com"),  # a duplicate in the same batch
        verified("nobody"),
    ]

    async def single_path(
        harness: Harness, event: UserSignedUp | UserEmailVerified
    ) -> Provisioning:
        if isinstance(event, UserEmailVerified):
            return await harness.organizations.email_verified(event, envelope(event))
        return await harness.organizations.signed_up(event, envelope(event))

    for harness in (batched, single):
        for event in setup:
            await single_path(harness, event)
    expected = [await single_path(single, event) for event in items]
    results = await ProvisionBatches(batched.organizations).run(
        [UserEvent(event, envelope(event)) for event in items]
    )

    assert [await outcome(batched, r) for r in results] == [
        await outcome(single, r) for r in expected
    ]
    assert [r.outcome for r in expected] == [
        "gated",
        "awaiting_signup",
        "converged",
        "created",
        "created",
        "created",
        "created",
        "created",
        "created",
        "converged",
        "awaiting_signup",
    ]
    assert await state(batched) == await state(single)


async def test_a_slug_committed_meanwhile_aborts_the_batch_and_each_event_runs_alone(
    start_harness: StartHarness,
) -> None:
    reads: list[set[str]] = []

    class StaleFirstRead(OrganizationsRepository):
        """The batch's slug read misses a workspace another replica committed."""

        async def taken_slugs(self, session: AsyncClientSession, slugs: Sequence[str]) -> set[str]:
            taken = await super().taken_slugs(session, slugs)
            reads.append(taken)
            return set() if len(reads) == 1 else taken

    harness = await start_harness(repository=StaleFirstRead)
    first = signup("first", "first@acme.com")
    await harness.organizations.signed_up(first, envelope(first))
    reads.clear()
    events = [signup("bob", "bob@acme.com"), signup("cy", "cy@acme.com")]

    results = await ProvisionBatches(harness.organizations).run(
        [UserEvent(e, envelope(e)) for e in events]
    )

    # the batch, then each event alone (at once: one may lose acme-2 to the other and read again)
    assert len(reads) >= 3
    assert sorted([await outcome(harness, r) for r in results]) == [
        ("created", "Acme", "acme-2", "acme.com", "acme"),
        ("created", "Acme", "acme-3", "acme.com", "acme"),
    ]
    assert [o["slug"] for o in await all_organizations(harness.db)] == ["acme", "acme-2", "acme-3"]
    assert len(await staged_events(harness.db)) == 6


async def test_a_batch_that_fails_runs_each_event_alone_with_its_own_outcome(
    start_harness: StartHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = await start_harness()
    real_record_signup = OrganizationsRepository.record_signup

    async def broken_batch(*args: object, **kwargs: object) -> None:
        raise ConnectionError("primary stepped down")

    async def u2_broken(self: OrganizationsRepository, session: object, event: object) -> object:
        if getattr(event, "user_id", None) == "u2":
            raise ConnectionError("still down for u2")
        return await real_record_signup(self, session, event)  # type: ignore[arg-type]

    monkeypatch.setattr(OrganizationsRepository, "create_workspaces", broken_batch)
    monkeypatch.setattr(OrganizationsRepository, "record_signup", u2_broken)
    events = [signup(f"u{n}", f"ada{n}@gmail.com") for n in range(1, 4)]
    results = await ProvisionBatches(harness.organizations).run(
        [UserEvent(e, envelope(e)) for e in events]
    )

    assert isinstance(results[1], ConnectionError)  # only its message is retried
    # u1 and u3 run alone at once: which of them gets the plain slug is a race
    assert sorted([await outcome(harness, r) for r in (results[0], results[2])]) == [
        ("created", "Ada's organization", "adas-organization", None, None),
        ("created", "Ada's organization", "adas-organization-2", None, None),
    ]
    assert await user_doc(harness.db, "u2") is None  # nothing of the failed batch committed
    assert sorted(m["user_id"] for m in await all_memberships(harness.db)) == ["u1", "u3"]


async def test_the_message_handlers_share_batches_and_each_event_continues_its_trace(
    start_harness: StartHarness,
) -> None:
    harness = await start_harness()
    use_cases = SignupOrganizations(
        harness.runtime, harness.organizations.policy, batch_max=8, batch_concurrency=1
    )
    events = [signup(f"u{n}", f"ada{n}@gmail.com") for n in range(10)]
    trace_of = {e.user_id: f"{n + 1:032x}" for n, e in enumerate(events)}

    async def handle(event: UserSignedUp) -> None:
        """The handler in the trace its message carried (as the consumer runs it)."""
        header = {"traceparent": f"00-{trace_of[event.user_id]}-{1:016x}-01"}
        with tracing.attached(tracing.context_from_headers(header)):
            await use_cases.on_user_signed_up(event, envelope(event))

    before = batches_seen(BATCH)
    await asyncio.gather(*(handle(e) for e in events))

    batches, items = (a - b for a, b in zip(batches_seen(BATCH), before, strict=True))
    assert items == 10 and batches < 10
    owner = {o["_id"]: o["created_by"] for o in await all_organizations(harness.db)}
    assert len(owner) == 10
    staged = await harness.db[OUTBOX].find().to_list()
    assert len(staged) == 20  # created + provisioned, each in its own message's trace
    for doc in staged:
        trace_id = doc["extra_headers"]["traceparent"].split("-")[1]
        assert trace_id == trace_of[owner[doc["aggregate_id"]]]


# -- helpers -----------------------------------------------------------------------------
async def outcome(
    harness: Harness, result: Provisioning | BaseException
) -> tuple[str, str | None, str | None, str | None, str | None]:
    """A result without its ids: outcome, name, slug, domain, and the slug of the hint."""
    assert isinstance(result, Provisioning), result
    org = result.organization
    hint = None
    if result.suggested_join is not None:
        doc = await harness.db[ORGANIZATIONS].find_one(
            {"_id": result.suggested_join.organization_id}
        )
        assert doc is not None and doc["name"] == result.suggested_join.name
        hint = doc["slug"]
    return (
        result.outcome,
        org.name if org else None,
        org.slug if org else None,
        org.domain if org else None,
        hint,
    )


async def state(harness: Harness) -> dict[str, object]:
    """What a database holds, by slug instead of ids: users, memberships, outbox."""
    slug_of = {o["_id"]: o["slug"] for o in await all_organizations(harness.db)}
    users = {}
    async for doc in harness.db["users"].find().sort("_id"):
        hint = doc.get("suggested_join")
        users[doc["_id"]] = (
            doc.get("email_verified"),
            slug_of.get(doc.get("current_organization_id", "")),
            slug_of[hint["organization_id"]] if hint else None,
        )
    return {
        "organizations": sorted(
            (o["slug"], o["name"], o["domain"], o["created_by"])
            for o in await all_organizations(harness.db)
        ),
        "memberships": sorted(
            (m["user_id"], slug_of[m["organization_id"]], m["role"], m["status"])
            for m in await all_memberships(harness.db)
        ),
        "users": users,
        # in order per organization (the order the relay keeps); users run at once
        "outbox": outbox_by_organization(
            [
                (slug_of[e.aggregate_id], e.type, e.data.get("user_id"))
                for e in await staged_events(harness.db)
            ]
        ),
    }


def outbox_by_organization(
    staged: list[tuple[str, str, object]],
) -> dict[str, list[tuple[str, object]]]:
    by_slug: dict[str, list[tuple[str, object]]] = {}
    for slug, event_type, user_id in staged:
        by_slug.setdefault(slug, []).append((event_type, user_id))
    return by_slug
