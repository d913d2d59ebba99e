"""CloudEvents 1.0 envelope in AMQP binary content mode.

The body is the event's data as JSON; the attributes travel as AMQP properties and
``cloudEvents:``-prefixed headers. The event id is the AMQP ``message_id`` and never
changes on relay, retry or replay. Two more headers ride along: the W3C trace context
(``traceparent``, see ``shared.tracing``) and ``x-grantwire-origin-time``, the time of the
first event of a causation chain (how long a chain took, e.g. signup to credit).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from opentelemetry.context import Context

from shared import tracing
from shared.contracts import Event

SPEC_VERSION = "1.0"
CONTENT_TYPE = "application/json"
CE_PREFIX = "cloudEvents:"
H_SPECVERSION = f"{CE_PREFIX}specversion"
H_ID = f"{CE_PREFIX}id"
H_TYPE = f"{CE_PREFIX}type"
H_SOURCE = f"{CE_PREFIX}source"
H_TIME = f"{CE_PREFIX}time"
H_SCHEMA_VERSION = f"{CE_PREFIX}schemaversion"
H_CORRELATION_ID = f"{CE_PREFIX}correlationid"
H_CAUSATION_ID = f"{CE_PREFIX}causationid"
H_ORIGIN_TIME = "x-grantwire-origin-time"


class EnvelopeError(ValueError):
    """A message's envelope is missing or has malformed attributes."""


@dataclass(frozen=True)
class Envelope:
    """One event as it travels: CloudEvents attributes plus the JSON body bytes."""

    id: str
    type: str
    source: str
    time: datetime
    schema_version: str
    correlation_id: str
    causation_id: str | None
    body: bytes
    extra_headers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(
        cls,
        event: Event,
        *,
        source: str,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        event_id: str | None = None,
        trace_context: Context | None = None,
    ) -> Envelope:
        """Wrap an event; a new chain gets its own id as correlation id.

        The envelope carries ``trace_context``, or else the current trace context (when
        there is one).
        """
        event_id = event_id or str(uuid.uuid4())
        return cls(
            id=event_id,
            type=event.event_type,
            source=source,
            time=datetime.now(UTC),
            schema_version=event.schema_version,
            correlation_id=correlation_id or event_id,
            causation_id=causation_id,
            body=event.model_dump_json().encode(),
            extra_headers=tracing.trace_headers(trace_context),
        )

    def caused(
        self, event: Event, *, source: str, trace_context: Context | None = None
    ) -> Envelope:
        """An envelope for an event caused by this one (same correlation id, origin time).

        ``trace_context``: the trace it continues, when the work runs outside the context
        that handled this one (a batch); by default the current context.
        """
        envelope = Envelope.new(
            event,
            source=source,
            correlation_id=self.correlation_id,
            causation_id=self.id,
            trace_context=trace_context,
        )
        origin = {H_ORIGIN_TIME: self.origin_time().isoformat()}
        return replace(envelope, extra_headers={**envelope.extra_headers, **origin})

    def origin_time(self) -> datetime:
        """When the first event of this causation chain happened (this one's time if unknown)."""
        text = _text(self.extra_headers.get(H_ORIGIN_TIME))
        try:
            origin = datetime.fromisoformat(text) if text else self.time
        except ValueError:
            origin = self.time
        return origin if origin.tzinfo else origin.replace(tzinfo=UTC)

    def headers(self) -> dict[str, Any]:
        """The AMQP headers of this envelope (CloudEvents attributes first)."""
        headers: dict[str, Any] = dict(self.extra_headers)
        headers.update(
            {
                H_SPECVERSION: SPEC_VERSION,
                H_ID: self.id,
                H_TYPE: self.type,
                H_SOURCE: self.source,
                H_TIME: self.time.isoformat(),
                H_SCHEMA_VERSION: self.schema_version,
                H_CORRELATION_ID: self.correlation_id,
            }
        )
        if self.causation_id:
            headers[H_CAUSATION_ID] = self.causation_id
        return headers

    def log_context(self) -> dict[str, str]:
        """Keys every log line about this message carries."""
        return {
            "event_id": self.id,
            "event_type": self.type,
            "correlation_id": self.correlation_id,
        }

    @classmethod
    def from_amqp(
        cls,
        *,
        body: bytes,
        message_id: str | None,
        headers: dict[str, Any] | None,
        correlation_id: str | None = None,
        message_type: str | None = None,
        timestamp: datetime | None = None,
    ) -> Envelope:
        """Read the envelope of a received message; ``EnvelopeError`` when incomplete."""
        headers = dict(headers or {})
        event_id = message_id or _text(headers.get(H_ID))
        if not event_id:
            raise EnvelopeError("message has no id (AMQP message_id / cloudEvents:id)")
        event_type = _text(headers.get(H_TYPE)) or message_type
        if not event_type:
            raise EnvelopeError("message has no type (cloudEvents:type)")
        schema_version = _text(headers.get(H_SCHEMA_VERSION)) or "1.0"
        time_text = _text(headers.get(H_TIME))
        try:
            time = datetime.fromisoformat(time_text) if time_text else None
        except ValueError as exc:
            raise EnvelopeError(f"malformed cloudEvents:time {time_text!r}") from exc
        time = time or timestamp or datetime.now(UTC)
        if time.tzinfo is None:
            time = time.replace(tzinfo=UTC)
        known = {H_SPECVERSION, H_ID, H_TYPE, H_SOURCE, H_TIME, H_SCHEMA_VERSION}
        known |= {H_CORRELATION_ID, H_CAUSATION_ID}
        return cls(
            id=event_id,
            type=event_type,
            source=_text(headers.get(H_SOURCE)) or "unknown",
            time=time,
            schema_version=schema_version,
            correlation_id=_text(headers.get(H_CORRELATION_ID)) or correlation_id or event_id,
            causation_id=_text(headers.get(H_CAUSATION_ID)) or None,
            body=body,
            extra_headers={k: v for k, v in headers.items() if k not in known},
        )


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
