"""Input limits at the HTTP edge: a request body larger than the limit is refused with 413.

``BodySizeLimit`` is a pure ASGI middleware: a declared ``Content-Length`` above the limit
is refused before the application runs or a byte of the body is read; a body without one
(chunked) is counted while the application reads it and refused as soon as it passes the
limit (whatever the application would have answered is dropped). The answer is the usual
``{"error": "payload_too_large", "message": ...}`` with status 413.

Configure with ``HttpLimitsSettings`` (mixin, ``GRANTWIRE_MAX_HTTP_BODY_BYTES``, default
64 KiB) and ``app.add_middleware(BodySizeLimit, max_bytes=settings.max_http_body_bytes)``.
"""

from __future__ import annotations

import json

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_MAX_HTTP_BODY_BYTES = 64 * 1024


class HttpLimitsSettings(BaseSettings):
    """``GRANTWIRE_MAX_HTTP_BODY_BYTES``: the largest request body an HTTP API accepts."""

    model_config = SettingsConfigDict(env_prefix="GRANTWIRE_", extra="ignore")

    max_http_body_bytes: int = Field(default=DEFAULT_MAX_HTTP_BODY_BYTES, ge=1)


class _BodyTooLargeError(Exception):
    """Raised into the application when the body it reads passes the limit."""


class BodySizeLimit:
    """Refuse request bodies larger than ``max_bytes`` with 413 (JSON error)."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_HTTP_BODY_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send)
            return

        received = 0
        refused = False  # our 413 went out: the application's own answer is dropped
        started = False  # the application began its response

        async def limited_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not started and not refused:
                        refused = True
                        await self._refuse(send)
                    raise _BodyTooLargeError
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLargeError:
            if not refused:  # the response had started: nothing clean left to say
                raise

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {
                "error": "payload_too_large",
                "message": f"request body larger than {self.max_bytes} bytes",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length itself
    return None
