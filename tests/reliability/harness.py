"""What every reliability scenario shares: the system under test, the stories, settling,
the invariant check, fault bookkeeping and the one summary line per scenario.

The services run as real processes (``grantwire.system.LocalSystem``) under a private
broker namespace and database prefix; the test plays the identity service (events over
AMQP) and the users (HTTP). Everything the test does that blocks (starting, waiting for
readiness, stopping) runs in a thread, so the event loop keeps serving the TCP proxies
that the infrastructure scenario puts between the services and the servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aio_pika.abc import AbstractRobustConnection

from grantwire.asyncapi import service_runtimes
from grantwire.demo import demo_env
from grantwire.invariants import (
    DeadLetterPolicy,
    ExtraTruth,
    InvariantReport,
    Rules,
    SystemDatabases,
    check_system,
    no_dead_letters,
)
from grantwire.system import ROOT, SERVICES, LocalSystem, ServiceProcess, free_port
from shared.contracts import Event, UserEmailVerified, UserSignedUp
from shared.envelope import Envelope
from shared.mongo import create_client
from shared.publisher import ConfirmingPublisher
from shared.topology import RetryPolicy
from tests.support import Isolation

REFERRER_UNITS, REFEREE_UNITS, SIGNUP_UNITS = 1000, 500, 500
RULES = Rules(
    referral_enabled=True,
    referrer_units=REFERRER_UNITS,
    referee_units=REFEREE_UNITS,
    signup_grant_units={"free": SIGNUP_UNITS},
    verification_gate=True,
)
RETRY_DELAYS_S = (0.5, 2.0, 5.0)  # as many tiers as the defaults, so teardown finds them all
SUMMARY_LINES: list[str] = []
RESULTS_FILE = ROOT / ".infra" / "chaos" / "results.jsonl"


# -- the summary line -------------------------------------------------------------------
@dataclass
class Summary:
    """Figures of one scenario; ``line()`` is what `make chaos` prints for it."""

    scenario: str
    events_sent: int = 0
    faults: int = 0
    duplicates: int = 0
    violations: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def line(self) -> str:
        extra = ", ".join(f"{k} {v}" for k, v in self.details.items())
        return (
            f"chaos {self.scenario}: events sent {self.events_sent}, faults injected "
            f"{self.faults}, duplicates seen {self.duplicates}, invariant violations "
            f"{self.violations}, time {self.seconds:.1f} s" + (f" ({extra})" if extra else "")
        )

    def publish(self) -> None:
        """Print the line now (``-s``), keep it for the terminal summary and the results file."""
        line = self.line()
        print(f"\n{line}", flush=True)
        SUMMARY_LINES.append(line)
        RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "scenario": self.scenario,
            "events_sent": self.events_sent,
            "faults": self.faults,
            "duplicates": self.duplicates,
            "violations": self.violations,
            "seconds": round(self.seconds, 1),
            "details": self.details,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with RESULTS_FILE.open("a") as out:
            out.write(json.dumps(record, default=str) + "\n")


# -- the system under test ----------------------------------------------------------------
class ChaosSystem:
    """The three services as processes on the test's isolation, and how to hurt them."""

    def __init__(
        self,
        isolation: Isolation,
        amqp: AbstractRobustConnection,
        *,
        service_amqp_url: str | None = None,
        service_mongo_url: str | None = None,
        env: dict[str, str] | None = None,
        services: Sequence[str] = SERVICES,
    ) -> None:
        self.isolation = isolation
        self.amqp = amqp
        self.naming = isolation.naming
        self.prefix = f"t{isolation.token}"
        self.databases = SystemDatabases.with_prefix(self.prefix)
        self.mongo_url = isolation.urls.mongo_url  # the test reads the database directly
        infra = {
            "GRANTWIRE_AMQP_URL": service_amqp_url or isolation.urls.amqp_url,
            "GRANTWIRE_MONGO_URL": service_mongo_url or isolation.urls.mongo_url,
        }
        base = demo_env(infra, namespace=self.naming.namespace, database_prefix=self.prefix)
        base.update(
            {
                "GRANTWIRE_RETRY_DELAYS_S": json.dumps(list(RETRY_DELAYS_S)),
                "GRANTWIRE_SHUTDOWN_GRACE_S": "10",
                "GRANTWIRE_INVITE_RATE_LIMIT": "1000000",
                "GRANTWIRE_MAILER": "none",
                "GRANTWIRE_LOG_LEVEL": "INFO",
                "GRANTWIRE_LOG_JSON": "true",
                **(env or {}),
            }
        )
        self.logs = ROOT / ".infra" / "logs" / f"chaos-{isolation.token}"
        self.local = LocalSystem(base, logs=self.logs)
        self.services = tuple(services)
        self.replicas: list[ServiceProcess] = []
        self.http = httpx.AsyncClient(timeout=10.0)
        self.mongo = create_client(self.mongo_url, app_name="chaos-tests")
        self._publisher: ConfirmingPublisher | None = None
        for runtime in service_runtimes().values():
            isolation.track_runtime(runtime)

    # lifecycle ------------------------------------------------------------------------
    async def start(self, timeout: float = 90.0) -> None:
        for name in self.services:
            self.local[name].start()
        await asyncio.to_thread(self.local.wait_ready, timeout, self.services)
        self._publisher = await ConfirmingPublisher.open(self.amqp, self.naming.events_exchange)

    async def add_replica(self, name: str, timeout: float = 90.0) -> ServiceProcess:
        """One more process of ``name`` on the same queues and database (competing consumer)."""
        base = self.local[name]
        port = free_port()
        replica = ServiceProcess(
            name,
            port,
            {**base.env, "GRANTWIRE_HTTP_PORT": str(port)},
            self.logs / f"{name}-replica{len(self.replicas) + 1}.log",
        )
        replica.start()
        self.replicas.append(replica)
        await wait_ready_url(replica, timeout)
        return replica

    async def stop(self) -> dict[str, int | None]:
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                await self._publisher.channel.close()
        await self.http.aclose()
        await self.mongo.close()
        codes = {name: await asyncio.to_thread(self.local[name].stop) for name in self.services}
        for n, replica in enumerate(self.replicas, 1):
            codes[f"{replica.name}-replica{n}"] = await asyncio.to_thread(replica.stop)
        return codes

    def processes(self) -> list[ServiceProcess]:
        return [self.local[name] for name in self.services] + self.replicas

    # faults ---------------------------------------------------------------------------
    async def crash_and_restart(self, name: str, downtime_s: float = 0.0) -> float:
        """SIGKILL ``name`` (no drain, nothing flushed), restart it; seconds until ready."""
        started = time.monotonic()
        self.local[name].kill()
        if downtime_s:
            await asyncio.sleep(downtime_s)
        self.local.restart(name)
        await asyncio.to_thread(self.local.wait_ready, 90.0, (name,))
        return time.monotonic() - started

    # traffic --------------------------------------------------------------------------
    async def publish(self, envelope: Envelope) -> None:
        """Publish as the identity service (persistent, confirmed, mandatory)."""
        assert self._publisher is not None
        await self._publisher.publish(envelope)

    def token_for(self, user_id: str, email: str) -> str:
        import jwt

        secret = self.local["invitations"].env["GRANTWIRE_JWT_SECRET"]
        claims = {"sub": user_id, "email": email, "roles": [], "exp": time.time() + 3600}
        return jwt.encode(claims, secret, algorithm="HS256")

    def url(self, name: str) -> str:
        return self.local[name].url

    # observation ----------------------------------------------------------------------
    async def readiness(self, name: str, timeout: float = 5.0) -> int | str:
        """The status code of ``/readyz`` (the error's name when the process does not answer)."""
        try:
            response = await self.http.get(f"{self.url(name)}/readyz", timeout=timeout)
        except httpx.HTTPError as exc:
            return type(exc).__name__
        return response.status_code

    async def queue_depths(self) -> dict[str, int]:
        """Messages ready in every work queue, retry tier and dead-letter queue."""
        depths: dict[str, int] = {}
        channel = await self.amqp.channel()
        try:
            retry = RetryPolicy(RETRY_DELAYS_S)
            names: list[str] = []
            for work_queue, _ in self.isolation.tracked:
                names += [work_queue.name(self.naming), work_queue.dlq_name(self.naming)]
                names += [
                    work_queue.retry_name(self.naming, tier) for tier in range(len(retry.delays_s))
                ]
            for name in dict.fromkeys(names):
                try:
                    queue = await channel.declare_queue(name, passive=True)
                except Exception:
                    channel = await self.amqp.channel()  # a missing queue closes the channel
                    continue
                depths[name] = queue.declaration_result.message_count or 0
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        return depths

    async def messages_in_flight(self) -> dict[str, int]:
        """Messages each service holds unacked (a ready count of 0 is not idle: a blocked
        handler's messages are delivered, waiting, and not in the queue's ready count)."""
        counts: dict[str, int] = {}
        for name in self.services:
            try:
                response = await self.http.get(f"{self.url(name)}/metrics", timeout=5.0)
            except httpx.HTTPError:
                counts[name] = -1  # not answering (restarting): not idle either
                continue
            total = 0.0
            for line in response.text.splitlines():
                if line.startswith("grantwire_messages_in_flight{"):
                    total += float(line.rsplit(" ", 1)[1])
            counts[name] = int(total)
        return counts

    async def progress_marks(self) -> tuple[int, ...]:
        """Counts that move while the system still works; the last one is outbox pending."""
        marks: list[int] = []
        pending = 0
        for name in SERVICES:
            db = self.mongo[self.databases.of(name)]
            for collection in ("outbox", "dead_letters", "ledger", "users", "memberships"):
                marks.append(await db[collection].estimated_document_count())
            pending += await db["outbox"].count_documents({"status": "pending"})
        return (*marks, pending)

    async def settle(self, timeout: float, quiet_s: float = 1.5) -> float:
        """Wait until no queue holds a message and nothing changes for ``quiet_s``."""
        started = time.monotonic()
        deadline = started + timeout
        previous: tuple[int, ...] | None = None
        while time.monotonic() < deadline:
            depths = await self.queue_depths()
            marks = await self.progress_marks()
            handling = await self.messages_in_flight()
            depths.update({f"{name} (in flight)": n for name, n in handling.items()})
            idle = not any(depths.values()) and marks[-1] == 0
            if idle and marks == previous:
                self.trace(f"settled in {time.monotonic() - started:.1f}s")
                return time.monotonic() - started
            if int(time.monotonic() - started) % 10 == 0:
                busy = {k.removeprefix(self.naming.namespace): v for k, v in depths.items() if v}
                self.trace(f"settling: queues {busy}, outbox pending {marks[-1]}")
            previous = marks if idle else None
            await asyncio.sleep(quiet_s)
        busy = {k: v for k, v in (await self.queue_depths()).items() if v}
        raise AssertionError(f"the system did not settle within {timeout:.0f}s: {busy}")

    async def check(
        self,
        *,
        dead_letters_expected: DeadLetterPolicy = no_dead_letters,
        extra: ExtraTruth | None = None,
        rules: Rules = RULES,
    ) -> InvariantReport:
        return await check_system(
            self.mongo_url,
            self.databases,
            rules,
            dead_letters_expected=dead_letters_expected,
            extra=extra,
        )

    async def converge(
        self,
        timeout: float,
        *,
        dead_letters_expected: DeadLetterPolicy = no_dead_letters,
        extra: ExtraTruth | None = None,
    ) -> InvariantReport:
        """Settle, then check; while violations remain and time is left, settle again.

        The check is the proof; settling only avoids checking a system still at work.
        """
        started = time.monotonic()
        deadline = started + timeout
        while True:
            left = deadline - time.monotonic()
            with contextlib.suppress(AssertionError):
                await self.settle(max(5.0, left))
            report = await self.check(dead_letters_expected=dead_letters_expected, extra=extra)
            self.trace(
                f"converge +{time.monotonic() - started:.1f}s: {report.violations} violations "
                f"{report.finding_counts}"
            )
            if report.violations == 0 or time.monotonic() > deadline:
                return report
            await asyncio.sleep(2.0)

    def trace(self, text: str) -> None:
        """A progress line on stdout (shown with ``-s``) and in the scenario's log folder."""
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / "scenario.log").open("a") as out:
            out.write(line + "\n")

    def log_count(self, service: str, needle: str) -> int:
        """Lines of ``service``'s logs (all its lifetimes and replicas) containing ``needle``."""
        total = 0
        for path in self.logs.glob(f"{service}*.log"):
            with path.open("rb") as log:
                total += sum(line.count(needle.encode()) for line in log)
        return total

    def duplicate_deliveries(self) -> dict[str, int]:
        """Per service: deliveries of an event id it had already handled (copies, crash
        redeliveries), from its ``message handled`` log lines over all its lifetimes."""
        found: dict[str, int] = {}
        for service in SERVICES:
            handled: Counter[str] = Counter()
            for path in self.logs.glob(f"{service}*.log"):
                with path.open("rb") as log:
                    for raw in log:
                        if b'"message handled"' not in raw or b'"outcome": "handled"' not in raw:
                            continue
                        with contextlib.suppress(ValueError):
                            handled[json.loads(raw)["event_id"]] += 1
            found[service] = sum(count - 1 for count in handled.values())
        return found

    def duplicates_seen(self) -> int:
        return sum(self.duplicate_deliveries().values())

    def remove_logs(self) -> None:
        import shutil

        shutil.rmtree(self.logs, ignore_errors=True)


class LoopWatch:
    """Measures how late this process's event loop wakes up (the proxies live on it)."""

    def __init__(self, trace: Callable[[str], None], threshold_s: float = 0.5) -> None:
        self.trace = trace
        self.threshold_s = threshold_s
        self.worst_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.1)
            late = time.monotonic() - before - 0.1
            self.worst_s = max(self.worst_s, late)
            if late > self.threshold_s:
                self.trace(f"event loop {late:.2f}s late")

    async def __aenter__(self) -> LoopWatch:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def wait_ready_url(process: ServiceProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.process is not None and process.process.poll() is not None:
                raise RuntimeError(f"{process.name} exited; see {process.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{process.url}/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{process.name} on {process.url} not ready after {timeout}s")


def rss_mb(process: ServiceProcess) -> float:
    """Resident memory of a service process, in MB (from /proc)."""
    assert process.process is not None
    status = Path(f"/proc/{process.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


# -- referral stories ----------------------------------------------------------------------
@dataclass
class User:
    user_id: str
    email: str
    first_name: str


@dataclass
class Story:
    """One referral: an inviter invites a friend, who signs up with the token."""

    inviter: User
    friend: User
    verified_at_signup: bool
    invitation_id: str | None = None
    token: str | None = None


def make_stories(count: int, *, inviters: int, seed: int) -> tuple[list[User], list[Story]]:
    """``count`` stories over ``inviters`` inviters (each invites count/inviters friends).

    Names are unique per run (organizations never contend for a slug); about half of the
    friends sign up verified (organization at once), the others verify afterwards.
    """
    rng = random.Random(seed)
    tag = uuid.uuid4().hex[:6]
    people = [
        User(f"ada-{tag}-{i}", f"ada.{i}@corp{tag}{i}.example", f"Ada{tag}{i}")
        for i in range(inviters)
    ]
    stories = [
        Story(
            inviter=people[n % inviters],
            friend=User(f"grace-{tag}-{n}", f"grace.{tag}.{n}@gmail.com", f"Grace{tag}{n}"),
            verified_at_signup=rng.random() < 0.5,
        )
        for n in range(count)
    ]
    return people, stories


def signup(user: User, *, verified: bool, token: str | None = None) -> Event:
    return UserSignedUp(
        user_id=user.user_id,
        email=user.email,
        first_name=user.first_name,
        email_verified=verified,
        invite_token=token,
    )


def verified(user: User) -> Event:
    return UserEmailVerified(user_id=user.user_id)


class Driver:
    """Plays stories against a ``ChaosSystem`` at a bounded rate, before a deadline.

    ``copies``: each identity event is published that many times (same id), the extra
    copies at random moments up to ``copy_spread_s`` later, interleaved with other traffic.
    """

    def __init__(
        self,
        system: ChaosSystem,
        *,
        seed: int,
        copies: int = 1,
        copy_spread_s: float = 2.0,
        concurrency: int = 24,
    ) -> None:
        self.system = system
        self.rng = random.Random(seed)
        self.copies = copies
        self.copy_spread_s = copy_spread_s
        self.sent = 0
        self.http_calls = 0
        self.http_retries = 0
        self.http_errors: Counter[str | int] = Counter()
        self.revoked_lost = 0
        self._slots = asyncio.Semaphore(concurrency)
        self._later: set[asyncio.Task[None]] = set()

    async def send(self, event: Event, *, envelope: Envelope | None = None) -> Envelope:
        envelope = envelope or Envelope.new(event, source="identity-chaos")
        await self.system.publish(envelope)
        self.sent += 1
        for _ in range(self.copies - 1):
            delay = self.rng.uniform(0, self.copy_spread_s)
            task = asyncio.create_task(self._send_later(envelope, delay))
            self._later.add(task)
            task.add_done_callback(self._later.discard)
        return envelope

    async def _send_later(self, envelope: Envelope, delay: float) -> None:
        await asyncio.sleep(delay)
        await self.system.publish(envelope)
        self.sent += 1

    async def flush(self) -> None:
        """Wait for every scheduled copy to be published."""
        while self._later:
            await asyncio.gather(*list(self._later))

    async def paced(
        self, items: Sequence[Any], rate: float, play: Callable[[Any], Awaitable[None]]
    ) -> None:
        """Start ``play(item)`` for each item at ``rate`` per second, ``concurrency`` at once."""
        started = time.monotonic()

        async def one(n: int, item: Any) -> None:
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
            async with self._slots:
                await play(item)

        await asyncio.gather(*(one(n, item) for n, item in enumerate(items)))

    async def sign_up_inviters(self, inviters: Sequence[User], rate: float) -> None:
        async def play(user: User) -> None:
            await self.send(signup(user, verified=True))

        await self.paced(inviters, rate, play)

    async def invite(self, story: Story, deadline: float) -> None:
        """Create the story's invitation over HTTP; retry while the service is away.

        A 409 after a failed attempt means that attempt committed but its answer was lost;
        the token is only ever returned at creation, so that invitation is revoked and the
        invite created again (the revoked one can never be accepted: no credit expected).
        """
        url = f"{self.system.url('invitations')}/invitations"
        token = self.system.token_for(story.inviter.user_id, story.inviter.email)
        headers = {"Authorization": f"Bearer {token}"}
        attempts = 0
        while True:
            attempts += 1
            self.http_calls += 1
            try:
                response = await self.system.http.post(
                    url, json={"email": story.friend.email}, headers=headers
                )
                if response.status_code == 201:
                    body = response.json()
                    story.invitation_id, story.token = body["id"], body["token"]
                    return
                if response.status_code == 409 and attempts > 1:
                    await self._revoke_pending(story, headers)
                elif response.status_code < 500:
                    raise AssertionError(f"invite refused: {response.status_code} {response.text}")
                else:
                    self.http_errors[response.status_code] += 1
            except httpx.HTTPError as exc:
                self.http_errors[type(exc).__name__] += 1
            if time.monotonic() > deadline:
                raise AssertionError(f"could not invite {story.friend.email} before the deadline")
            self.http_retries += 1
            await asyncio.sleep(0.5)

    async def _revoke_pending(self, story: Story, headers: dict[str, str]) -> None:
        base = f"{self.system.url('invitations')}/invitations"
        listed = await self.system.http.get(base, params={"limit": 200}, headers=headers)
        for invitation in listed.json()["invitations"]:
            if invitation["email"] == story.friend.email and invitation["status"] == "pending":
                await self.system.http.delete(f"{base}/{invitation['id']}", headers=headers)
                self.revoked_lost += 1

    async def play_story(self, story: Story, deadline: float) -> None:
        if story.token is None:
            await self.invite(story, deadline)
        await self.send(signup(story.friend, verified=story.verified_at_signup, token=story.token))
        if not story.verified_at_signup:
            await asyncio.sleep(self.rng.uniform(0, 0.5))
            await self.send(verified(story.friend))

    async def play(self, stories: Sequence[Story], rate: float, deadline: float) -> None:
        await self.paced(stories, rate, lambda story: self.play_story(story, deadline))
        await self.flush()


def expected_keys(stories: Iterable[Story]) -> int:
    """Referral keys the stories must end with (both sides of each)."""
    return 2 * sum(1 for _ in stories)


async def monkey(
    system: ChaosSystem,
    schedule: Sequence[tuple[float, str]],
    *,
    rng: random.Random,
    log: list[dict[str, Any]],
) -> None:
    """Crash (SIGKILL) and restart services at the scheduled moments (seconds from now)."""
    started = time.monotonic()
    for at, name in schedule:
        await asyncio.sleep(max(0.0, started + at - time.monotonic()))
        downtime = rng.uniform(0.2, 2.0)
        back_after = await system.crash_and_restart(name, downtime)
        log.append(
            {
                "service": name,
                "at_s": round(time.monotonic() - started - back_after, 1),
                "ready_after_s": round(back_after, 1),
            }
        )


COPY_HEADER = "x-chaos-copy"


class Copier:
    """Publishes every event the services publish ``copies - 1`` more times, byte for byte
    (same id, body, properties), each copy at a random moment up to ``spread_s`` later."""

    def __init__(
        self,
        system: ChaosSystem,
        routing_keys: Sequence[str],
        *,
        copies: int = 3,
        spread_s: float = 2.0,
        seed: int = 0,
    ) -> None:
        self.system = system
        self.routing_keys = list(routing_keys)
        self.copies = copies
        self.spread_s = spread_s
        self.rng = random.Random(seed)
        self.originals = 0
        self.sent = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._channel: Any = None
        self._exchange: Any = None

    async def start(self) -> None:
        self._channel = await self.system.amqp.channel(publisher_confirms=True)
        self._exchange = await self._channel.get_exchange(self.system.naming.events_exchange)
        listen = await self.system.amqp.channel()
        queue = await listen.declare_queue(exclusive=True, auto_delete=True)
        for key in self.routing_keys:
            await queue.bind(self._exchange.name, routing_key=key)
        await queue.consume(self._on_message, no_ack=True)
        self._listen = listen

    async def _on_message(self, message: Any) -> None:
        if COPY_HEADER in (message.headers or {}):
            return
        self.originals += 1
        for n in range(1, self.copies):
            task = asyncio.create_task(self._copy(message, n, self.rng.uniform(0, self.spread_s)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _copy(self, message: Any, n: int, delay: float) -> None:
        import aio_pika

        await asyncio.sleep(delay)
        await self._exchange.publish(
            aio_pika.Message(
                message.body,
                message_id=message.message_id,
                correlation_id=message.correlation_id,
                type=message.type,
                app_id=message.app_id,
                content_type=message.content_type,
                timestamp=message.timestamp,
                headers={**(message.headers or {}), COPY_HEADER: n},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=message.routing_key or "",
        )
        self.sent += 1

    async def flush(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks))

    async def stop(self) -> None:
        await self.flush()
        for channel in (self._listen, self._channel):
            with contextlib.suppress(Exception):
                await channel.close()
