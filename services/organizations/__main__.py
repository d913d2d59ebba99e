"""``python -m services.organizations`` (also ``grantwire serve organizations``)."""

from __future__ import annotations

import signal
import sys

import structlog

from services.organizations import SERVICE
from services.organizations.app import build
from services.organizations.domain import VERIFICATION_MODES
from services.organizations.settings import OrganizationsSettings
from shared.http import serve
from shared.logging import configure_logging


def main() -> None:
    settings = OrganizationsSettings()
    configure_logging(SERVICE, settings.log_level, settings.log_json)
    if settings.organizations_email_verification not in VERIFICATION_MODES:
        structlog.get_logger("grantwire.organizations").warning(
            "unknown email verification mode; the gate stays closed (strict)",
            value=settings.organizations_email_verification,
        )
    _, app = build(settings)
    # uvicorn re-raises SIGTERM once it has drained; by then the service stopped cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(app, settings)


if __name__ == "__main__":
    main()
