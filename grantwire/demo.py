"""`grantwire demo`: the whole referral story against three real service processes.

It plays the identity service (publishing `user.*` events) and the users (HTTP calls),
exactly as an outside client would, and prints a timeline with balances and the
milliseconds from email verification to credit.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import httpx
import jwt
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from grantwire.system import STATE, LocalSystem, read_infra_env
from shared.contracts import Event, UserEmailVerified, UserSignedUp
from shared.envelope import Envelope
from shared.publisher import ConfirmingPublisher
from shared.topology import Naming, declare_exchanges

REFERRAL = {
    "GRANTWIRE_REFERRAL_ENABLED": "true",
    "GRANTWIRE_REFERRAL_REFERRER_UNITS": "1000",
    "GRANTWIRE_REFERRAL_REFEREE_UNITS": "500",
    "GRANTWIRE_REFERRAL_EXPIRY_DAYS": "365",
}


def demo_env(infra: dict[str, str], *, namespace: str, database_prefix: str) -> dict[str, str]:
    """Environment shared by the three services in a demo run."""
    return {
        "GRANTWIRE_AMQP_URL": infra["GRANTWIRE_AMQP_URL"],
        "GRANTWIRE_MONGO_URL": infra["GRANTWIRE_MONGO_URL"],
        "GRANTWIRE_NAMESPACE": namespace,
        "GRANTWIRE_MONGO_DB": database_prefix,
        "GRANTWIRE_ORGANIZATIONS_EMAIL_VERIFICATION": "strict",
        "GRANTWIRE_MAILER": "log",
        "GRANTWIRE_JWT_SECRET": secrets.token_hex(32),  # per run, never stored
        **REFERRAL,
    }


@dataclass
class Timeline:
    started: float = field(default_factory=time.perf_counter)
    lines: list[str] = field(default_factory=list)

    def step(self, text: str) -> None:
        elapsed = (time.perf_counter() - self.started) * 1000
        line = f"[{elapsed:8.1f} ms] {text}"
        self.lines.append(line)
        print(line, flush=True)


class Client:
    """What an outside client sees: the broker for identity events, HTTP for the rest."""

    def __init__(self, system: LocalSystem, connection: AbstractRobustConnection, naming: Naming):
        self.system = system
        self.connection = connection
        self.naming = naming
        self.http = httpx.AsyncClient(timeout=5.0)
        self.credits: list[tuple[float, dict[str, Any]]] = []
        self._publisher: ConfirmingPublisher | None = None

    async def open(self) -> None:
        channel = await self.connection.channel()
        exchange, _ = await declare_exchanges(channel, self.naming)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key="billing.credits_granted")
        await queue.consume(self._on_credit, no_ack=True)
        self._publisher = await ConfirmingPublisher.open(
            self.connection, self.naming.events_exchange
        )

    async def _on_credit(self, message: AbstractIncomingMessage) -> None:
        self.credits.append((time.perf_counter(), json.loads(message.body)))

    async def publish(self, event: Event) -> float:
        """Publish as the identity service; returns the time it was confirmed."""
        assert self._publisher is not None
        await self._publisher.publish(Envelope.new(event, source="identity-demo"))
        return time.perf_counter()

    def token_for(self, user_id: str, email: str, roles: tuple[str, ...] = ()) -> str:
        secret = self.system["invitations"].env["GRANTWIRE_JWT_SECRET"]
        claims = {"sub": user_id, "email": email, "roles": list(roles), "exp": time.time() + 600}
        return jwt.encode(claims, secret, algorithm="HS256")

    async def organization_of(self, user_id: str) -> dict[str, Any] | None:
        response = await self.http.get(
            f"{self.system['organizations'].url}/users/{user_id}/organization"
        )
        return response.json() if response.status_code == 200 else None

    def admin_headers(self) -> dict[str, str]:
        """Bearer header of an admin token: billing's reads are for members and admins."""
        token = self.token_for("demo-admin", "admin@example.com", roles=("admin",))
        return {"Authorization": f"Bearer {token}"}

    async def balance(self, organization_id: str) -> int:
        response = await self.http.get(
            f"{self.system['billing'].url}/organizations/{organization_id}/balance",
            headers=self.admin_headers(),
        )
        response.raise_for_status()
        return int(response.json()["balance"])

    async def invite(self, inviter_id: str, inviter_email: str, email: str) -> dict[str, Any]:
        response = await self.http.post(
            f"{self.system['invitations'].url}/invitations",
            json={"email": email},
            headers={"Authorization": f"Bearer {self.token_for(inviter_id, inviter_email)}"},
        )
        if response.status_code != 201:
            raise RuntimeError(f"invite failed: {response.status_code} {response.text}")
        return dict(response.json())

    async def close(self) -> None:
        await self.http.aclose()


async def eventually(probe: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll ``probe`` until it returns something truthy (the story waits on conditions)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def play_story(client: Client, timeline: Timeline) -> dict[str, Any]:
    """The referral story with a mailer configured; returns the figures it observed."""
    run = uuid.uuid4().hex[:6]
    inviter_id, friend_id = f"ada-{run}", f"grace-{run}"
    inviter_email, friend_email = f"ada.{run}@example.com", f"grace.{run}@gmail.com"

    timeline.step(f"identity: {inviter_email} signs up (verified)")
    await client.publish(
        UserSignedUp(user_id=inviter_id, email=inviter_email, first_name="Ada", email_verified=True)
    )
    inviter_org = await eventually(
        lambda: client.organization_of(inviter_id), "the inviter's organization"
    )
    timeline.step(f"organizations: {inviter_org['name']!r} provisioned for the inviter")
    signup_grant = await eventually(
        lambda: client.balance(inviter_org["organization_id"]), "the signup grant"
    )
    timeline.step(f"billing: inviter balance {signup_grant} (signup grant of the free plan)")

    invitation = await client.invite(inviter_id, inviter_email, friend_email)
    timeline.step(f"invitations: {inviter_email} invites {friend_email} over HTTP")

    timeline.step(f"identity: {friend_email} signs up with the token (unverified: mailer on)")
    await client.publish(
        UserSignedUp(
            user_id=friend_id,
            email=friend_email,
            first_name="Grace",
            email_verified=False,
            invite_token=invitation["token"],
        )
    )
    referrer_balance = await eventually(
        lambda: _at_least(client.balance(inviter_org["organization_id"]), signup_grant + 1000),
        "the referrer's credit",
    )
    timeline.step(f"billing: referrer credited, inviter balance {referrer_balance}")
    friend_org_before = await client.organization_of(friend_id)
    timeline.step(
        "organizations: the friend has "
        + ("an organization?!" if friend_org_before else "no organization yet (referee pending)")
    )

    verified_at = await client.publish(UserEmailVerified(user_id=friend_id))
    timeline.step(f"identity: {friend_email} verifies the email")
    credit = await eventually(
        lambda: _referee_credit(client, invitation["id"]), "the referee's credit"
    )
    credit_ms = (credit[0] - verified_at) * 1000
    friend_org = await client.organization_of(friend_id)
    assert friend_org is not None
    timeline.step(f"organizations: {friend_org['name']!r} provisioned for the friend")
    friend_balance = await eventually(
        lambda: _at_least(client.balance(friend_org["organization_id"]), 1000),
        "the friend's balance",
    )
    timeline.step(
        f"billing: referee credited {credit[1]['amount']} units "
        f"{credit_ms:.1f} ms after email verification; friend balance {friend_balance}"
    )
    return {
        "inviter_balance": referrer_balance,
        "friend_balance": friend_balance,
        "verification_to_credit_ms": round(credit_ms, 1),
        "inviter_organization_id": inviter_org["organization_id"],
        "friend_organization_id": friend_org["organization_id"],
        "invitation_id": invitation["id"],
    }


async def _at_least(balance: Any, expected: int) -> int | None:
    value = int(await balance)
    return value if value >= expected else None


async def _referee_credit(
    client: Client, invitation_id: str
) -> tuple[float, dict[str, Any]] | None:
    for at, credit in client.credits:
        if credit.get("invitation_id") == invitation_id and credit.get("side") == "referee":
            return at, credit
    return None


async def run_demo(system: LocalSystem, naming: Naming) -> dict[str, Any]:
    amqp_url = system.base_env["GRANTWIRE_AMQP_URL"]
    connection = await aio_pika.connect_robust(amqp_url)
    client = Client(system, connection, naming)
    try:
        await client.open()
        return await play_story(client, Timeline())
    finally:
        await client.close()
        await connection.close()


def main(keep_running: bool = False) -> int:
    """Start the system, play the story, print the timeline; stop unless asked not to."""
    infra = read_infra_env()
    namespace = ""  # the demo runs the real topology; each story uses fresh user ids
    system = LocalSystem(demo_env(infra, namespace=namespace, database_prefix="grantwire"))
    print("Grantwire demo: starting organizations, invitations and billing as processes")
    system.start(detached=keep_running)
    try:
        system.wait_ready()
        for name, proc in system.processes.items():
            print(f"  {name:<14} {proc.url}  (log: {proc.log_path})")
        print("Referral: referrer 1000 units, referee 500 units, expiring after 365 days\n")
        figures = asyncio.run(run_demo(system, Naming(namespace)))
    except BaseException:
        system.stop()
        raise
    print("\nResult:", json.dumps(figures))
    ok = figures["inviter_balance"] == 1500 and figures["friend_balance"] == 1000
    print("Balances are correct." if ok else "UNEXPECTED balances!")
    if keep_running:
        system.save()
        # Local exploration only: the per-run signing key, so `grantwire token` can mint
        # tokens for this system's APIs (git-ignored, readable by the owner only).
        key_file = STATE / "jwt-secret"
        key_file.touch(mode=0o600)
        key_file.write_text(system.base_env["GRANTWIRE_JWT_SECRET"])
        print("Tokens for the APIs: .venv/bin/grantwire token --role admin")
        print("The system keeps running; stop it with `make down`.")
    else:
        codes = system.stop()
        print(f"Stopped the services (exit codes {codes}).")
    return 0 if ok else 1
