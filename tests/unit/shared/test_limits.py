"""BodySizeLimit: 413 above the limit, by declared length or while a chunked body streams."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI, Request

from shared.limits import DEFAULT_MAX_HTTP_BODY_BYTES, BodySizeLimit, HttpLimitsSettings

LIMIT = 1000


def app_with_limit(seen: list[int]) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        body = await request.body()
        seen.append(len(body))
        return {"received": len(body)}

    app.add_middleware(BodySizeLimit, max_bytes=LIMIT)
    return app


async def chunks(total: int, size: int = 100) -> AsyncIterator[bytes]:
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


@pytest.fixture
def seen() -> list[int]:
    return []


@pytest.fixture
async def http(seen: list[int]) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app_with_limit(seen))
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        yield client


async def test_a_body_up_to_the_limit_reaches_the_application(
    http: httpx.AsyncClient, seen: list[int]
) -> None:
    assert (await http.post("/echo", content=b"x" * LIMIT)).json() == {"received": LIMIT}
    assert (await http.post("/echo", content=chunks(LIMIT))).json() == {"received": LIMIT}
    assert seen == [LIMIT, LIMIT]


async def test_a_declared_length_above_the_limit_is_refused_before_the_application_runs(
    http: httpx.AsyncClient, seen: list[int]
) -> None:
    response = await http.post("/echo", content=b"x" * (LIMIT + 1))
    assert response.status_code == 413
    assert response.json() == {
        "error": "payload_too_large",
        "message": f"request body larger than {LIMIT} bytes",
    }
    assert seen == []


async def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(
    http: httpx.AsyncClient, seen: list[int]
) -> None:
    response = await http.post("/echo", content=chunks(LIMIT * 5))
    assert "content-length" not in response.request.headers  # really chunked
    assert response.status_code == 413 and response.json()["error"] == "payload_too_large"
    assert seen == []  # the application never got the body


def test_the_limit_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert HttpLimitsSettings().max_http_body_bytes == DEFAULT_MAX_HTTP_BODY_BYTES == 65536
    monkeypatch.setenv("GRANTWIRE_MAX_HTTP_BODY_BYTES", "2048")
    assert HttpLimitsSettings().max_http_body_bytes == 2048
    with pytest.raises(ValueError, match="max_bytes"):
        BodySizeLimit(FastAPI(), max_bytes=0)
