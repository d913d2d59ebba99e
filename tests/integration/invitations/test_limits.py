"""Input limits of the invitations API: request body size (413) and page size (422)."""

from __future__ import annotations

import json

import pytest

from tests.integration.invitations.conftest import ALICE, Service, StartService

pytestmark = pytest.mark.integration


async def test_a_body_over_64_kib_is_refused_with_413_and_nothing_is_stored(
    service: Service,
) -> None:
    padding = "x" * (64 * 1024)
    body = json.dumps({"email": "friend@example.com", "padding": padding}).encode()
    response = await service.http.post(
        "/invitations", content=body, headers={**ALICE, "Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert await service.collection.count_documents({}) == 0
    # The limit comes before authentication: no token, same answer, no work done.
    anonymous = await service.http.post(
        "/invitations", content=body, headers={"Content-Type": "application/json"}
    )
    assert anonymous.status_code == 413


async def test_the_limit_is_configurable_and_bodies_below_it_work(
    start_service: StartService,
) -> None:
    service = await start_service(max_http_body_bytes=256)
    assert (await service.invite("friend@example.com")).status_code == 201
    big = {"email": "other@example.com", "padding": "x" * 300}
    response = await service.http.post("/invitations", json=big, headers=ALICE)
    assert response.status_code == 413
    assert response.json()["message"] == "request body larger than 256 bytes"


async def test_list_page_size_is_bounded(service: Service) -> None:
    for limit, status in ((200, 200), (201, 422), (0, 422)):
        response = await service.http.get("/invitations", params={"limit": limit}, headers=ALICE)
        assert response.status_code == status, limit
    too_many = await service.http.get("/invitations", params={"limit": 10_000}, headers=ALICE)
    assert too_many.json()["error"] == "invalid_request"
