"""The AsyncAPI 3.0 document of every channel and payload, generated from the code.

Channels and payloads come from the contract models (`shared.contracts`); who sends and
who receives each event comes from the services' own composition roots (the queues they
consume, the events they publish), so the document cannot drift from what runs. Also
renders `docs/events.md`: one example message per event with its AMQP properties and
headers. `make docs` writes both; CI fails when the committed copies are stale.
"""

from __future__ import annotations

import importlib
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.contracts import EVENT_MODELS, Event
from shared.envelope import Envelope
from shared.runtime import ServiceRuntime
from shared.topology import Naming

SERVICES = ("organizations", "invitations", "billing")
EXTERNAL_PUBLISHERS = {"user.signed_up": "identity", "user.email_verified": "identity"}
DOCS = Path(__file__).resolve().parents[1] / "docs"
SOURCES = {
    "user": "identity",
    "organization": "organizations",
    "invitation": "invitations",
    "billing": "billing",
}
EXAMPLE_TIME = datetime(2026, 1, 15, 9, 30, tzinfo=UTC)

EXAMPLES: dict[str, dict[str, Any]] = {
    "user.signed_up": {
        "user_id": "usr_grace",
        "email": "grace@gmail.com",
        "first_name": "Grace",
        "last_name": "Hopper",
        "email_verified": False,
        "invite_token": "9f2c4e6a8b0d1f3a5c7e9b1d3f5a7c9e1b3d5f70",
    },
    "user.email_verified": {"user_id": "usr_grace"},
    "organization.created": {"organization_id": "org_7f3a", "plan_id": "free"},
    "organization.provisioned": {"user_id": "usr_grace", "organization_id": "org_7f3a"},
    "invitation.accepted": {
        "invitation_id": "inv_51c0",
        "email": "grace@gmail.com",
        "invited_by": "usr_ada",
        "accepted_user_id": "usr_grace",
    },
    "billing.credits_granted": {
        "organization_id": "org_7f3a",
        "ref_id": "referral:inv_51c0:referee",
        "source": "referral",
        "amount": 500,
        "balance": 1000,
        "expires_at": "2027-01-15T09:30:00Z",
        "invitation_id": "inv_51c0",
        "side": "referee",
    },
}


def service_runtimes() -> dict[str, ServiceRuntime]:
    """Each service's runtime as its composition root builds it (nothing is started)."""
    runtimes = {}
    for name in SERVICES:
        app_module = importlib.import_module(f"services.{name}.app")
        settings_module = importlib.import_module(f"services.{name}.settings")
        settings_cls = next(  # the service's own class, not the mixins it imports
            value
            for attr, value in vars(settings_module).items()
            if attr.endswith("Settings") and value.__module__ == settings_module.__name__
        )
        runtime, _ = app_module.build(settings_cls(namespace=""))
        runtimes[name] = runtime
    return runtimes


def example_envelope(event_type: str) -> Envelope:
    event = EVENT_MODELS[event_type].model_validate(EXAMPLES[event_type])
    envelope = Envelope.new(
        event,
        source=SOURCES[event_type.split(".")[0]],
        event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"grantwire-example:{event_type}")),
        correlation_id="c0ffee00-0000-4000-8000-000000000001",
    )
    return Envelope(**{**envelope.__dict__, "time": EXAMPLE_TIME})


def _message_name(model: type[Event]) -> str:
    return model.__name__


def build_document(runtimes: dict[str, ServiceRuntime]) -> dict[str, Any]:
    naming = Naming()
    schemas: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    headers_schema = {
        "type": "object",
        "description": "CloudEvents 1.0 attributes (AMQP binary content mode).",
        "required": ["cloudEvents:specversion", "cloudEvents:id", "cloudEvents:type"],
        "properties": {
            "cloudEvents:specversion": {"const": "1.0"},
            "cloudEvents:id": {"type": "string", "description": "= AMQP message_id"},
            "cloudEvents:type": {"type": "string", "description": "= routing key"},
            "cloudEvents:source": {"type": "string"},
            "cloudEvents:time": {"type": "string", "format": "date-time"},
            "cloudEvents:schemaversion": {"type": "string", "pattern": "^[0-9]+\\.[0-9]+$"},
            "cloudEvents:correlationid": {"type": "string"},
            "cloudEvents:causationid": {"type": "string"},
            "traceparent": {"type": "string", "description": "W3C trace context"},
            "tracestate": {"type": "string", "description": "W3C trace context"},
            "x-grantwire-origin-time": {
                "type": "string",
                "format": "date-time",
                "description": "time of the first event of the chain (credit latency)",
            },
        },
    }
    schemas["CloudEventsHeaders"] = headers_schema
    for event_type, model in sorted(EVENT_MODELS.items()):
        name = _message_name(model)
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for def_name, definition in schema.pop("$defs", {}).items():
            schemas[def_name] = definition
        schemas[name] = schema
        example = example_envelope(event_type)
        messages[name] = {
            "name": event_type,
            "title": name,
            "summary": (model.__doc__ or "").strip(),
            "contentType": "application/json",
            "headers": {"$ref": "#/components/schemas/CloudEventsHeaders"},
            "payload": {"$ref": f"#/components/schemas/{name}"},
            "correlationId": {"location": "$message.header#/cloudEvents:correlationid"},
            "bindings": {"amqp": {"messageType": event_type, "bindingVersion": "0.3.0"}},
            "x-schema-version": model.schema_version,
            "examples": [{"headers": example.headers(), "payload": EXAMPLES[event_type]}],
        }
        channels[event_type] = {
            "address": event_type,
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {
                        "name": naming.events_exchange,
                        "type": "topic",
                        "durable": True,
                        "autoDelete": False,
                    },
                    "bindingVersion": "0.3.0",
                }
            },
        }
    publishers: dict[str, list[str]] = {t: [p] for t, p in EXTERNAL_PUBLISHERS.items()}
    for service, runtime in runtimes.items():
        for event_type in runtime.publishes:
            publishers.setdefault(event_type, []).append(service)
        for work_queue in runtime.work_queues:
            for event_type in work_queue.event_types:
                operations[f"{service}.receive.{event_type}"] = {
                    "action": "receive",
                    "summary": f"{service} consumes {event_type} from {work_queue.name(naming)}",
                    "channel": {"$ref": f"#/channels/{event_type}"},
                    "messages": [
                        {
                            "$ref": f"#/channels/{event_type}/messages/"
                            f"{_message_name(EVENT_MODELS[event_type])}"
                        }
                    ],
                    "bindings": {"amqp": {"ack": True, "bindingVersion": "0.3.0"}},
                    "x-queue": {
                        "name": work_queue.name(naming),
                        "type": "quorum",
                        "dead-letter-queue": work_queue.dlq_name(naming),
                    },
                }
    for event_type, senders in sorted(publishers.items()):
        for sender in senders:
            operations[f"{sender}.send.{event_type}"] = {
                "action": "send",
                "summary": f"{sender} publishes {event_type} (persistent, confirmed, mandatory)",
                "channel": {"$ref": f"#/channels/{event_type}"},
                "messages": [
                    {
                        "$ref": f"#/channels/{event_type}/messages/"
                        f"{_message_name(EVENT_MODELS[event_type])}"
                    }
                ],
                "bindings": {
                    "amqp": {"deliveryMode": 2, "mandatory": True, "bindingVersion": "0.3.0"}
                },
            }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Grantwire events",
            "version": "1.0.0",
            "description": (
                "Domain events of Grantwire. One durable topic exchange; routing key = event "
                "type; CloudEvents 1.0 in AMQP binary mode (body = data as JSON, message_id = "
                "event id). Consumers accept any minor version of a major they know."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "127.0.0.1:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "the local RabbitMQ of `make infra-up`",
            }
        },
        "channels": channels,
        "operations": dict(sorted(operations.items())),
        "components": {"schemas": schemas, "messages": messages},
    }


def render_examples() -> str:
    lines = [
        "# Event examples",
        "",
        "Generated by `make docs` from `shared/contracts.py` (do not edit). One example",
        "message per event: AMQP properties, headers, and the JSON body.",
        "",
    ]
    for event_type in sorted(EVENT_MODELS):
        envelope = example_envelope(event_type)
        properties = {
            "message_id": envelope.id,
            "type": envelope.type,
            "correlation_id": envelope.correlation_id,
            "app_id": envelope.source,
            "content_type": "application/json",
            "delivery_mode": 2,
            "routing_key": event_type,
        }
        lines += [
            f"## `{event_type}`",
            "",
            "```json",
            json.dumps(
                {
                    "properties": properties,
                    "headers": envelope.headers(),
                    "body": EXAMPLES[event_type],
                },
                indent=2,
            ),
            "```",
            "",
        ]
    return "\n".join(lines)


def write_docs(target: Path = DOCS) -> list[Path]:
    target.mkdir(parents=True, exist_ok=True)
    spec = target / "asyncapi.json"
    spec.write_text(json.dumps(build_document(service_runtimes()), indent=2) + "\n")
    examples = target / "events.md"
    examples.write_text(render_examples())
    return [spec, examples]


def stale_docs() -> list[str]:
    """Names of the committed docs that differ from what the code generates now."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fresh = write_docs(Path(tmp))
        return [
            path.name
            for path in fresh
            if not (DOCS / path.name).exists() or (DOCS / path.name).read_text() != path.read_text()
        ]
