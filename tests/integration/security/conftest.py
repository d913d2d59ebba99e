"""Least privilege on the real servers: the deploy definitions loaded into a throwaway vhost,
and a separate authenticated mongod with one user per service.

RabbitMQ: ``deploy/rabbitmq/definitions.json`` is rewritten (vhost -> ``grantwire-test-<hex>``,
every user -> ``<user>-<hex>`` with a random password; permissions, topic permissions, the
operator policy, exchanges, the event log stream and its binding unchanged) and imported with
``rabbitmqctl import_definitions`` (works on 3.10 without the management plugin). Teardown
deletes the vhost and the users.

MongoDB: a second ``mongod`` (the binary ``deploy/local/infra.py`` finds) in a temp dir on a
free port with ``--auth --keyFile --replSet rsauth``, initiated through the localhost
exception, an admin user, then one user per service with ``readWrite`` on its own database,
as ``deploy/mongo/initdb.d/10-grantwire-users.js`` creates them. Stopped (SIGTERM, by its pid)
at the end of the session.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

from shared.contracts import Event
from shared.envelope import Envelope
from shared.publisher import ConfirmingPublisher
from shared.topology import Naming, RetryPolicy, WorkQueue, delete_work_queue
from tests.support import ROOT, InfraUrls

DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
MONGO_USERS_SCRIPT = ROOT / "deploy" / "mongo" / "initdb.d" / "10-grantwire-users.js"
NAMING = Naming("")  # the vhost isolates: real names, so the permission regexes apply as is
ORGANIZATIONS_USERS = WorkQueue("organizations", "users", ("user.signed_up", "user.email_verified"))
BILLING_GRANTS = WorkQueue(
    "billing",
    "grants",
    ("invitation.accepted", "organization.provisioned", "organization.created"),
)
REPLICA_SET = "rsauth"
DEADLINE_S = 20.0


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- RabbitMQ ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LeastPrivilegeBroker:
    """The deploy definitions in a throwaway vhost; ``url(user)`` by the definitions' names."""

    vhost: str
    host: str
    port: int
    users: dict[str, str]  # name in definitions.json -> user created for this session
    passwords: dict[str, str]  # name in definitions.json -> its random password

    def url(self, user: str) -> str:
        return (
            f"amqp://{self.users[user]}:{self.passwords[user]}@{self.host}:{self.port}/{self.vhost}"
        )

    async def connect(self, user: str) -> AbstractRobustConnection:
        return await aio_pika.connect_robust(self.url(user))


def rabbitmqctl(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args], input=stdin, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {result.stderr or result.stdout}")
    return result.stdout


def rewritten_definitions(tag: str) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """definitions.json for vhost ``grantwire-test-<tag>``: (definitions, users, passwords)."""
    password_hash = _load(DEFINITIONS.parent / "password_hash.py", "password_hash").password_hash
    definitions = json.loads(DEFINITIONS.read_text())
    vhost = f"grantwire-test-{tag}"
    users = {user["name"]: f"{user['name']}-{tag}" for user in definitions["users"]}
    passwords = {name: secrets.token_urlsafe(18) for name in users}
    for user in definitions["users"]:
        name = user["name"]
        user["name"] = users[name]
        user["password_hash"] = password_hash(passwords[name])
    for vhost_entry in definitions["vhosts"]:
        vhost_entry["name"] = vhost
    for section in ("permissions", "topic_permissions"):
        for entry in definitions[section]:
            entry["user"] = users[entry["user"]]
            entry["vhost"] = vhost
    for section in ("parameters", "policies", "queues", "exchanges", "bindings"):
        for entry in definitions[section]:
            entry["vhost"] = vhost
    return definitions, users, passwords


def _wait_for_import(vhost: str, definitions: dict[str, Any]) -> None:
    """The import is asynchronous: wait until its last part (the bindings) exists."""
    expected = len(definitions["bindings"])
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            listed = rabbitmqctl("list_bindings", "-p", vhost, "source_name", "destination_name")
            found = sum(1 for line in listed.splitlines() if line.startswith("grantwire.events\t"))
            if found >= expected:
                return
        except RuntimeError:
            pass  # the vhost is not there yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"definitions not imported into {vhost} after {DEADLINE_S} s")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def least_privilege_broker(infra: InfraUrls) -> Iterator[LeastPrivilegeBroker]:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not on PATH: the broker cannot be administered from here")
    tag = secrets.token_hex(4)
    definitions, users, passwords = rewritten_definitions(tag)
    vhost = definitions["vhosts"][0]["name"]
    url = urlsplit(infra.amqp_url)
    broker = LeastPrivilegeBroker(
        vhost, url.hostname or "127.0.0.1", url.port or 5672, users, passwords
    )
    try:
        # From standard input: the broker process may not read our temp files (3.10 has no "-").
        rabbitmqctl("import_definitions", "--format", "json", stdin=json.dumps(definitions))
        _wait_for_import(vhost, definitions)
        yield broker
    finally:
        # Concurrent: each rabbitmqctl call starts an Erlang VM (~0.5 s).
        calls = [["delete_vhost", vhost]] + [["delete_user", name] for name in users.values()]
        running = [
            subprocess.Popen(
                ["rabbitmqctl", "-q", *call], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            for call in calls
        ]
        for process in running:
            process.wait(60)


@pytest.fixture
async def broker(
    least_privilege_broker: LeastPrivilegeBroker,
) -> AsyncIterator[LeastPrivilegeBroker]:
    """The session's vhost; the work queues a test declared there are deleted after it (as the
    admin of the definitions), so every test declares them afresh with its own arguments."""
    yield least_privilege_broker
    connection = await least_privilege_broker.connect("grantwire-admin")
    try:
        channel = await connection.channel()
        for work_queue in (ORGANIZATIONS_USERS, BILLING_GRANTS):
            await delete_work_queue(channel, NAMING, work_queue, RetryPolicy())
        await channel.close()
    finally:
        await connection.close()


async def publish_as(connection: AbstractRobustConnection, event: Event) -> Envelope:
    """Publish with confirms, as the connected user, without declaring anything."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    exchange = await channel.get_exchange(NAMING.events_exchange, ensure=False)
    publisher = ConfirmingPublisher(channel, exchange)
    envelope = Envelope.new(event, source="tests")
    await publisher.publish(envelope)
    await channel.close()
    return envelope


# -- MongoDB ----------------------------------------------------------------------------
@dataclass(frozen=True)
class AuthenticatedMongo:
    """A mongod with auth and a key file; users by service name, plus ``admin``."""

    port: int
    databases: dict[str, str]  # service -> its database (from the deploy script)
    passwords: dict[str, str]  # user -> password

    def url(self, user: str) -> str:
        return (
            f"mongodb://{user}:{self.passwords[user]}@127.0.0.1:{self.port}/"
            f"?replicaSet={REPLICA_SET}&authSource=admin"
        )


def service_databases_from_deploy() -> dict[str, str]:
    """``SERVICES`` of the deploy script, checked to grant readWrite on that database only."""
    script = MONGO_USERS_SCRIPT.read_text()
    block = re.search(r"const SERVICES = \{(.*?)\};", script, flags=re.S)
    assert block, f"no SERVICES map in {MONGO_USERS_SCRIPT}"
    databases = dict(re.findall(r"(\w+):\s*\"([\w-]+)\"", block.group(1)))
    grant = 'upsertUser(service, password, [{ role: "readWrite", db: database }]);'
    assert grant in script, f"{MONGO_USERS_SCRIPT} no longer grants exactly this: {grant}"
    return databases


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_writable_primary(client: MongoClient[dict[str, Any]], log: Path) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            if client.admin.command("hello").get("isWritablePrimary"):
                return
        except PyMongoError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no writable primary after {DEADLINE_S} s; see {log}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def authenticated_mongo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthenticatedMongo]:
    infra = _load(ROOT / "deploy" / "local" / "infra.py", "grantwire_local_infra")
    binary = infra.find_mongod()
    home = tmp_path_factory.mktemp("mongod-auth")
    key_file = home / "keyfile"
    key_file.write_text(base64.b64encode(os.urandom(96)).decode())
    key_file.chmod(0o600)  # mongod refuses a key file others can read
    (home / "db").mkdir()
    log = home / "mongod.log"
    port = _free_port()
    command = [binary, "--replSet", REPLICA_SET, "--auth", "--keyFile", str(key_file)]
    command += ["--bind_ip", "127.0.0.1", "--port", str(port), "--dbpath", str(home / "db")]
    command += ["--logpath", str(log), "--wiredTigerCacheSizeGB", "0.25"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    databases = service_databases_from_deploy()
    passwords = {user: secrets.token_urlsafe(18) for user in ("admin", *databases)}
    try:
        local: MongoClient[dict[str, Any]] = MongoClient(
            "127.0.0.1",
            port,
            directConnection=True,
            serverSelectionTimeoutMS=int(DEADLINE_S * 1000),
        )
        try:
            # The localhost exception: no user yet, so initiate and create the first user.
            member = {"_id": 0, "host": f"127.0.0.1:{port}"}
            local.admin.command("replSetInitiate", {"_id": REPLICA_SET, "members": [member]})
            _wait_writable_primary(local, log)
            local.admin.command(
                "createUser",
                "admin",
                pwd=passwords["admin"],
                roles=[{"role": "root", "db": "admin"}],
            )
        finally:
            local.close()
        mongo = AuthenticatedMongo(port, databases, passwords)
        with MongoClient(mongo.url("admin"), serverSelectionTimeoutMS=10_000) as admin:
            for service, database in databases.items():
                admin.admin.command(
                    "createUser",
                    service,
                    pwd=passwords[service],
                    roles=[{"role": "readWrite", "db": database}],
                )
        yield mongo
    finally:
        process.terminate()  # our own child, by its handle
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def unauthorized(exc: OperationFailure) -> bool:
    return exc.code == 13  # Unauthorized
