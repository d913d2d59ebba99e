"""`grantwire publish` against the real broker: valid data goes out, invalid data does not."""

from __future__ import annotations

import asyncio
import json

import pytest
from aio_pika.abc import AbstractRobustConnection
from typer.testing import CliRunner

from grantwire.cli import app
from tests.support import EventTap, Isolation

pytestmark = pytest.mark.integration


def run_cli(isolation: Isolation, *args: str) -> object:
    env = {
        "GRANTWIRE_AMQP_URL": isolation.urls.amqp_url,
        "GRANTWIRE_NAMESPACE": isolation.naming.namespace,
    }
    return CliRunner().invoke(app, list(args), env=env)


async def test_publish_validates_and_publishes_with_a_cloudevents_envelope(
    isolation: Isolation, amqp: AbstractRobustConnection
) -> None:
    tap = await EventTap.open(amqp, isolation.naming, ["user.#"])
    data = {"user_id": "u1", "email": " Ada@Example.com ", "email_verified": False}
    result = await asyncio.to_thread(
        run_cli,
        isolation,
        "publish",
        "user.signed_up",
        "--data",
        json.dumps(data),
        "--correlation-id",
        "chain-1",
    )
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    printed = json.loads(result.output)  # type: ignore[attr-defined]
    [message] = await tap.wait_for(lambda msgs: len(msgs) == 1)
    assert message.message_id == printed["id"]
    assert message.correlation_id == "chain-1"
    assert message.headers["cloudEvents:type"] == "user.signed_up"
    assert message.headers["cloudEvents:source"] == "grantwire-cli"
    assert json.loads(message.body)["email"] == "ada@example.com"


async def test_invalid_data_is_refused_with_the_errors_and_nothing_is_published(
    isolation: Isolation, amqp: AbstractRobustConnection
) -> None:
    tap = await EventTap.open(amqp, isolation.naming, ["#"])
    refused = await asyncio.to_thread(
        run_cli, isolation, "publish", "user.signed_up", "--data", '{"user_id": "u1"}'
    )
    assert refused.exit_code == 2  # type: ignore[attr-defined]
    assert "email" in refused.output and "email_verified" in refused.output  # type: ignore[attr-defined]
    unknown = await asyncio.to_thread(run_cli, isolation, "publish", "user.deleted", "--data", "{}")
    assert unknown.exit_code == 2 and "unknown event type" in unknown.output  # type: ignore[attr-defined]
    # A valid marker published afterwards is the only message that ever arrives.
    marker = await asyncio.to_thread(
        run_cli, isolation, "publish", "user.email_verified", "--data", '{"user_id": "u1"}'
    )
    assert marker.exit_code == 0  # type: ignore[attr-defined]
    await tap.wait_for(lambda msgs: len(msgs) >= 1)
    assert [m.type for m in tap.messages] == ["user.email_verified"]


async def test_publish_with_no_queue_bound_fails_loudly(isolation: Isolation) -> None:
    # No service has declared this namespace's topology (not even the event log).
    result = await asyncio.to_thread(
        run_cli, isolation, "publish", "user.email_verified", "--data", '{"user_id": "u1"}'
    )
    assert result.exit_code == 1  # type: ignore[attr-defined]
    assert "not published" in result.output  # type: ignore[attr-defined]
