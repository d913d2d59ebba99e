"""`python -m services.billing`: run the billing service until SIGTERM."""

from __future__ import annotations

from services.billing import SERVICE
from services.billing.app import build
from services.billing.settings import BillingSettings
from shared.auth import require_jwt_key
from shared.http import serve
from shared.logging import configure_logging


def main() -> None:
    settings = BillingSettings()
    configure_logging(SERVICE, settings.log_level, settings.log_json)
    require_jwt_key(SERVICE, settings)  # the read API needs a key: refuse to start without one
    _runtime, app = build(settings)
    serve(app, settings)


if __name__ == "__main__":
    main()
