"""``python -m services.invitations``: run the invitations service until SIGTERM."""

from __future__ import annotations

from services.invitations import SERVICE
from services.invitations.app import build
from services.invitations.settings import InvitationsSettings
from shared.auth import require_jwt_key
from shared.http import serve
from shared.logging import configure_logging


def main() -> None:
    settings = InvitationsSettings()
    configure_logging(SERVICE, settings.log_level, settings.log_json)
    require_jwt_key(SERVICE, settings)
    _runtime, app = build(settings)
    serve(app, settings)


if __name__ == "__main__":
    main()
