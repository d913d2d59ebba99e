"""`grantwire publish`: validate an event against its contract and publish it properly.

The tool other teams and operators use to inject events: the data is validated by the
same pydantic model every consumer uses, wrapped in a CloudEvents envelope and published
persistent, confirmed and mandatory. Invalid data is refused with the validation errors
and nothing is published.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import aio_pika
import typer
from aiormq.exceptions import ChannelNotFoundEntity
from pydantic import ValidationError

from shared.contracts import EVENT_MODELS, Event
from shared.envelope import Envelope
from shared.logging import mask_url
from shared.publisher import ConfirmingPublisher, UnroutableError
from shared.settings import ServiceSettings


class PublishSettings(ServiceSettings):
    """Where to publish: the same `GRANTWIRE_AMQP_URL` / `GRANTWIRE_NAMESPACE` as the services."""


def validate_event(event_type: str, raw: str) -> Event:
    """The contract model of ``raw``; ``typer.BadParameter`` with every problem when invalid."""
    model = EVENT_MODELS.get(event_type)
    if model is None:
        known = ", ".join(sorted(EVENT_MODELS))
        raise typer.BadParameter(f"unknown event type {event_type!r}; known: {known}")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"data is not JSON: {exc}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in err['loc']) or '<data>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise typer.BadParameter(f"{event_type} data violates its contract:\n{problems}") from exc


async def publish_envelope(settings: ServiceSettings, envelope: Envelope) -> None:
    """Publish one envelope to the events exchange and wait for the broker's confirm."""
    connection = await aio_pika.connect_robust(settings.amqp_url.get_secret_value())
    try:
        # Passive: a publisher needs write permission only, never configure.
        publisher = await ConfirmingPublisher.open(connection, settings.naming().events_exchange)
        await publisher.publish(envelope)
    finally:
        await connection.close()


def register(app: typer.Typer) -> None:
    """Add the `publish` command to the `grantwire` command line."""

    @app.command()
    def publish(
        event_type: Annotated[str, typer.Argument(help="e.g. user.signed_up")],
        data: Annotated[str | None, typer.Option(help="the event data as JSON")] = None,
        file: Annotated[
            Path | None, typer.Option(exists=True, dir_okay=False, help="read the data here")
        ] = None,
        correlation_id: Annotated[str | None, typer.Option(help="join an existing chain")] = None,
        event_id: Annotated[str | None, typer.Option(help="default: a new UUID")] = None,
        source: Annotated[str, typer.Option(help="CloudEvents source")] = "grantwire-cli",
    ) -> None:
        """Validate EVENT_TYPE data against its contract and publish it durably."""
        if (data is None) == (file is None):
            raise typer.BadParameter("give exactly one of --data or --file")
        raw = data if data is not None else file.read_text()  # type: ignore[union-attr]
        event = validate_event(event_type, raw)
        envelope = Envelope.new(
            event, source=source, correlation_id=correlation_id, event_id=event_id
        )
        settings = PublishSettings()
        try:
            asyncio.run(publish_envelope(settings, envelope))
        except ChannelNotFoundEntity as exc:
            exchange = settings.naming().events_exchange
            typer.echo(f"not published: exchange {exchange!r} does not exist", err=True)
            raise typer.Exit(1) from exc
        except UnroutableError as exc:
            typer.echo(
                f"not published: {exc} (is the consuming service's queue declared?)", err=True
            )
            raise typer.Exit(1) from exc
        except OSError as exc:
            url = mask_url(settings.amqp_url.get_secret_value())
            typer.echo(f"not published: broker at {url} unreachable: {exc}", err=True)
            raise typer.Exit(1) from exc
        typer.echo(
            json.dumps(
                {
                    "published": envelope.type,
                    "id": envelope.id,
                    "correlation_id": envelope.correlation_id,
                }
            )
        )
