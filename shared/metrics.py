"""Prometheus metrics shared by every service (labels carry the service name).

Counters and histograms move as messages flow; the gauges (outbox, dead letters stored,
readiness, consumers) are refreshed on every ``/metrics`` scrape and ``/readyz`` call.
A service's own metrics (billing's grants and jobs) live in that service.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_LAG = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

# -- consumers -------------------------------------------------------------------------
MESSAGES = Counter(
    "grantwire_messages_total",
    "Messages consumed, by outcome (handled, retried, dead_lettered, requeued).",
    ["service", "queue", "event_type", "outcome"],
)
HANDLER_SECONDS = Histogram(
    "grantwire_handler_seconds",
    "Time from receiving a message to settling it.",
    ["service", "queue", "event_type"],
    buckets=_FAST,
)
MESSAGE_AGE = Histogram(
    "grantwire_message_age_seconds",
    "Age of a message when its consumer receives it (now minus its CloudEvents time).",
    ["service", "queue", "event_type"],
    buckets=_LAG,
)
IN_FLIGHT = Gauge(
    "grantwire_messages_in_flight",
    "Messages delivered to a consumer and not settled yet (handler running or waiting for "
    "its batch); stuck above 0 with no progress means handlers are blocked.",
    ["service", "queue"],
)
CONSUMER_UP = Gauge(
    "grantwire_consumer_up",
    "1 while the consumer of a work queue is consuming on an open channel.",
    ["service", "queue"],
)

# -- outbox and relay ------------------------------------------------------------------
OUTBOX_PENDING = Gauge(
    "grantwire_outbox_pending", "Outbox documents not yet published.", ["service"]
)
OUTBOX_OLDEST_AGE = Gauge(
    "grantwire_outbox_oldest_pending_seconds",
    "Age of the oldest pending outbox document.",
    ["service"],
)
OUTBOX_PUBLISHED = Counter(
    "grantwire_outbox_published_total",
    "Outbox documents the relay published (broker confirmed) and marked sent.",
    ["service", "event_type"],
)
OUTBOX_PUBLISH_FAILURES = Counter(
    "grantwire_outbox_publish_failures_total",
    "Outbox documents the broker did not take (error: UnroutableError, PublishRejectedError, ...).",
    ["service", "event_type", "error"],
)
OUTBOX_DELAY = Histogram(
    "grantwire_outbox_delay_seconds",
    "Time from staging an event (its transaction) to its confirmed publish.",
    ["service", "event_type"],
    buckets=_LAG,
)
RELAY_PUBLISH_SECONDS = Histogram(
    "grantwire_relay_publish_seconds",
    "Time for the relay to publish one batch and receive every confirm.",
    ["service"],
    buckets=_FAST,
)

# -- dead letters and health -----------------------------------------------------------
DEAD_LETTERS_ARCHIVED = Counter(
    "grantwire_dead_letters_archived_total",
    "Dead letters moved from a dead-letter queue into the service's dead_letters collection.",
    ["service", "queue", "event_type", "reason"],
)
DEAD_LETTERS_STORED = Gauge(
    "grantwire_dead_letters_stored",
    "Archived dead letters by status (dead = waiting for an operator to replay or purge).",
    ["service", "status"],
)
READY = Gauge("grantwire_ready", "1 when /readyz passes, 0 when it fails.", ["service"])
