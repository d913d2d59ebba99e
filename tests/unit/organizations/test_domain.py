"""The organizations rules as pure functions: gate, domains, naming, slugs."""

from __future__ import annotations

import pytest

from services.organizations.domain import (
    PUBLIC_EMAIL_DOMAINS,
    ProvisioningPolicy,
    SlugsExhaustedError,
    User,
    WorkspacePlan,
    email_domain,
    first_free_slug,
    may_provision,
    parse_domain_list,
    plan_workspace,
    slug_candidates,
    slugify,
)

STRICT = ProvisioningPolicy()


def user(*, verified: bool) -> User:
    return User(user_id="u1", email="ada@acme.com", first_name="Ada", email_verified=verified)


# -- email-verification gate ---------------------------------------------------------------
def test_strict_is_the_default_and_blocks_an_unverified_user() -> None:
    assert ProvisioningPolicy().email_verification == "strict"
    assert not may_provision(STRICT, user(verified=False))
    assert may_provision(STRICT, user(verified=True))


def test_only_the_exact_value_off_opens_the_gate_for_an_unverified_user() -> None:
    assert may_provision(ProvisioningPolicy(email_verification="off"), user(verified=False))


@pytest.mark.parametrize("mode", ["OFF", "Off", " off", "off ", "disabled", "false", "", "none"])
def test_any_other_verification_mode_fails_closed(mode: str) -> None:
    assert not may_provision(ProvisioningPolicy(email_verification=mode), user(verified=False))


# -- domain normalization ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("email", "domain"),
    [
        ("ada@acme.com", "acme.com"),
        ("  Ada@ACME.Com ", "acme.com"),
        ("ada@eu.acme.com", "eu.acme.com"),
        ("ada@acme.com.", "acme.com"),
        ("ada+tag@my-company.co.uk", "my-company.co.uk"),
    ],
)
def test_domain_is_the_lowercased_part_after_the_at_sign(email: str, domain: str) -> None:
    assert email_domain(email) == domain


@pytest.mark.parametrize(
    "email",
    [
        "no-at-sign",
        "@acme.com",
        "ada@",
        "ada@b@acme.com",
        "ada@localhost",
        "ada@-acme.com",
        "ada@acme-.com",
        "ada@acme..com",
        "ada@ac me.com",
        "ada@acme_corp.com",
        "ada@.com",
    ],
)
def test_a_malformed_email_has_no_domain(email: str) -> None:
    assert email_domain(email) is None


# -- public vs corporate, naming -------------------------------------------------------------
@pytest.mark.parametrize("provider", ["gmail.com", "outlook.com", "proton.me", "icloud.com"])
def test_a_public_provider_gets_a_personal_workspace(provider: str) -> None:
    assert provider in PUBLIC_EMAIL_DOMAINS
    plan = plan_workspace(STRICT, f"ada@{provider}", "Ada")
    assert plan == WorkspacePlan(name="Ada's organization", domain=None)


def test_the_configured_extra_list_counts_as_public() -> None:
    policy = ProvisioningPolicy(extra_public_domains=frozenset({"mailbox.example"}))
    assert plan_workspace(policy, "ada@mailbox.example", "Ada").domain is None
    assert plan_workspace(STRICT, "ada@mailbox.example", "Ada").domain == "mailbox.example"


def test_a_corporate_domain_names_the_workspace_after_its_first_label() -> None:
    assert plan_workspace(STRICT, "Ada@Acme.com", "Ada") == WorkspacePlan("Acme", "acme.com")
    assert plan_workspace(STRICT, "ada@eu.acme.com", "Ada") == WorkspacePlan("Eu", "eu.acme.com")


def test_public_matching_is_exact_a_subdomain_of_a_provider_is_corporate() -> None:
    assert plan_workspace(STRICT, "ada@corp.gmail.com", "Ada").domain == "corp.gmail.com"


def test_with_domain_matching_off_every_workspace_is_personal() -> None:
    policy = ProvisioningPolicy(domain_matching=False)
    assert plan_workspace(policy, "ada@acme.com", "Ada") == WorkspacePlan(
        "Ada's organization", None
    )


@pytest.mark.parametrize("first_name", ["", "   "])
def test_a_personal_workspace_without_a_first_name_belongs_to_user(first_name: str) -> None:
    assert plan_workspace(STRICT, "x@gmail.com", first_name).name == "User's organization"


def test_a_malformed_domain_gets_a_personal_workspace() -> None:
    assert plan_workspace(STRICT, "ada@localhost", "Ada") == WorkspacePlan(
        "Ada's organization", None
    )


# -- slugs -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("Acme", "acme"),
        ("Ada's organization", "adas-organization"),
        ("Jos\u00e9\u2019s organization", "joses-organization"),
        ("  --My   Company!!--  ", "my-company"),
        ("李", "org"),
        ("", "org"),
    ],
)
def test_slug_is_lowercase_letters_digits_and_dashes(name: str, slug: str) -> None:
    assert slugify(name) == slug


def test_a_long_slug_is_cut_without_a_trailing_dash() -> None:
    slug = slugify("a" * 39 + " b")
    assert slug == "a" * 39
    assert len(slugify("x" * 500)) == 40


def test_collisions_retry_two_to_six_then_one_random_suffix() -> None:
    assert slug_candidates("acme", lambda: "f00d42") == [
        "acme",
        "acme-2",
        "acme-3",
        "acme-4",
        "acme-5",
        "acme-6",
        "acme-f00d42",
    ]


def test_the_first_free_candidate_wins() -> None:
    candidates = slug_candidates("acme", lambda: "f00d42")
    assert first_free_slug(candidates, set()) == "acme"
    assert first_free_slug(candidates, {"acme", "acme-2"}) == "acme-3"
    assert first_free_slug(candidates, set(candidates[:6])) == "acme-f00d42"


def test_when_every_candidate_is_taken_slug_choice_fails() -> None:
    candidates = slug_candidates("acme", lambda: "f00d42")
    with pytest.raises(SlugsExhaustedError, match="acme-f00d42"):
        first_free_slug(candidates, set(candidates))


# -- configuration -------------------------------------------------------------------------------
def test_domain_list_accepts_commas_and_lists_and_normalizes() -> None:
    assert parse_domain_list(" Mailbox.Example, ,@corp-mail.example ") == {
        "mailbox.example",
        "corp-mail.example",
    }
    assert parse_domain_list(["a.example", "B.example"]) == {"a.example", "b.example"}


def test_a_malformed_configured_domain_is_an_error() -> None:
    with pytest.raises(ValueError, match="not a domain"):
        parse_domain_list("ok.example, not a domain")
