"""Billing configuration, from environment variables only (prefix ``GRANTWIRE_``).

Each field below is one variable: ``referral_enabled`` is ``GRANTWIRE_REFERRAL_ENABLED``.
Dicts are JSON (``GRANTWIRE_SIGNUP_GRANT_UNITS='{"free": 500, "team": 2000}'``); a days
value of ``null`` (or <= 0) means never.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from services.billing.domain import ReferralConfig
from shared.auth import JwtSettings
from shared.settings import ServiceSettings


class BillingSettings(ServiceSettings, JwtSettings):
    """Settings of the billing service and its jobs; ``JwtSettings`` for the read API (the
    service refuses to start without a JWT key; the jobs need none)."""

    mongo_db: str = "grantwire_billing"
    http_port: int = 8003

    referral_enabled: bool = Field(
        default=False,
        description="the referral switch; off: accepted referrals are recorded, not credited "
        "(turning it on later credits them: see README.md, 'first enable')",
    )
    referral_referrer_units: int = Field(
        default=0, ge=0, description="units for the inviter's organization; 0: `zero_units`"
    )
    referral_referee_units: int = Field(
        default=0, ge=0, description="units for the new user's organization; 0: `zero_units`"
    )
    referral_expiry_days: int | None = Field(
        default=365, description="referral credits expire after this; null or <= 0: never"
    )
    signup_grant_units: dict[str, int] = Field(
        default_factory=lambda: {"free": 500},
        description="signup grant per plan of `organization.created`; not gated by the switch",
    )
    signup_grant_expiry_days: int | None = Field(
        default=None, description="signup grants expire after this; null or <= 0: never"
    )
    reconcile_jitter_s: float = Field(
        default=60.0, ge=0, description="reconcile first waits a random 0..N seconds"
    )
    reconcile_lock_minutes: float = Field(
        default=10.0, gt=0, description="reconcile lease; a second runner exits 0 while held"
    )
    reconcile_batch_size: int = Field(
        default=500, ge=1, description="referrals (or topups) per batch of a job's walk"
    )
    grant_batch_max: int = Field(
        default=128,
        ge=1,
        le=1000,
        description="most listener events granted in one transaction (those that arrive "
        "together; 1 at low load); the prefetch bounds it too",
    )
    grant_batch_concurrency: int = Field(
        default=4,
        ge=1,
        le=64,
        description="listener batches in flight at once (each its own transaction)",
    )
    prefetch: int = Field(
        default=256,
        ge=1,
        description="unacked messages on billing's queue: the events one batch can gather",
    )
    job_concurrency: int = Field(
        default=16, ge=1, description="grants in flight at once inside a job batch"
    )

    @field_validator("referral_expiry_days", "signup_grant_expiry_days", mode="before")
    @classmethod
    def _null_means_never(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("", "null", "none"):
            return None
        return value

    @field_validator("signup_grant_units")
    @classmethod
    def _units_not_negative(cls, value: dict[str, int]) -> dict[str, int]:
        negative = {plan: units for plan, units in value.items() if units < 0}
        if negative:
            raise ValueError(f"signup grant units must be >= 0: {negative}")
        return value

    def referral_config(self) -> ReferralConfig:
        return ReferralConfig(
            enabled=self.referral_enabled,
            referrer_units=self.referral_referrer_units,
            referee_units=self.referral_referee_units,
            expiry_days=self.referral_expiry_days,
        )
