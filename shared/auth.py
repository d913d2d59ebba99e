"""Bearer JWT authentication every HTTP API of Grantwire shares.

Tokens come from the identity provider: HS256 with a shared secret and/or RS256 with a
public key. Claims: ``sub`` = user id, ``email``, ``roles`` (a list of strings, optional),
``exp`` (required); ``aud`` / ``iss`` when configured. The algorithm is taken from the
token's header only to pick among the configured keys; a token signed with anything else
is refused. No key configured: every token is refused (fail closed), and a service with
an authenticated API refuses to start (``require_jwt_key``).

A route asks for the caller with ``Depends(bearer_principal(verifier))``: 401 with
``WWW-Authenticate: Bearer`` and ``{"error": "unauthorized", ...}`` without a valid
token. What the caller may then do (403) is the service's own decision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.http import ApiError

CHALLENGE = {"WWW-Authenticate": "Bearer"}


class JwtSettings(BaseSettings):
    """The JWT settings of a service with an authenticated API (mixin; ``GRANTWIRE_`` prefix).

    ``class MySettings(ServiceSettings, JwtSettings)``: ``GRANTWIRE_JWT_SECRET`` (HS256),
    ``GRANTWIRE_JWT_PUBLIC_KEY`` (RS256, PEM; literal ``\\n`` sequences allowed in one env
    line), ``GRANTWIRE_JWT_AUDIENCE``, ``GRANTWIRE_JWT_ISSUER``, ``GRANTWIRE_JWT_LEEWAY_S``,
    ``GRANTWIRE_ADMIN_ROLE``.
    """

    model_config = SettingsConfigDict(env_prefix="GRANTWIRE_", extra="ignore")

    jwt_secret: SecretStr | None = None
    jwt_public_key: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: float = 30.0
    admin_role: str = "admin"

    def jwt_configured(self) -> bool:
        """True when a token can be verified at all (the process refuses to start otherwise)."""
        return self.jwt_secret is not None or bool(self.jwt_public_key)


def require_jwt_key(service: str, settings: JwtSettings) -> None:
    """Exit at process start when no key is configured: an API nobody can call is a
    deployment error, said once at start rather than as a 401 on every request."""
    if not settings.jwt_configured():
        raise SystemExit(
            f"{service}: set GRANTWIRE_JWT_SECRET (HS256) or GRANTWIRE_JWT_PUBLIC_KEY (RS256)"
        )


class AuthError(Exception):
    """The request carries no usable credentials (HTTP 401)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling, from a verified token."""

    user_id: str
    email: str
    roles: frozenset[str]

    def has_role(self, role: str) -> bool:
        return role in self.roles


class TokenVerifier:
    """Verifies bearer tokens against the keys the settings configure."""

    def __init__(
        self,
        keys: dict[str, Any],
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway_s: float = 30.0,
    ) -> None:
        self._keys = keys  # empty: every token is refused (fail closed)
        self._audience = audience
        self._issuer = issuer
        self._leeway_s = leeway_s

    @classmethod
    def from_settings(cls, settings: JwtSettings) -> TokenVerifier:
        keys: dict[str, Any] = {}
        if settings.jwt_secret is not None:
            keys["HS256"] = settings.jwt_secret.get_secret_value()
        if settings.jwt_public_key:
            # A PEM in one environment line may carry literal "\n" sequences.
            pem = settings.jwt_public_key.replace("\\n", "\n").encode()
            keys["RS256"] = load_pem_public_key(pem)
        return cls(
            keys,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway_s=settings.jwt_leeway_s,
        )

    def verify(self, token: str) -> Principal:
        """The caller of a valid token; ``AuthError`` with the reason otherwise."""
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError as exc:
            raise AuthError(f"malformed token: {exc}") from exc
        if not isinstance(algorithm, str) or algorithm not in self._keys:
            raise AuthError(f"token algorithm {algorithm!r} is not accepted")
        key = self._keys[algorithm]
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway_s,
                options={"require": ["sub", "exp"], "verify_aud": self._audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from exc
        return _principal(claims)


def _principal(claims: dict[str, Any]) -> Principal:
    user_id, email, roles = claims.get("sub"), claims.get("email"), claims.get("roles", [])
    if not isinstance(user_id, str) or not user_id:
        raise AuthError("claim 'sub' must be a non-empty string")
    if not isinstance(email, str) or not email.strip():
        raise AuthError("claim 'email' must be a non-empty string")
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        raise AuthError("claim 'roles' must be a list of strings")
    return Principal(user_id=user_id, email=email, roles=frozenset(roles))


_bearer = HTTPBearer(auto_error=False)


def bearer_principal(verifier: TokenVerifier) -> Callable[..., Principal]:
    """A FastAPI dependency: the verified caller, or 401 with ``WWW-Authenticate: Bearer``."""

    def principal(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        if credentials is None:
            raise ApiError(401, "unauthorized", "a bearer token is required", CHALLENGE)
        try:
            return verifier.verify(credentials.credentials)
        except AuthError as exc:
            raise ApiError(401, "unauthorized", str(exc), CHALLENGE) from exc

    return principal
