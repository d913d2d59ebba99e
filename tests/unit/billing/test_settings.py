"""Billing configuration from the environment, with DOMAIN.md defaults."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.billing import __main__ as entrypoint
from services.billing.domain import ReferralConfig
from services.billing.settings import BillingSettings


def test_defaults_follow_the_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REFERRAL_ENABLED", "REFERRAL_EXPIRY_DAYS", "SIGNUP_GRANT_UNITS", "MONGO_DB"):
        monkeypatch.delenv(f"GRANTWIRE_{name}", raising=False)
    settings = BillingSettings()
    assert settings.referral_config() == ReferralConfig(
        enabled=False, referrer_units=0, referee_units=0, expiry_days=365
    )
    assert settings.signup_grant_units == {"free": 500}
    assert settings.signup_grant_expiry_days is None
    assert (settings.reconcile_jitter_s, settings.reconcile_lock_minutes) == (60.0, 10.0)
    assert settings.reconcile_batch_size == 500
    assert (settings.mongo_db, settings.http_port) == ("grantwire_billing", 8003)


def test_environment_configures_referrals_and_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRANTWIRE_REFERRAL_ENABLED", "true")
    monkeypatch.setenv("GRANTWIRE_REFERRAL_REFERRER_UNITS", "1000")
    monkeypatch.setenv("GRANTWIRE_REFERRAL_REFEREE_UNITS", "500")
    monkeypatch.setenv("GRANTWIRE_REFERRAL_EXPIRY_DAYS", "null")
    monkeypatch.setenv("GRANTWIRE_SIGNUP_GRANT_UNITS", '{"free": 500, "team": 2000}')
    settings = BillingSettings()
    assert settings.referral_config() == ReferralConfig(True, 1000, 500, None)
    assert settings.signup_grant_units == {"free": 500, "team": 2000}


def test_negative_units_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRANTWIRE_REFERRAL_REFEREE_UNITS", "-1")
    with pytest.raises(ValidationError):
        BillingSettings()
    monkeypatch.delenv("GRANTWIRE_REFERRAL_REFEREE_UNITS")
    monkeypatch.setenv("GRANTWIRE_SIGNUP_GRANT_UNITS", '{"free": -5}')
    with pytest.raises(ValidationError):
        BillingSettings()


def test_the_service_refuses_to_start_without_a_jwt_key_but_jobs_need_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GRANTWIRE_JWT_SECRET", raising=False)
    monkeypatch.delenv("GRANTWIRE_JWT_PUBLIC_KEY", raising=False)
    monkeypatch.setattr(entrypoint, "configure_logging", lambda *args, **kwargs: None)
    settings = BillingSettings()  # what the jobs build: valid without a key
    assert not settings.jwt_configured() and settings.admin_role == "admin"
    with pytest.raises(SystemExit, match="billing: set GRANTWIRE_JWT_SECRET"):
        entrypoint.main()
    monkeypatch.setenv("GRANTWIRE_JWT_PUBLIC_KEY", "-----BEGIN PUBLIC KEY-----...")
    assert BillingSettings().jwt_configured()
