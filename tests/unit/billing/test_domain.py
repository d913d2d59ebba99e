"""The billing rules of DOMAIN.md as pure functions: milliseconds, no IO."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.billing.domain import (
    GrantDecision,
    InvalidCursorError,
    LedgerCursor,
    LedgerRuleError,
    Referral,
    ReferralConfig,
    SideRecord,
    changed_sides,
    check_entry,
    conclude,
    decide_grants,
    expiry_key,
    expiry_time,
    follows_sign_rule,
    referral_key,
    side_state,
    signup_grant,
    signup_grant_key,
    unspent_units,
    users_to_resolve,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
ON = ReferralConfig(enabled=True, referrer_units=1000, referee_units=500, expiry_days=365)
BOTH_ORGS = {"inviter": "org-a", "friend": "org-b"}


def referral(inviter: str | None = "inviter", referee: str | None = "friend") -> Referral:
    return Referral(invitation_id="inv1", inviter=inviter, referee=referee)


def outcomes(
    config: ReferralConfig = ON,
    ref: Referral | None = None,
    orgs: dict[str, str] | None = None,
    duplicates: frozenset[str] = frozenset(),
) -> dict[str, str]:
    decision = decide_grants(config, ref or referral(), BOTH_ORGS if orgs is None else orgs, NOW)
    applied = {g.ref_id: g.ref_id not in duplicates for g in decision.grants}
    return conclude(decision, applied).summary()


# -- keys and sign rules -------------------------------------------------------------
def test_keys_follow_the_documented_formats() -> None:
    assert referral_key("inv1", "referrer") == "referral:inv1:referrer"
    assert referral_key("inv1", "referee") == "referral:inv1:referee"
    assert signup_grant_key("org1") == "signup_grant:org1"
    assert expiry_key("65a0") == "expire:65a0"


@pytest.mark.parametrize(
    ("kind", "allowed", "refused"),
    [
        ("topup", [1, 500], [0, -1]),
        ("adjustment", [1], [0, -5]),
        ("debit", [-1, -500], [0, 1]),
        ("refund", [-1], [0, 3]),
        ("expiration", [0, -1, -500], [1]),
    ],
)
def test_each_entry_kind_has_its_sign_rule(
    kind: str, allowed: list[int], refused: list[int]
) -> None:
    for amount in allowed:
        assert follows_sign_rule(kind, amount)
        check_entry(kind, amount)
    for amount in refused:
        assert not follows_sign_rule(kind, amount)
        with pytest.raises(LedgerRuleError, match=kind):
            check_entry(kind, amount)


def test_an_unknown_entry_kind_is_refused() -> None:
    assert not follows_sign_rule("gift", 10)
    with pytest.raises(LedgerRuleError, match="unknown"):
        check_entry("gift", 10)


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        (365, NOW + timedelta(days=365)),
        (1, NOW + timedelta(days=1)),
        (None, None),
        (0, None),
        (-3, None),
    ],
)
def test_expiry_days_null_or_not_positive_never_expire(
    days: int | None, expected: datetime | None
) -> None:
    assert expiry_time(NOW, days) == expected


@pytest.mark.parametrize(
    ("topup", "balance", "unspent"),
    [(500, 1500, 500), (500, 500, 500), (500, 200, 200), (500, 0, 0), (500, -20, 0)],
)
def test_unspent_units_are_the_topup_bounded_by_the_balance(
    topup: int, balance: int, unspent: int
) -> None:
    assert unspent_units(topup, balance) == unspent


# -- grant_for_invitation outcomes ----------------------------------------------------
def test_disabled_referral_skips_before_anything_else() -> None:
    assert outcomes(ReferralConfig(enabled=False, referrer_units=1, referee_units=1)) == {
        "skipped": "disabled"
    }
    assert users_to_resolve(ReferralConfig(), referral()) == []


def test_no_invitation_id_is_skipped() -> None:
    ref = Referral(invitation_id="", inviter="inviter", referee="friend")
    assert outcomes(ref=ref) == {"skipped": "no_invitation_id"}


def test_both_sides_applied_to_each_users_organization() -> None:
    decision = decide_grants(ON, referral(), BOTH_ORGS, NOW)
    grants = {g.side: g for g in decision.grants}
    assert grants["referee"].organization_id == "org-b"
    assert grants["referee"].units == 500
    assert grants["referee"].ref_id == "referral:inv1:referee"
    assert grants["referrer"].organization_id == "org-a"
    assert grants["referrer"].units == 1000
    assert grants["referrer"].expires_at == NOW + timedelta(days=365)
    assert {g.source for g in decision.grants} == {"referral"}
    assert outcomes() == {"referee": "applied", "referrer": "applied"}


def test_referee_side_is_decided_first() -> None:
    result = conclude(
        decide_grants(ON, referral(), BOTH_ORGS, NOW),
        {"referral:inv1:referee": True, "referral:inv1:referrer": True},
    )
    assert [r.side for r in result.sides] == ["referee", "referrer"]


def test_zero_referee_units_is_zero_units_even_without_accepted_user() -> None:
    config = ReferralConfig(enabled=True, referrer_units=1000, referee_units=0)
    assert outcomes(config)["referee"] == "zero_units"
    assert outcomes(config, referral(referee=None))["referee"] == "zero_units"


def test_no_accepted_user() -> None:
    assert outcomes(ref=referral(referee=None)) == {
        "referee": "no_accepted_user",
        "referrer": "applied",
    }


def test_no_inviter() -> None:
    assert outcomes(ref=referral(inviter=None))["referrer"] == "no_inviter"


def test_self_referral_is_checked_before_zero_units() -> None:
    config = ReferralConfig(enabled=True, referrer_units=0, referee_units=500)
    ref = referral(inviter="friend", referee="friend")
    assert outcomes(ON, ref)["referrer"] == "self_referral"
    assert outcomes(config, ref)["referrer"] == "self_referral"


def test_zero_referrer_units() -> None:
    config = ReferralConfig(enabled=True, referrer_units=0, referee_units=500)
    assert outcomes(config) == {"referee": "applied", "referrer": "zero_units"}


def test_a_user_without_organization_is_no_organization() -> None:
    assert outcomes(orgs={"inviter": "org-a"}) == {
        "referee": "no_organization",
        "referrer": "applied",
    }
    assert outcomes(orgs={}) == {"referee": "no_organization", "referrer": "no_organization"}


def test_a_key_already_in_the_ledger_is_duplicate_grant() -> None:
    assert outcomes(duplicates=frozenset({"referral:inv1:referee"})) == {
        "referee": "duplicate_grant",
        "referrer": "applied",
    }


def test_settled_sides_keep_their_outcome_and_touch_no_ledger() -> None:
    ref = Referral(
        "inv1",
        "inviter",
        "friend",
        {
            "referee": SideRecord("granted", "applied", "org-b"),
            "referrer": SideRecord("closed", "zero_units"),
        },
    )
    decision = decide_grants(ON, ref, BOTH_ORGS, NOW)
    assert decision.grants == ()
    assert conclude(decision, {}).summary() == {
        "referee": "duplicate_grant",
        "referrer": "zero_units",
    }
    assert users_to_resolve(ON, ref) == []


def test_only_users_of_open_grantable_sides_are_resolved() -> None:
    assert users_to_resolve(ON, referral()) == ["friend", "inviter"]
    assert users_to_resolve(ON, referral(inviter="friend")) == ["friend"]
    no_referrer = ReferralConfig(enabled=True, referee_units=500)
    assert users_to_resolve(no_referrer, referral()) == ["friend"]


@pytest.mark.parametrize(
    ("outcome", "state"),
    [
        ("applied", "granted"),
        ("duplicate_grant", "granted"),
        ("no_organization", "open"),
        ("zero_units", "closed"),
        ("no_accepted_user", "closed"),
        ("no_inviter", "closed"),
        ("self_referral", "closed"),
        ("preseeded", "closed"),
    ],
)
def test_side_state_after_each_outcome(outcome: str, state: str) -> None:
    assert side_state(outcome) == state  # type: ignore[arg-type]


def test_changed_sides_skips_what_the_projection_knows_and_never_rewrites_granted() -> None:
    ref = Referral(
        "inv1",
        "inviter",
        "friend",
        {"referee": SideRecord("granted", "applied", "org-b"), "referrer": SideRecord()},
    )
    result = conclude(
        decide_grants(ON, ref, {"inviter": "org-a"}, NOW), {"referral:inv1:referrer": True}
    )
    assert [r.side for r in changed_sides(ref, result)] == ["referrer"]
    unchanged = Referral(
        "inv1",
        "inviter",
        "friend",
        {
            "referee": SideRecord("open", "no_organization"),
            "referrer": SideRecord("open", "no_organization"),
        },
    )
    assert changed_sides(unchanged, conclude(decide_grants(ON, unchanged, {}, NOW), {})) == ()


def test_a_skipped_decision_concludes_skipped() -> None:
    assert conclude(GrantDecision(skipped="disabled"), {}).summary() == {"skipped": "disabled"}


# -- signup grant ----------------------------------------------------------------------
def test_signup_grant_per_plan() -> None:
    grant = signup_grant("org1", "free", {"free": 500}, NOW)
    assert grant is not None
    assert (grant.ref_id, grant.units, grant.source, grant.expires_at) == (
        "signup_grant:org1",
        500,
        "signup_grant",
        None,
    )
    assert signup_grant("org1", "team", {"free": 500}, NOW) is None
    assert signup_grant("org1", "free", {"free": 0}, NOW) is None
    expiring = signup_grant("org1", "free", {"free": 500}, NOW, expiry_days=30)
    assert expiring is not None and expiring.expires_at == NOW + timedelta(days=30)


# -- ledger cursor ---------------------------------------------------------------------
def test_ledger_cursor_round_trips_and_refuses_foreign_text() -> None:
    cursor = LedgerCursor(1767225600123, "65a1b2c3d4e5f60718293a4b")
    assert LedgerCursor.decode(cursor.encode()) == cursor
    for bad in (
        "",
        "abc",
        "12.xyz",
        "12.65a1b2c3d4e5f60718293a4b.1",
        "12;65a1b2c3d4e5f60718293a4b",
    ):
        with pytest.raises(InvalidCursorError):
            LedgerCursor.decode(bad)


def test_a_users_open_side_is_the_one_provisioned_re_decides() -> None:
    from services.billing.domain import Referral, SideRecord

    referral = Referral(
        "inv1",
        inviter="ada",
        referee="grace",
        sides={"referee": SideRecord("granted", "applied", "org-g"), "referrer": SideRecord()},
    )
    assert referral.has_open_side_of("ada")  # the referrer side is open
    assert not referral.has_open_side_of("grace")  # her side was granted
    assert not referral.has_open_side_of("someone-else")
