"""Fixtures for observability tests: an in-memory span exporter, HTTP sinks, metric reads."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.observability.sinks import HttpSink


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans finished during the test, as this process's tracer provider records them.

    The global provider can be set once per process: the first test installs an SDK
    provider; each test adds its own exporter and shuts it down after (it then drops).
    """
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(resource=Resource.create({"service.name": "grantwire-tests"}))
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


@pytest.fixture
def sink() -> Iterator[HttpSink]:
    """An HTTP receiver (Pushgateway or OTLP stand-in) on a free local port."""
    server = HttpSink().start()
    yield server
    server.stop()


def sample(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples named ``name`` in a Prometheus exposition whose labels match."""
    found = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(found) if found else None


def span_named(finished: tuple[ReadableSpan, ...], name: str, **attributes: str) -> ReadableSpan:
    """The one finished span called ``name`` with these attributes."""
    matching = [
        s
        for s in finished
        if s.name == name and all((s.attributes or {}).get(k) == v for k, v in attributes.items())
    ]
    assert len(matching) == 1, f"{len(matching)} spans {name!r} {attributes}: {matching}"
    return matching[0]
