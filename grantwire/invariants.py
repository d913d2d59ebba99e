"""`grantwire invariants`: what must hold across the whole system, checked from its databases.

Services never read each other's databases; this operator tool does, read-only, to prove
after the fact that nothing was lost and nothing was credited twice:

- billing's own audit (`grantwire audit`, reused as is): every balance equals its ledger
  sum, no ledger key twice, the unique index exists, every entry follows its sign rule;
- referrals: for every accepted invitation (invitations' database, the source of truth),
  each side whose user has an organization (organizations' database) holds its ledger key
  `referral:<invitation>:referrer|referee` exactly once, credited to one of that user's
  organizations with the configured units; no referral key exists that no accepted
  invitation explains;
- signup grants: every organization whose plan has a grant holds `signup_grant:<org>` once;
- organizations: every user allowed an organization (email known, verified unless the gate
  is off) has one; invitations: no claim is left unfinalized;
- every service's outbox is drained (no `pending` document);
- every dead letter still `dead` is accounted for: the caller says which are expected
  poison (`--allow-dead-letter-reason` on the command line), anything else is a violation.

One JSON report line; exit 1 on any violation. Reading costs one pass over the accepted
invitations, the memberships and the ledger's referral and signup keys (held in memory):
an audit for quiet hours, like `grantwire audit`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pymongo import ASCENDING

from services.billing import jobs as billing_jobs
from services.billing.domain import SIDES, Side, referral_key, signup_grant_key
from services.billing.settings import BillingSettings
from shared.deadletters import DEAD_LETTERS
from shared.mongo import Document, create_client
from shared.outbox import OUTBOX

SERVICES = ("organizations", "invitations", "billing")
MAX_FINDINGS_PER_CHECK = 100
UNSETTLED_DEAD_LETTER = ("dead", "replaying")  # replayed and purged ones were handled

DeadLetterPolicy = Callable[[str, Document], bool]
"""``(service, dead letter document) -> True`` when the letter is expected poison."""


def no_dead_letters(_service: str, _letter: Document) -> bool:
    """The default policy: no dead letter is expected."""
    return False


def allow_reasons(reasons: Iterable[str]) -> DeadLetterPolicy:
    """Dead letters whose reason is one of ``reasons`` are expected."""
    allowed = frozenset(reasons)
    return lambda _service, letter: letter.get("reason") in allowed


@dataclass(frozen=True)
class SystemDatabases:
    """The database of each service."""

    organizations: str = "grantwire_organizations"
    invitations: str = "grantwire_invitations"
    billing: str = "grantwire_billing"

    @classmethod
    def with_prefix(cls, prefix: str) -> SystemDatabases:
        """``<prefix>_<service>``, as `grantwire up` and the tests name them."""
        return cls(*(f"{prefix}_{service}" for service in SERVICES))

    def of(self, service: str) -> str:
        return str(getattr(self, service))


@dataclass(frozen=True)
class Rules:
    """What the system was configured to do (billing's and organizations' settings)."""

    referral_enabled: bool = True
    referrer_units: int = 0
    referee_units: int = 0
    signup_grant_units: Mapping[str, int] = field(default_factory=lambda: {"free": 500})
    verification_gate: bool = True  # organizations provisions verified users only
    check_amounts: bool = True  # credited units equal the configured ones

    def units(self, side: Side) -> int:
        return self.referee_units if side == "referee" else self.referrer_units

    @classmethod
    def from_environment(cls) -> Rules:
        from services.organizations.settings import OrganizationsSettings

        billing = BillingSettings()
        return cls(
            referral_enabled=billing.referral_enabled,
            referrer_units=billing.referral_referrer_units,
            referee_units=billing.referral_referee_units,
            signup_grant_units=dict(billing.signup_grant_units),
            verification_gate=OrganizationsSettings().policy().requires_verified_email,
        )


@dataclass(frozen=True)
class AcceptedReferral:
    """An accepted invitation: the truth billing's keys are checked against."""

    invitation_id: str
    inviter: str | None
    referee: str | None


@dataclass(frozen=True)
class ExtraTruth:
    """Facts given by the caller besides the databases (events injected straight into
    billing, as another team's services would publish them)."""

    referrals: Sequence[AcceptedReferral] = ()
    memberships: Mapping[str, frozenset[str]] = field(default_factory=dict)  # user -> orgs
    organizations: Mapping[str, str] = field(default_factory=dict)  # organization -> plan


@dataclass
class InvariantReport:
    """Figures of the system and its violations (``findings``, at most 100 per check)."""

    status: str = "completed"
    referrals: int = 0  # accepted invitations checked
    referral_keys: int = 0  # keys expected (a side whose user has an organization)
    referral_sides_waiting: int = 0  # sides whose user has no organization (no key expected)
    organizations: int = 0
    users: int = 0
    accounts: int = 0
    entries: int = 0
    outbox_pending: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, dict[str, int]] = field(default_factory=dict)  # service -> reason
    finding_counts: dict[str, int] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)
    duration_ms: int = 0

    @property
    def violations(self) -> int:
        return sum(self.finding_counts.values())

    @property
    def exit_code(self) -> int:
        return 1 if self.violations else 0

    def add(self, check: str, found: Sequence[Mapping[str, Any]], total: int | None = None) -> None:
        count = len(found) if total is None else total
        if count:
            self.finding_counts[check] = self.finding_counts.get(check, 0) + count
            self.findings += [{"finding": check, **f} for f in list(found)[:MAX_FINDINGS_PER_CHECK]]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "violations": self.violations}

    def brief(self) -> str:
        """One line for a test failure: the counts and the first few findings."""
        first = "; ".join(json.dumps(f, default=str) for f in self.findings[:5])
        return f"{self.violations} violations {self.finding_counts}: {first}"


# -- the check ----------------------------------------------------------------------------
async def check_system(
    mongo_url: str,
    databases: SystemDatabases,
    rules: Rules,
    *,
    dead_letters_expected: DeadLetterPolicy = no_dead_letters,
    extra: ExtraTruth | None = None,
) -> InvariantReport:
    """Every invariant of the module docstring, read-only; the report lists violations."""
    started = time.perf_counter()
    report = InvariantReport()
    extra = extra or ExtraTruth()
    audit = await billing_jobs.audit(
        BillingSettings(mongo_url=mongo_url, mongo_db=databases.billing)
    )
    report.accounts, report.entries = audit.accounts, audit.entries
    for check, count in audit.finding_counts.items():
        found = [
            {k: v for k, v in f.items() if k != "finding"}
            for f in audit.findings
            if f["finding"] == check
        ]
        report.add(f"billing_{check}", found, count)

    client = create_client(mongo_url, app_name="grantwire-invariants")
    try:
        organizations_db = client[databases.organizations]
        invitations_db = client[databases.invitations]
        billing_db = client[databases.billing]
        memberships = await _memberships(organizations_db, extra)
        plans = await _organization_plans(organizations_db, extra)
        report.organizations = len(plans)
        referrals = await _accepted_referrals(invitations_db, extra)
        report.referrals = len(referrals)
        keys = await _ledger_keys(billing_db)
        _check_referrals(report, rules, referrals, memberships, keys)
        _check_signup_grants(report, rules, plans, keys)
        await _check_users(report, rules, organizations_db)
        await _check_claims(report, invitations_db)
        for service in SERVICES:
            await _check_outbox(report, service, client[databases.of(service)])
            await _check_dead_letters(
                report, service, client[databases.of(service)], dead_letters_expected
            )
    finally:
        await client.close()
    report.duration_ms = round((time.perf_counter() - started) * 1000)
    return report


async def _memberships(db: Any, extra: ExtraTruth) -> dict[str, set[str]]:
    """user -> the organizations they are an active member of."""
    found: dict[str, set[str]] = defaultdict(set)
    async for doc in db["memberships"].find(
        {"status": "active"}, {"user_id": True, "organization_id": True}
    ):
        found[doc["user_id"]].add(doc["organization_id"])
    for user, organizations in extra.memberships.items():
        found[user] |= set(organizations)
    return found


async def _organization_plans(db: Any, extra: ExtraTruth) -> dict[str, str]:
    plans = {
        doc["_id"]: doc.get("plan_id", "")
        async for doc in db["organizations"].find({}, {"plan_id": True})
    }
    return {**plans, **extra.organizations}


async def _accepted_referrals(db: Any, extra: ExtraTruth) -> list[AcceptedReferral]:
    found = [
        AcceptedReferral(str(doc["_id"]), doc.get("invited_by"), doc.get("accepted_user_id"))
        async for doc in db["invitations"].find(
            {"status": "accepted"}, {"invited_by": True, "accepted_user_id": True}
        )
    ]
    return found + list(extra.referrals)


async def _ledger_keys(db: Any) -> dict[str, list[Document]]:
    """Referral and signup-grant keys of the ledger -> their entries (normally one)."""
    keys: dict[str, list[Document]] = defaultdict(list)
    query = {"ref_id": {"$regex": "^(referral|signup_grant):"}}
    projection = {"ref_id": True, "organization_id": True, "amount": True}
    async for doc in db["ledger"].find(query, projection).sort("ref_id", ASCENDING):
        keys[doc["ref_id"]].append(doc)
    return keys


def _expected_sides(rules: Rules, referral: AcceptedReferral) -> dict[Side, str]:
    """Side -> the user it credits, for sides the rules credit (DOMAIN.md)."""
    if not rules.referral_enabled or not referral.invitation_id:
        return {}
    sides: dict[Side, str] = {}
    if rules.referee_units > 0 and referral.referee:
        sides["referee"] = referral.referee
    inviter = referral.inviter
    if rules.referrer_units > 0 and inviter and inviter != referral.referee:
        sides["referrer"] = inviter
    return sides


def _check_referrals(
    report: InvariantReport,
    rules: Rules,
    referrals: Sequence[AcceptedReferral],
    memberships: Mapping[str, set[str]],
    keys: Mapping[str, list[Document]],
) -> None:
    missing: list[dict[str, Any]] = []
    twice: list[dict[str, Any]] = []
    wrong_org: list[dict[str, Any]] = []
    wrong_amount: list[dict[str, Any]] = []
    against_rules: list[dict[str, Any]] = []
    explained: set[str] = set()
    for referral in referrals:
        expected = _expected_sides(rules, referral)
        for side in SIDES:
            key = referral_key(referral.invitation_id, side)
            explained.add(key)  # its invitation was accepted: not made up
            entries = keys.get(key, [])
            user = expected.get(side)
            if side == "referrer" and entries and referral.inviter in (None, referral.referee):
                against_rules.append({"ref_id": key, "inviter": referral.inviter})
            if user is None:
                continue  # the switch or the units say no (they may have said yes before)
            organizations = memberships.get(user, set())
            if not organizations:
                report.referral_sides_waiting += 1
                continue  # not credited yet, and nothing says it should be
            report.referral_keys += 1
            where = {"ref_id": key, "user_id": user}
            if not entries:
                missing.append(where)
                continue
            if len(entries) > 1:
                twice.append({**where, "count": len(entries)})
            for entry in entries:
                if entry["organization_id"] not in organizations:
                    wrong_org.append(
                        {
                            **where,
                            "organization_id": entry["organization_id"],
                            "user_organizations": sorted(organizations),
                        }
                    )
                if rules.check_amounts and entry["amount"] != rules.units(side):
                    wrong_amount.append(
                        {**where, "amount": entry["amount"], "expected": rules.units(side)}
                    )
    unexplained = [
        {"ref_id": key, "organization_id": entries[0]["organization_id"]}
        for key, entries in keys.items()
        if key.startswith("referral:") and key not in explained
    ]
    report.add("referral_key_missing", missing)
    report.add("referral_key_twice", twice)
    report.add("referral_wrong_organization", wrong_org)
    report.add("referral_wrong_amount", wrong_amount)
    report.add("referral_key_unexplained", unexplained)
    report.add("referral_key_against_rules", against_rules)


def _check_signup_grants(
    report: InvariantReport,
    rules: Rules,
    plans: Mapping[str, str],
    keys: Mapping[str, list[Document]],
) -> None:
    missing: list[dict[str, Any]] = []
    twice: list[dict[str, Any]] = []
    wrong: list[dict[str, Any]] = []
    for organization, plan in plans.items():
        units = rules.signup_grant_units.get(plan, 0)
        if units <= 0:
            continue
        key = signup_grant_key(organization)
        entries = keys.get(key, [])
        if not entries:
            missing.append({"ref_id": key, "plan_id": plan})
        elif len(entries) > 1:
            twice.append({"ref_id": key, "count": len(entries)})
        for entry in entries:
            if entry["organization_id"] != organization or (
                rules.check_amounts and entry["amount"] != units
            ):
                wrong.append(
                    {
                        "ref_id": key,
                        "organization_id": entry["organization_id"],
                        "amount": entry["amount"],
                        "expected": units,
                    }
                )
    unexplained = [
        {"ref_id": key}
        for key in keys
        if key.startswith("signup_grant:") and key.removeprefix("signup_grant:") not in plans
    ]
    report.add("signup_grant_missing", missing)
    report.add("signup_grant_twice", twice)
    report.add("signup_grant_wrong", wrong)
    report.add("signup_grant_unexplained", unexplained)


async def _check_users(report: InvariantReport, rules: Rules, db: Any) -> None:
    """Every user organizations knows the email of (and, gated, verified) has one."""
    report.users = await db["users"].count_documents({})
    query: Document = {"email": {"$type": "string"}, "current_organization_id": None}
    if rules.verification_gate:
        query["email_verified"] = True
    orphans = await db["users"].find(query, {"_id": True}).to_list(MAX_FINDINGS_PER_CHECK)
    total = await db["users"].count_documents(query) if orphans else 0
    report.add("user_without_organization", [{"user_id": d["_id"]} for d in orphans], total)


async def _check_claims(report: InvariantReport, db: Any) -> None:
    """A claimed invitation that is still pending: a signup that never finished accepting."""
    query = {"status": "pending", "claimed_by": {"$type": "string"}}
    stuck = (
        await db["invitations"]
        .find(query, {"claimed_by": True, "claimed_at": True})
        .to_list(MAX_FINDINGS_PER_CHECK)
    )
    total = await db["invitations"].count_documents(query) if stuck else 0
    found = [
        {
            "invitation_id": str(d["_id"]),
            "claimed_by": d["claimed_by"],
            "claimed_at": str(d.get("claimed_at")),
        }
        for d in stuck
    ]
    report.add("invitation_claim_unfinalized", found, total)


async def _check_outbox(report: InvariantReport, service: str, db: Any) -> None:
    pending = await db[OUTBOX].count_documents({"status": "pending"})
    report.outbox_pending[service] = pending
    if pending:
        oldest = await db[OUTBOX].find({"status": "pending"}).sort("_id", 1).limit(5).to_list()
        found = [
            {
                "service": service,
                "event_id": d["event_id"],
                "type": d["type"],
                "attempts": d.get("attempts", 0),
                "error": d.get("last_error"),
            }
            for d in oldest
        ]
        report.add("outbox_pending", found, pending)


async def _check_dead_letters(
    report: InvariantReport, service: str, db: Any, expected: DeadLetterPolicy
) -> None:
    reasons: Counter[str] = Counter()
    unaccounted: list[dict[str, Any]] = []
    total = 0
    query = {"status": {"$in": list(UNSETTLED_DEAD_LETTER)}}
    async for letter in db[DEAD_LETTERS].find(query):
        reasons[str(letter.get("reason"))] += 1
        if not expected(service, letter):
            total += 1
            if len(unaccounted) < MAX_FINDINGS_PER_CHECK:
                unaccounted.append(
                    {
                        "service": service,
                        "id": str(letter["_id"]),
                        "event_type": letter.get("event_type"),
                        "reason": letter.get("reason"),
                        "error": str(letter.get("error_message", ""))[:200],
                        "message_id": letter.get("message_id"),
                    }
                )
    if reasons:
        report.dead_letters[service] = dict(reasons)
    report.add("dead_letter_unaccounted", unaccounted, total)


# -- command line ---------------------------------------------------------------------------
def main(database_prefix: str, allowed_reasons: Sequence[str]) -> int:
    """`grantwire invariants`: check the system configured by the environment; exit code."""
    import typer

    settings = BillingSettings()
    report = asyncio.run(
        check_system(
            settings.mongo_url.get_secret_value(),
            SystemDatabases.with_prefix(database_prefix),
            Rules.from_environment(),
            dead_letters_expected=allow_reasons(allowed_reasons),
        )
    )
    typer.echo(json.dumps(report.as_dict(), default=str))
    return report.exit_code
