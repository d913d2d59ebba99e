"""The invitation rules, pure: tokens, validity, accept refusals, create rules and their order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.invitations.domain import (
    AlreadyAUser,
    CreateFacts,
    CreatePolicy,
    DuplicatePendingInvitation,
    InvalidEmail,
    Invitation,
    InvitationError,
    InviteCapReached,
    RateLimited,
    SelfInvite,
    accept_refusal,
    check_create,
    is_claim_stale,
    is_email,
    is_well_formed_token,
    new_invitation,
    new_token,
    rate_limit_retry_after,
    retry_after_header,
    validity,
)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
STALE = timedelta(minutes=15)
HOUR = timedelta(hours=1)
OPEN = CreatePolicy(lifetime_cap=None, rate_limit=None, rate_window=HOUR)
FRESH = CreateFacts(
    email_is_user=False, live_pending_exists=False, invites_ever=0, recent_created=[]
)


def invite(**changes: object) -> Invitation:
    base = new_invitation(
        invitation_id="i1",
        email="Friend@Example.com",
        invited_by="alice",
        inviter_email="alice@example.com",
        now=NOW,
        ttl=timedelta(days=14),
    )
    return Invitation(**{**base.__dict__, **changes})  # type: ignore[arg-type]


def create(
    email: str = "friend@example.com",
    facts: CreateFacts = FRESH,
    policy: CreatePolicy = OPEN,
    inviter_email: str = "alice@example.com",
) -> None:
    check_create(inviter_email=inviter_email, email=email, facts=facts, policy=policy, now=NOW)


def facts(**changes: object) -> CreateFacts:
    return CreateFacts(**{**FRESH.__dict__, **changes})  # type: ignore[arg-type]


# -- tokens and new invitations ------------------------------------------------------------
def test_token_is_40_hex_chars_from_20_random_bytes_and_never_repeats() -> None:
    tokens = {new_token() for _ in range(1000)}
    assert len(tokens) == 1000
    assert all(len(t) == 40 and is_well_formed_token(t) for t in tokens)


@pytest.mark.parametrize(
    "value", ["", "abc", "g" * 40, "A" * 40, "a" * 39, "a" * 41, " " + "a" * 39, "a" * 40 + "\n"]
)
def test_malformed_tokens_are_recognized(value: str) -> None:
    assert not is_well_formed_token(value)


def test_new_invitation_is_pending_with_normalized_email_and_expiry_after_ttl() -> None:
    inv = invite()
    assert inv.email == "friend@example.com"
    assert inv.status == "pending"
    assert inv.expires_at == NOW + timedelta(days=14)
    assert inv.invited_by == "alice"
    assert inv.accepted_at is inv.accepted_user_id is inv.claimed_at is None


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("a@b.co", True),
        ("first.last+tag@sub.example.org", True),
        ("no-at-sign", False),
        ("two@@example.com", False),
        ("space in@example.com", False),
        ("nodot@localhost", False),
        ("a@" + "b" * 320 + ".com", False),
    ],
)
def test_email_format(value: str, ok: bool) -> None:
    assert is_email(value) is ok


# -- validity ----------------------------------------------------------------------------
def test_pending_invite_is_valid_until_it_expires_and_expired_from_then_on() -> None:
    inv = invite()
    assert validity(inv, inv.expires_at - timedelta(seconds=1)) == "valid"
    assert validity(inv, inv.expires_at) == "expired"
    assert validity(inv, inv.expires_at + timedelta(days=1)) == "expired"


@pytest.mark.parametrize("status", ["accepted", "revoked"])
def test_accepted_or_revoked_invite_is_never_valid_even_before_expiry(status: str) -> None:
    assert validity(invite(status=status), NOW) == status


# -- accept --------------------------------------------------------------------------------
def refusal(inv: Invitation | None, **kw: object) -> object:
    args: dict[str, object] = {
        "email": "friend@example.com",
        "user_id": "bob",
        "now": NOW,
        "stale_after": STALE,
    }
    args.update(kw)
    return accept_refusal(inv, **args)  # type: ignore[arg-type]


def test_pending_unclaimed_unexpired_invite_with_matching_email_can_be_claimed() -> None:
    assert refusal(invite()) is None


def test_email_matches_case_insensitively_and_trimmed() -> None:
    assert refusal(invite(), email="  FRIEND@example.COM ") is None


@pytest.mark.parametrize(
    ("inv", "kw", "reason"),
    [
        (None, {}, "unknown_token"),
        (invite(status="revoked"), {}, "revoked"),
        (invite(expires_at=NOW), {}, "expired"),
        (invite(), {"email": "other@example.com"}, "email_mismatch"),
        (invite(status="accepted", accepted_user_id="bob"), {}, "already_accepted"),
        (invite(status="accepted", accepted_user_id="carol"), {}, "accepted_by_another_user"),
        (
            invite(claimed_by="carol", claimed_at=NOW - timedelta(minutes=14)),
            {},
            "claimed_by_another_signup",
        ),
    ],
)
def test_accept_is_refused_with_the_reason(
    inv: Invitation | None, kw: dict[str, object], reason: str
) -> None:
    assert refusal(inv, **kw) == reason


def test_claim_older_than_15_minutes_without_finalize_is_released() -> None:
    held = invite(claimed_by="carol", claimed_at=NOW - timedelta(minutes=15, seconds=1))
    assert refusal(held) is None
    assert is_claim_stale(held.claimed_at, NOW, STALE)
    assert not is_claim_stale(NOW - timedelta(minutes=14), NOW, STALE)
    assert is_claim_stale(None, NOW, STALE)


def test_claim_held_by_the_same_user_is_resumable() -> None:
    assert refusal(invite(claimed_by="bob", claimed_at=NOW)) is None


# -- create rules ----------------------------------------------------------------------------
def test_a_fresh_email_can_be_invited() -> None:
    create()


def test_self_invite_is_refused_case_insensitively() -> None:
    with pytest.raises(SelfInvite):
        create(email=" ALICE@example.com")


def test_self_invite_is_checked_before_every_other_rule() -> None:
    worst = facts(email_is_user=True, live_pending_exists=True, invites_ever=99)
    capped = CreatePolicy(lifetime_cap=0, rate_limit=1, rate_window=HOUR)
    with pytest.raises(SelfInvite):
        create(email="alice@example.com", facts=worst, policy=capped)


def test_malformed_email_is_refused() -> None:
    with pytest.raises(InvalidEmail):
        create(email="not-an-email")


def test_existing_user_is_refused_before_duplicate_and_limits() -> None:
    with pytest.raises(AlreadyAUser):
        create(
            facts=facts(email_is_user=True, live_pending_exists=True, invites_ever=5),
            policy=CreatePolicy(lifetime_cap=0, rate_limit=None, rate_window=HOUR),
        )


def test_live_pending_duplicate_is_refused_before_the_limits() -> None:
    with pytest.raises(DuplicatePendingInvitation):
        create(
            facts=facts(live_pending_exists=True, recent_created=[NOW]),
            policy=CreatePolicy(lifetime_cap=0, rate_limit=1, rate_window=HOUR),
        )


def test_lifetime_cap_off_by_default_zero_means_nobody_and_counts_all_invites() -> None:
    create(facts=facts(invites_ever=10_000))  # None = off
    with pytest.raises(InviteCapReached):
        create(policy=CreatePolicy(lifetime_cap=0, rate_limit=None, rate_window=HOUR))
    three = CreatePolicy(lifetime_cap=3, rate_limit=None, rate_window=HOUR)
    create(facts=facts(invites_ever=2), policy=three)
    with pytest.raises(InviteCapReached):
        create(facts=facts(invites_ever=3), policy=three)


def test_cap_is_checked_before_the_rate_limit() -> None:
    with pytest.raises(InviteCapReached):
        create(
            facts=facts(invites_ever=1, recent_created=[NOW]),
            policy=CreatePolicy(lifetime_cap=1, rate_limit=1, rate_window=HOUR),
        )


def test_rate_limit_refuses_with_the_seconds_until_the_oldest_counted_invite_leaves() -> None:
    policy = CreatePolicy(lifetime_cap=None, rate_limit=2, rate_window=HOUR)
    recent = [NOW - timedelta(minutes=10), NOW - timedelta(minutes=40)]
    with pytest.raises(RateLimited) as refused:
        create(facts=facts(recent_created=recent), policy=policy)
    assert refused.value.retry_after_s == pytest.approx(20 * 60)
    create(facts=facts(recent_created=recent[:1]), policy=policy)


def test_rate_limit_lowered_below_the_current_count_waits_for_the_limit_th_newest() -> None:
    newest_first = [NOW - timedelta(minutes=m) for m in (1, 2, 3, 50)]
    assert rate_limit_retry_after(newest_first, limit=2, window=HOUR, now=NOW) == 58 * 60
    assert rate_limit_retry_after(newest_first, limit=None, window=HOUR, now=NOW) is None
    assert rate_limit_retry_after(newest_first, limit=5, window=HOUR, now=NOW) is None


@pytest.mark.parametrize(("seconds", "header"), [(0.0, "1"), (0.2, "1"), (1.0, "1"), (59.01, "60")])
def test_retry_after_header_is_whole_seconds_rounded_up(seconds: float, header: str) -> None:
    assert retry_after_header(seconds) == header


@pytest.mark.parametrize(
    "kw",
    [
        {"lifetime_cap": -1, "rate_limit": None, "rate_window": HOUR},
        {"lifetime_cap": None, "rate_limit": 0, "rate_window": HOUR},
        {"lifetime_cap": None, "rate_limit": 1, "rate_window": timedelta(0)},
    ],
)
def test_policy_refuses_meaningless_limits(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CreatePolicy(**kw)  # type: ignore[arg-type]


def test_every_refusal_has_a_stable_error_code() -> None:
    codes = {cls.code for cls in InvitationError.__subclasses__()}
    assert len(codes) == len(InvitationError.__subclasses__())
    assert "invitation_error" not in codes
