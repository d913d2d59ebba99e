"""Billing rules as plain Python: ledger sign rules, grant keys, the grant decision, expiry.

No IO here. Listeners and jobs both call ``decide_grants`` and ``conclude``, so a rule
can never drift between the instant path and the reconcile safety net.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

Side = Literal["referee", "referrer"]
SIDES: tuple[Side, ...] = ("referee", "referrer")  # the referee side is decided first
EntryKind = Literal["topup", "debit", "refund", "expiration", "adjustment"]
Source = Literal["signup_grant", "referral", "adjustment"]
Skip = Literal["disabled", "no_invitation_id"]
SideOutcome = Literal[
    "applied",
    "duplicate_grant",
    "no_organization",
    "zero_units",
    "no_accepted_user",
    "no_inviter",
    "self_referral",
    "preseeded",  # closed by an operator before the first enable (README: first enable)
]
SideState = Literal["open", "granted", "closed"]
"""``open``: may still be granted (undecided, or no organization yet); ``granted``: the key
is in the ledger (terminal); ``closed``: a rule says never (``zero_units`` included, so a
units change does not retro-grant old referrals)."""

MAX_LEDGER_PAGE = 200

# (lowest, highest) allowed amount per kind; None = unbounded.
SIGN_RULES: dict[str, tuple[int | None, int | None]] = {
    "topup": (1, None),
    "adjustment": (1, None),
    "debit": (None, -1),
    "refund": (None, -1),
    "expiration": (None, 0),
}


class LedgerRuleError(ValueError):
    """An entry that breaks the ledger's sign rules."""


class InvalidCursorError(ValueError):
    """A ledger page cursor that this service did not produce."""


# -- keys ---------------------------------------------------------------------------
def referral_key(invitation_id: str, side: Side) -> str:
    """``referral:<invitation_id>:<side>``: one grant per side of an invitation, forever."""
    return f"referral:{invitation_id}:{side}"


def signup_grant_key(organization_id: str) -> str:
    return f"signup_grant:{organization_id}"


def expiry_key(entry_id: str) -> str:
    return f"expire:{entry_id}"


# -- ledger entries -----------------------------------------------------------------
def follows_sign_rule(kind: str, amount: int) -> bool:
    """True when ``amount`` has the sign its ``kind`` requires (unknown kinds never do)."""
    bounds = SIGN_RULES.get(kind)
    if bounds is None:
        return False
    low, high = bounds
    return (low is None or amount >= low) and (high is None or amount <= high)


def check_entry(kind: str, amount: int) -> None:
    """Raise ``LedgerRuleError`` unless the entry follows the sign rules."""
    if kind not in SIGN_RULES:
        raise LedgerRuleError(f"unknown entry kind {kind!r}")
    if not follows_sign_rule(kind, amount):
        low, high = SIGN_RULES[kind]
        allowed = ">= 1" if low == 1 else "<= -1" if high == -1 else "<= 0"
        raise LedgerRuleError(f"a {kind} amount must be {allowed}, got {amount}")


def expiry_time(now: datetime, days: int | None) -> datetime | None:
    """When credits granted at ``now`` expire; None (never) for a null or non-positive days."""
    if days is None or days <= 0:
        return None
    return now + timedelta(days=days)


def unspent_units(topup_amount: int, balance: int) -> int:
    """Units of an expiring topup still unspent: ``min(topup, balance)``, never negative.

    Spending is attributed to expiring credits last: an expiration can never push a balance
    below zero, and it needs one read (the balance), not the account's whole history. While
    the system has no debits this is exactly the topup's amount.
    """
    return max(0, min(topup_amount, balance))


# -- grants -------------------------------------------------------------------------
@dataclass(frozen=True)
class ReferralConfig:
    """The referral switch and amounts (DOMAIN defaults: off, 0 units, 365 days)."""

    enabled: bool = False
    referrer_units: int = 0
    referee_units: int = 0
    expiry_days: int | None = 365

    def units(self, side: Side) -> int:
        return self.referee_units if side == "referee" else self.referrer_units


@dataclass(frozen=True)
class Grant:
    """One credit to apply: a topup of ``units`` keyed by ``ref_id``."""

    ref_id: str
    organization_id: str
    units: int
    source: Source
    expires_at: datetime | None
    invitation_id: str | None = None
    side: Side | None = None


@dataclass(frozen=True)
class SideRecord:
    """What billing last knew about one side of a referral."""

    state: SideState = "open"
    outcome: SideOutcome | None = None
    organization_id: str | None = None


@dataclass(frozen=True)
class Referral:
    """An accepted invitation as billing's projection knows it."""

    invitation_id: str
    inviter: str | None
    referee: str | None
    sides: Mapping[Side, SideRecord] = field(
        default_factory=lambda: {side: SideRecord() for side in SIDES}
    )

    def record(self, side: Side) -> SideRecord:
        return self.sides.get(side, SideRecord())

    def user(self, side: Side) -> str | None:
        return self.referee if side == "referee" else self.inviter

    def has_open_side_of(self, user_id: str) -> bool:
        """True when ``user_id``'s own side (as referee or as referrer) is still open: the
        referrals ``organization.provisioned`` for that user re-decides."""
        return any(
            self.user(side) == user_id and self.record(side).state == "open" for side in SIDES
        )


@dataclass(frozen=True)
class SideResult:
    side: Side
    outcome: SideOutcome
    organization_id: str | None = None


@dataclass(frozen=True)
class GrantDecision:
    """Sides settled without the ledger, and the grants left to apply."""

    skipped: Skip | None = None
    settled: tuple[SideResult, ...] = ()
    grants: tuple[Grant, ...] = ()


@dataclass(frozen=True)
class GrantResult:
    """The outcome of ``grant_for_invitation``: skipped, or one result per side."""

    skipped: Skip | None = None
    sides: tuple[SideResult, ...] = ()

    def summary(self) -> dict[str, str]:
        if self.skipped:
            return {"skipped": self.skipped}
        return {r.side: r.outcome for r in self.sides}


def side_state(outcome: SideOutcome) -> SideState:
    """Which state a side is in after ``outcome``."""
    if outcome in ("applied", "duplicate_grant"):
        return "granted"
    if outcome == "no_organization":
        return "open"
    return "closed"


def _rule_outcome(config: ReferralConfig, referral: Referral, side: Side) -> SideOutcome | None:
    """Why a side can never be granted under ``config``, or None when it can."""
    if side == "referee":
        if config.referee_units <= 0:
            return "zero_units"
        if not referral.referee:
            return "no_accepted_user"
        return None
    if not referral.inviter:
        return "no_inviter"
    if referral.inviter == referral.referee:
        return "self_referral"
    if config.referrer_units <= 0:
        return "zero_units"
    return None


def _skip(config: ReferralConfig, referral: Referral) -> Skip | None:
    if not config.enabled:
        return "disabled"
    if not referral.invitation_id:
        return "no_invitation_id"
    return None


def users_to_resolve(config: ReferralConfig, referral: Referral) -> list[str]:
    """The users whose organization the decision needs (none when nothing can be granted)."""
    if _skip(config, referral):
        return []
    users: list[str] = []
    for side in SIDES:
        user = referral.user(side)
        open_ = referral.record(side).state == "open"
        if open_ and user and user not in users and _rule_outcome(config, referral, side) is None:
            users.append(user)
    return users


def decide_grants(
    config: ReferralConfig,
    referral: Referral,
    organization_of: Mapping[str, str],
    now: datetime,
) -> GrantDecision:
    """The grant decision of DOMAIN.md for one referral.

    A side already settled in the projection keeps its outcome (a granted side reports
    ``duplicate_grant`` without touching the ledger); an open side is decided by the rules,
    then by whether its user has an organization (``organization_of``: user -> org).
    """
    skipped = _skip(config, referral)
    if skipped:
        return GrantDecision(skipped=skipped)
    settled: list[SideResult] = []
    grants: list[Grant] = []
    for side in SIDES:
        record = referral.record(side)
        if record.state == "granted":
            settled.append(SideResult(side, "duplicate_grant", record.organization_id))
            continue
        if record.state == "closed" and record.outcome is not None:
            settled.append(SideResult(side, record.outcome, record.organization_id))
            continue
        reason = _rule_outcome(config, referral, side)
        if reason is not None:
            settled.append(SideResult(side, reason))
            continue
        user = referral.user(side)
        organization_id = organization_of.get(user) if user else None
        if organization_id is None:
            settled.append(SideResult(side, "no_organization"))
            continue
        grants.append(
            Grant(
                ref_id=referral_key(referral.invitation_id, side),
                organization_id=organization_id,
                units=config.units(side),
                source="referral",
                expires_at=expiry_time(now, config.expiry_days),
                invitation_id=referral.invitation_id,
                side=side,
            )
        )
    return GrantDecision(settled=tuple(settled), grants=tuple(grants))


def conclude(decision: GrantDecision, applied: Mapping[str, bool]) -> GrantResult:
    """The result once each grant was tried: ``applied[ref_id]`` True, or False (duplicate)."""
    if decision.skipped:
        return GrantResult(skipped=decision.skipped)
    results = list(decision.settled)
    for grant in decision.grants:
        assert grant.side is not None
        outcome: SideOutcome = "applied" if applied[grant.ref_id] else "duplicate_grant"
        results.append(SideResult(grant.side, outcome, grant.organization_id))
    results.sort(key=lambda r: SIDES.index(r.side))
    return GrantResult(sides=tuple(results))


def changed_sides(referral: Referral, result: GrantResult) -> tuple[SideResult, ...]:
    """The side results the projection does not know yet; a granted side is never rewritten."""
    changed: list[SideResult] = []
    for r in result.sides:
        known = referral.record(r.side)
        if known.state == "granted":
            continue
        if (known.state, known.outcome, known.organization_id) != (
            side_state(r.outcome),
            r.outcome,
            r.organization_id,
        ):
            changed.append(r)
    return tuple(changed)


def signup_grant(
    organization_id: str,
    plan_id: str,
    units_by_plan: Mapping[str, int],
    now: datetime,
    expiry_days: int | None = None,
) -> Grant | None:
    """The signup grant of a new organization's plan, or None when the plan has none."""
    units = units_by_plan.get(plan_id, 0)
    if units <= 0:
        return None
    return Grant(
        ref_id=signup_grant_key(organization_id),
        organization_id=organization_id,
        units=units,
        source="signup_grant",
        expires_at=expiry_time(now, expiry_days),
    )


# -- ledger pages -------------------------------------------------------------------
_CURSOR = re.compile(r"^(?P<at>-?\d{1,16})\.(?P<id>[0-9a-f]{24})$")
# the times a cursor may name: those a datetime can hold (past them a read would crash)
_CURSOR_MS_RANGE = (
    int(datetime(1, 1, 2, tzinfo=UTC).timestamp() * 1000),
    int(datetime(9999, 12, 30, tzinfo=UTC).timestamp() * 1000),
)


@dataclass(frozen=True)
class LedgerCursor:
    """Position after the last entry of a page (newest first): its time and id."""

    at_ms: int
    entry_id: str

    def encode(self) -> str:
        return f"{self.at_ms}.{self.entry_id}"

    @classmethod
    def decode(cls, text: str) -> LedgerCursor:
        match = _CURSOR.match(text)
        if match is None:
            raise InvalidCursorError(f"not a ledger cursor: {text!r}")
        at_ms = int(match["at"])
        if not _CURSOR_MS_RANGE[0] <= at_ms <= _CURSOR_MS_RANGE[1]:
            raise InvalidCursorError(f"not a ledger cursor: {text!r} (time out of range)")
        return cls(at_ms, match["id"])
