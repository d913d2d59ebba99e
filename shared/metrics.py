"""Prometheus metrics shared by every service (labels carry the service name)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter(
    "grantwire_messages_total",
    "Messages consumed, by outcome (handled, retried, dead_lettered, requeued).",
    ["service", "queue", "event_type", "outcome"],
)
HANDLER_SECONDS = Histogram(
    "grantwire_handler_seconds",
    "Time from receiving a message to settling it.",
    ["service", "queue", "event_type"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
OUTBOX_PENDING = Gauge(
    "grantwire_outbox_pending", "Outbox documents not yet published.", ["service"]
)
OUTBOX_OLDEST_AGE = Gauge(
    "grantwire_outbox_oldest_pending_seconds",
    "Age of the oldest pending outbox document.",
    ["service"],
)
