"""Bearer JWT verification: HS256 with a shared secret and/or RS256 with a public key.

Claims: ``sub`` = user id, ``email``, ``roles`` (a list of strings, optional), ``exp``
(required). The algorithm is taken from the token's header only to pick among the
configured keys; a token signed with anything else is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from services.invitations.settings import InvitationsSettings


class AuthError(Exception):
    """The request carries no usable credentials (HTTP 401)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling, from a verified token."""

    user_id: str
    email: str
    roles: frozenset[str]


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
    def from_settings(cls, settings: InvitationsSettings) -> TokenVerifier:
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
