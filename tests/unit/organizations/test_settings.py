"""Organizations settings from the environment: defaults and the extra public domains."""

from __future__ import annotations

import pytest

from services.organizations.settings import OrganizationsSettings


def test_defaults_follow_the_domain_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EMAIL_VERIFICATION", "DOMAIN_MATCHING", "EXTRA_PUBLIC_DOMAINS"):
        monkeypatch.delenv(f"GRANTWIRE_ORGANIZATIONS_{name}", raising=False)
    settings = OrganizationsSettings()
    assert settings.mongo_db == "grantwire_organizations"
    assert settings.http_port == 8001
    policy = settings.policy()
    assert policy.requires_verified_email
    assert policy.domain_matching
    assert policy.extra_public_domains == frozenset()


@pytest.mark.parametrize(
    "raw", ["mailbox.example,Corp-Mail.example", '["mailbox.example", "corp-mail.example"]']
)
def test_extra_public_domains_read_as_comma_separated_or_json(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("GRANTWIRE_ORGANIZATIONS_EXTRA_PUBLIC_DOMAINS", raw)
    policy = OrganizationsSettings().policy()
    assert policy.extra_public_domains == {"mailbox.example", "corp-mail.example"}
    assert policy.is_public("corp-mail.example") and policy.is_public("gmail.com")


def test_switches_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRANTWIRE_ORGANIZATIONS_EMAIL_VERIFICATION", "off")
    monkeypatch.setenv("GRANTWIRE_ORGANIZATIONS_DOMAIN_MATCHING", "false")
    policy = OrganizationsSettings().policy()
    assert not policy.requires_verified_email
    assert not policy.domain_matching


def test_user_events_are_batched_by_default_with_a_prefetch_to_gather_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("PROVISION_BATCH_MAX", "PROVISION_BATCH_CONCURRENCY", "PREFETCH"):
        monkeypatch.delenv(f"GRANTWIRE_{name}", raising=False)
    settings = OrganizationsSettings()
    assert (settings.provision_batch_max, settings.provision_batch_concurrency) == (64, 4)
    assert settings.prefetch == 256

    monkeypatch.setenv("GRANTWIRE_PROVISION_BATCH_MAX", "1")
    monkeypatch.setenv("GRANTWIRE_PREFETCH", "32")
    settings = OrganizationsSettings()
    assert (settings.provision_batch_max, settings.prefetch) == (1, 32)
