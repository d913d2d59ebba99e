"""Bearer JWT verification (shared.auth): HS256 and RS256, required claims, refused algorithms."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from shared.auth import AuthError, JwtSettings, Principal, TokenVerifier, require_jwt_key

SECRET = "unit-test-secret-of-at-least-32-bytes!"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC_PEM = (
    RSA_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "u1",
        "email": "u1@example.com",
        "roles": ["admin"],
        "exp": int(time.time()) + 300,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def verifier(**settings: Any) -> TokenVerifier:
    values: dict[str, Any] = {"jwt_secret": SECRET, "jwt_leeway_s": 0}
    values.update(settings)
    return TokenVerifier.from_settings(JwtSettings(**values))


def test_hs256_token_gives_the_caller() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert verifier().verify(token) == Principal("u1", "u1@example.com", frozenset({"admin"}))


def test_rs256_token_verifies_with_the_public_key_from_one_env_line() -> None:
    one_line = PUBLIC_PEM.replace("\n", "\\n")
    token = jwt.encode(claims(roles=None), RSA_KEY, algorithm="RS256")
    principal = verifier(jwt_secret=None, jwt_public_key=one_line).verify(token)
    assert principal.user_id == "u1" and principal.roles == frozenset()


@pytest.mark.parametrize(
    ("token", "why"),
    [
        (jwt.encode(claims(), "another-secret-of-at-least-32-bytes", algorithm="HS256"), "secret"),
        (jwt.encode(claims(exp=int(time.time()) - 5), SECRET, algorithm="HS256"), "expired"),
        (jwt.encode(claims(exp=None), SECRET, algorithm="HS256"), "no exp"),
        (jwt.encode(claims(sub=None), SECRET, algorithm="HS256"), "no sub"),
        (jwt.encode(claims(email=None), SECRET, algorithm="HS256"), "no email"),
        (jwt.encode(claims(roles="admin"), SECRET, algorithm="HS256"), "roles not a list"),
        (jwt.encode(claims(), None, algorithm="none"), "alg none"),
        (jwt.encode(claims(), RSA_KEY, algorithm="RS256"), "RS256 without a public key"),
        (jwt.encode(claims(), SECRET * 2, algorithm="HS512"), "HS512"),
        ("not.a.jwt", "garbage"),
    ],
)
def test_bad_tokens_are_refused(token: str, why: str) -> None:
    with pytest.raises(AuthError):
        verifier().verify(token)


def test_hs256_token_signed_with_the_public_key_is_refused() -> None:
    # Algorithm confusion: the public key must never be used as an HMAC secret.
    forged = jwt.encode(claims(), SECRET, algorithm="HS256")
    with pytest.raises(AuthError):
        verifier(jwt_secret=None, jwt_public_key=PUBLIC_PEM).verify(forged)


def test_audience_and_issuer_are_checked_when_configured() -> None:
    strict = verifier(jwt_audience="grantwire", jwt_issuer="https://id.example.com")
    good = jwt.encode(
        claims(aud="grantwire", iss="https://id.example.com"), SECRET, algorithm="HS256"
    )
    assert strict.verify(good).user_id == "u1"
    for bad in (claims(aud="other", iss="https://id.example.com"), claims(aud="grantwire")):
        with pytest.raises(AuthError):
            strict.verify(jwt.encode(bad, SECRET, algorithm="HS256"))


def test_without_a_key_every_token_is_refused_and_a_service_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GRANTWIRE_JWT_SECRET", raising=False)
    monkeypatch.delenv("GRANTWIRE_JWT_PUBLIC_KEY", raising=False)
    settings = JwtSettings()
    assert not settings.jwt_configured()
    with pytest.raises(AuthError):
        TokenVerifier.from_settings(settings).verify(
            jwt.encode(claims(), SECRET, algorithm="HS256")
        )
    with pytest.raises(SystemExit, match="billing: set GRANTWIRE_JWT_SECRET"):
        require_jwt_key("billing", settings)
    require_jwt_key("billing", JwtSettings(jwt_secret=SECRET))  # configured: no exit


def test_settings_come_from_the_grantwire_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRANTWIRE_JWT_SECRET", SECRET)
    monkeypatch.setenv("GRANTWIRE_JWT_AUDIENCE", "grantwire")
    monkeypatch.setenv("GRANTWIRE_ADMIN_ROLE", "operator")
    settings = JwtSettings()
    assert settings.jwt_configured() and settings.jwt_audience == "grantwire"
    assert settings.admin_role == "operator"
    assert Principal("u", "u@example.com", frozenset({"operator"})).has_role(settings.admin_role)
