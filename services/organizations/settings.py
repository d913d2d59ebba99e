"""Configuration of the organizations service (environment variables, prefix ``GRANTWIRE_``)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from services.organizations.domain import ProvisioningPolicy, parse_domain_list
from shared.settings import ServiceSettings


class OrganizationsSettings(ServiceSettings):
    """``GRANTWIRE_ORGANIZATIONS_*`` keys configure the signup rules."""

    mongo_db: str = "grantwire_organizations"
    http_port: int = 8001
    # `strict` (default) or `off`; any other value keeps the gate closed.
    organizations_email_verification: str = "strict"
    organizations_domain_matching: bool = True
    # Comma-separated text or a JSON list, added to the built-in public providers.
    organizations_extra_public_domains: Annotated[frozenset[str], NoDecode] = frozenset()
    provision_batch_max: int = Field(
        default=64,
        ge=1,
        le=1000,
        description="most user events provisioned in one transaction (those that arrive "
        "together; 1 at low load); the prefetch bounds it too",
    )
    provision_batch_concurrency: int = Field(
        default=4,
        ge=1,
        le=64,
        description="provisioning batches in flight at once (each its own transaction)",
    )
    prefetch: int = Field(
        default=256,
        ge=1,
        description="unacked messages on the users queue: the events one batch can gather",
    )

    @field_validator("organizations_extra_public_domains", mode="before")
    @classmethod
    def _parse_domains(cls, value: Any) -> frozenset[str]:
        if isinstance(value, str) and value.strip().startswith("["):
            value = json.loads(value)
        return parse_domain_list(value)

    def policy(self) -> ProvisioningPolicy:
        return ProvisioningPolicy(
            email_verification=self.organizations_email_verification,
            domain_matching=self.organizations_domain_matching,
            extra_public_domains=self.organizations_extra_public_domains,
        )
