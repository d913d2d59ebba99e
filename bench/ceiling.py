"""The pipeline's ceiling: its messages alone, with no database and no Grantwire code.

An echo process (raw aio-pika, a process of its own as billing is) takes billing's place in
the pipeline part's topology before the services start: a durable quorum queue bound to
``organization.provisioned`` on the part's events exchange, where the event-log stream
copies every event as shipped. For each event it publishes one message shaped like
billing's ``billing.credits_granted`` (persistent, mandatory, confirmed, up to the prefetch
in flight) and acks the event once the broker has confirmed the credit: billing's own order.
The bench publishes and taps exactly as in the pipeline runs (``pipeline.burst``), so the
grants/s here are what the broker, the bench's publisher and tap, and one minimal Python hop
allow before billing or MongoDB does any work: about the most the pipeline can reach on
this machine, and what the target's ratio has to be read against.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
from multiprocessing.connection import Connection
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bench.common import spread

PREFETCH = 256  # billing's shipped prefetch
WORK_QUEUE = "bench.ceiling"  # under the part's namespace
CREDIT = "billing.credits_granted"


def echo_main(amqp_url: str, exchange: str, queue: str, pipe: Connection) -> None:
    """Echo until told to stop; "ready" once consuming; its queue is deleted on the way out."""
    asyncio.run(_echo(amqp_url, exchange, queue, pipe))


def credit_body(provisioned: bytes) -> bytes:
    """The credit the echo sends for one provisioned referee (what the bench's tap reads)."""
    event = json.loads(provisioned)
    user_id: str = event["user_id"]
    return json.dumps(
        {
            "organization_id": event["organization_id"],
            "ref_id": f"referral:{user_id}:referee",
            "source": "referral",
            "amount": 500,
            "balance": 500,
            "invitation_id": "inv-" + user_id.removeprefix("referee-"),
            "side": "referee",
        }
    ).encode()


async def _echo(amqp_url: str, exchange_name: str, queue_name: str, pipe: Connection) -> None:
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        consuming = await connection.channel()
        await consuming.set_qos(prefetch_count=PREFETCH)
        publishing = await connection.channel(publisher_confirms=True, on_return_raises=True)
        events = await publishing.get_exchange(exchange_name, ensure=True)
        queue = await consuming.declare_queue(
            queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange_name, routing_key="organization.provisioned")

        async def on_message(message: AbstractIncomingMessage) -> None:
            headers = dict(message.headers or {})
            headers["cloudEvents:type"] = CREDIT
            credit = aio_pika.Message(
                credit_body(message.body),
                message_id=f"{message.message_id}-credit",
                correlation_id=message.correlation_id,
                type=CREDIT,
                content_type="application/json",
                headers=headers,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await events.publish(credit, routing_key=CREDIT, mandatory=True)
            await message.ack()

        tag = await queue.consume(on_message)
        pipe.send("ready")
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # "stop"
        await queue.cancel(tag)
        await consuming.queue_delete(queue_name)
    finally:
        await connection.close()


class EchoProcess:
    """The echo in a process of its own (spawned, as a service would be started)."""

    def __init__(self, amqp_url: str, exchange: str, queue: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(
            target=echo_main, args=(amqp_url, exchange, queue, child), daemon=True
        )
        self._process.start()

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    async def ready(self, timeout: float = 30.0) -> None:
        if not await asyncio.to_thread(self._pipe.poll, timeout):
            raise TimeoutError("the ceiling's echo process did not start")
        if self._pipe.recv() != "ready":
            raise RuntimeError("the ceiling's echo process failed to start")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._pipe.send("stop")
        self._process.join(15)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)


WHAT = (
    "the pipeline's messages alone: a raw aio-pika echo process in billing's place (quorum "
    "queue on organization.provisioned, one confirmed credits_granted-shaped publish per "
    "event, ack after the confirm, prefetch 256); the pipeline runs' publisher and tap; as "
    "shipped (the event-log stream copies every event) and without the event log; no "
    "database, no Grantwire code"
)


def summary(results: list[dict[str, Any]], baseline: float | None) -> dict[str, Any]:
    """The ceiling's figure (median of its runs) and its ratio to the raw baseline."""
    figure = spread([r["grants_per_s"] for r in results], 0)
    return {
        "grants_per_s": figure,
        "ratio_to_baseline": round(figure["median"] / baseline, 3) if baseline else None,
        "runs": results,
    }
