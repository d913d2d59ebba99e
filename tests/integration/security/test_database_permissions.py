"""MongoDB least privilege, on a real mongod with auth and a key file: each service's user
has readWrite on its own database only (deploy/mongo/initdb.d/10-grantwire-users.js)."""

from __future__ import annotations

import uuid

import pytest
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import OperationFailure

from services.billing.app import build as build_billing
from services.billing.settings import BillingSettings
from shared.contracts import CreditsGranted, OrganizationCreated
from shared.mongo import create_client, run_in_transaction
from tests.integration.security.conftest import (
    NAMING,
    AuthenticatedMongo,
    LeastPrivilegeBroker,
    publish_as,
    unauthorized,
)
from tests.support import EventTap, Isolation, bearer, running_service, wait_until

pytestmark = pytest.mark.integration
JWT_SECRET = "least-privilege-test-secret-of-32-bytes"


async def test_billing_user_runs_transactions_in_its_database_and_cannot_read_organizations(
    authenticated_mongo: AuthenticatedMongo,
) -> None:
    own, organizations = (
        authenticated_mongo.databases["billing"],
        authenticated_mongo.databases["organizations"],
    )
    admin = create_client(authenticated_mongo.url("admin"), app_name="tests-admin")
    billing = create_client(authenticated_mongo.url("billing"), app_name="tests-billing")
    try:
        await admin[organizations]["organizations"].insert_one({"_id": "org-secret"})
        key = uuid.uuid4().hex

        async def work(session: AsyncClientSession) -> None:
            await billing[own]["probe"].insert_one({"_id": key}, session=session)
            await billing[own]["probe_accounts"].update_one(
                {"_id": "org-a"}, {"$inc": {"balance": 1}}, upsert=True, session=session
            )

        await run_in_transaction(billing, work)
        assert await billing[own]["probe"].find_one({"_id": key}) == {"_id": key}

        with pytest.raises(OperationFailure) as read:
            await billing[organizations]["organizations"].find_one({})
        assert unauthorized(read.value), read.value.details
        with pytest.raises(OperationFailure) as write:
            await billing[organizations]["organizations"].insert_one({"_id": "forged"})
        assert unauthorized(write.value)
        with pytest.raises(OperationFailure) as users:
            await billing["admin"]["system.users"].find_one({})
        assert unauthorized(users.value)
        assert await admin[organizations]["organizations"].count_documents({}) == 1
    finally:
        await billing.close()
        await admin.close()


@pytest.mark.parametrize("service", ["organizations", "invitations", "billing"])
async def test_every_service_user_reaches_its_own_database_only(
    authenticated_mongo: AuthenticatedMongo, service: str
) -> None:
    client = create_client(authenticated_mongo.url(service), app_name=f"tests-{service}")
    try:
        for owner, database in authenticated_mongo.databases.items():
            collection = client[database]["probe"]
            if owner == service:
                await collection.insert_one({"_id": uuid.uuid4().hex})
                assert await collection.count_documents({}) >= 1
                continue
            with pytest.raises(OperationFailure) as refused:
                await collection.count_documents({})
            assert unauthorized(refused.value), (service, database)
    finally:
        await client.close()


async def test_the_billing_service_runs_with_its_least_privileged_users(
    authenticated_mongo: AuthenticatedMongo, broker: LeastPrivilegeBroker, isolation: Isolation
) -> None:
    """The real runtime as `billing` on both servers: indexes, transactions, the outbox and
    its change stream, the work queue, publishing credits; /readyz is 200."""
    settings = isolation.settings(
        BillingSettings,
        "billing",
        mongo_url=authenticated_mongo.url("billing"),
        mongo_db=authenticated_mongo.databases["billing"],
        amqp_url=broker.url("billing"),
        namespace="",
        event_log_enabled=False,
        jwt_secret=JWT_SECRET,
    )
    admin = await broker.connect("grantwire-admin")
    organizations = await broker.connect("organizations")
    try:
        tap = await EventTap.open(admin, NAMING, [CreditsGranted.event_type])
        runtime, app = build_billing(settings)
        async with running_service(runtime, app, isolation) as service:
            ready = await service.http.get("/readyz")
            assert ready.status_code == 200, ready.text
            organization = f"org-{uuid.uuid4().hex[:8]}"
            await publish_as(
                organizations, OrganizationCreated(organization_id=organization, plan_id="free")
            )
            await tap.wait_for(lambda msgs: len(msgs) >= 1)
            assert tap.of_type(CreditsGranted.event_type)[0]["organization_id"] == organization
            balance = await service.http.get(
                f"/organizations/{organization}/balance",
                headers=bearer(JWT_SECRET, "ops", roles=("admin",)),
            )
            assert balance.json()["balance"] == 500  # the free plan's signup grant

            async def outbox_drained() -> bool:
                return await runtime.db["outbox"].count_documents({"status": "pending"}) == 0

            await wait_until(outbox_drained)
            assert (await service.http.get("/readyz")).status_code == 200
    finally:
        await organizations.close()
        await admin.close()
