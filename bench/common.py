"""What every part shares: isolation, the local system, publishing, taps, stats, /proc."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from bson import ObjectId
from pymongo import AsyncMongoClient

from grantwire.demo import demo_env
from grantwire.system import LocalSystem, free_port, read_infra_env
from shared.envelope import H_TIME, Envelope
from shared.mongo import run_in_transaction
from shared.publisher import ConfirmingPublisher
from shared.topology import Naming, declare_exchanges

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LOGS = ROOT / ".infra" / "bench"
SERVICES = ("organizations", "invitations", "billing")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Billing for the pipeline and latency parts: one referee grant per story, no referrer grant.
ONE_GRANT_PER_STORY = {
    "GRANTWIRE_REFERRAL_ENABLED": "true",
    "GRANTWIRE_REFERRAL_REFERRER_UNITS": "0",
    "GRANTWIRE_REFERRAL_REFEREE_UNITS": "500",
    "GRANTWIRE_REFERRAL_EXPIRY_DAYS": "365",
}


def out(text: str = "") -> None:
    """One line of progress on stdout (the bench is a command-line tool)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


@dataclass
class Bench:
    """One `python -m bench` invocation: its id, mode, infrastructure and command."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    quick: bool = False
    command: str = "make bench"
    infra: dict[str, str] = field(default_factory=read_infra_env)
    profile: bool = True
    latency_rate: float | None = None  # stories/s of the latency part (default 200)
    latency_seconds: float | None = None  # its duration (default 60; 10 with --quick)

    @property
    def amqp_url(self) -> str:
        return self.infra["GRANTWIRE_AMQP_URL"]

    @property
    def mongo_url(self) -> str:
        return self.infra["GRANTWIRE_MONGO_URL"]

    def naming(self, part: str) -> Naming:
        return Naming(f"bench-{self.run_id}-{part}.")

    def db_prefix(self, part: str) -> str:
        return f"bench_{self.run_id}_{part}"

    def logs(self, part: str) -> Path:
        return LOGS / f"{self.run_id}-{part}"

    def figure_command(self, part: str) -> str:
        """The command that produced a part's figure, and how to run that part alone."""
        alone = self.part_command(part)
        return self.command if self.command == alone else f"{self.command} (alone: {alone})"

    def part_command(self, part: str) -> str:
        words = [f"python -m bench --part {part}"]
        if part == "latency" and self.latency_rate:
            words.append(f"--rate {self.latency_rate:g}")
        if part == "latency" and self.latency_seconds:
            words.append(f"--seconds {self.latency_seconds:g}")
        if self.quick:
            words.append("--quick")
        return " ".join(words)


# -- the services as processes ----------------------------------------------------------
def service_env(bench: Bench, part: str, **extra: str) -> dict[str, str]:
    """The demo configuration under this part's namespace and databases, plus ``extra``."""
    env = demo_env(
        bench.infra, namespace=bench.naming(part).namespace, database_prefix=bench.db_prefix(part)
    )
    env.update(ONE_GRANT_PER_STORY)
    env.update(extra)
    return env


async def start_system(
    bench: Bench,
    part: str,
    service_env_overrides: dict[str, dict[str, str]] | None = None,
    **extra: str,
) -> LocalSystem:
    """Start the three services as processes and wait until each answers ``/readyz``."""
    system = LocalSystem(
        service_env(bench, part, **extra),
        service_env=service_env_overrides or {},
        logs=bench.logs(part),
    )
    # LocalSystem prefers the services' default ports (8001-8003) when they look free; a
    # system someone else starts at the same moment may take them, and then its /readyz
    # answers for ours. Ephemeral ports do not collide like that.
    for proc in system.processes.values():
        proc.port = free_port()
        proc.env["GRANTWIRE_HTTP_PORT"] = str(proc.port)
    system.start()
    try:
        await asyncio.to_thread(system.wait_ready, 90.0)
        await asyncio.sleep(0.5)
        dead = [
            n for n, p in system.processes.items() if p.process and p.process.poll() is not None
        ]
        if dead:
            raise RuntimeError(f"services exited after start: {dead}; see {bench.logs(part)}")
    except BaseException:
        await asyncio.to_thread(system.stop)
        raise
    return system


async def stop_system(system: LocalSystem) -> dict[str, int | None]:
    return await asyncio.to_thread(system.stop)


def pids(system: LocalSystem) -> dict[str, int]:
    return {
        name: proc.process.pid
        for name, proc in system.processes.items()
        if proc.process is not None and proc.process.poll() is None
    }


# -- cleanup ------------------------------------------------------------------------------
def _work_queues() -> list[str]:
    """Names (without namespace) of every service's work queues."""
    from services.billing.app import GRANTS_QUEUE
    from services.invitations.app import SIGNUPS
    from services.organizations.app import USERS_QUEUE

    return [f"{wq.service}.{wq.purpose}" for wq in (GRANTS_QUEUE, SIGNUPS, USERS_QUEUE)]


async def cleanup_broker(connection: AbstractRobustConnection, naming: Naming) -> None:
    """Delete a part's queues (work, dead-letter, retry tiers), event log and exchanges."""
    channel = await connection.channel()
    try:
        for name in _work_queues():
            queue = f"{naming.namespace}{name}"
            for victim in (queue, f"{queue}.dlq", *(f"{queue}.retry.{n}" for n in range(5))):
                await channel.queue_delete(victim)
        await channel.queue_delete(naming.event_log)
        await channel.exchange_delete(naming.events_exchange)
        await channel.exchange_delete(naming.dead_letter_exchange)
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


async def drop_databases(mongo: AsyncMongoClient[Any], prefix: str) -> list[str]:
    dropped = [name for name in await mongo.list_database_names() if name.startswith(prefix)]
    for name in dropped:
        await mongo.drop_database(name)
    return dropped


async def cleanup_part(bench: Bench, part: str) -> None:
    """Everything a part created on the broker and in MongoDB (called in ``finally``)."""
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect_robust(bench.amqp_url)
        try:
            await cleanup_broker(connection, bench.naming(part))
        finally:
            await connection.close()
    mongo: AsyncMongoClient[Any] = AsyncMongoClient(bench.mongo_url)
    try:
        await drop_databases(mongo, bench.db_prefix(part) + "_")
    finally:
        await mongo.close()


# -- seeding with the services' own code ---------------------------------------------------------
class UseCaseDatabase:
    """What the services' use cases need from their runtime: ``db`` and ``commit``."""

    def __init__(self, client: AsyncMongoClient[Any], name: str) -> None:
        self.client = client
        self.db = client[name]

    async def commit(self, work: Callable[[Any], Awaitable[Any]]) -> Any:
        return await run_in_transaction(self.client, work)


def story_token(i: int) -> str:
    """The part of every id, email and name of story ``i`` that tells it from the others."""
    return f"s{i:06d}"


def _substitute(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, ObjectId):
        return ObjectId()
    if isinstance(value, dict):
        return {k: _substitute(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, old, new) for v in value]
    return value


async def clone_story_state(
    mongo: AsyncMongoClient[Any], databases: Sequence[str], n: int, chunk: int = 5_000
) -> int:
    """Copy what story 0's use cases wrote to stories 1..n-1 (ids and emails swapped).

    Story 0 went through the services' own code; every document that mentions its token
    is the template of the others, so their state has exactly the services' shapes. The
    outbox must be empty (seeding stages no events). Returns the documents written.
    """
    old = story_token(0)
    written = 0
    for name in databases:
        db = mongo[name]
        if await db["outbox"].count_documents({}):
            raise RuntimeError(f"seeding staged events in {name}; it must not")
        for collection in await db.list_collection_names():
            if collection in ("leases", "outbox"):
                continue
            docs = await db[collection].find({}).to_list()
            templates = [doc for doc in docs if old in repr(doc)]
            if not templates:
                continue
            batch: list[dict[str, Any]] = []
            for i in range(1, n):
                batch += [_substitute(doc, old, story_token(i)) for doc in templates]
                if len(batch) >= chunk:
                    await db[collection].insert_many(batch, ordered=False)
                    written += len(batch)
                    batch = []
            if batch:
                await db[collection].insert_many(batch, ordered=False)
                written += len(batch)
    return written


# -- publishing as another team would (persistent, confirmed, pipelined) ----------------------
class Pipelined:
    """Publishes envelopes with confirms, at most ``window`` unconfirmed at a time."""

    def __init__(self, publisher: ConfirmingPublisher, window: int = 256) -> None:
        self._publisher = publisher
        self._slots = asyncio.Semaphore(window)
        self._tasks: set[asyncio.Task[None]] = set()
        self.errors: list[BaseException] = []
        self.confirmed = 0

    @classmethod
    async def open(
        cls, connection: AbstractRobustConnection, naming: Naming, window: int = 256
    ) -> Pipelined:
        return cls(await ConfirmingPublisher.open(connection, naming.events_exchange), window)

    async def send(self, envelope: Envelope) -> None:
        """Hand one envelope to the broker; returns once it is in flight (not confirmed)."""
        await self._slots.acquire()
        task = asyncio.create_task(self._publish(envelope))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, envelope: Envelope) -> None:
        try:
            await self._publisher.publish(envelope)
            self.confirmed += 1
        except Exception as exc:
            self.errors.append(exc)
        finally:
            self._slots.release()

    async def drain(self, timeout: float = 60.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def close(self) -> None:
        await self.drain()
        with contextlib.suppress(Exception):
            await self._publisher.channel.close()


async def declare_topology(connection: AbstractRobustConnection, naming: Naming) -> None:
    channel = await connection.channel()
    await declare_exchanges(channel, naming)
    await channel.close()


async def tap_queue(
    connection: AbstractRobustConnection,
    naming: Naming,
    routing_key: str,
    on_message: Callable[[AbstractIncomingMessage], Awaitable[None]],
) -> None:
    """A private queue on the events exchange bound to ``routing_key``, consumed without acks."""
    channel = await connection.channel()
    exchange, _ = await declare_exchanges(channel, naming)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, routing_key=routing_key)
    await queue.consume(on_message, no_ack=True)


class CreditTap:
    """A private queue on ``billing.credits_granted``: first arrival time per referral.

    Keys are invitation ids of referee-side referral grants; other credits (signup
    grants) are counted, not keyed.
    """

    def __init__(self) -> None:
        self.referee: dict[str, float] = {}
        self.staged: dict[str, float] = {}  # invitation id -> billing staged it (wall clock, s)
        self.duplicates = 0
        self.other = 0
        self.total = 0
        self._watch: set[str] | None = None
        self._missing = 0
        self.done = asyncio.Event()

    @classmethod
    async def open(cls, connection: AbstractRobustConnection, naming: Naming) -> CreditTap:
        tap = cls()
        await tap_queue(connection, naming, "billing.credits_granted", tap._on_message)
        return tap

    def expect(self, invitation_ids: Iterable[str]) -> None:
        """Set ``done`` once every one of these has arrived."""
        self._watch = set(invitation_ids)
        self._missing = len(self._watch - set(self.referee))
        self.done.clear()
        if self._missing == 0:
            self.done.set()

    def missing(self) -> int:
        return self._missing

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        at = time.perf_counter()
        self.total += 1
        body = json.loads(message.body)
        if body.get("source") != "referral" or body.get("side") != "referee":
            self.other += 1
            return
        invitation_id = body["invitation_id"]
        if invitation_id in self.referee:
            self.duplicates += 1
            return
        self.referee[invitation_id] = at
        staged = staged_at(message)
        if staged is not None:
            self.staged[invitation_id] = staged
        if self._watch is not None and invitation_id in self._watch:
            self._missing -= 1
            if self._missing == 0:
                self.done.set()


def staged_at(message: AbstractIncomingMessage) -> float | None:
    """When the service staged the event (its ``ce-time``, wall clock seconds; the outbox
    keeps it to the millisecond)."""
    text = (message.headers or {}).get(H_TIME)
    if isinstance(text, bytes):
        text = text.decode()
    return datetime.fromisoformat(text).timestamp() if isinstance(text, str) else None


class ProvisionedTap:
    """A private queue on ``organization.provisioned``: per user, when organizations staged
    it (wall clock) and when it reached the bench (``time.perf_counter``)."""

    def __init__(self) -> None:
        self.staged: dict[str, float] = {}
        self.arrived: dict[str, float] = {}

    @classmethod
    async def open(cls, connection: AbstractRobustConnection, naming: Naming) -> ProvisionedTap:
        tap = cls()
        await tap_queue(connection, naming, "organization.provisioned", tap._on_message)
        return tap

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        at = time.perf_counter()
        user_id = json.loads(message.body).get("user_id")
        if user_id is None or user_id in self.arrived:
            return
        self.arrived[user_id] = at
        staged = staged_at(message)
        if staged is not None:
            self.staged[user_id] = staged


async def wait_until(
    probe: Callable[[], Awaitable[Any]], *, timeout: float, interval: float = 0.1
) -> bool:
    """Poll ``probe`` until truthy; False (never an exception) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if await probe():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)


# -- statistics -----------------------------------------------------------------------------
def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return float(sorted_values[rank - 1])


def latency_summary(values_ms: Iterable[float]) -> dict[str, Any]:
    values = sorted(values_ms)
    if not values:
        return {"samples": 0}
    return {
        "samples": len(values),
        "p50_ms": round(percentile(values, 50), 2),
        "p90_ms": round(percentile(values, 90), 2),
        "p99_ms": round(percentile(values, 99), 2),
        "p999_ms": round(percentile(values, 99.9), 2),
        "max_ms": round(values[-1], 2),
        "mean_ms": round(sum(values) / len(values), 2),
    }


def spread(values: Sequence[float], digits: int = 1) -> dict[str, Any]:
    """Median, min and max of repeated runs (the runs themselves kept too)."""
    ordered = sorted(values)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return {
        "median": round(median, digits),
        "min": round(ordered[0], digits),
        "max": round(ordered[-1], digits),
        "runs": [round(v, digits) for v in values],
    }


# -- processes (/proc) ----------------------------------------------------------------------
def proc_memory_mb(pid: int) -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident set of a process, in MB."""
    found: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mb": found.get("VmRSS", 0.0), "peak_rss_mb": found.get("VmHWM", 0.0)}


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def infra_pids() -> dict[str, int]:
    """mongod (from .infra) and the RabbitMQ node (beam.smp running rabbit)."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        found["mongod"] = int((ROOT / ".infra" / "mongod.pid").read_text().split()[0])
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes()
            if b"beam.smp" in cmdline and b"rabbit" in cmdline:
                found["rabbitmq"] = int(entry.name)
                break
    return found


class CpuMeter:
    """CPU used by named processes over a window, as cores busy (1.0 = one core)."""

    def __init__(self, named_pids: dict[str, int]) -> None:
        self._pids = dict(named_pids)
        self._start = {name: proc_cpu_s(pid) for name, pid in self._pids.items()}
        self._t0 = time.perf_counter()
        self._self0 = time.process_time()
        self._machine0 = _machine_cpu()

    def stop(self) -> dict[str, float]:
        wall = max(1e-9, time.perf_counter() - self._t0)
        used = {
            name: (proc_cpu_s(pid) - self._start[name]) / wall for name, pid in self._pids.items()
        }
        used["bench client"] = (time.process_time() - self._self0) / wall
        ours = sum(used.values())
        used["whole machine"] = (_machine_cpu()[0] - self._machine0[0]) / wall
        # Other people's processes on the machine (and the kernel): noise in every figure.
        used["everything else"] = max(0.0, used["whole machine"] - ours)
        return {name: round(value, 2) for name, value in used.items()}


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all cores from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


async def machine_busy(seconds: float = 2.0) -> float:
    """Cores busy on the whole machine over ``seconds``."""
    start = _machine_cpu()[0]
    await asyncio.sleep(seconds)
    return (_machine_cpu()[0] - start) / seconds


async def wait_for_quiet(limit_cores: float = 0.5, timeout: float = 90.0) -> dict[str, Any]:
    """Wait (bounded) until the machine is mostly idle before measuring; report what was seen."""
    started = time.monotonic()
    busy = await machine_busy()
    while busy > limit_cores and time.monotonic() - started < timeout:
        out(f"  the machine is busy ({busy:.2f} cores in use by others); waiting for quiet")
        busy = await machine_busy(5.0)
    return {
        "cores_busy_before_start": round(busy, 2),
        "waited_s": round(time.monotonic() - started, 1),
        "quiet": busy <= limit_cores,
    }


# -- the machine --------------------------------------------------------------------------------
async def machine_info(bench: Bench) -> dict[str, Any]:
    """Cores, memory, versions: what a figure depends on."""
    import aio_pika as aio_pika_module
    import pydantic
    import pymongo

    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gb": _mem_total_gb(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aio_pika": aio_pika_module.__version__,
        "pymongo": pymongo.version,
        "pydantic": pydantic.VERSION,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        **_code_version(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect_robust(bench.amqp_url)
        props = connection.transport.connection.server_properties
        info["rabbitmq"] = _text(props.get("version"))
        info["erlang"] = _text(props.get("platform"))
        await connection.close()
    with contextlib.suppress(Exception):
        mongo: AsyncMongoClient[Any] = AsyncMongoClient(bench.mongo_url)
        build = await mongo.admin.command("buildInfo")
        info["mongodb"] = f"{build['version']} (one-node replica set, wiredTiger cache 0.25 GB)"
        await mongo.close()
    from bench.hops import round_trip_cost

    info["round_trip_cost"] = await round_trip_cost(bench.mongo_url, infra_pids().get("mongod"))
    return info


def _code_version() -> dict[str, Any]:
    """The commit measured, and uncommitted changes to the code the services run."""
    import subprocess

    def git(*args: str) -> str:
        result = subprocess.run(  # noqa: S603 - fixed git arguments
            ["git", *args],  # noqa: S607 - git from PATH
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return result.stdout.rstrip("\n")

    with contextlib.suppress(Exception):
        dirty = git("status", "--porcelain", "--", "shared", "services", "grantwire")
        return {
            "commit": git("rev-parse", "--short", "HEAD").strip(),
            "uncommitted_service_code": [line[3:] for line in dirty.splitlines()],
        }
    return {}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_gb() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return 0.0
