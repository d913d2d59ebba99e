"""Billing as documented: its own process, and the `grantwire` job commands."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aio_pika.abc import AbstractRobustConnection

from services.billing import jobs
from services.billing.app import GRANTS_QUEUE
from shared.contracts import CreditsGranted
from shared.lease import Lease
from shared.outbox import LEASES
from shared.topology import RetryPolicy
from tests.integration.billing.conftest import (
    ADMIN,
    JWT_SECRET,
    REFERRAL_ON,
    StartBilling,
    accepted,
    provisioned,
)
from tests.support import EventTap, Isolation, publish_event, wait_until

pytestmark = pytest.mark.integration
GRANTWIRE = Path(sys.executable).parent / "grantwire"
REFERRAL_ENV = {
    "GRANTWIRE_REFERRAL_ENABLED": "true",
    "GRANTWIRE_REFERRAL_REFERRER_UNITS": "1000",
    "GRANTWIRE_REFERRAL_REFEREE_UNITS": "500",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_service_runs_as_its_own_process_and_stops_cleanly_on_sigterm(
    isolation: Isolation, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    port = free_port()
    env = os.environ | isolation.env(
        "billing",
        GRANTWIRE_HTTP_PORT=str(port),
        GRANTWIRE_SHUTDOWN_GRACE_S="6",
        GRANTWIRE_LOG_JSON="true",
        GRANTWIRE_JWT_SECRET=JWT_SECRET,
        **REFERRAL_ENV,
    )
    isolation.track(GRANTS_QUEUE, RetryPolicy())  # the process's default retry tiers
    tap = await EventTap.open(amqp, isolation.naming, [CreditsGranted.event_type])
    log_file = (tmp_path / "billing.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.billing", env=env, stdout=log_file, stderr=log_file
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=ADMIN) as http:

            async def ready() -> bool:
                try:
                    return (await http.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(ready, timeout=20, interval=0.1)
            for event in (provisioned("inviter", "org-a"), provisioned("friend1", "org-b")):
                await publish_event(amqp, isolation.naming, event)
            await publish_event(amqp, isolation.naming, accepted(1))

            async def credited() -> bool:
                response = await http.get("/organizations/org-b/balance")
                return response.json()["balance"] == 500

            await wait_until(credited, timeout=10, interval=0.05)
            assert (await http.get("/organizations/org-a/balance")).json()["balance"] == 1000
            await tap.wait_for(lambda msgs: len(msgs) >= 2)

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        log_file.close()
    assert b'"stopped"' in (tmp_path / "billing.log").read_bytes()


async def grantwire(isolation: Isolation, *args: str, **env: str) -> tuple[int, dict[str, Any]]:
    """Run a `grantwire` command as a CronJob would; (exit code, its one JSON report line)."""
    process = await asyncio.create_subprocess_exec(
        str(GRANTWIRE),
        *args,
        env=os.environ | isolation.env("billing", GRANTWIRE_RECONCILE_JITTER_S="0", **env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    lines = stdout.decode().strip().splitlines()
    assert len(lines) == 1, (stdout, stderr)
    return int(process.returncode or 0), json.loads(lines[0])


async def test_job_commands_print_one_json_report_and_exit_with_its_code(
    start_billing: StartBilling, isolation: Isolation
) -> None:
    billing = await start_billing(**REFERRAL_ON)
    await billing.publish(provisioned("inviter", "org-a"))
    await billing.publish(accepted(1))
    await billing.settled()
    held = Lease(
        billing.runtime.db[LEASES], jobs.RECONCILE_LEASE, "other-runner", timedelta(minutes=10)
    )

    assert await held.acquire()
    code, report = await grantwire(isolation, "reconcile", **REFERRAL_ENV)
    assert (code, report["status"], report["lock_holder"]) == (0, "lock_held", "other-runner")
    await held.release()

    code, report = await grantwire(isolation, "reconcile", **REFERRAL_ENV)
    assert code == 0
    assert {k: report[k] for k in ("status", "accepted", "backfilled", "pending", "errors")} == {
        "status": "completed",
        "accepted": 1,
        "backfilled": 0,
        "pending": 1,  # the referee has no organization yet
        "errors": 0,
    }
    assert isinstance(report["duration_ms"], int)

    code, report = await grantwire(isolation, "expire")
    assert (code, report["expired"]) == (0, 0)

    await billing.store.accounts.update_one({"_id": "org-a"}, {"$inc": {"balance": 1}})
    code, report = await grantwire(isolation, "audit")
    assert (code, report["finding_counts"]) == (1, {"balance_mismatch": 1})
