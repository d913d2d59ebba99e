"""`grantwire token`: tokens for exploring a local system's APIs."""

from __future__ import annotations

import jwt
from typer.testing import CliRunner

from grantwire.cli import app


def test_token_is_signed_with_the_configured_key_and_carries_the_roles() -> None:
    result = CliRunner().invoke(
        app, ["token", "--role", "admin", "--sub", "ops-1"], env={"GRANTWIRE_JWT_SECRET": "k" * 32}
    )
    assert result.exit_code == 0, result.output
    claims = jwt.decode(result.output.strip(), "k" * 32, algorithms=["HS256"])
    assert claims["sub"] == "ops-1" and claims["roles"] == ["admin"] and claims["exp"] > 0
