"""Billing under test: the real service in-process, on the real broker and database."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import pytest
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import REGISTRY

from services.billing.app import GRANTS_QUEUE, build
from services.billing.handlers import Billing
from services.billing.repository import BillingStore
from services.billing.settings import BillingSettings
from shared.contracts import (
    CreditsGranted,
    Event,
    InvitationAccepted,
    OrganizationCreated,
    OrganizationProvisioned,
)
from shared.envelope import Envelope
from shared.runtime import ServiceRuntime
from tests.support import (
    EventTap,
    Isolation,
    RunningService,
    bearer,
    publish_event,
    running_service,
    wait_until,
)

JWT_SECRET = "billing-test-secret-of-at-least-32-bytes"
ADMIN = bearer(JWT_SECRET, "ops-admin", roles=("admin",))

REFERRAL_ON: dict[str, Any] = {
    "referral_enabled": True,
    "referral_referrer_units": 1000,
    "referral_referee_units": 500,
}


def accepted(
    n: int | str, inviter: str | None = "inviter", referee: str = ""
) -> InvitationAccepted:
    return InvitationAccepted(
        invitation_id=f"inv{n}",
        email=f"friend{n}@example.com",
        invited_by=inviter,
        accepted_user_id=referee or f"friend{n}",
    )


def provisioned(user: str, org: str) -> OrganizationProvisioned:
    return OrganizationProvisioned(user_id=user, organization_id=org)


def created(org: str, plan: str = "free") -> OrganizationCreated:
    return OrganizationCreated(organization_id=org, plan_id=plan)


@dataclass
class BillingUnderTest:
    """One running billing service and what a test needs around it."""

    service: RunningService
    billing: Billing
    settings: BillingSettings
    tap: EventTap
    amqp: AbstractRobustConnection
    isolation: Isolation
    published: Counter[str] = field(default_factory=Counter)

    @property
    def runtime(self) -> ServiceRuntime:
        return self.service.runtime

    @property
    def store(self) -> BillingStore:
        return self.billing.store

    async def publish(self, event: Event, envelope: Envelope | None = None) -> Envelope:
        self.published[event.event_type] += 1
        return await publish_event(self.amqp, self.isolation.naming, event, envelope=envelope)

    async def settled(self, timeout: float = 10) -> None:
        """Wait until every message this test published was handled (effects all written)."""
        for event_type, count in self.published.items():
            await self.wait_handled(event_type, count, timeout)

    def handled(self, event_type: str, outcome: str = "handled") -> int:
        """Messages of ``event_type`` this test's consumers settled with ``outcome``."""
        value = REGISTRY.get_sample_value(
            "grantwire_messages_total",
            {
                "service": "billing",
                "queue": GRANTS_QUEUE.name(self.isolation.naming),
                "event_type": event_type,
                "outcome": outcome,
            },
        )
        return int(value or 0)

    async def wait_handled(self, event_type: str, count: int, timeout: float = 10) -> None:
        async def done() -> bool:
            return self.handled(event_type) >= count

        await wait_until(done, timeout=timeout)

    async def balance(self, organization_id: str) -> int:
        response = await self.service.http.get(
            f"/organizations/{organization_id}/balance", headers=ADMIN
        )
        assert response.status_code == 200, response.text
        return int(response.json()["balance"])

    async def wait_balance(self, organization_id: str, expected: int, timeout: float = 10) -> None:
        async def reached() -> bool:
            return await self.balance(organization_id) == expected

        try:
            await wait_until(reached, timeout=timeout)
        except AssertionError:
            actual = await self.balance(organization_id)
            raise AssertionError(
                f"{organization_id}: balance {actual}, expected {expected}"
            ) from None

    def credits(self) -> list[dict[str, Any]]:
        return self.tap.of_type(CreditsGranted.event_type)

    async def wait_credits(self, count: int) -> list[dict[str, Any]]:
        await self.tap.wait_for(
            lambda msgs: sum(m.type == CreditsGranted.event_type for m in msgs) >= count
        )
        return self.credits()

    async def ledger_keys(self, organization_id: str | None = None) -> list[str]:
        query = {} if organization_id is None else {"organization_id": organization_id}
        return sorted([doc["ref_id"] async for doc in self.store.ledger.find(query)])

    async def referral_sides(self, invitation_id: str) -> dict[str, str | None]:
        doc = await self.store.referrals.find_one({"_id": invitation_id})
        assert doc is not None, f"referral {invitation_id} not recorded"
        return {side: doc["sides"][side].get("outcome") for side in ("referee", "referrer")}

    async def dead_letter_count(self) -> int:
        return await self.runtime.db["dead_letters"].count_documents({})


StartBilling = Callable[..., Awaitable[BillingUnderTest]]


@pytest.fixture
async def start_billing(
    isolation: Isolation, amqp: AbstractRobustConnection
) -> AsyncIterator[StartBilling]:
    """Start billing (settings overrides as keyword arguments); stopped at teardown."""
    async with AsyncExitStack() as stack:

        async def start(**overrides: Any) -> BillingUnderTest:
            values: dict[str, Any] = {"jwt_secret": JWT_SECRET, **overrides}
            settings = isolation.settings(BillingSettings, "billing", **values)
            # bound before anything is published: credits are routable and observed
            tap = await EventTap.open(amqp, isolation.naming, [CreditsGranted.event_type])
            runtime, app = build(settings)
            service = await stack.enter_async_context(running_service(runtime, app, isolation))
            return BillingUnderTest(service, app.state.billing, settings, tap, amqp, isolation)

        yield start
