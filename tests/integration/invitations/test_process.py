"""The service as its own process: ``python -m services.invitations``, HTTP, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile

import httpx
import pytest
from aio_pika.abc import AbstractRobustConnection

from services.invitations.app import SIGNUPS
from shared.contracts import InvitationAccepted, UserSignedUp
from shared.topology import RetryPolicy
from tests.integration.invitations.conftest import SECRET, bearer
from tests.support import ROOT, EventTap, Isolation, publish_event, wait_until

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_service_runs_as_its_own_process_serves_its_api_and_exits_0_on_sigterm(
    isolation: Isolation, amqp: AbstractRobustConnection
) -> None:
    port = free_port()
    isolation.track(SIGNUPS, RetryPolicy())  # the process uses the default retry tiers
    env = {
        **os.environ,
        **isolation.env(
            "invitations",
            GRANTWIRE_HTTP_PORT=str(port),
            GRANTWIRE_JWT_SECRET=SECRET,
            GRANTWIRE_SHUTDOWN_GRACE_S="5",
            GRANTWIRE_LOG_JSON="true",
        ),
    }
    tap = await EventTap.open(amqp, isolation.naming, [InvitationAccepted.event_type])
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.invitations"],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

                async def ready() -> bool:
                    assert process.poll() is None, "the service exited early"
                    try:
                        return (await http.get("/readyz")).status_code == 200
                    except httpx.TransportError:
                        return False

                await wait_until(ready, timeout=30, interval=0.1)
                created = await http.post(
                    "/invitations", json={"email": "friend@example.com"}, headers=bearer("alice")
                )
                assert created.status_code == 201, created.text
                token = created.json()["token"]

                await publish_event(
                    amqp,
                    isolation.naming,
                    UserSignedUp(
                        user_id="bob",
                        email="friend@example.com",
                        email_verified=False,
                        invite_token=token,
                    ),
                )
                await tap.wait_for(lambda msgs: len(msgs) == 1, timeout=15)
                verify = await http.get(f"/invitations/verify/{token}")
                assert verify.json()["reason"] == "accepted"
                # Over uvicorn: a body above GRANTWIRE_MAX_HTTP_BODY_BYTES (64 KiB) is 413.
                too_big = await http.post(
                    "/invitations",
                    json={"email": "x@example.com", "pad": "x" * 65536},
                    headers=bearer("alice"),
                )
                assert too_big.status_code == 413, too_big.text
                assert too_big.json()["error"] == "payload_too_large"

            process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(process.wait, 15)
            assert code == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            output.seek(0)
            print(output.read().decode(errors="replace")[-4000:])
