"""The invariant checker itself: silent on a sound system, loud on a deliberately broken one.

The databases are written directly (no service runs): a sound state first, then each
invariant broken once, each break found under its own name; the command line exits 1.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient
from typer.testing import CliRunner

from grantwire.cli import app
from grantwire.invariants import (
    AcceptedReferral,
    ExtraTruth,
    Rules,
    SystemDatabases,
    allow_reasons,
    check_system,
)
from services.billing.repository import INDEXES as BILLING_INDEXES
from shared.mongo import Document, ensure_indexes
from tests.support import Isolation

pytestmark = pytest.mark.integration

RULES = Rules(referrer_units=1000, referee_units=500, signup_grant_units={"free": 500})
NOW = datetime(2026, 1, 15, tzinfo=UTC)


def entry(ref_id: str, org: str, amount: int) -> Document:
    return {
        "_id": ObjectId(),
        "ref_id": ref_id,
        "organization_id": org,
        "kind": "topup",
        "amount": amount,
        "source": ref_id.split(":")[0],
        "at": NOW,
    }


async def sound_system(mongo: AsyncMongoClient[Document], dbs: SystemDatabases) -> None:
    """Ada (org-a) invited Grace (org-g); both credited once, signup grants included."""
    orgs, invs, billing = mongo[dbs.organizations], mongo[dbs.invitations], mongo[dbs.billing]
    await ensure_indexes(billing, BILLING_INDEXES)
    for user, org in (("ada", "org-a"), ("grace", "org-g")):
        await orgs["users"].insert_one(
            {
                "_id": user,
                "email": f"{user}@example.com",
                "email_verified": True,
                "current_organization_id": org,
            }
        )
        await orgs["organizations"].insert_one({"_id": org, "plan_id": "free"})
        await orgs["memberships"].insert_one(
            {"_id": str(ObjectId()), "user_id": user, "organization_id": org, "status": "active"}
        )
    await invs["invitations"].insert_one(
        {
            "_id": ObjectId("6b0000000000000000000001"),
            "status": "accepted",
            "invited_by": "ada",
            "accepted_user_id": "grace",
            "email": "grace@example.com",
        }
    )
    inv = "6b0000000000000000000001"
    await billing["ledger"].insert_many(
        [
            entry("signup_grant:org-a", "org-a", 500),
            entry("signup_grant:org-g", "org-g", 500),
            entry(f"referral:{inv}:referrer", "org-a", 1000),
            entry(f"referral:{inv}:referee", "org-g", 500),
        ]
    )
    await billing["accounts"].insert_many(
        [{"_id": "org-a", "balance": 1500}, {"_id": "org-g", "balance": 1000}]
    )
    for db in (orgs, invs, billing):
        await db["outbox"].insert_one({"event_id": str(ObjectId()), "type": "x", "status": "sent"})


async def test_a_sound_system_has_no_violation(
    isolation: Isolation, mongo: AsyncMongoClient[Document]
) -> None:
    dbs = SystemDatabases.with_prefix(f"t{isolation.token}")
    await sound_system(mongo, dbs)

    report = await check_system(isolation.urls.mongo_url, dbs, RULES)

    assert report.violations == 0, report.brief()
    assert (report.referrals, report.referral_keys, report.organizations) == (1, 2, 2)
    assert report.outbox_pending == {"organizations": 0, "invitations": 0, "billing": 0}


async def test_every_broken_invariant_is_reported_under_its_name(
    isolation: Isolation, mongo: AsyncMongoClient[Document]
) -> None:
    dbs = SystemDatabases.with_prefix(f"t{isolation.token}")
    await sound_system(mongo, dbs)
    orgs, invs, billing = mongo[dbs.organizations], mongo[dbs.invitations], mongo[dbs.billing]
    # a referral whose referee side was lost, and one credited to a stranger's organization
    lost, misdirected = "6b0000000000000000000002", "6b0000000000000000000003"
    for inv in (lost, misdirected):
        await invs["invitations"].insert_one(
            {
                "_id": ObjectId(inv),
                "status": "accepted",
                "invited_by": "ada",
                "accepted_user_id": "grace",
            }
        )
    await billing["ledger"].insert_many(
        [
            entry(f"referral:{lost}:referrer", "org-a", 1000),
            entry(f"referral:{misdirected}:referrer", "org-a", 999),  # wrong amount
            entry(f"referral:{misdirected}:referee", "org-stranger", 500),
            entry("referral:made-up:referee", "org-g", 500),  # no accepted invitation
        ]
    )
    # a self-referral credited on the referrer side
    await invs["invitations"].insert_one(
        {
            "_id": ObjectId("6b0000000000000000000004"),
            "status": "accepted",
            "invited_by": "ada",
            "accepted_user_id": "ada",
        }
    )
    await billing["ledger"].insert_one(
        entry("referral:6b0000000000000000000004:referrer", "org-a", 1000)
    )
    # a key credited twice: only possible once the unique index is gone
    await billing["ledger"].drop_index("ref_id_unique")
    await billing["ledger"].insert_one(entry("signup_grant:org-a", "org-a", 500))
    # an organization without its signup grant, a verified user without an organization
    await orgs["organizations"].insert_one({"_id": "org-new", "plan_id": "free"})
    await orgs["users"].insert_one(
        {"_id": "lin", "email": "lin@example.com", "email_verified": True}
    )
    # a claim that never finalized; an event never published; a poison message kept
    await invs["invitations"].insert_one(
        {"_id": ObjectId(), "status": "pending", "claimed_by": "zoe", "claimed_at": NOW}
    )
    await orgs["outbox"].insert_one(
        {"event_id": "e-stuck", "type": "organization.created", "status": "pending"}
    )
    await billing["dead_letters"].insert_one(
        {
            "status": "dead",
            "reason": "schema_violation",
            "event_type": "invitation.accepted",
            "message_id": "m1",
            "error_message": "user_id: field required",
        }
    )

    report = await check_system(isolation.urls.mongo_url, dbs, RULES)

    assert report.finding_counts == {
        "billing_missing_unique_index": 1,
        "billing_duplicate_key": 1,
        "billing_balance_mismatch": 3,  # org-a, org-g (entries added), org-stranger (no account)
        "referral_key_missing": 2,  # the lost referee side; the self-referral's referee side
        "referral_wrong_organization": 1,
        "referral_wrong_amount": 1,
        "referral_key_unexplained": 1,
        "referral_key_against_rules": 1,
        "signup_grant_missing": 1,
        "signup_grant_twice": 1,
        "user_without_organization": 1,
        "invitation_claim_unfinalized": 1,
        "outbox_pending": 1,
        "dead_letter_unaccounted": 1,
    }, report.as_dict()
    found = {(f["finding"], f.get("ref_id") or f.get("user_id")) for f in report.findings}
    assert ("referral_key_missing", f"referral:{lost}:referee") in found
    assert ("referral_key_unexplained", "referral:made-up:referee") in found
    assert ("user_without_organization", "lin") in found
    assert report.exit_code == 1

    # the poison is expected: it no longer counts; nothing else changes
    tolerant = await check_system(
        isolation.urls.mongo_url,
        dbs,
        RULES,
        dead_letters_expected=allow_reasons(["schema_violation"]),
    )
    assert "dead_letter_unaccounted" not in tolerant.finding_counts
    assert tolerant.dead_letters == {"billing": {"schema_violation": 1}}
    assert tolerant.violations == report.violations - 1


async def test_extra_truth_explains_keys_of_events_injected_into_billing(
    isolation: Isolation, mongo: AsyncMongoClient[Document]
) -> None:
    dbs = SystemDatabases.with_prefix(f"t{isolation.token}")
    await ensure_indexes(mongo[dbs.billing], BILLING_INDEXES)
    await mongo[dbs.billing]["ledger"].insert_one(entry("referral:inv1:referee", "org-f", 500))
    await mongo[dbs.billing]["accounts"].insert_one({"_id": "org-f", "balance": 500})
    extra = ExtraTruth(
        referrals=[AcceptedReferral("inv1", "inviter", "friend")],
        memberships={"friend": frozenset({"org-f"}), "inviter": frozenset({"org-i"})},
    )

    report = await check_system(isolation.urls.mongo_url, dbs, RULES, extra=extra)

    assert report.finding_counts == {"referral_key_missing": 1}, report.as_dict()
    assert report.findings[0]["ref_id"] == "referral:inv1:referrer"


def test_the_command_prints_one_json_report_and_exits_1_on_violations(
    isolation: Isolation,
) -> None:
    env = {
        "GRANTWIRE_MONGO_URL": isolation.urls.mongo_url,
        "GRANTWIRE_REFERRAL_ENABLED": "true",
        "GRANTWIRE_REFERRAL_REFERRER_UNITS": "1000",
        "GRANTWIRE_REFERRAL_REFEREE_UNITS": "500",
    }
    args = ["invariants", "--database-prefix", f"t{isolation.token}"]
    import asyncio

    async def broken() -> None:
        client: AsyncMongoClient[Any] = AsyncMongoClient(isolation.urls.mongo_url)
        dbs = SystemDatabases.with_prefix(f"t{isolation.token}")
        await sound_system(client, dbs)
        await client[dbs.billing]["dead_letters"].insert_one(
            {"status": "dead", "reason": "invalid_json", "event_type": "x", "message_id": "m"}
        )
        await client.close()

    asyncio.run(broken())

    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 1, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["finding_counts"] == {"dead_letter_unaccounted": 1}

    allowed = CliRunner().invoke(
        app, [*args, "--allow-dead-letter-reason", "invalid_json"], env=env
    )
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.output.strip().splitlines()[-1])["violations"] == 0
