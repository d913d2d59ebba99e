"""`/readyz` fails while the outbox holds a document too long, and says why."""

from __future__ import annotations

from typing import Any

import pytest
from aio_pika.abc import AbstractRobustConnection
from pymongo.asynchronous.client_session import AsyncClientSession

from services.organizations.app import build
from services.organizations.settings import OrganizationsSettings
from shared.contracts import OrganizationProvisioned
from shared.envelope import Envelope
from shared.outbox import stage_events
from tests.integration.observability.conftest import sample
from tests.support import EventTap, Isolation, RunningService, running_service, wait_until

pytestmark = pytest.mark.integration


async def readyz(service: RunningService) -> tuple[int, dict[str, Any]]:
    response = await service.http.get("/readyz")
    return response.status_code, response.json()


async def test_readyz_is_503_with_the_reason_while_an_unroutable_event_waits_in_the_outbox(
    isolation: Isolation, amqp: AbstractRobustConnection
) -> None:
    # No event log and no consumer of organization.provisioned: the event is unroutable.
    settings = isolation.settings(
        OrganizationsSettings,
        "organizations",
        event_log_enabled=False,
        outbox_stuck_after_s=0.5,
        outbox_max_backoff_s=0.3,
    )
    runtime, app = build(settings)
    async with running_service(runtime, app, isolation) as service:
        assert (await readyz(service))[0] == 200
        envelope = Envelope.new(
            OrganizationProvisioned(user_id="u-stuck", organization_id="org-stuck"), source="tests"
        )

        async def stage(session: AsyncClientSession) -> None:
            await stage_events(runtime.db, session, [envelope], aggregate_id="org-stuck")

        await runtime.commit(stage)

        async def not_ready() -> bool:
            return (await readyz(service))[0] == 503

        await wait_until(not_ready, timeout=10)
        status, body = await readyz(service)
        assert status == 503 and body["status"] == "not_ready"
        outbox = body["checks"]["outbox"]
        assert outbox["status"] == "stuck" and outbox["pending"] == 1
        assert outbox["oldest_pending_s"] > outbox["stuck_after_s"] == 0.5
        assert outbox["oldest"]["event_id"] == envelope.id
        assert outbox["oldest"]["event_type"] == "organization.provisioned"
        assert "UnroutableError" in outbox["oldest"]["error"]
        assert outbox["oldest"]["attempts"] >= 1
        assert body["checks"]["broker"] == body["checks"]["database"] == "ok"
        [reason] = body["reasons"]
        assert reason.startswith("outbox: 1 pending")
        assert envelope.id in reason and "UnroutableError" in reason and "> 0.5 s" in reason

        text = (await service.http.get("/metrics")).text
        assert sample(text, "grantwire_ready", service="organizations") == 0
        assert sample(text, "grantwire_outbox_pending", service="organizations") == 1
        oldest = sample(text, "grantwire_outbox_oldest_pending_seconds", service="organizations")
        assert oldest is not None and oldest > 0.5
        failures = sample(
            text,
            "grantwire_outbox_publish_failures_total",
            service="organizations",
            event_type="organization.provisioned",
            error="UnroutableError",
        )
        assert failures is not None and failures >= 1

        # a consumer appears: the relay's next attempt publishes it and readiness recovers
        tap = await EventTap.open(amqp, isolation.naming, [OrganizationProvisioned.event_type])
        await tap.wait_for(lambda messages: len(messages) == 1, timeout=10)
        assert tap.messages[0].message_id == envelope.id

        async def ready_again() -> bool:
            return (await readyz(service))[0] == 200

        await wait_until(ready_again, timeout=10)
        status, body = await readyz(service)
        assert body == {"status": "ready", "checks": body["checks"]}
        assert body["checks"]["outbox"]["pending"] == 0
