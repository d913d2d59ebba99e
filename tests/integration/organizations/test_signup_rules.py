"""handle_signup_organization against the real MongoDB replica set (use cases called directly)."""

from __future__ import annotations

import pytest

from tests.integration.organizations.harness import (
    StartHarness,
    all_memberships,
    all_organizations,
    envelope,
    signup,
    staged_events,
    user_doc,
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
