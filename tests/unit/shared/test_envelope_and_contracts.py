"""Pure rules of the kit: envelope mapping, contracts, retry tiers, URL masking."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.contracts import (
    EVENT_MODELS,
    OrganizationProvisioned,
    UserSignedUp,
    major_version,
    normalize_email,
)
from shared.envelope import H_CAUSATION_ID, H_CORRELATION_ID, H_ID, Envelope, EnvelopeError
from shared.logging import mask_url
from shared.topology import Naming, RetryPolicy, WorkQueue


def test_envelope_round_trips_through_amqp_headers() -> None:
    cause = Envelope.new(
        UserSignedUp(user_id="u", email="u@x.io", email_verified=True), source="id"
    )
    effect = cause.caused(OrganizationProvisioned(user_id="u", organization_id="o"), source="orgs")
    read = Envelope.from_amqp(body=effect.body, message_id=effect.id, headers=effect.headers())
    assert read.id == effect.id and read.type == "organization.provisioned"
    assert read.correlation_id == cause.id and read.causation_id == cause.id
    assert read.time == effect.time and read.body == effect.body
    assert effect.headers()[H_CORRELATION_ID] == cause.id
    assert effect.headers()[H_CAUSATION_ID] == cause.id


def test_envelope_without_an_id_is_refused() -> None:
    with pytest.raises(EnvelopeError, match="no id"):
        Envelope.from_amqp(body=b"{}", message_id=None, headers={}, message_type="user.signed_up")


def test_envelope_takes_its_id_from_the_cloudevents_header_when_message_id_is_absent() -> None:
    read = Envelope.from_amqp(
        body=b"{}", message_id=None, headers={H_ID: "abc"}, message_type="user.signed_up"
    )
    assert read.id == "abc" and read.correlation_id == "abc"


def test_envelope_with_a_malformed_time_is_refused() -> None:
    with pytest.raises(EnvelopeError, match="time"):
        Envelope.from_amqp(
            body=b"{}", message_id="1", headers={"cloudEvents:time": "yesterday"}, message_type="t"
        )


def test_signup_email_is_normalized_and_malformed_emails_are_rejected() -> None:
    event = UserSignedUp(user_id="u", email="  Ada@Example.COM ", email_verified=False)
    assert event.email == "ada@example.com"
    for bad in ("not-an-email", "a@b@c", "@example.com", "a b@example.com"):
        with pytest.raises(ValidationError):
            UserSignedUp(user_id="u", email=bad, email_verified=True)
    assert normalize_email(" X@Y.Z ") == "x@y.z"


def test_every_event_type_has_a_model_with_a_major_minor_version() -> None:
    assert set(EVENT_MODELS) == {
        "user.signed_up",
        "user.email_verified",
        "organization.created",
        "organization.provisioned",
        "invitation.accepted",
        "billing.credits_granted",
    }
    for model in EVENT_MODELS.values():
        assert major_version(model.schema_version) == 1


def test_retry_tiers_grow_then_stay_at_the_longest_delay() -> None:
    policy = RetryPolicy(delays_s=(1, 5, 30), max_attempts=6)
    assert [policy.delay_tier(n) for n in range(1, 6)] == [0, 1, 2, 2, 2]


def test_names_follow_service_dot_purpose_under_a_namespace() -> None:
    naming = Naming("t1.")
    queue = WorkQueue("billing", "grants", ("invitation.accepted",))
    assert queue.name(naming) == "t1.billing.grants"
    assert queue.dlq_name(naming) == "t1.billing.grants.dlq"
    assert queue.retry_name(naming, 0) == "t1.billing.grants.retry.0"
    assert naming.events_exchange == "t1.grantwire.events"


def test_connection_urls_are_masked() -> None:
    assert mask_url("amqp://svc:s3cret@rabbit:5672/vh") == "amqp://svc:***@rabbit:5672/vh"
    assert (
        mask_url("mongodb://u:p%40ss@h1,h2/?replicaSet=rs0")
        == "mongodb://u:***@h1,h2/?replicaSet=rs0"
    )
    assert mask_url("mongodb://127.0.0.1:27017/") == "mongodb://127.0.0.1:27017/"
