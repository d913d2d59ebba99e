"""``python -m services.invitations``: run the invitations service until SIGTERM."""

from __future__ import annotations

from services.invitations import SERVICE
from services.invitations.app import build
from services.invitations.settings import InvitationsSettings
from shared.http import serve
from shared.logging import configure_logging


def main() -> None:
    settings = InvitationsSettings()
    configure_logging(SERVICE, settings.log_level, settings.log_json)
    if not settings.jwt_configured():
        # An API nobody can call is a deployment error: say so now, not on every request.
        raise SystemExit(
            "invitations: set GRANTWIRE_JWT_SECRET (HS256) or GRANTWIRE_JWT_PUBLIC_KEY (RS256)"
        )
    _runtime, app = build(settings)
    serve(app, settings)


if __name__ == "__main__":
    main()
