"""handle_signup_organization against the real MongoDB replica set (use cases called directly)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase

from services.organizations.domain import SlugsExhaustedError
from services.organizations.repository import OrganizationsRepository
from shared.mongo import Document
from shared.outbox import OUTBOX
from tests.integration.organizations.harness import (
    StartHarness,
    all_memberships,
    all_organizations,
    envelope,
    signup,
    staged_events,
    user_doc,
    verified,
)

pytestmark = pytest.mark.integration


async def test_a_verified_signup_creates_a_free_workspace_owned_by_the_user(
    start_harness: StartHarness,
) -> None:
    harness = await start_harness()
    cause = envelope(signup("u1", "ada@acme.com"))
    result = await harness.organizations.signed_up(signup("u1", "ada@acme.com"), cause)

    assert result.outcome == "created" and result.organization is not None
    [org] = await all_organizations(harness.db)
    assert org["_id"] == result.organization.id
    assert (org["name"], org["slug"], org["domain"], org["plan_id"]) == (
        "Acme",
        "acme",
        "acme.com",
        "free",
    )
    [membership] = await all_memberships(harness.db)
    assert (membership["user_id"], membership["organization_id"]) == ("u1", org["_id"])
    assert (membership["role"], membership["status"]) == ("owner", "active")
    user = await user_doc(harness.db, "u1")
    assert user is not None and user["current_organization_id"] == org["_id"]
    events = await staged_events(harness.db)
    assert [(e.type, e.data) for e in events] == [
        ("organization.created", {"organization_id": org["_id"], "plan_id": "free"}),
        ("organization.provisioned", {"user_id": "u1", "organization_id": org["_id"]}),
    ]
    assert {(e.causation_id, e.correlation_id) for e in events} == {(cause.id, cause.id)}
    published = await harness.published.wait_for(lambda msgs: len(msgs) >= 2)
    assert [m.type for m in published] == [e.type for e in events]


# -- the email-verification gate ---------------------------------------------------------
async def test_in_strict_mode_an_unverified_user_gets_nothing_until_verified(
    start_harness: StartHarness,
) -> None:
    harness = await start_harness()
    event = signup("u1", "ada@acme.com", verified=False)
    gated = await harness.organizations.signed_up(event, envelope(event))
    assert gated.outcome == "gated"
    assert await all_organizations(harness.db) == []
    assert await staged_events(harness.db) == []
    projected = await user_doc(harness.db, "u1")
    assert projected is not None and projected["email_verified"] is False

    cause = envelope(verified("u1"))
    created = await harness.organizations.email_verified(verified("u1"), cause)
    assert created.outcome == "created" and created.organization is not None
    events = await staged_events(harness.db)
    assert [e.type for e in events] == ["organization.created", "organization.provisioned"]
    assert {e.causation_id for e in events} == {cause.id}


async def test_verification_off_provisions_an_unverified_user(start_harness: StartHarness) -> None:
    harness = await start_harness(organizations_email_verification="off")
    event = signup("u1", "ada@acme.com", verified=False)
    result = await harness.organizations.signed_up(event, envelope(event))
    assert result.outcome == "created"
    assert len(await all_organizations(harness.db)) == 1


@pytest.mark.parametrize("mode", ["OFF", "Off", " off", "disabled", ""])
async def test_any_verification_mode_but_exactly_off_fails_closed(
    start_harness: StartHarness, mode: str
) -> None:
    harness = await start_harness(organizations_email_verification=mode)
    event = signup("u1", "ada@acme.com", verified=False)
    result = await harness.organizations.signed_up(event, envelope(event))
    assert result.outcome == "gated"
    assert await all_organizations(harness.db) == []
    assert await staged_events(harness.db) == []


# -- convergence -------------------------------------------------------------------------
async def test_a_replayed_signup_creates_nothing_and_announces_the_same_organization_again(
    start_harness: StartHarness,
) -> None:
    harness = await start_harness()
    event = signup("u1", "ada@acme.com")
    first = await harness.organizations.signed_up(event, envelope(event))
    replay = await harness.organizations.signed_up(event, envelope(event))
    assert replay.outcome == "converged"
    assert replay.organization == first.organization
    assert len(await all_organizations(harness.db)) == 1
    assert len(await all_memberships(harness.db)) == 1
    assert [e.type for e in await staged_events(harness.db)] == [
        "organization.created",
        "organization.provisioned",
        "organization.provisioned",
    ]


async def test_email_verified_for_a_provisioned_user_converges(start_harness: StartHarness) -> None:
    harness = await start_harness()
    event = signup("u1", "ada@acme.com")
    first = await harness.organizations.signed_up(event, envelope(event))
    again = await harness.organizations.email_verified(verified("u1"), envelope(verified("u1")))
    assert (again.outcome, again.organization) == ("converged", first.organization)
    assert first.organization is not None
    last = (await staged_events(harness.db))[-1]
    assert (last.type, last.data) == (
        "organization.provisioned",
        {"user_id": "u1", "organization_id": first.organization.id},
    )


async def test_a_verification_seen_before_the_signup_is_kept_and_the_signup_provisions(
    start_harness: StartHarness,
) -> None:
    harness = await start_harness()
    early = await harness.organizations.email_verified(verified("u1"), envelope(verified("u1")))
    assert early.outcome == "awaiting_signup"
    assert await staged_events(harness.db) == []
    # The identity service's signup event still says "not verified": it must not undo the fact.
    event = signup("u1", "ada@acme.com", verified=False)
    result = await harness.organizations.signed_up(event, envelope(event))
    assert result.outcome == "created"
    projected = await user_doc(harness.db, "u1")
    assert projected is not None and projected["email_verified"] is True


# -- naming, domains and the suggested_join hint -----------------------------------------
@pytest.mark.parametrize(
    ("first_name", "name", "slug"),
    [
        ("Ada", "Ada's organization", "adas-organization"),
        ("", "User's organization", "users-organization"),
    ],
)
async def test_a_public_provider_gets_a_personal_workspace_without_a_domain(
    start_harness: StartHarness, first_name: str, name: str, slug: str
) -> None:
    harness = await start_harness()
    event = signup("u1", "Ada@GMail.com", first_name=first_name)
    await harness.organizations.signed_up(event, envelope(event))
    [org] = await all_organizations(harness.db)
    assert (org["name"], org["slug"], org["domain"]) == (name, slug, None)


async def test_configured_extra_public_domains_get_personal_workspaces(
    start_harness: StartHarness,
) -> None:
    harness = await start_harness(organizations_extra_public_domains="mailbox.example")
    for n, email in enumerate(["ada@mailbox.example", "bob@mailbox.example"]):
        event = signup(f"u{n}", email)
        result = await harness.organizations.signed_up(event, envelope(event))
        assert result.suggested_join is None
    assert [o["domain"] for o in await all_organizations(harness.db)] == [None, None]


async def test_a_colleague_gets_their_own_workspace_and_a_hint_to_join_the_first(
    start_harness: StartHarness,
) -> None:
    harness = await start_harness()
    results = []
    for n, email in enumerate(["ada@acme.com", "bob@ACME.com", "cy@acme.com"]):
        event = signup(f"u{n}", email)
        results.append(await harness.organizations.signed_up(event, envelope(event)))
    first, second, third = results
    assert first.suggested_join is None and first.organization is not None
    for later in (second, third):
        assert later.outcome == "created"  # always create; the hint is only a suggestion
        assert later.suggested_join is not None
        assert later.suggested_join.organization_id == first.organization.id
        assert later.suggested_join.name == "Acme"
    orgs = await all_organizations(harness.db)
    assert [(o["name"], o["slug"], o["domain"]) for o in orgs] == [
        ("Acme", "acme", "acme.com"),
        ("Acme", "acme-2", "acme.com"),
        ("Acme", "acme-3", "acme.com"),
    ]
    projected = await user_doc(harness.db, "u1")
    assert projected is not None
    assert projected["suggested_join"] == {"organization_id": first.organization.id, "name": "Acme"}


async def test_domain_matching_is_exact_a_subdomain_is_another_domain(
    start_harness: StartHarness,
) -> None:
    harness = await start_harness()
    for n, email in enumerate(["ada@acme.com", "bob@eu.acme.com", "cy@acme.com.au"]):
        event = signup(f"u{n}", email)
        result = await harness.organizations.signed_up(event, envelope(event))
        assert result.suggested_join is None
    orgs = await all_organizations(harness.db)
    assert [(o["name"], o["domain"]) for o in orgs] == [
        ("Acme", "acme.com"),
        ("Eu", "eu.acme.com"),
        ("Acme", "acme.com.au"),
    ]


async def test_with_domain_matching_off_a_corporate_email_gets_a_personal_workspace(
    start_harness: StartHarness,
) -> None:
    harness = await start_harness(organizations_domain_matching=False)
    for n in range(2):
        event = signup(f"u{n}", f"user{n}@acme.com", first_name="Ada")
        result = await harness.organizations.signed_up(event, envelope(event))
        assert result.suggested_join is None
    orgs = await all_organizations(harness.db)
    assert [(o["name"], o["domain"]) for o in orgs] == [("Ada's organization", None)] * 2


async def test_an_email_with_a_malformed_domain_gets_a_personal_workspace(
    start_harness: StartHarness,
) -> None:
    harness = await start_harness()
    event = signup("u1", "ada@localhost")  # the contract accepts it; it is no company domain
    await harness.organizations.signed_up(event, envelope(event))
    [org] = await all_organizations(harness.db)
    assert (org["name"], org["domain"]) == ("Ada's organization", None)


# -- slugs -------------------------------------------------------------------------------
async def test_slug_collisions_take_two_to_six_then_a_random_suffix_then_fail(
    start_harness: StartHarness,
) -> None:
    harness = await start_harness(random_suffix=lambda: "f00d42")
    for n in range(7):
        event = signup(f"u{n}", f"ada{n}@gmail.com")
        await harness.organizations.signed_up(event, envelope(event))
    slugs = [o["slug"] for o in await all_organizations(harness.db)]
    assert slugs == [
        "adas-organization",
        *(f"adas-organization-{n}" for n in range(2, 7)),
        "adas-organization-f00d42",
    ]

    eighth = signup("u7", "ada7@gmail.com")
    with pytest.raises(SlugsExhaustedError):
        await harness.organizations.signed_up(eighth, envelope(eighth))
    assert len(await all_organizations(harness.db)) == 7
    assert await user_doc(harness.db, "u7") is None  # the whole transaction rolled back
    assert len(await staged_events(harness.db)) == 14


async def test_a_slug_taken_by_a_concurrent_commit_is_retried_with_the_next_candidate(
    start_harness: StartHarness,
) -> None:
    reads: list[set[str]] = []

    class StaleFirstRead(OrganizationsRepository):
        """The first slug read misses a commit that landed after its snapshot."""

        async def taken_slugs(self, session: AsyncClientSession, slugs: Sequence[str]) -> set[str]:
            taken = await super().taken_slugs(session, slugs)
            reads.append(taken)
            return set() if len(reads) == 1 else taken

    harness = await start_harness()
    first = signup("u1", "ada@acme.com")
    await harness.organizations.signed_up(first, envelope(first))

    racing = await start_harness(repository=StaleFirstRead)
    second = signup("u2", "bob@acme.com")
    result = await racing.organizations.signed_up(second, envelope(second))

    assert reads == [{"acme"}, {"acme"}]  # the unique index refused "acme"; the retry re-read
    assert result.organization is not None and result.organization.slug == "acme-2"
    assert [o["slug"] for o in await all_organizations(harness.db)] == ["acme", "acme-2"]


async def test_concurrent_signups_with_one_name_get_distinct_slugs(
    start_harness: StartHarness,
) -> None:
    harness = await start_harness()
    events = [signup(f"u{n}", f"ada{n}@gmail.com") for n in range(8)]
    results = await asyncio.gather(
        *(harness.organizations.signed_up(e, envelope(e)) for e in events)
    )
    assert {r.outcome for r in results} == {"created"}
    slugs = [o["slug"] for o in await all_organizations(harness.db)]
    assert len(slugs) == len(set(slugs)) == 8
    numbered = {"adas-organization", *(f"adas-organization-{n}" for n in range(2, 7))}
    assert numbered <= set(slugs)
    assert all(s.startswith("adas-organization-") for s in set(slugs) - numbered)


# -- one transaction ---------------------------------------------------------------------
async def test_state_and_events_commit_together_or_not_at_all(start_harness: StartHarness) -> None:
    harness = await start_harness()
    await _refuse_outbox_writes(harness.db, refuse=True)
    event = signup("u1", "ada@acme.com")
    with pytest.raises(Exception, match="failed validation"):
        await harness.organizations.signed_up(event, envelope(event))
    assert await all_organizations(harness.db) == []
    assert await all_memberships(harness.db) == []
    assert await user_doc(harness.db, "u1") is None

    await _refuse_outbox_writes(harness.db, refuse=False)
    result = await harness.organizations.signed_up(event, envelope(event))
    assert result.outcome == "created"
    assert len(await staged_events(harness.db)) == 2


async def _refuse_outbox_writes(db: AsyncDatabase[Document], *, refuse: bool) -> None:
    """A schema no outbox document satisfies: the last write of the transaction fails."""
    validator = {"$jsonSchema": {"required": ["never_present"]}} if refuse else {}
    await db.command("collMod", OUTBOX, validator=validator, validationAction="error")


# -- concurrency -------------------------------------------------------------------------
async def test_ten_concurrent_deliveries_of_one_signup_create_one_organization(
    start_harness: StartHarness,
) -> None:
    harness = await start_harness()
    event = signup("u1", "ada@acme.com")
    delivery = envelope(event)  # the same message, delivered ten times at once
    results = await asyncio.gather(
        *(harness.organizations.signed_up(event, delivery) for _ in range(10))
    )
    assert sorted(r.outcome for r in results) == ["converged"] * 9 + ["created"]
    [org] = await all_organizations(harness.db)
    assert {r.organization.id for r in results if r.organization} == {org["_id"]}
    assert len(await all_memberships(harness.db)) == 1
    events = await staged_events(harness.db)
    assert [e.type for e in events].count("organization.created") == 1
    provisioned = [e.data for e in events if e.type == "organization.provisioned"]
    assert provisioned == [{"user_id": "u1", "organization_id": org["_id"]}] * 10
