"""Rules of the organizations service, free of IO: gate, domains, naming, slugs."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Literal

PLAN_FREE = "free"
ROLE_OWNER = "owner"
MEMBERSHIP_ACTIVE = "active"
VERIFICATION_OFF = "off"
VERIFICATION_MODES = frozenset({"strict", VERIFICATION_OFF})

# Personal mailbox providers: an address there says nothing about an employer.
PUBLIC_EMAIL_DOMAINS: frozenset[str] = frozenset(
    {
        "163.com",
        "aol.com",
        "fastmail.com",
        "gmail.com",
        "gmx.com",
        "gmx.de",
        "gmx.net",
        "googlemail.com",
        "hey.com",
        "hotmail.co.uk",
        "hotmail.com",
        "icloud.com",
        "live.com",
        "mac.com",
        "mail.com",
        "mail.ru",
        "me.com",
        "msn.com",
        "outlook.com",
        "pm.me",
        "proton.me",
        "protonmail.com",
        "qq.com",
        "tutanota.com",
        "web.de",
        "yahoo.co.uk",
        "yahoo.com",
        "yandex.com",
        "yandex.ru",
        "ymail.com",
        "zoho.com",
    }
)

SLUG_NUMBERED_RETRIES = 5  # after the plain slug: -2 .. -6
SLUG_MAX_BASE_LENGTH = 40
SLUG_FALLBACK = "org"

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})+$")
_NOT_SLUG = re.compile(r"[^a-z0-9]+")
_APOSTROPHES = re.compile(r"['\u2019]")


class SlugsExhaustedError(Exception):
    """Every slug candidate of an organization name is taken."""

    def __init__(self, candidates: Collection[str]) -> None:
        super().__init__(f"every slug candidate is taken: {', '.join(candidates)}")
        self.candidates = tuple(candidates)


@dataclass(frozen=True)
class ProvisioningPolicy:
    """The service's configuration of the signup rules."""

    email_verification: str = "strict"
    domain_matching: bool = True
    extra_public_domains: frozenset[str] = frozenset()

    @property
    def requires_verified_email(self) -> bool:
        """Only the exact value ``off`` disables the gate; anything else fails closed."""
        return self.email_verification != VERIFICATION_OFF

    def is_public(self, domain: str) -> bool:
        return domain in PUBLIC_EMAIL_DOMAINS or domain in self.extra_public_domains


@dataclass(frozen=True)
class User:
    """The service's projection of a user; ``email`` is None until the signup is seen."""

    user_id: str
    email: str | None
    first_name: str
    email_verified: bool
    current_organization_id: str | None = None


@dataclass(frozen=True)
class Organization:
    id: str
    name: str
    slug: str
    domain: str | None
    plan_id: str


@dataclass(frozen=True)
class SuggestedJoin:
    """An existing organization with the new user's exact email domain (id and name only)."""

    organization_id: str
    name: str


@dataclass(frozen=True)
class WorkspacePlan:
    """What a new workspace is called and which domain it claims (None: personal)."""

    name: str
    domain: str | None

    @property
    def slug_base(self) -> str:
        return slugify(self.name)


Outcome = Literal["awaiting_signup", "gated", "converged", "created"]


@dataclass(frozen=True)
class Provisioning:
    """Result of ``handle_signup_organization`` for one user."""

    outcome: Outcome
    organization: Organization | None = None
    suggested_join: SuggestedJoin | None = None


def normalize_domain(value: str) -> str | None:
    """A lowercased, trimmed domain (one trailing dot dropped); None when malformed."""
    domain = value.strip().lower().removesuffix(".")
    return domain if _DOMAIN.match(domain) else None


def email_domain(email: str) -> str | None:
    """The normalized part after ``@``; None when the email or its domain is malformed."""
    local, at, domain = email.strip().rpartition("@")
    if not at or not local or "@" in local:
        return None
    return normalize_domain(domain)


def may_provision(policy: ProvisioningPolicy, user: User) -> bool:
    """The email-verification gate."""
    return user.email_verified or not policy.requires_verified_email


def plan_workspace(policy: ProvisioningPolicy, email: str, first_name: str) -> WorkspacePlan:
    """Corporate workspace named after the email domain, else a personal one."""
    domain = email_domain(email)
    if domain is not None and policy.domain_matching and not policy.is_public(domain):
        return WorkspacePlan(name=corporate_name(domain), domain=domain)
    return WorkspacePlan(name=personal_name(first_name), domain=None)


def corporate_name(domain: str) -> str:
    """``acme.com`` -> ``Acme``: the domain's first label, capitalized."""
    first_label = domain.split(".", 1)[0]
    return first_label[:1].upper() + first_label[1:]


def personal_name(first_name: str) -> str:
    return f"{first_name.strip() or 'User'}'s organization"


def slugify(name: str) -> str:
    """Lowercase ASCII letters, digits and single dashes; ``org`` when nothing is left."""
    ascii_text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = _NOT_SLUG.sub("-", _APOSTROPHES.sub("", ascii_text.lower())).strip("-")
    return slug[:SLUG_MAX_BASE_LENGTH].strip("-") or SLUG_FALLBACK


def slug_candidates(base: str, random_suffix: Callable[[], str]) -> list[str]:
    """The plain slug, then ``-2`` .. ``-6``, then one random suffix, in that order."""
    numbered = [f"{base}-{n}" for n in range(2, SLUG_NUMBERED_RETRIES + 2)]
    return [base, *numbered, f"{base}-{random_suffix()}"]


def first_free_slug(candidates: Iterable[str], taken: Collection[str]) -> str:
    """The first candidate nobody has; ``SlugsExhaustedError`` when all are taken."""
    candidates = list(candidates)
    for candidate in candidates:
        if candidate not in taken:
            return candidate
    raise SlugsExhaustedError(candidates)


def parse_domain_list(raw: str | Iterable[str]) -> frozenset[str]:
    """Domains from config (a list, or comma-separated text); malformed entries are errors."""
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    domains: set[str] = set()
    for item in items:
        text = item.strip().removeprefix("@")
        if not text:
            continue
        domain = normalize_domain(text)
        if domain is None:
            raise ValueError(f"not a domain: {item!r}")
        domains.add(domain)
    return frozenset(domains)
