"""Settings: a JWT key is required, the mailer choice, DOMAIN.md defaults."""

from __future__ import annotations

from datetime import timedelta

import jwt
import pytest
from pydantic import ValidationError

from services.invitations import __main__ as entrypoint
from services.invitations.mailer import LogMailer, SmtpMailer, build_mailer
from services.invitations.settings import InvitationsSettings
from shared.auth import AuthError, TokenVerifier


def test_defaults_follow_the_domain() -> None:
    settings = InvitationsSettings(jwt_secret="s")
    assert settings.invite_ttl() == timedelta(days=14)
    assert settings.claim_stale_after() == timedelta(minutes=15)
    assert settings.create_policy().lifetime_cap is None
    assert settings.mongo_db == "grantwire_invitations" and settings.http_port == 8002


def test_without_any_jwt_key_the_process_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRANTWIRE_JWT_SECRET", raising=False)
    monkeypatch.delenv("GRANTWIRE_JWT_PUBLIC_KEY", raising=False)
    monkeypatch.setattr(entrypoint, "configure_logging", lambda *args, **kwargs: None)
    assert not InvitationsSettings().jwt_configured()
    with pytest.raises(SystemExit, match="JWT"):
        entrypoint.main()


def test_without_any_jwt_key_every_token_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRANTWIRE_JWT_SECRET", raising=False)
    monkeypatch.delenv("GRANTWIRE_JWT_PUBLIC_KEY", raising=False)
    verifier = TokenVerifier.from_settings(InvitationsSettings())
    token = jwt.encode({"sub": "u", "email": "u@example.com", "exp": 2**40}, "x" * 32)
    with pytest.raises(AuthError):
        verifier.verify(token)


def test_log_mailer_by_default_smtp_when_a_host_is_given_none_on_request() -> None:
    assert isinstance(build_mailer(InvitationsSettings(jwt_secret="s")), LogMailer)
    smtp = InvitationsSettings(jwt_secret="s", smtp_host="mail.example.com")
    assert isinstance(build_mailer(smtp), SmtpMailer)
    assert build_mailer(InvitationsSettings(jwt_secret="s", mailer="none")) is None


def test_smtp_mailer_needs_a_host() -> None:
    with pytest.raises(ValidationError, match="SMTP_HOST"):
        InvitationsSettings(jwt_secret="s", mailer="smtp")


def test_optional_limits_can_be_switched_off_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GRANTWIRE_JWT_SECRET", "s")
    monkeypatch.setenv("GRANTWIRE_INVITE_RATE_LIMIT", "null")
    monkeypatch.setenv("GRANTWIRE_INVITE_LIFETIME_CAP", "0")
    settings = InvitationsSettings()
    assert settings.invite_rate_limit is None
    assert settings.invite_lifetime_cap == 0
