"""Observability of the three real service processes: traces, metrics, logs, job results.

The services run as OS processes (as `make demo` runs them). Organizations and billing
export spans over OTLP/HTTP to a receiver in this test (standard ``OTEL_*`` variables);
invitations has no tracing configured, and still passes the trace context on.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from grantwire.asyncapi import service_runtimes
from grantwire.demo import Client, demo_env, eventually
from grantwire.system import ROOT, LocalSystem, free_port
from shared.contracts import CreditsGranted, Event, UserEmailVerified, UserSignedUp
from shared.envelope import Envelope
from tests.integration.observability.conftest import sample
from tests.integration.observability.sinks import ExportedSpan, HttpSink, exported_spans
from tests.support import EventTap, Isolation, publish_event, wait_until

pytestmark = pytest.mark.e2e

GRANTWIRE = Path(sys.executable).parent / "grantwire"
LOG_KEYS = {"event_id", "event_type", "correlation_id", "service", "outcome", "duration_ms"}


@pytest.fixture
async def system(isolation: Isolation, sink: HttpSink) -> AsyncIterator[LocalSystem]:
    for runtime in service_runtimes().values():
        isolation.track_runtime(runtime)
    infra = {
        "GRANTWIRE_AMQP_URL": isolation.urls.amqp_url,
        "GRANTWIRE_MONGO_URL": isolation.urls.mongo_url,
    }
    env = demo_env(
        infra, namespace=isolation.naming.namespace, database_prefix=f"t{isolation.token}"
    )
    env.update({"GRANTWIRE_RETRY_DELAYS_S": "[0.1, 0.5]", "GRANTWIRE_SHUTDOWN_GRACE_S": "10"})
    tracing = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    local = LocalSystem(
        env,
        service_env={"organizations": tracing, "billing": tracing},
        logs=ROOT / ".infra" / "logs" / f"observability-{isolation.token}",
    )
    for process in local.processes.values():  # any free port: others' runs take the defaults
        process.port = free_port()
        process.env["GRANTWIRE_HTTP_PORT"] = str(process.port)
    local.start()
    try:
        local.wait_ready(timeout=60)
        yield local
    finally:
        codes = local.stop()
    assert all(code == 0 for code in codes.values()), f"unclean exits: {codes}"


def traced(event: Event) -> tuple[Envelope, str, str]:
    """An identity event inside the identity service's own trace: (envelope, trace, span)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    envelope = Envelope.new(event, source="identity")
    traceparent = {"traceparent": f"00-{trace_id}-{span_id}-01"}
    return replace(envelope, extra_headers=traceparent), trace_id, span_id


def trace_parent(message: AbstractIncomingMessage) -> tuple[str, str]:
    value = (message.headers or {}).get("traceparent")
    text = value.decode() if isinstance(value, bytes) else str(value)
    _, trace_id, span_id, _ = text.split("-")
    return trace_id, span_id


def one_span(spans: list[ExportedSpan], service: str, name: str, trace_id: str) -> ExportedSpan:
    found = [s for s in spans if (s.service, s.name, s.trace_id) == (service, name, trace_id)]
    assert len(found) == 1, f"{service} {name} in {trace_id}: {found}"
    return found[0]


def handled_lines(log: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "message handled"]


async def test_running_services_trace_count_and_log_a_referral_and_expose_job_results(
    system: LocalSystem,
    amqp: AbstractRobustConnection,
    isolation: Isolation,
    sink: HttpSink,
) -> None:
    naming = isolation.naming
    credits = await EventTap.open(amqp, naming, [CreditsGranted.event_type])
    client = Client(system, amqp, naming)
    await client.open()
    try:
        run = uuid.uuid4().hex[:6]
        inviter, inviter_email = f"ada-{run}", f"ada.{run}@example.com"
        friend, friend_email = f"grace-{run}", f"grace.{run}@example.org"
        await client.publish(
            UserSignedUp(user_id=inviter, email=inviter_email, email_verified=True)
        )
        inviter_org = await eventually(lambda: client.organization_of(inviter), "inviter org")
        invitation = await client.invite(inviter, inviter_email, friend_email)

        signup, signup_trace, signup_span = traced(
            UserSignedUp(
                user_id=friend,
                email=friend_email,
                email_verified=False,
                invite_token=invitation["token"],
            )
        )
        await publish_event(
            amqp, naming, UserSignedUp.model_validate_json(signup.body), envelope=signup
        )
        await eventually(
            lambda: _equals(client.balance(inviter_org["organization_id"]), 1500), "referrer"
        )
        verified, verify_trace, verify_span = traced(UserEmailVerified(user_id=friend))
        await publish_event(amqp, naming, UserEmailVerified(user_id=friend), envelope=verified)
        friend_org = await eventually(lambda: client.organization_of(friend), "friend org")
        await eventually(
            lambda: _equals(client.balance(friend_org["organization_id"]), 1000), "referee"
        )

        # -- the credits carry the trace of the identity event that earned them ------------
        await credits.wait_for(lambda messages: len(messages) == 4)  # 2 signup grants, 2 sides
        by_side = {json.loads(m.body).get("side"): m for m in credits.messages}
        referee_credit, referrer_credit = by_side["referee"], by_side["referrer"]
        assert trace_parent(referee_credit)[0] == verify_trace
        # through invitations, which traces nothing: the context passed on untouched
        assert trace_parent(referrer_credit)[0] == signup_trace

        # -- the exported spans chain across the processes -------------------------------
        wanted = {
            ("grantwire-organizations", "process user.email_verified", verify_trace),
            ("grantwire-organizations", "publish organization.provisioned", verify_trace),
            ("grantwire-billing", "process organization.provisioned", verify_trace),
            ("grantwire-billing", "process invitation.accepted", signup_trace),
        }

        async def all_exported() -> bool:  # each process exports in its own batches
            spans = exported_spans(sink)
            seen = {(s.service, s.name, s.trace_id) for s in spans}
            ids = {s.attributes.get("messaging.message.id") for s in spans}
            return wanted <= seen and referee_credit.message_id in ids

        await wait_until(all_exported, timeout=15)
        spans = exported_spans(sink)
        org_process = one_span(
            spans, "grantwire-organizations", "process user.email_verified", verify_trace
        )
        org_publish = one_span(
            spans, "grantwire-organizations", "publish organization.provisioned", verify_trace
        )
        billing_process = one_span(
            spans, "grantwire-billing", "process organization.provisioned", verify_trace
        )
        credit_publishes = [
            s
            for s in spans
            if s.attributes.get("messaging.message.id") == referee_credit.message_id
        ]
        assert org_process.parent_span_id == verify_span
        assert org_publish.parent_span_id == org_process.span_id
        assert billing_process.parent_span_id == org_publish.span_id
        assert [s.parent_span_id for s in credit_publishes] == [billing_process.span_id]
        assert trace_parent(referee_credit)[1] == credit_publishes[0].span_id
        accepted = one_span(spans, "grantwire-billing", "process invitation.accepted", signup_trace)
        assert accepted.parent_span_id == signup_span  # invitations added no span of its own
        assert not [s for s in spans if s.service == "grantwire-invitations"]
        routes = {s.attributes.get("http.route") for s in spans}
        assert "/users/{user_id}/organization" in routes  # the API's requests are traced
        assert not routes & {"/healthz", "/readyz", "/metrics"}  # probes and scrapes are not

        # -- metrics of each process -------------------------------------------------------
        async with httpx.AsyncClient(timeout=5) as http:
            texts = {
                name: (await http.get(f"{system[name].url}/metrics")).text
                for name in ("organizations", "invitations", "billing")
            }
        organizations, billing = texts["organizations"], texts["billing"]
        assert (
            sample(
                organizations,
                "grantwire_messages_total",
                event_type="user.email_verified",
                outcome="handled",
            )
            == 1
        )
        assert (
            sample(
                organizations,
                "grantwire_outbox_published_total",
                event_type="organization.provisioned",
            )
            == 2
        )
        assert (sample(organizations, "grantwire_relay_publish_seconds_count") or 0) >= 1
        assert (sample(organizations, "grantwire_handler_seconds_count") or 0) >= 3
        for name, text in texts.items():
            assert sample(text, "grantwire_ready", service=name) == 1, name
            assert sample(text, "grantwire_outbox_pending", service=name) == 0, name
            assert sample(text, "grantwire_consumer_up", service=name) == 1, name
        assert sample(texts["invitations"], "grantwire_messages_total", outcome="handled")
        for side, source, count in [
            ("referee", "referral", 1),
            ("referrer", "referral", 1),
            ("none", "signup_grant", 2),
        ]:
            assert (
                sample(
                    billing,
                    "grantwire_grants_total",
                    side=side,
                    source=source,
                    outcome="applied",
                )
                == count
            ), (side, source)
        assert sample(billing, "grantwire_grants_total", outcome="duplicate") in (None, 0)
        # from the verification (the chain's first event) to the referee's credit
        waited = sample(
            billing, "grantwire_credit_latency_seconds_sum", side="referee", source="referral"
        )
        assert waited is not None and 0 < waited < 10

        # -- one log line per handled message, with what an operator searches by ----------
        for name in ("organizations", "billing"):
            lines = handled_lines(system[name].log_path)
            handled = sample(texts[name], "grantwire_messages_total", service=name)
            assert len(lines) == handled, name
            for line in lines:
                assert line.keys() >= LOG_KEYS, line
                assert line["service"] == name and line["outcome"] == "handled"
        verified_line = next(
            line
            for line in handled_lines(system["organizations"].log_path)
            if line["event_id"] == verified.id
        )
        assert verified_line["trace_id"] == verify_trace
        assert verified_line["correlation_id"] == verified.correlation_id
        # what the handler decided is on that one line, not on a line of its own
        assert verified_line["handler"]["event"] == "signup organization handled"
        assert verified_line["handler"]["outcome"] == "created"
        billing_log = [
            json.loads(line)
            for line in system["billing"].log_path.read_text().splitlines()
            if line.startswith("{")
        ]
        handler_events = {"referral grant", "organization provisioned", "signup grant"}
        assert not [line for line in billing_log if line.get("event") in handler_events]
        reported = [line["handler"]["event"] for line in handled_lines(system["billing"].log_path)]
        assert sorted(reported) == sorted(
            ["signup grant"] * 2 + ["referral grant"] + ["organization provisioned"] * 2
        )

        # -- a job run shows on billing's /metrics and reaches the Pushgateway -------------
        job_env = {
            **system["billing"].env,
            "GRANTWIRE_PUSHGATEWAY_URL": sink.url,
            "GRANTWIRE_RECONCILE_JITTER_S": "0",
        }
        job = await asyncio.create_subprocess_exec(
            str(GRANTWIRE),
            "reconcile",
            env=job_env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await job.communicate()
        assert job.returncode == 0, stderr.decode()
        assert json.loads(stdout)["status"] == "completed"
        async with httpx.AsyncClient(timeout=5) as http:
            billing = (await http.get(f"{system['billing'].url}/metrics")).text
        success = sample(
            billing, "grantwire_job_last_success_timestamp_seconds", job_name="reconcile"
        )
        assert success is not None and success > 0
        assert sample(billing, "grantwire_job_last_errors", job_name="reconcile") == 0
        pushes = [r for r in sink.requests if r.path.startswith("/metrics/job/")]
        assert [r.path for r in pushes] == [
            "/metrics/job/grantwire-billing-jobs/job_name/reconcile"
        ]
    finally:
        await client.close()


async def _equals(balance: Any, expected: int) -> bool:
    return int(await balance) == expected
