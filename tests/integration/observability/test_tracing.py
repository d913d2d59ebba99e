"""Trace context through the outbox: one trace from an identity event to the credit it earns.

Organizations and billing run in-process as their composition roots wire them, on the
real broker and database, with an SDK tracer provider recording into memory.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY

from services.billing.app import GRANTS_QUEUE
from services.billing.app import build as build_billing
from services.billing.settings import BillingSettings
from services.organizations.app import USERS_QUEUE
from services.organizations.app import build as build_organizations
from services.organizations.settings import OrganizationsSettings
from shared.contracts import CreditsGranted, InvitationAccepted, UserEmailVerified, UserSignedUp
from shared.tracing import configure_tracing, tracing_requested
from tests.integration.observability.conftest import span_named
from tests.support import EventTap, Isolation, publish_event, running_service, wait_until

REFERRAL_ON: dict[str, Any] = {
    "referral_enabled": True,
    "referral_referrer_units": 1000,
    "referral_referee_units": 500,
}


def handled(service: str, queue: str, event_type: str) -> int:
    value = REGISTRY.get_sample_value(
        "grantwire_messages_total",
        {"service": service, "queue": queue, "event_type": event_type, "outcome": "handled"},
    )
    return int(value or 0)


def trace_parent(message: AbstractIncomingMessage) -> tuple[str, str]:
    """(trace id, span id) of a received message's ``traceparent`` header."""
    value = (message.headers or {}).get("traceparent")
    text = value.decode() if isinstance(value, bytes) else str(value)
    version, trace_id, span_id, _flags = text.split("-")
    assert version == "00", text
    return trace_id, span_id


@pytest.mark.integration
async def test_one_trace_runs_from_email_verified_through_organizations_and_billing_to_credit(
    spans: InMemorySpanExporter, isolation: Isolation, amqp: AbstractRobustConnection
) -> None:
    naming = isolation.naming
    tap = await EventTap.open(amqp, naming, [CreditsGranted.event_type])
    organizations = build_organizations(isolation.settings(OrganizationsSettings, "organizations"))
    billing = build_billing(isolation.settings(BillingSettings, "billing", **REFERRAL_ON))
    users_queue, grants_queue = USERS_QUEUE.name(naming), GRANTS_QUEUE.name(naming)
    referee = f"friend-{uuid.uuid4().hex[:8]}"
    async with (
        running_service(*organizations, isolation),
        running_service(*billing, isolation),
    ):
        # before the trace: a referee waiting for verification, and their accepted invitation
        await publish_event(
            amqp,
            naming,
            UserSignedUp(user_id=referee, email=f"{referee}@example.org", email_verified=False),
        )
        await publish_event(
            amqp,
            naming,
            InvitationAccepted(
                invitation_id=f"inv-{referee}",
                email=f"{referee}@example.org",
                invited_by="inviter-without-organization",
                accepted_user_id=referee,
            ),
        )

        async def set_up() -> bool:
            return (
                handled("organizations", users_queue, UserSignedUp.event_type) >= 1
                and handled("billing", grants_queue, InvitationAccepted.event_type) >= 1
            )

        await wait_until(set_up)

        # the identity service verifies the email inside its own trace
        with trace.get_tracer("identity").start_as_current_span("verify email") as root:
            await publish_event(amqp, naming, UserEmailVerified(user_id=referee))
        root_context = root.get_span_context()
        root_trace = f"{root_context.trace_id:032x}"

        def referee_credit(messages: list[AbstractIncomingMessage]) -> list[Any]:
            return [
                m
                for m in messages
                if json.loads(m.body).get("side") == "referee"
                and json.loads(m.body).get("source") == "referral"
            ]

        await tap.wait_for(lambda messages: bool(referee_credit(messages)), timeout=15)
        credit = referee_credit(tap.messages)[0]
        credit_trace, credit_parent = trace_parent(credit)
        assert credit_trace == root_trace

        async def credit_publish_ended() -> bool:
            return any(
                (s.attributes or {}).get("messaging.message.id") == credit.message_id
                for s in spans.get_finished_spans()
            )

        await wait_until(credit_publish_ended)

    in_trace = tuple(
        s for s in spans.get_finished_spans() if f"{s.context.trace_id:032x}" == root_trace
    )
    org_process = span_named(
        in_trace, "process user.email_verified", **{"grantwire.service": "organizations"}
    )
    org_publish = span_named(
        in_trace, "publish organization.provisioned", **{"grantwire.service": "organizations"}
    )
    billing_process = span_named(
        in_trace, "process organization.provisioned", **{"grantwire.service": "billing"}
    )
    credit_publish = span_named(
        in_trace,
        "publish billing.credits_granted",
        **{"messaging.message.id": credit.message_id or ""},
    )
    # identity -> organizations -> (outbox) -> billing -> (outbox) -> the credit, link by link
    assert org_process.parent is not None and org_process.parent.span_id == root_context.span_id
    assert org_publish.parent is not None
    assert org_publish.parent.span_id == org_process.context.span_id
    assert billing_process.parent is not None
    assert billing_process.parent.span_id == org_publish.context.span_id
    assert credit_publish.parent is not None
    assert credit_publish.parent.span_id == billing_process.context.span_id
    assert credit_parent == f"{credit_publish.context.span_id:016x}"
    assert (org_process.kind, org_publish.kind) == (SpanKind.CONSUMER, SpanKind.PRODUCER)
    assert (billing_process.kind, credit_publish.kind) == (SpanKind.CONSUMER, SpanKind.PRODUCER)
    assert (billing_process.attributes or {}).get("grantwire.outcome") == "handled"


def test_tracing_is_off_unless_an_exporter_or_an_otlp_endpoint_is_configured() -> None:
    assert tracing_requested({}) == []
    assert tracing_requested({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}) == ["otlp"]
    assert tracing_requested({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}) == [
        "otlp"
    ]
    assert tracing_requested({"OTEL_TRACES_EXPORTER": "console,otlp"}) == ["console", "otlp"]
    assert (
        tracing_requested(
            {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}
        )
        == []
    )
    assert tracing_requested({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}) == []
    assert configure_tracing("grantwire-tests", environ={}) is False
