#!/usr/bin/env python3
"""Smoke-test a broker loaded with deploy/rabbitmq/definitions.json, as each Grantwire user.

    .venv/bin/python deploy/tools/broker_smoke.py [--host 127.0.0.1] [--port 5672]

Run it against the compose stack (`docker compose -f deploy/compose.yaml up -d rabbitmq`) or any
broker that imported the definitions. Passwords: deploy/.env if present, else the demo values of
deploy/.env.example. It declares each service's real topology with shared/topology.py, then
checks that every user can do what the code does and is refused what it must not do (publishing
another service's event types, binding to events it does not consume, touching another service's
queues, declaring the shared exchanges without owning them). Exit 1 on any unexpected outcome.
Side effects: the services' queues are declared in vhost `grantwire` (as the services do at
startup) and temporary exclusive queues are bound; test messages use routing keys no service is
bound to (`<prefix>.smoke_test`, `<service>.smoke-test`): no service ever receives one, and the
event log stream (bound to every event) keeps the `*.smoke_test` ones for its retention.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import aio_pika  # noqa: E402
from aiormq.exceptions import ChannelAccessRefused, ChannelClosed  # noqa: E402

from shared.topology import (  # noqa: E402
    Naming,
    RetryPolicy,
    WorkQueue,
    declare_event_log,
    declare_exchanges,
    declare_work_queue,
)

PASSWORD_VARIABLE = {
    "organizations": "RABBITMQ_ORGANIZATIONS_PASSWORD",
    "invitations": "RABBITMQ_INVITATIONS_PASSWORD",
    "billing": "RABBITMQ_BILLING_PASSWORD",
    "identity": "RABBITMQ_IDENTITY_PASSWORD",
    "grantwire-ops": "RABBITMQ_OPS_PASSWORD",
}
QUEUES = {
    "organizations": WorkQueue("organizations", "users", ("user.signed_up", "user.email_verified")),
    "invitations": WorkQueue("invitations", "signups", ("user.signed_up",)),
    "billing": WorkQueue(
        "billing",
        "grants",
        ("invitation.accepted", "organization.provisioned", "organization.created"),
    ),
}
NAMING = Naming("")
RETRY = RetryPolicy()


def passwords() -> dict[str, str]:
    path = REPO / "deploy" / ".env"
    if not path.exists():
        path = REPO / "deploy" / ".env.example"
    values = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return {user: values[variable] for user, variable in PASSWORD_VARIABLE.items()}


class Smoke:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.passwords = passwords()
        self.failures: list[str] = []

    async def connect(self, user: str) -> aio_pika.abc.AbstractConnection:
        url = f"amqp://{user}:{self.passwords[user]}@{self.host}:{self.port}/grantwire"
        return await aio_pika.connect(url)

    async def expect(
        self,
        user: str,
        allowed: bool,
        what: str,
        action: Callable[[aio_pika.abc.AbstractChannel], Awaitable[object]],
    ) -> None:
        connection = await self.connect(user)
        try:
            channel = await connection.channel(publisher_confirms=True)
            try:
                await action(channel)
                outcome = True
            except (ChannelAccessRefused, ChannelClosed) as exc:
                outcome = False
                detail = str(exc)
            if outcome == allowed:
                print(f"  ok   {user}: {what} -> {'allowed' if allowed else 'refused'}")
            else:
                extra = "" if outcome else f" ({detail})"
                self.failures.append(f"{user}: {what} was {'allowed' if outcome else 'refused'}")
                print(f"  FAIL {user}: {what} -> {'allowed' if outcome else 'refused'}{extra}")
        finally:
            await connection.close()

    async def run(self) -> int:
        def publish(
            exchange: str, key: str
        ) -> Callable[[aio_pika.abc.AbstractChannel], Awaitable[object]]:
            async def go(channel: aio_pika.abc.AbstractChannel) -> object:
                target = (
                    channel.default_exchange
                    if exchange == ""
                    else await channel.get_exchange(exchange, ensure=False)
                )
                return await target.publish(aio_pika.Message(b"{}"), routing_key=key)

            return go

        def bind(
            user: str, key: str
        ) -> Callable[[aio_pika.abc.AbstractChannel], Awaitable[object]]:
            # A queue in the user's own namespace, so only the topic permission can refuse.
            async def go(channel: aio_pika.abc.AbstractChannel) -> object:
                queue = await channel.declare_queue(f"{user}.smoke-test", exclusive=True)
                return await queue.bind("grantwire.events", routing_key=key)

            return go

        for service, work_queue in QUEUES.items():

            async def declare(
                channel: aio_pika.abc.AbstractChannel, work_queue: WorkQueue = work_queue
            ) -> object:
                return await declare_work_queue(channel, NAMING, work_queue, RETRY)

            await self.expect(
                service, True, f"declare {work_queue.name(NAMING)} + bindings", declare
            )
        # Publishing: own event types only (routing keys nobody is bound to: dropped).
        prefixes = {
            "organizations": "organization",
            "invitations": "invitation",
            "billing": "billing",
            "identity": "user",
        }
        for user, own in prefixes.items():
            key = f"{own}.smoke_test"
            await self.expect(user, True, f"publish {key}", publish("grantwire.events", key))
            for other in prefixes.values():
                if other != own:
                    key = f"{other}.smoke_test"
                    await self.expect(
                        user, False, f"publish {key}", publish("grantwire.events", key)
                    )
        # Retry tiers (default exchange) and dead letters (shared/consumer.py), replays
        # (grantwire dlq). Write permission is checked on the exchange, not on the queue.
        for service in QUEUES:
            probe = f"{service}.smoke-test"
            await self.expect(service, True, "publish via the default exchange", publish("", probe))
            await self.expect(
                service,
                True,
                "publish to grantwire.dead-letters",
                publish("grantwire.dead-letters", f"{probe}.dlq"),
            )
        await self.expect(
            "grantwire-ops", True, "replay to a queue", publish("", "organizations.smoke-test")
        )
        await self.expect(
            "grantwire-ops",
            True,
            "replay to grantwire.events",
            publish("grantwire.events", "invitation.smoke_test"),
        )
        await self.expect(
            "identity", False, "publish via the default exchange", publish("", "organizations.x")
        )
        # Bindings: only to consumed event types (topic read permission).
        await self.expect(
            "billing", True, "bind to organization.created", bind("billing", "organization.created")
        )
        await self.expect(
            "billing", False, "bind to user.signed_up", bind("billing", "user.signed_up")
        )
        await self.expect(
            "organizations", False, "bind to invitation.*", bind("organizations", "invitation.*")
        )

        # Other services' queues: a refused basic.get takes nothing from the queue.
        async def get_from(channel: aio_pika.abc.AbstractChannel) -> object:
            queue = await channel.get_queue("billing.grants", ensure=False)
            return await queue.get(no_ack=False, fail=False)

        await self.expect("organizations", False, "basic.get from billing.grants", get_from)
        await self.expect("identity", False, "basic.get from billing.grants", get_from)
        await self.expect("grantwire-ops", False, "basic.get from billing.grants", get_from)

        # The event log: declared by the broker (definitions), readable by operators only.
        async def log_exists(channel: aio_pika.abc.AbstractChannel) -> object:
            return await channel.get_queue("grantwire.events.log", ensure=True)  # passive

        async def declare_log(channel: aio_pika.abc.AbstractChannel) -> object:
            return await declare_event_log(channel, NAMING)

        await self.expect("grantwire-ops", True, "grantwire.events.log exists", log_exists)
        await self.expect("billing", False, "declare grantwire.events.log", declare_log)

        async def declare_shared(channel: aio_pika.abc.AbstractChannel) -> object:
            return await declare_exchanges(channel, NAMING)

        await self.expect("identity", False, "declare the shared exchanges", declare_shared)
        await self.expect("grantwire-ops", False, "declare the shared exchanges", declare_shared)
        if self.failures:
            print(f"{len(self.failures)} unexpected outcome(s)")
            return 1
        print("broker permissions behave as designed")
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5672)
    options = parser.parse_args()
    return asyncio.run(Smoke(options.host, options.port).run())


if __name__ == "__main__":
    sys.exit(main())
