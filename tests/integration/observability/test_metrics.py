"""What `/metrics` and the logs tell an operator, read from services running in-process."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog
from aio_pika.abc import AbstractRobustConnection

from services.billing import jobs
from services.billing.app import GRANTS_QUEUE
from services.billing.app import build as build_billing
from services.billing.settings import BillingSettings
from shared.consumer import PermanentError
from shared.contracts import (
    CreditsGranted,
    Event,
    InvitationAccepted,
    OrganizationCreated,
    OrganizationProvisioned,
    UserSignedUp,
)
from shared.envelope import Envelope
from shared.http import create_service_app
from shared.runtime import ServiceRuntime
from shared.settings import ServiceSettings
from shared.topology import WorkQueue
from tests.integration.observability.conftest import sample
from tests.integration.observability.sinks import HttpSink
from tests.support import (
    EventTap,
    Isolation,
    RunningService,
    publish_event,
    running_service,
    wait_until,
)

pytestmark = pytest.mark.integration

WORK = WorkQueue("kit", "work", (UserSignedUp.event_type,))
REFERRAL_ON: dict[str, Any] = {
    "referral_enabled": True,
    "referral_referrer_units": 1000,
    "referral_referee_units": 500,
    "reconcile_jitter_s": 0,
}
LOG_KEYS = {"event_id", "event_type", "correlation_id", "service", "outcome", "duration_ms"}


async def scrape(service: RunningService) -> str:
    response = await service.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def signup(user_id: str) -> UserSignedUp:
    return UserSignedUp(user_id=user_id, email=f"{user_id}@example.com", email_verified=True)


async def test_consumer_counts_and_logs_each_outcome_per_queue_and_event_type(
    isolation: Isolation, amqp: AbstractRobustConnection
) -> None:
    attempts: dict[str, int] = {}

    async def handler(event: Event, envelope: Envelope) -> None:
        assert isinstance(event, UserSignedUp)
        attempts[event.user_id] = attempts.get(event.user_id, 0) + 1
        if event.user_id == "poison":
            raise PermanentError("not_allowed", "this user may never sign up")
        if event.user_id == "flaky" and attempts[event.user_id] == 1:
            raise ConnectionError("the first attempt loses its connection")

    settings = isolation.settings(ServiceSettings, "kit")
    runtime = ServiceRuntime(service="kit", settings=settings, indexes={})
    runtime.subscribe(WORK, {UserSignedUp.event_type: handler})
    queue = WORK.name(isolation.naming)
    labels = {"service": "kit", "queue": queue, "event_type": UserSignedUp.event_type}
    with structlog.testing.capture_logs() as logs:
        async with running_service(
            runtime, create_service_app(runtime, title="kit"), isolation
        ) as (service):
            sent = {
                user: await publish_event(amqp, isolation.naming, signup(user))
                for user in ("fine", "flaky", "poison")
            }

            async def archived() -> bool:
                text = await scrape(service)
                archived = sample(text, "grantwire_dead_letters_archived_total", **labels)
                return archived == 1

            await wait_until(archived)

            async def all_settled() -> bool:
                text = await scrape(service)
                return sample(text, "grantwire_handler_seconds_count", **labels) == 4

            await wait_until(all_settled)
            text = await scrape(service)

    def messages(outcome: str) -> float | None:
        return sample(text, "grantwire_messages_total", **labels, outcome=outcome)

    assert (messages("handled"), messages("retried"), messages("dead_lettered")) == (2, 1, 1)
    assert sample(text, "grantwire_message_age_seconds_count", **labels) == 4
    archived_labels = {**labels, "reason": "not_allowed"}
    assert sample(text, "grantwire_dead_letters_archived_total", **archived_labels) == 1
    assert sample(text, "grantwire_dead_letters_stored", service="kit", status="dead") == 1
    assert sample(text, "grantwire_consumer_up", service="kit", queue=queue) == 1
    assert sample(text, "grantwire_ready", service="kit") == 1

    lines = [entry for entry in logs if entry["event"] == "message handled"]
    assert sorted(entry["outcome"] for entry in lines) == [
        "dead_lettered",
        "handled",
        "handled",
        "retried",
    ]
    for entry in lines:
        assert entry.keys() >= LOG_KEYS, entry
        assert entry["service"] == "kit" and entry["queue"] == queue
        assert entry["event_type"] == UserSignedUp.event_type
    by_outcome = {entry["outcome"]: entry for entry in lines}
    poison, flaky = sent["poison"], sent["flaky"]
    dead = by_outcome["dead_lettered"]
    assert (dead["event_id"], dead["correlation_id"]) == (poison.id, poison.correlation_id)
    assert dead["reason"] == "not_allowed" and dead["log_level"] == "error"
    retried = by_outcome["retried"]
    assert retried["event_id"] == flaky.id and retried["attempts"] == 1
    assert "ConnectionError" in retried["error"] and retried["log_level"] == "warning"


def grants(side: str, source: str, outcome: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "grantwire_grants_total", {"side": side, "source": source, "outcome": outcome}
    )
    return value or 0.0


async def start_billing(
    isolation: Isolation, amqp: AbstractRobustConnection
) -> tuple[BillingSettings, Any, EventTap]:
    settings = isolation.settings(BillingSettings, "billing", **REFERRAL_ON)
    tap = await EventTap.open(amqp, isolation.naming, [CreditsGranted.event_type])
    return settings, build_billing(settings), tap


async def test_billing_counts_grants_applied_and_duplicate_by_side_and_source(
    isolation: Isolation, amqp: AbstractRobustConnection
) -> None:
    _, (runtime, app), tap = await start_billing(isolation, amqp)
    watched: list[tuple[str, str, str]] = [
        ("none", "signup_grant", "applied"),
        ("none", "signup_grant", "duplicate"),
        ("referrer", "referral", "applied"),
        ("referee", "referral", "applied"),
        ("referrer", "referral", "duplicate"),
        ("referee", "referral", "duplicate"),
    ]
    before = {key: grants(*key) for key in watched}
    queue = GRANTS_QUEUE.name(isolation.naming)
    async with running_service(runtime, app, isolation) as service:

        async def publish(event: Event, envelope: Envelope | None = None) -> None:
            await publish_event(amqp, isolation.naming, event, envelope=envelope)

        async def handled(count: int) -> None:
            async def reached() -> bool:
                text = await scrape(service)
                value = sample(text, "grantwire_messages_total", queue=queue, outcome="handled")
                return value == count

            await wait_until(reached)

        created = OrganizationCreated(organization_id="org-a", plan_id="free")
        envelope = Envelope.new(created, source="tests")
        await publish(created, envelope)
        await publish(created, envelope)  # the same event delivered twice
        await publish(OrganizationProvisioned(user_id="ada", organization_id="org-a"))
        await publish(OrganizationProvisioned(user_id="grace", organization_id="org-b"))
        await handled(4)  # accepted after provisioning: no race between the two listeners
        accepted = InvitationAccepted(
            invitation_id="inv-1",
            email="grace@example.org",
            invited_by="ada",
            accepted_user_id="grace",
        )
        await publish(accepted)
        await handled(5)
        await publish(accepted)  # a replay under a new id
        await handled(6)
        await tap.wait_for(lambda messages: len(messages) == 3)
        text = await scrape(service)

    after = {key: grants(*key) - before[key] for key in watched}
    assert after == {
        ("none", "signup_grant", "applied"): 1,
        ("none", "signup_grant", "duplicate"): 1,
        ("referrer", "referral", "applied"): 1,
        ("referee", "referral", "applied"): 1,
        ("referrer", "referral", "duplicate"): 1,
        ("referee", "referral", "duplicate"): 1,
    }
    latency = sample(
        text, "grantwire_credit_latency_seconds_count", side="referee", source="referral"
    )
    assert latency is not None and latency >= 1
    published = sample(
        text,
        "grantwire_outbox_published_total",
        service="billing",
        event_type=CreditsGranted.event_type,
    )
    assert published is not None and published >= 3
    relay_batches = sample(text, "grantwire_relay_publish_seconds_count", service="billing")
    assert relay_batches is not None and relay_batches >= 1
    delays = sample(
        text,
        "grantwire_outbox_delay_seconds_count",
        service="billing",
        event_type=CreditsGranted.event_type,
    )
    assert delays is not None and delays >= 3


async def test_job_runs_show_on_billing_metrics_and_are_pushed_to_a_pushgateway(
    isolation: Isolation,
    amqp: AbstractRobustConnection,
    sink: HttpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings, (runtime, app), _ = await start_billing(isolation, amqp)
    async with running_service(runtime, app, isolation) as service:
        started = time.time()
        report = await jobs.run_reported("reconcile", settings, pushgateway_url=sink.url)
        assert report.exit_code == 0
        text = await scrape(service)
        success = sample(text, "grantwire_job_last_success_timestamp_seconds", job_name="reconcile")
        assert success is not None and started <= success <= time.time()
        assert sample(text, "grantwire_job_last_errors", job_name="reconcile") == 0
        assert sample(text, "grantwire_job_last_exit_code", job_name="reconcile") == 0
        assert (
            sample(text, "grantwire_job_last_report", job_name="reconcile", field="accepted") == 0
        )
        [push] = sink.requests
        assert push.method == "POST"
        assert push.path == "/metrics/job/grantwire-billing-jobs/job_name/reconcile"
        assert b'grantwire_job_last_success_timestamp_seconds{job_name="reconcile"}' in push.body

        async def crashing(settings: BillingSettings, **_: Any) -> jobs.JobReport:
            raise RuntimeError("database went away")

        monkeypatch.setitem(jobs.JOBS, "reconcile", crashing)
        with pytest.raises(RuntimeError):
            await jobs.run_reported("reconcile", settings, pushgateway_url=sink.url)
        text = await scrape(service)
        assert sample(text, "grantwire_job_last_errors", job_name="reconcile") == 1
        assert sample(text, "grantwire_job_last_exit_code", job_name="reconcile") == 1
        last_run = sample(text, "grantwire_job_last_run_timestamp_seconds", job_name="reconcile")
        assert last_run is not None and last_run >= success
        # the last success stays the one before the crash
        assert (
            sample(text, "grantwire_job_last_success_timestamp_seconds", job_name="reconcile")
            == success
        )
        run = await runtime.db[jobs.JOB_RUNS].find_one({"_id": "reconcile"})
        assert run is not None and run["last_status"] == "crashed"
        assert run["last_error"] == "RuntimeError: database went away"
        assert run["last_success_at"] <= datetime.now(UTC)
        assert len(sink.requests) == 2
