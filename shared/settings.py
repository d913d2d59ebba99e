"""Base settings: every service is configured only by environment variables."""

from __future__ import annotations

import ssl
from datetime import timedelta
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.consumer import ConsumerSettings
from shared.topology import Naming, RetryPolicy


class ServiceSettings(BaseSettings):
    """Settings every service shares (prefix ``GRANTWIRE_``)."""

    model_config = SettingsConfigDict(env_prefix="GRANTWIRE_", extra="ignore")

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    mongo_url: SecretStr = SecretStr("mongodb://127.0.0.1:27017/?replicaSet=rs0")
    mongo_db: str = ""
    namespace: str = Field(default="", description="prefix of every exchange and queue name")
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    log_level: str = "INFO"
    log_json: bool | None = None
    max_message_bytes: int = 256 * 1024
    prefetch: int = 32
    handler_timeout_s: float = 30.0
    retry_delays_s: tuple[float, ...] = (1.0, 5.0, 30.0)
    max_attempts: int = 5
    delivery_limit: int = 20
    outbox_poll_interval_s: float = 1.0
    outbox_max_backoff_s: float = 10.0
    amqp_reconnect_interval_s: float = 2.0
    outbox_sent_retention_hours: float = 72.0
    outbox_stuck_after_s: float = 60.0
    shutdown_grace_s: float = 20.0
    keep_dead_letters: bool = True
    event_log_enabled: bool = True
    event_log_max_age: str = "7D"
    dead_letter_purged_retention_days: float = 30.0

    # TLS. `amqps://` URLs use TLS with the system CAs; these add a private CA and a client
    # certificate. MongoDB: `mongo_tls` true/false overrides the URL (`?tls=true` works too).
    amqp_tls_ca_file: str | None = None
    amqp_tls_cert_file: str | None = None
    amqp_tls_key_file: str | None = None
    mongo_tls: bool | None = None
    mongo_tls_ca_file: str | None = None
    mongo_tls_cert_key_file: str | None = None

    def amqp_ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of the broker connection; None for plain `amqp://`."""
        uses_tls = self.amqp_url.get_secret_value().startswith("amqps://")
        if not uses_tls and not (self.amqp_tls_ca_file or self.amqp_tls_cert_file):
            return None
        context = ssl.create_default_context(cafile=self.amqp_tls_ca_file)
        if self.amqp_tls_cert_file:
            context.load_cert_chain(self.amqp_tls_cert_file, self.amqp_tls_key_file)
        return context

    def mongo_tls_options(self) -> dict[str, Any]:
        """Extra `AsyncMongoClient` options for TLS (empty: as the URL says)."""
        options: dict[str, Any] = {}
        if self.mongo_tls is not None:
            options["tls"] = self.mongo_tls
        if self.mongo_tls_ca_file:
            options["tlsCAFile"] = self.mongo_tls_ca_file
        if self.mongo_tls_cert_key_file:
            options["tlsCertificateKeyFile"] = self.mongo_tls_cert_key_file
        return options

    def naming(self) -> Naming:
        return Naming(self.namespace)

    def consumer_settings(self) -> ConsumerSettings:
        return ConsumerSettings(
            max_message_bytes=self.max_message_bytes,
            prefetch=self.prefetch,
            handler_timeout_s=self.handler_timeout_s,
            delivery_limit=self.delivery_limit,
            retry=RetryPolicy(self.retry_delays_s, self.max_attempts),
        )

    def sent_retention(self) -> timedelta:
        return timedelta(hours=self.outbox_sent_retention_hours)
