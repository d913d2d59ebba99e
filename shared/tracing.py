"""Distributed tracing: W3C trace context in message headers, OpenTelemetry spans.

The trace context (``traceparent``/``tracestate``) travels in AMQP headers. An envelope
takes the current context when it is created (``Envelope.new``/``caused``), the outbox
stores it with the event, the relay publishes each document in a PRODUCER span that is a
child of it, and the consumer runs the handler in a CONSUMER span that is a child of the
message's context. So one trace follows an identity event through every service.

The SDK is configured only by the standard ``OTEL_*`` environment variables
(``configure_tracing``); with none set nothing is exported and spans are not recorded,
yet a trace context that arrives in a message still travels on to the events it causes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

TRACER_NAME = "grantwire"
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")
MESSAGING_SYSTEM = "rabbitmq"
log = structlog.get_logger("grantwire.tracing")


class _HeaderGetter(Getter[Mapping[str, Any]]):
    """Reads AMQP headers, whose string values may arrive as bytes."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            return None
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return [str(value)]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier.keys())


_GETTER = _HeaderGetter()
# A proxy: it follows whatever tracer provider is installed later (a no-op one until then).
_TRACER = trace.get_tracer(TRACER_NAME)


def tracer() -> trace.Tracer:
    """The kit's tracer (a no-op one until a tracer provider is configured)."""
    return _TRACER


def context_from_headers(headers: Mapping[str, Any] | None) -> Context:
    """The trace context a message carries (empty when it carries none)."""
    return propagate.extract(headers or {}, getter=_GETTER)


def current_context() -> Context:
    """The current trace context, to carry into work that runs elsewhere (a batch)."""
    return otel_context.get_current()


@contextmanager
def attached(context: Context | None) -> Iterator[None]:
    """Run a block in ``context`` (a handler's, carried into a batch); as is when None."""
    if context is None:
        yield
        return
    token = otel_context.attach(context)
    try:
        yield
    finally:
        otel_context.detach(token)


def trace_headers(context: Context | None = None) -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) of ``context`` or the current one; {} when none."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier


def with_trace_headers(headers: Mapping[str, Any], span: Span) -> dict[str, Any]:
    """``headers`` with the trace context replaced by ``span``'s."""
    updated = {k: v for k, v in headers.items() if k not in TRACE_HEADERS}
    updated.update(trace_headers(trace.set_span_in_context(span)))
    return updated


def log_ids(span: Span | None = None) -> dict[str, str]:
    """``trace_id`` and ``span_id`` for log lines (nothing when there is no valid span)."""
    context = (span or trace.get_current_span()).get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


@contextmanager
def consuming(
    headers: Mapping[str, Any] | None,
    *,
    service: str,
    queue: str,
    event_type: str,
    message_id: str | None,
    correlation_id: str | None,
) -> Iterator[Span]:
    """A CONSUMER span around handling one message, child of the message's context.

    It is the current span meanwhile, so the events a handler causes carry it on.
    """
    attributes: dict[str, str] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.type": "process",
        "messaging.destination.name": queue,
        "messaging.message.id": message_id or "",
        "messaging.message.conversation_id": correlation_id or "",
        "cloudevents.event_type": event_type,
        "grantwire.service": service,
    }
    with tracer().start_as_current_span(
        f"process {event_type}",
        context=context_from_headers(headers),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


def settle(span: Span, outcome: str, error: BaseException | None = None) -> None:
    """Record a consumed message's outcome on its span."""
    span.set_attribute("grantwire.outcome", outcome)
    if error is not None:
        span.record_exception(error)
    if outcome != "handled":
        span.set_status(Status(StatusCode.ERROR, outcome))


def start_publish(
    headers: Mapping[str, Any],
    *,
    service: str,
    exchange: str,
    event_type: str,
    message_id: str,
    correlation_id: str,
) -> tuple[Span, dict[str, Any]]:
    """A PRODUCER span, child of the context in ``headers``, and the headers to send.

    The caller ends the span (``end_publish``) when the broker confirmed or refused.
    """
    span = tracer().start_span(
        f"publish {event_type}",
        context=context_from_headers(headers),
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.operation.type": "send",
            "messaging.destination.name": exchange,
            "messaging.rabbitmq.destination.routing_key": event_type,
            "messaging.message.id": message_id,
            "messaging.message.conversation_id": correlation_id,
            "cloudevents.event_type": event_type,
            "grantwire.service": service,
        },
    )
    return span, with_trace_headers(headers, span)


def end_publish(span: Span, error: BaseException | None) -> None:
    """End a PRODUCER span; an error marks it failed."""
    if error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    span.end()


# -- SDK configuration -------------------------------------------------------------------
def tracing_requested(environ: Mapping[str, str]) -> list[str]:
    """Span exporters the ``OTEL_*`` variables ask for ([] = tracing off).

    Unlike the SDK's own default (``otlp``), an unset ``OTEL_TRACES_EXPORTER`` means off
    unless an OTLP endpoint is given, so a process without configuration exports nothing.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n and n != "none"]
    if names:
        return names
    if "OTEL_TRACES_EXPORTER" in environ:  # explicitly "none"
        return []
    endpoints = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    return ["otlp"] if any(environ.get(name) for name in endpoints) else []


def configure_tracing(service: str, environ: Mapping[str, str] | None = None) -> bool:
    """Install the OpenTelemetry SDK when the ``OTEL_*`` variables ask for it.

    ``OTEL_TRACES_EXPORTER`` = ``otlp`` (HTTP/protobuf, endpoint and headers from
    ``OTEL_EXPORTER_OTLP_*``) and/or ``console`` (stderr); an ``OTEL_EXPORTER_OTLP_ENDPOINT``
    alone means ``otlp``. ``OTEL_SERVICE_NAME`` overrides ``service``; the sampler
    (``OTEL_TRACES_SAMPLER``) and batching (``OTEL_BSP_*``) follow the SDK's variables.
    Returns whether a tracer provider was installed.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    exporters = tracing_requested(env)
    if not exporters:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    attributes: dict[str, str] = {}
    if not env.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = service
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in exporters:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
                "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
            )
            if protocol != "http/protobuf":
                log.warning("only OTLP over http/protobuf is installed", protocol=protocol)
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            # stderr: a job's stdout is its JSON report
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
        else:
            log.warning("unknown OTEL_TRACES_EXPORTER ignored", exporter=name)
    trace.set_tracer_provider(provider)
    log.info("tracing on", exporters=exporters)
    return True
