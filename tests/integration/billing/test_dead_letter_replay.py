"""A billing message dead-lettered for a fixable cause, replayed by an operator, credited once.

The cause: billing's database is unreachable (a proxy between billing and mongod is cut)
for longer than the retry tiers. After the database is back, `grantwire dlq replay` by
filter credits the referral exactly once; replaying again, or the broker delivering the
same message again, credits nothing more.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import pytest
from typer.testing import CliRunner

from grantwire.cli import app
from tests.integration.billing.conftest import (
    REFERRAL_ON,
    BillingUnderTest,
    StartBilling,
    accepted,
    provisioned,
)
from tests.proxy import CuttableProxy
from tests.support import Isolation, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
async def database_proxy(isolation: Isolation) -> AsyncIterator[CuttableProxy]:
    target = urlparse(isolation.urls.mongo_url)
    proxy = CuttableProxy(target.hostname or "127.0.0.1", target.port or 27017)
    await proxy.start()
    yield proxy
    await proxy.cut()


def dlq(isolation: Isolation, *args: str) -> Any:
    env = {
        "GRANTWIRE_AMQP_URL": isolation.urls.amqp_url,
        "GRANTWIRE_MONGO_URL": isolation.urls.mongo_url,
        "GRANTWIRE_DLQ_DATABASES": json.dumps({"billing": isolation.db_name("billing")}),
        "GRANTWIRE_OPERATOR": "ops-test",
    }
    result = CliRunner().invoke(app, ["dlq", *args], env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.output.splitlines()[-1])


async def test_billing_letter_dead_lettered_while_its_database_was_down_is_replayed_once(
    database_proxy: CuttableProxy, start_billing: StartBilling, isolation: Isolation
) -> None:
    billing: BillingUnderTest = await start_billing(
        **REFERRAL_ON,
        mongo_url=f"mongodb://127.0.0.1:{database_proxy.port}/?directConnection=true&heartbeatFrequencyMS=500&serverSelectionTimeoutMS=2000",
        handler_timeout_s=1.0,
        retry_delays_s=(0.1, 0.2),
        max_attempts=3,
    )
    await billing.publish(provisioned("inviter", "org-inviter"))
    await billing.settled()

    await database_proxy.cut()  # the database goes away for longer than the retry tiers
    lost = await billing.publish(accepted(1, inviter="inviter"))

    async def dead_lettered() -> bool:
        accepted_type = "invitation.accepted"
        return (
            billing.handled(accepted_type) == 0
            and billing.handled(accepted_type, outcome="dead_lettered") >= 1
        )

    await wait_until(dead_lettered, timeout=30)
    await database_proxy.restore()  # fixed

    async def archived() -> bool:
        return await billing.dead_letter_count() == 1

    await wait_until(archived, timeout=30)
    assert await billing.balance("org-inviter") == 0

    report = await asyncio.to_thread(
        dlq,
        isolation,
        "replay",
        "--service",
        "billing",
        "--event-type",
        "invitation.accepted",
        "--reason",
        "database back",
    )
    assert (report["selected"], report["replayed"]) == (1, 1)
    await billing.wait_balance("org-inviter", 1000)

    again = await asyncio.to_thread(
        dlq,
        isolation,
        "replay",
        "--service",
        "billing",
        "--event-type",
        "invitation.accepted",
        "--reason",
        "once more",
    )
    assert again["selected"] == 0
    # the broker delivering the very same message again changes nothing either
    await billing.publish(accepted(1, inviter="inviter"), envelope=lost)
    await billing.wait_handled("invitation.accepted", 2)
    assert await billing.balance("org-inviter") == 1000
    assert await billing.ledger_keys("org-inviter") == ["referral:inv1:referrer"]
