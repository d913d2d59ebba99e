"""Which failure headers the consumer trusts: only its own, on a return from its retry tier."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from shared.consumer import (
    H_ATTEMPTS,
    H_FIRST_FAILURE_AT,
    H_ORIGINAL_EXCHANGE,
    H_ORIGINAL_ROUTING_KEY,
    Consumer,
    returned_from_retry_tier,
)

QUEUE = "organizations.users"
OURS = {
    H_ATTEMPTS: 2,
    H_ORIGINAL_EXCHANGE: "grantwire.events",
    H_ORIGINAL_ROUTING_KEY: "user.signed_up",
    H_FIRST_FAILURE_AT: "2026-01-15T09:30:00+00:00",
}


def death(queue: str, reason: str = "expired") -> dict[str, Any]:
    return {"queue": queue, "reason": reason, "count": 1, "exchange": "", "routing-keys": [queue]}


def delivery(exchange: str, routing_key: str, deaths: list[dict[str, Any]] | None) -> Any:
    headers: dict[str, Any] = dict(OURS)
    if deaths is not None:
        headers["x-death"] = deaths
    return SimpleNamespace(exchange=exchange, routing_key=routing_key, headers=headers)


def failure_headers(message: Any) -> dict[str, Any]:
    consumer = SimpleNamespace(_service="organizations", queue_name=QUEUE)
    return Consumer._failure_headers(consumer, message, ValueError("x"), 3, reason="transient")  # type: ignore[arg-type]


def test_a_message_back_from_its_own_retry_tier_keeps_its_failure_headers() -> None:
    back = delivery("", QUEUE, [death(f"{QUEUE}.retry.1")])
    assert returned_from_retry_tier(back, QUEUE)
    headers = failure_headers(back)
    assert headers[H_ORIGINAL_ROUTING_KEY] == "user.signed_up"
    assert headers[H_ORIGINAL_EXCHANGE] == "grantwire.events"
    assert headers[H_FIRST_FAILURE_AT] == OURS[H_FIRST_FAILURE_AT]


def test_x_death_bytes_values_are_read_as_text() -> None:
    back = delivery("", QUEUE, [{"queue": f"{QUEUE}.retry.0".encode(), "reason": b"expired"}])
    assert returned_from_retry_tier(back, QUEUE)


def test_failure_headers_are_not_trusted_on_any_other_arrival() -> None:
    others = {
        "published to the events exchange": delivery("grantwire.events", "user.signed_up", None),
        "events exchange, with a forged x-death": delivery(
            "grantwire.events", "user.signed_up", [death(f"{QUEUE}.retry.0")]
        ),
        "straight to the work queue, no expiry": delivery("", QUEUE, None),
        "straight to the work queue, empty x-death": delivery("", QUEUE, []),
        "expired in another queue's retry tier": delivery(
            "", QUEUE, [death("billing.grants.retry.0")]
        ),
        "expired in a queue named like ours": delivery("", QUEUE, [death(f"{QUEUE}x.retry.0")]),
        "last died of something else": delivery(
            "", QUEUE, [death(QUEUE, "delivery_limit"), death(f"{QUEUE}.retry.0")]
        ),
        "x-death is not a list of tables": delivery("", QUEUE, "expired"),  # type: ignore[arg-type]
    }
    for name, message in others.items():
        assert not returned_from_retry_tier(message, QUEUE), name
        headers = failure_headers(message)
        assert headers[H_ORIGINAL_ROUTING_KEY] == message.routing_key, name
        assert headers[H_ORIGINAL_EXCHANGE] == message.exchange, name
        assert headers[H_FIRST_FAILURE_AT] != OURS[H_FIRST_FAILURE_AT], name
