"""The invitations service in-process on the real broker and database, with JWT helpers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
from aio_pika.abc import AbstractRobustConnection

from services.invitations import SERVICE
from services.invitations.app import SIGNUPS, build
from services.invitations.handlers import Invitations
from services.invitations.mailer import InvitationMail
from services.invitations.repository import INVITATIONS, InvitationRepository
from services.invitations.settings import InvitationsSettings
from shared.contracts import UserSignedUp
from shared.envelope import Envelope
from shared.runtime import ServiceRuntime
from tests.support import Isolation, publish_event, running_service, wait_until

SECRET = "integration-test-secret-of-32-bytes-or-more"


def bearer(
    user_id: str, email: str | None = None, roles: Iterable[str] = (), *, secret: str = SECRET
) -> dict[str, str]:
    """Authorization header of a valid HS256 token for this user."""
    claims = {
        "sub": user_id,
        "email": email or f"{user_id}@example.com",
        "roles": list(roles),
        "exp": int(time.time()) + 300,
    }
    return {"Authorization": f"Bearer {jwt.encode(claims, secret, algorithm='HS256')}"}


ALICE = bearer("alice")
BOB = bearer("bob")
ADMIN = bearer("root", roles=["admin"])


class RecordingMailer:
    """Keeps what it was asked to send; fails on request."""

    def __init__(self) -> None:
        self.sent: list[InvitationMail] = []
        self.failing = False

    async def send_invitation(self, mail: InvitationMail) -> None:
        if self.failing:
            raise ConnectionError("smtp server unreachable")
        self.sent.append(mail)


@dataclass
class Service:
    runtime: ServiceRuntime
    http: httpx.AsyncClient
    invitations: Invitations
    mailer: RecordingMailer | None
    isolation: Isolation
    amqp: AbstractRobustConnection
    signups: list[Envelope] = field(default_factory=list)

    @property
    def repo(self) -> InvitationRepository:
        return InvitationRepository(self.runtime.db)

    @property
    def collection(self) -> Any:
        return self.runtime.db[INVITATIONS]

    async def invite(self, email: str, as_: dict[str, str] = ALICE, **body: Any) -> httpx.Response:
        return await self.http.post("/invitations", json={"email": email, **body}, headers=as_)

    async def created(self, email: str, as_: dict[str, str] = ALICE) -> dict[str, Any]:
        response = await self.invite(email, as_)
        assert response.status_code == 201, response.text
        return dict(response.json())

    async def sign_up(
        self, user_id: str, email: str, token: str | None = None, envelope: Envelope | None = None
    ) -> Envelope:
        """Publish ``user.signed_up`` as the identity service would."""
        event = UserSignedUp(user_id=user_id, email=email, email_verified=False, invite_token=token)
        sent = await publish_event(self.amqp, self.isolation.naming, event, envelope=envelope)
        self.signups.append(sent)
        return sent

    async def wait_for_user(self, user_id: str) -> None:
        async def recorded() -> bool:
            return await self.runtime.db["users"].find_one({"_id": user_id}) is not None

        await wait_until(recorded)

    async def dead_letters(self) -> int:
        channel = await self.amqp.channel()
        queue = await channel.get_queue(SIGNUPS.dlq_name(self.isolation.naming))
        count = queue.declaration_result.message_count or 0
        await channel.close()
        return count


StartService = Callable[..., Awaitable[Service]]


@pytest.fixture
async def start_service(
    isolation: Isolation, amqp: AbstractRobustConnection
) -> AsyncIterator[StartService]:
    async with AsyncExitStack() as stack:

        async def start(*, record_mail: bool = True, **overrides: Any) -> Service:
            values: dict[str, Any] = {"jwt_secret": SECRET}
            values.update(overrides)
            settings = isolation.settings(InvitationsSettings, SERVICE, **values)
            mailer = RecordingMailer() if record_mail else None
            runtime, app = build(settings, mailer=mailer)
            running = await stack.enter_async_context(running_service(runtime, app, isolation))
            return Service(runtime, running.http, app.state.invitations, mailer, isolation, amqp)

        yield start


@pytest.fixture
async def service(start_service: StartService) -> Service:
    return await start_service()
