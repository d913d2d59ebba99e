"""Part 1, the yardstick: raw aio-pika on a durable quorum queue, no Grantwire code.

The publisher (this process) sends persistent messages with pipelined publisher confirms;
the consumer (its own process, as a service would be) acks each message manually with
prefetch 100. Throughput is end to end: N messages from the first publish to the last
delivery. Latency is measured at a fixed offered rate of 1,000 messages/s, from the
publish call to the delivery in the consumer (both read the system-wide monotonic clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import struct
import time
from multiprocessing.connection import Connection
from typing import Any

import aio_pika

from bench.common import Bench, latency_summary, out, spread

PREFETCH = 100
WINDOW = 256  # unconfirmed publishes in flight
BODY_BYTES = 300  # about a CloudEvent body of ours
_STAMP = struct.Struct(">q")


def _now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _queue_arguments() -> dict[str, Any]:
    return {"x-queue-type": "quorum"}


# -- the consumer process -------------------------------------------------------------------
def consumer_main(amqp_url: str, queue_name: str, pipe: Connection) -> None:
    """Serve sessions: ("expect", n, timeout) -> "ready" ... then the session's samples."""
    asyncio.run(_consume(amqp_url, queue_name, pipe))


async def _consume(amqp_url: str, queue_name: str, pipe: Connection) -> None:
    connection = await aio_pika.connect_robust(amqp_url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    queue = await channel.declare_queue(queue_name, durable=True, arguments=_queue_arguments())
    state: dict[str, Any] = {"expected": 0, "latencies": [], "first": 0, "last": 0}
    done = asyncio.Event()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        now = _now_ns()
        (sent,) = _STAMP.unpack_from(message.body)
        await message.ack()
        latencies: list[float] = state["latencies"]
        if not latencies:
            state["first"] = now
        latencies.append((now - sent) / 1e6)
        state["last"] = now
        if len(latencies) >= state["expected"]:
            done.set()

    await queue.consume(on_message)
    loop = asyncio.get_running_loop()
    try:
        while True:
            command = await loop.run_in_executor(None, pipe.recv)
            if command[0] == "stop":
                break
            _, expected, timeout = command
            state.update(expected=expected, latencies=[], first=0, last=0)
            done.clear()
            pipe.send("ready")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout)
            pipe.send(
                {"latencies": state["latencies"], "first": state["first"], "last": state["last"]}
            )
    finally:
        await connection.close()


class ConsumerProcess:
    def __init__(self, amqp_url: str, queue_name: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(
            target=consumer_main, args=(amqp_url, queue_name, child), daemon=True
        )
        self._process.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    async def expect(self, n: int, timeout: float) -> None:
        self._pipe.send(("expect", n, timeout))
        if not await asyncio.to_thread(self._pipe.poll, 30.0):
            raise TimeoutError("the baseline consumer did not start")
        assert self._pipe.recv() == "ready"

    async def result(self, timeout: float) -> dict[str, Any]:
        if not await asyncio.to_thread(self._pipe.poll, timeout + 10):
            raise TimeoutError("the baseline consumer sent no result")
        result: dict[str, Any] = self._pipe.recv()
        return result

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._pipe.send(("stop",))
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)


# -- the publisher (this process) --------------------------------------------------------------
class RawPublisher:
    def __init__(self, channel: aio_pika.abc.AbstractChannel, queue_name: str) -> None:
        self._exchange = channel.default_exchange
        self._queue_name = queue_name
        self._slots = asyncio.Semaphore(WINDOW)
        self._tasks: set[asyncio.Task[None]] = set()
        self._padding = b"x" * (BODY_BYTES - _STAMP.size)
        self.errors = 0

    async def send(self) -> None:
        await self._slots.acquire()
        body = _STAMP.pack(_now_ns()) + self._padding
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        task = asyncio.create_task(self._publish(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, message: aio_pika.Message) -> None:
        try:
            await self._exchange.publish(message, routing_key=self._queue_name)
        except Exception:
            self.errors += 1
        finally:
            self._slots.release()

    async def drain(self, timeout: float) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)


async def _throughput_run(
    publisher: RawPublisher, consumer: ConsumerProcess, n: int, timeout: float
) -> dict[str, Any]:
    await consumer.expect(n, timeout)
    started = _now_ns()
    for _ in range(n):
        await publisher.send()
    await publisher.drain(timeout)
    published = _now_ns()
    result = await consumer.result(timeout)
    received = len(result["latencies"])
    elapsed_s = (result["last"] - started) / 1e9 if received else float("inf")
    return {
        "messages": n,
        "received": received,
        "msgs_per_s": received / elapsed_s if received == n else 0.0,
        "publish_msgs_per_s": n / ((published - started) / 1e9),
    }


async def _latency_run(
    publisher: RawPublisher, consumer: ConsumerProcess, rate: float, seconds: float
) -> dict[str, Any]:
    n = int(rate * seconds)
    await consumer.expect(n, seconds + 30)
    start = time.perf_counter()
    lag = 0.0
    for i in range(n):
        target = start + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lag = max(lag, time.perf_counter() - target)
        await publisher.send()
    await publisher.drain(30)
    result = await consumer.result(30)
    return {
        "messages": n,
        "received": len(result["latencies"]),
        "latencies_ms": result["latencies"],
        "publisher_max_lag_ms": round(lag * 1000, 2),
    }


async def run(bench: Bench) -> dict[str, Any]:
    """Throughput (median of runs) and latency at 1,000/s offered (all samples)."""
    runs = 3
    n = 5_000 if bench.quick else 20_000
    rate, seconds = 1000.0, (3.0 if bench.quick else 10.0)
    queue_name = f"bench-{bench.run_id}-baseline.quorum"
    connection = await aio_pika.connect_robust(bench.amqp_url)
    channel = await connection.channel(publisher_confirms=True)
    await channel.declare_queue(queue_name, durable=True, arguments=_queue_arguments())
    consumer = ConsumerProcess(bench.amqp_url, queue_name)
    try:
        publisher = RawPublisher(channel, queue_name)
        await _throughput_run(publisher, consumer, 1_000, 30)  # warm-up, not recorded
        throughput = []
        for i in range(runs):
            result = await _throughput_run(publisher, consumer, n, 60)
            out(
                f"  baseline run {i + 1}: {result['msgs_per_s']:,.0f} msg/s end to end "
                f"(publish side {result['publish_msgs_per_s']:,.0f}/s)"
            )
            throughput.append(result)
        latency_runs = []
        for i in range(runs):
            result = await _latency_run(publisher, consumer, rate, seconds)
            summary = latency_summary(result["latencies_ms"])
            out(
                f"  baseline latency run {i + 1} at {rate:.0f}/s: p50 {summary['p50_ms']} ms, "
                f"p99 {summary['p99_ms']} ms ({result['received']}/{result['messages']})"
            )
            latency_runs.append(result)
    finally:
        consumer.stop()
        with contextlib.suppress(Exception):
            await channel.queue_delete(queue_name)
        await connection.close()
    samples = [v for r in latency_runs for v in r["latencies_ms"]]
    lost = sum(r["messages"] - r["received"] for r in latency_runs)
    lost += sum(r["messages"] - r["received"] for r in throughput)
    return {
        "what": "raw aio-pika: persistent publish, pipelined confirms (window "
        f"{WINDOW}); separate consumer process, manual ack, prefetch {PREFETCH}; one durable "
        f"quorum queue; {BODY_BYTES}-byte bodies",
        "command": bench.figure_command("baseline"),
        "throughput_msgs_per_s": spread([r["msgs_per_s"] for r in throughput], 0),
        "messages_per_run": n,
        "publish_side_msgs_per_s": spread([r["publish_msgs_per_s"] for r in throughput], 0),
        "latency_offered_per_s": rate,
        "latency_seconds_per_run": seconds,
        "latency": latency_summary(samples),
        "latency_p99_per_run_ms": spread(
            [latency_summary(r["latencies_ms"])["p99_ms"] for r in latency_runs], 2
        ),
        "publisher_max_lag_ms": max(r["publisher_max_lag_ms"] for r in latency_runs),
        "lost_messages": lost,
        "_latency_samples_ms": samples,
    }
