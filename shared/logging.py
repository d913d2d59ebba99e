"""structlog set up once per process: JSON when not on a terminal, key-value on one.

A consumed message gets one log line, the consumer's ``message handled``. A handler adds
what it decided to that line with ``log_outcome`` (under ``handler``) instead of writing a
line of its own; called outside a message (an HTTP request, a job, a test), it logs a line.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import structlog

_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@")


def mask_url(url: str) -> str:
    """Hide the password of a connection URL: ``amqp://user:***@host``."""
    return _CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", url)


def _mask_values(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        if isinstance(value, str) and "://" in value:
            event_dict[key] = mask_url(value)
        elif isinstance(value, dict):
            _mask_values(_, __, value)
    return event_dict


# The handler fields of the message being handled in this context (see log_outcome).
_MESSAGE_OUTCOME: ContextVar[dict[str, Any] | None] = ContextVar(
    "grantwire_message_outcome", default=None
)


@contextmanager
def message_outcome() -> Iterator[dict[str, Any]]:
    """Collect what handlers report with ``log_outcome`` while a message is handled."""
    fields: dict[str, Any] = {}
    token = _MESSAGE_OUTCOME.set(fields)
    try:
        yield fields
    finally:
        _MESSAGE_OUTCOME.reset(token)


def log_outcome(
    logger: Any, event: str, *, context: dict[str, Any] | None = None, **fields: Any
) -> None:
    """Report a handler's outcome: on its message's one log line when there is one (as
    ``handler: {"event": ..., **fields}``; that line already names the message), otherwise
    as an INFO line of its own with ``context`` (the event's ids)."""
    collected = _MESSAGE_OUTCOME.get()
    if collected is None:
        logger.info(event, **(context or {}), **fields)
        return
    collected.update(event=event, **fields)


def configure_logging(service: str, level: str = "INFO", json: bool | None = None) -> None:
    """Configure structlog and stdlib logging; every line carries ``service``."""
    if json is None:
        json = not sys.stderr.isatty()
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=numeric, force=True)
    for noisy in ("aio_pika", "aiormq", "pymongo"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _mask_values,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)
