"""The SMTP mailer against a minimal SMTP server on a local socket."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest

from tests.integration.invitations.conftest import StartService

pytestmark = pytest.mark.integration


@dataclass
class SmtpServer:
    """Just enough ESMTP (EHLO, AUTH PLAIN, MAIL, RCPT, DATA, QUIT) to receive a message."""

    port: int = 0
    logins: list[str] = field(default_factory=list)
    messages: list[EmailMessage] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def reply(line: str) -> None:
            writer.write(f"{line}\r\n".encode())

        reply("220 test ESMTP")
        data: list[bytes] | None = None
        while line := await reader.readline():
            if data is not None:
                if line == b".\r\n":
                    raw = b"".join(data)
                    self.messages.append(message_from_bytes(raw, policy=policy.default))  # type: ignore[arg-type]
                    data = None
                    reply("250 queued")
                else:
                    data.append(line[1:] if line.startswith(b"..") else line)
            else:
                verb = line.split(b" ", 1)[0].strip().upper()
                if verb == b"EHLO":
                    reply("250-test")
                    reply("250 AUTH PLAIN")
                elif verb == b"AUTH":
                    _, credentials = line.split(b" ", 2)[1:]
                    self.logins.append(base64.b64decode(credentials).decode())
                    reply("235 authenticated")
                elif verb == b"DATA":
                    data = []
                    reply("354 go ahead")
                elif verb == b"QUIT":
                    reply("221 bye")
                    await writer.drain()
                    break
                else:
                    reply("250 ok")
            await writer.drain()
        writer.close()


@pytest.fixture
async def smtp_server() -> AsyncIterator[SmtpServer]:
    server = SmtpServer()
    listener = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield server


async def test_smtp_settings_send_the_invitation_with_its_link(
    start_service: StartService, smtp_server: SmtpServer
) -> None:
    service = await start_service(
        record_mail=False,
        smtp_host="127.0.0.1",
        smtp_port=smtp_server.port,
        smtp_starttls=False,
        smtp_username="grantwire",
        smtp_password="mail-secret",
        smtp_from="Grantwire <invites@grantwire.test>",
        invite_url_template="https://app.grantwire.test/join?t={token}",
    )
    created = await service.created("friend@example.com")
    assert created["mail_sent"] is True
    [message] = smtp_server.messages
    assert message["To"] == "friend@example.com"
    assert message["From"] == "Grantwire <invites@grantwire.test>"
    body = message.get_content()
    assert f"https://app.grantwire.test/join?t={created['token']}" in body
    assert "alice@example.com invited you" in body
    assert smtp_server.logins == ["\0grantwire\0mail-secret"]
