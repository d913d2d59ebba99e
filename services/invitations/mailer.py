"""Invitation mail: a pluggable mailer (``log`` by default, ``smtp`` when configured).

With ``GRANTWIRE_MAILER=none`` there is no mailer: invites are still created (the inviter
shares the token) and resend answers 422.
"""

from __future__ import annotations

import asyncio
import smtplib
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from typing import Protocol

import structlog

from services.invitations.settings import InvitationsSettings

log = structlog.get_logger("grantwire.invitations.mailer")


@dataclass(frozen=True)
class InvitationMail:
    """What an invitee receives: the link with their token, who invited them, until when."""

    invitation_id: str
    to: str
    link: str
    inviter_email: str | None
    expires_at: datetime

    def subject(self) -> str:
        return "You are invited to Grantwire"

    def text(self) -> str:
        by = f"{self.inviter_email} invited you" if self.inviter_email else "You are invited"
        return (
            f"{by} to join Grantwire.\n\nSign up with this link:\n{self.link}\n\n"
            f"The invitation expires on {self.expires_at:%Y-%m-%d %H:%M} UTC.\n"
        )


class Mailer(Protocol):
    async def send_invitation(self, mail: InvitationMail) -> None:
        """Deliver the invitation or raise."""


class LogMailer:
    """Development mailer: logs the link instead of sending it."""

    async def send_invitation(self, mail: InvitationMail) -> None:
        log.info(
            "invitation mail (log mailer, not sent)",
            invitation_id=mail.invitation_id,
            to=mail.to,
            link=mail.link,
        )


class SmtpMailer:
    """Sends through an SMTP server (STARTTLS by default); the blocking client runs in a thread."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        sender: str,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = True,
        timeout_s: float = 10.0,
    ) -> None:
        self._host, self._port, self._sender = host, port, sender
        self._username, self._password = username, password
        self._starttls, self._timeout_s = starttls, timeout_s

    async def send_invitation(self, mail: InvitationMail) -> None:
        message = EmailMessage()
        message["From"] = self._sender
        message["To"] = mail.to
        message["Subject"] = mail.subject()
        message.set_content(mail.text())
        await asyncio.to_thread(self._send, message)
        log.info("invitation mail sent", invitation_id=mail.invitation_id, to=mail.to)

    def _send(self, message: EmailMessage) -> None:
        with smtplib.SMTP(self._host, self._port, timeout=self._timeout_s) as smtp:
            if self._starttls:
                smtp.starttls()
            if self._username:
                smtp.login(self._username, self._password or "")
            smtp.send_message(message)


def build_mailer(settings: InvitationsSettings) -> Mailer | None:
    """The mailer the settings ask for; None when mail is switched off."""
    kind = settings.mailer_kind()
    if kind == "none":
        return None
    if kind == "log":
        return LogMailer()
    assert settings.smtp_host is not None  # the settings validator guarantees it
    return SmtpMailer(
        host=settings.smtp_host,
        port=settings.smtp_port,
        sender=settings.smtp_from,
        username=settings.smtp_username,
        password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
        starttls=settings.smtp_starttls,
        timeout_s=settings.smtp_timeout_s,
    )
