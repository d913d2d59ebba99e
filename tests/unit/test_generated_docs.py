"""The committed contract docs are what the code generates now (AsyncAPI + examples)."""

from __future__ import annotations

import json

from grantwire.asyncapi import DOCS, build_document, service_runtimes, stale_docs


def test_committed_asyncapi_and_examples_are_current() -> None:
    assert stale_docs() == [], "run `make docs` and commit docs/"


def test_every_event_has_a_channel_a_sender_and_its_consumers() -> None:
    document = build_document(service_runtimes())
    operations = document["operations"]
    assert set(document["channels"]) == {
        "user.signed_up",
        "user.email_verified",
        "organization.created",
        "organization.provisioned",
        "invitation.accepted",
        "billing.credits_granted",
    }
    assert "organizations.send.organization.provisioned" in operations
    assert "billing.receive.organization.provisioned" in operations
    assert "billing.receive.invitation.accepted" in operations
    assert "invitations.receive.user.signed_up" in operations
    assert "identity.send.user.email_verified" in operations
    assert json.loads((DOCS / "asyncapi.json").read_text())["asyncapi"] == "3.0.0"
