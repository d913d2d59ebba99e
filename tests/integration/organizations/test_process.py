"""The organizations service as its own process: ready, working, and a clean SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest
from aio_pika.abc import AbstractRobustConnection

from services.organizations import SERVICE
from services.organizations.app import USERS_QUEUE
from shared.topology import RetryPolicy
from tests.integration.organizations.harness import signup
from tests.support import ROOT, EventTap, Isolation, publish_event, wait_until

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
COMMANDS = {
    "python -m": [sys.executable, "-m", "services.organizations"],
    "grantwire serve": [str(BIN / "grantwire"), "serve", "organizations"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
async def test_the_service_runs_as_its_own_process_and_exits_0_on_sigterm(
    command: list[str], isolation: Isolation, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    port = free_port()
    env = os.environ | isolation.env(
        SERVICE,
        GRANTWIRE_HTTP_PORT=str(port),
        GRANTWIRE_RETRY_DELAYS_S="[0.05, 0.1]",
        GRANTWIRE_MAX_ATTEMPTS="3",
        GRANTWIRE_OUTBOX_POLL_INTERVAL_S="0.2",
        GRANTWIRE_SHUTDOWN_GRACE_S="5",
        GRANTWIRE_LOG_JSON="true",
    )
    isolation.track(USERS_QUEUE, RetryPolicy((0.05, 0.1), 3))
    log_path = tmp_path / "service.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command, cwd=ROOT, env=env, stdout=log, stderr=log
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=2) as http:

            async def ready() -> bool:
                assert process.returncode is None, log_path.read_text()
                try:
                    return (await http.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(ready, timeout=30, interval=0.1)
            tap = await EventTap.open(amqp, isolation.naming, ["organization.*"])
            await publish_event(amqp, isolation.naming, signup("u1", "ada@acme.com"))

            async def organization() -> dict[str, str] | None:
                response = await http.get("/users/u1/organization")
                return response.json() if response.status_code == 200 else None

            found = await wait_until(organization, timeout=10, interval=0.05)
            assert (found["name"], found["role"]) == ("Acme", "owner")
            await tap.wait_for(lambda msgs: len(msgs) >= 2)

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0, log_path.read_text()
        assert '"event": "stopped"' in log_path.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
