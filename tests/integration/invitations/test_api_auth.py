"""Authentication and authorization of the HTTP API (bearer JWT, HS256 and RS256)."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.integration.invitations.conftest import (
    ALICE,
    SECRET,
    Service,
    StartService,
    bearer,
)

pytestmark = pytest.mark.integration

PROTECTED = [
    ("POST", "/invitations"),
    ("GET", "/invitations"),
    ("DELETE", f"/invitations/{'0' * 24}"),
    ("POST", f"/invitations/{'0' * 24}/resend"),
]


def expired_token() -> dict[str, str]:
    claims = {"sub": "alice", "email": "alice@example.com", "exp": int(time.time()) - 120}
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


@pytest.mark.parametrize(
    ("headers", "case"),
    [
        ({}, "no token"),
        ({"Authorization": "Basic YWxpY2U6c2VjcmV0"}, "not a bearer"),
        ({"Authorization": "Bearer not-a-jwt"}, "garbage"),
        (bearer("alice", secret="some-other-secret-of-32-bytes-or-more"), "wrong secret"),
        (expired_token(), "expired"),
    ],
)
async def test_every_route_but_verify_answers_401_without_a_valid_token(
    service: Service, headers: dict[str, str], case: str
) -> None:
    for method, path in PROTECTED:
        response = await service.http.request(
            method, path, headers=headers, json={"email": "x@example.com"}
        )
        assert response.status_code == 401, (case, method, path)
        assert response.json()["error"] == "unauthorized"
        assert response.json()["message"]
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert await service.collection.count_documents({}) == 0


async def test_verify_needs_no_token(service: Service) -> None:
    created = await service.created("friend@example.com")
    response = await service.http.get(f"/invitations/verify/{created['token']}")
    assert response.status_code == 200 and response.json()["valid"] is True


async def test_role_decides_what_a_valid_caller_may_do(service: Service) -> None:
    created = await service.created("friend@example.com", ALICE)
    member_resend = await service.http.post(
        f"/invitations/{created['id']}/resend", headers=bearer("carol", roles=["member"])
    )
    assert member_resend.status_code == 403
    admin_resend = await service.http.post(
        f"/invitations/{created['id']}/resend", headers=bearer("root", roles=["admin"])
    )
    assert admin_resend.status_code == 200


async def test_rs256_tokens_verify_with_the_configured_public_key(
    start_service: StartService,
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    service = await start_service(jwt_secret=None, jwt_public_key=public_pem)
    claims = {"sub": "alice", "email": "alice@example.com", "exp": int(time.time()) + 60}
    good = {"Authorization": f"Bearer {jwt.encode(claims, key, algorithm='RS256')}"}
    response = await service.http.post(
        "/invitations", json={"email": "friend@example.com"}, headers=good
    )
    assert response.status_code == 201
    assert response.json()["invited_by"] == "alice"
    # An HS256 token is refused when only RS256 is configured.
    refused = await service.http.get("/invitations", headers=bearer("alice"))
    assert refused.status_code == 401
