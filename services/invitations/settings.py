"""Configuration of the invitations service (environment variables, prefix ``GRANTWIRE_``)."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from services.invitations.domain import CreatePolicy
from shared.auth import JwtSettings
from shared.limits import HttpLimitsSettings
from shared.settings import ServiceSettings

MailerKind = Literal["none", "log", "smtp"]


class InvitationsSettings(ServiceSettings, JwtSettings, HttpLimitsSettings):
    """Invitations: JWT verification (``JwtSettings``), the request body limit
    (``HttpLimitsSettings``), invite lifetime and limits, the mailer."""

    # ``GRANTWIRE_INVITE_RATE_LIMIT=null`` turns an optional limit off from the environment.
    model_config = SettingsConfigDict(env_parse_none_str="null")

    mongo_db: str = "grantwire_invitations"
    http_port: int = 8002

    invite_ttl_days: float = Field(default=14, gt=0)
    invite_lifetime_cap: int | None = Field(default=None, ge=0)  # None = off, 0 = nobody
    invite_rate_limit: int | None = Field(default=20, ge=1)  # None = off
    invite_rate_window_s: float = Field(default=3600, gt=0)
    claim_stale_after_s: float = Field(default=900, gt=0)
    invite_url_template: str = "http://localhost:3000/signup?invite_token={token}"

    # Mailer: "none" (resend answers 422), "log" (logs the link), "smtp".
    # Unset: "smtp" when smtp_host is given, else "log".
    mailer: MailerKind | None = None
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_from: str = "Grantwire <no-reply@grantwire.local>"
    smtp_starttls: bool = True
    smtp_timeout_s: float = 10.0

    @model_validator(mode="after")
    def _consistent(self) -> InvitationsSettings:
        if self.mailer_kind() == "smtp" and not self.smtp_host:
            raise ValueError("GRANTWIRE_MAILER=smtp needs GRANTWIRE_SMTP_HOST")
        if "{token}" not in self.invite_url_template:
            raise ValueError("GRANTWIRE_INVITE_URL_TEMPLATE must contain {token}")
        return self

    def mailer_kind(self) -> MailerKind:
        if self.mailer is not None:
            return self.mailer
        return "smtp" if self.smtp_host else "log"

    def create_policy(self) -> CreatePolicy:
        return CreatePolicy(
            lifetime_cap=self.invite_lifetime_cap,
            rate_limit=self.invite_rate_limit,
            rate_window=timedelta(seconds=self.invite_rate_window_s),
        )

    def invite_ttl(self) -> timedelta:
        return timedelta(days=self.invite_ttl_days)

    def claim_stale_after(self) -> timedelta:
        return timedelta(seconds=self.claim_stale_after_s)
