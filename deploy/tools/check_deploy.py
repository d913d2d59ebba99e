#!/usr/bin/env python3
"""Consistency and policy checks of deploy/ that no off-the-shelf validator knows about.

Run by deploy/validate.sh with the tools venv's python (needs PyYAML):

    check_deploy.py locks | dockerfile | compose | rabbitmq | mongo
    check_deploy.py k8s RENDERED.yaml --profile base|production
    check_deploy.py image-sim --python python3.11 --pip PIP --cache DIR

Each prints its findings and exits 1 when there is at least one. The facts the checks compare
against are read from the code where possible (event types from shared/contracts.py, the queues
and their event types from services/*/app.py, the build backend from pyproject.toml), so a code
change that needs a deploy change fails here instead of in production.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SERVICES = ("organizations", "invitations", "billing")
APP_UID = 10001
VHOST = "grantwire"
EVENTS_EXCHANGE = "grantwire.events"
DEAD_LETTER_EXCHANGE = "grantwire.dead-letters"
RETRY_TIERS = 3  # len(ServiceSettings.retry_delays_s) by default
# Who may publish each event-type prefix (the identity service is not ours, but publishes user.*).
PUBLISHER_OF_PREFIX = {
    "user": "identity",
    "organization": "organizations",
    "invitation": "invitations",
    "billing": "billing",
}
# Used only while a service's app.py (its composition root) does not exist yet.
FALLBACK_QUEUES = {
    "organizations": {"users": {"user.signed_up", "user.email_verified"}},
    "invitations": {"signups": {"user.signed_up"}},
    "billing": {
        "grants": {"invitation.accepted", "organization.provisioned", "organization.created"}
    },
}
EVENT_LOG = "grantwire.events.log"
SECRETISH = re.compile(r"(PASSWORD|SECRET|TOKEN|_KEY)$")


class Findings:
    """Collects problems; every check reports all of them, not only the first."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.items: list[str] = []
        self.notes: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def check(self, condition: object, message: str) -> None:
        if not condition:
            self.add(message)

    def note(self, message: str) -> None:
        self.notes.append(message)

    def warn(self, message: str) -> None:
        self.notes.append(f"WARNING: {message}")

    def report(self) -> int:
        for note in self.notes:
            print(f"  {note}" if note.startswith("WARNING") else f"  note: {note}")
        for item in self.items:
            print(f"  FINDING [{self.topic}]: {item}")
        if not self.items:
            print(f"  ok: {self.topic}")
        return 1 if self.items else 0


# -- facts from the code ---------------------------------------------------------------------
def contract_event_types() -> dict[str, str]:
    """``{class name: event type}`` of every event model in shared/contracts.py."""
    tree = ast.parse((REPO / "shared" / "contracts.py").read_text())
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and stmt.target.id == "event_type"
                and isinstance(stmt.value, ast.Constant)
                and isinstance(stmt.value.value, str)
            ):
                found[node.name] = stmt.value.value
    return found


def service_queues(findings: Findings) -> dict[str, dict[str, set[str]]]:
    """``{service: {purpose: {event types}}}`` from each ``WorkQueue(SERVICE, ...)`` in app.py."""
    classes = contract_event_types()
    result: dict[str, dict[str, set[str]]] = {}
    for service in SERVICES:
        app = REPO / "services" / service / "app.py"
        if not app.exists():
            findings.note(f"services/{service}/app.py not there yet: using the documented queues")
            result[service] = FALLBACK_QUEUES[service]
            continue
        queues: dict[str, set[str]] = {}
        for node in ast.walk(ast.parse(app.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "WorkQueue"
                and len(node.args) >= 3
                and isinstance(node.args[1], ast.Constant)
            ):
                continue
            types: set[str] = set()
            for element in getattr(node.args[2], "elts", []):
                if isinstance(element, ast.Attribute) and isinstance(element.value, ast.Name):
                    if element.value.id in classes:
                        types.add(classes[element.value.id])
                elif isinstance(element, ast.Constant) and isinstance(element.value, str):
                    types.add(element.value)
            queues[str(node.args[1].value)] = types
        if not queues:
            findings.note(f"no WorkQueue found in services/{service}/app.py: documented queues")
            queues = FALLBACK_QUEUES[service]
        result[service] = queues
    return result


def jwt_services() -> set[str]:
    """Services whose process refuses to start without a JWT key (``require_jwt_key`` in their
    ``__main__.py``): their HTTP APIs verify bearer tokens."""
    found = set()
    for service in SERVICES:
        main = REPO / "services" / service / "__main__.py"
        if main.exists() and "require_jwt_key(" in main.read_text():
            found.add(service)
    return found


JWT_KEYS = ("GRANTWIRE_JWT_SECRET", "GRANTWIRE_JWT_PUBLIC_KEY")


def event_log_arguments() -> dict[str, Any]:
    """The stream arguments of ``declare_event_log`` (shared/topology.py) with the default age."""
    tree = ast.parse((REPO / "shared" / "topology.py").read_text())
    max_age = "7D"
    for node in ast.walk(ast.parse((REPO / "shared" / "settings.py").read_text())):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "event_log_max_age"
            and isinstance(node.value, ast.Constant)
        ):
            max_age = node.value.value
    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncFunctionDef) and node.name == "declare_event_log":
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and any(k.arg == "arguments" for k in call.keywords):
                    arguments = next(k.value for k in call.keywords if k.arg == "arguments")
                    assert isinstance(arguments, ast.Dict)
                    result: dict[str, Any] = {}
                    for key, value in zip(arguments.keys, arguments.values, strict=True):
                        assert isinstance(key, ast.Constant)
                        result[key.value] = (
                            max_age if isinstance(value, ast.Name) else ast.literal_eval(value)
                        )
                    return result
    return {}


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value
    return values


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# -- locks -----------------------------------------------------------------------------------
def parse_lock(path: Path) -> dict[str, dict[str, Any]]:
    """``{name: {version, hashes, via}}`` of a uv/pip-compile lock with --generate-hashes."""
    packages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    in_via = False
    for raw in path.read_text().splitlines():
        line = raw.strip()
        pin = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)", raw)
        if pin:
            name = re.sub(r"[-_.]+", "-", pin.group(1)).lower()
            current = {"version": pin.group(2), "hashes": set(), "via": set()}
            packages[name] = current
            in_via = False
            continue
        if current is None:
            continue
        for digest in re.findall(r"--hash=sha256:([0-9a-f]{64})", line):
            current["hashes"].add(digest)
        if line.startswith("# via"):
            in_via = True
            rest = line[len("# via") :].strip()
            if rest:
                current["via"].add(rest)
        elif in_via and line.startswith("#   "):
            current["via"].add(line[4:].strip())
        elif not line.startswith("--hash"):
            in_via = False
    return packages


def requirement_name(requirement: str) -> str:
    name = re.split(r"[\[=<>!~;\s]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def dev_only_names() -> set[str]:
    """The top-level packages of every optional-dependency group (dev tools, SSPL mongod)."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    runtime = {requirement_name(r) for r in pyproject["project"]["dependencies"]}
    extras = pyproject["project"].get("optional-dependencies", {}).values()
    return {requirement_name(r) for group in extras for r in group} - runtime


def check_locks() -> int:
    findings = Findings("locks")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    full = parse_lock(REPO / "requirements.lock")
    runtime_path = DEPLOY / "requirements-runtime.lock"
    runtime = parse_lock(runtime_path)
    roots = {requirement_name(r) for r in pyproject["project"]["dependencies"]}
    # The runtime closure, walked through requirements.lock's "# via" annotations.
    needed = set(roots)
    changed = True
    while changed:
        changed = False
        for name, info in full.items():
            parents = {requirement_name(v) for v in info["via"]}
            if name not in needed and parents & needed:
                needed.add(name)
                changed = True
    missing, extra = needed - set(runtime), set(runtime) - needed
    findings.check(not missing, f"runtime lock lacks {sorted(missing)} (regenerate it)")
    findings.check(not extra, f"runtime lock has packages no runtime dep needs: {sorted(extra)}")
    dev_only = dev_only_names()
    for name, info in runtime.items():
        if name in dev_only:
            findings.add(f"dev-only package {name} in {runtime_path.name}")
        findings.check(info["hashes"], f"{name} has no --hash in {runtime_path.name}")
        other = full.get(name)
        if other and other["version"] != info["version"]:
            findings.add(
                f"{name} {info['version']} in the runtime lock but {other['version']} in "
                "requirements.lock: images would run other versions than the tests"
            )
        elif other and other["hashes"] != info["hashes"]:
            findings.add(f"{name}: hashes differ between the runtime lock and requirements.lock")
    build = parse_lock(DEPLOY / "requirements-build.lock")
    for requirement in pyproject["build-system"]["requires"]:
        name = requirement_name(requirement)
        wanted = requirement.split("==", 1)[1] if "==" in requirement else None
        got = build.get(name, {}).get("version")
        findings.check(got, f"build backend {name} missing from requirements-build.lock")
        if wanted and got and got != wanted:
            findings.add(f"requirements-build.lock pins {name}=={got}, pyproject wants {wanted}")
    findings.note(f"{len(runtime)} runtime packages, all hash-pinned, matching requirements.lock")
    return findings.report()


# -- Dockerfile ------------------------------------------------------------------------------
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def check_dockerfile() -> int:
    findings = Findings("dockerfile")
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = dockerfile_instructions(text)
    args = dict(
        rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest
    )
    base = args.get("PYTHON_IMAGE", "")
    match = re.fullmatch(r"python:3\.11\.(\d+)-slim-bookworm(@sha256:[0-9a-f]{64})?", base)
    findings.check(match, f"base image {base!r} is not python:3.11.<patch>-slim-bookworm[@digest]")
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    findings.check(len(froms) >= 2, "not a multi-stage build")
    findings.check(
        all(f.startswith("${PYTHON_IMAGE}") for f in froms), "every stage must use PYTHON_IMAGE"
    )
    final = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    users = [rest for keyword, rest in final if keyword == "USER"]
    findings.check(
        users and users[-1].split(":")[0] == str(APP_UID),
        f"final stage must run as uid {APP_UID} (numeric, as Kubernetes runAsUser expects)",
    )
    entry = [rest for keyword, rest in final if keyword == "ENTRYPOINT"]
    findings.check(entry and json.loads(entry[-1]) == ["grantwire"], 'ENTRYPOINT ["grantwire"]')
    health = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    findings.check(
        health and "urllib" in health[-1] and "/healthz" in health[-1],
        "HEALTHCHECK must probe /healthz with the stdlib (no curl in slim)",
    )
    env_text = " ".join(rest for keyword, rest in final if keyword == "ENV")
    for variable in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"):
        findings.check(variable in env_text, f"final stage must set {variable}")
    for keyword, rest in instructions:
        if keyword in ("ENV", "ARG"):
            for name in re.findall(r"([A-Z_][A-Z0-9_]*)=", rest):
                findings.check(
                    not SECRETISH.search(name), f"{keyword} {name}: no secrets in images"
                )
        if keyword == "COPY":
            findings.check(
                "requirements.lock" not in rest.split(),
                "the dev lock (requirements.lock, with the SSPL mongod) must never be copied",
            )
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    findings.check("-r requirements-runtime.lock" in runs, "install from the runtime lock")
    for install in re.findall(r"pip[^&;]*? install [^&;]*", runs):
        if " -r " in install:
            findings.check(
                "--require-hashes" in install, f"pip without --require-hashes: {install}"
            )
            findings.check("--no-deps" in install, f"pip without --no-deps: {install}")
    ignore = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    findings.check(ignore and ignore[0] == "*", "Dockerfile.dockerignore must be an allow-list")
    for forbidden in (".venv", ".infra", "tests", ".git", "requirements.lock"):
        findings.check(f"!{forbidden}" not in ignore, f"{forbidden} must not enter the context")
    for needed in re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M):
        findings.check(
            f"!{needed}" in ignore or needed == ".", f"COPY {needed} not allowed by dockerignore"
        )
    return findings.report()


# -- compose ---------------------------------------------------------------------------------
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


def walk_strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from walk_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk_strings(item)


def check_compose() -> int:
    findings = Findings("compose")
    path = DEPLOY / "compose.yaml"
    compose = yaml.safe_load(path.read_text())
    example = read_env_file(DEPLOY / ".env.example")
    services: dict[str, Any] = compose["services"]
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    broker_users = {user["name"] for user in definitions["users"]}
    used = {m.group(1) for s in walk_strings(compose) for m in INTERPOLATION.finditer(s)}
    for variable in sorted(used):
        findings.check(variable in example, f"${{{variable}}} is not defined in .env.example")
    for variable in example:
        if SECRETISH.search(variable) or variable.endswith("_USERNAME"):
            continue
        findings.add(f".env.example {variable}: only secrets belong there")
    for variable, value in example.items():
        if SECRETISH.search(variable):
            findings.check(
                "demo" in value or base64_has_demo(value),
                f".env.example {variable} must be an obviously fake demo value",
            )
    gitignore = DEPLOY / ".gitignore"
    findings.check(
        gitignore.exists() and ".env" in gitignore.read_text().split(),
        "deploy/.env must be git-ignored (deploy/.gitignore)",
    )
    for name, service in services.items():
        image = service.get("image", "")
        if "build" in service:
            findings.check(
                image == "grantwire:local", f"{name}: built image must be grantwire:local"
            )
        else:
            tag = image.rsplit(":", 1)[1] if ":" in image else ""
            findings.check(
                re.fullmatch(r"\d+\.\d+\.\d+(-[a-z]+)?", tag),
                f"{name}: image {image!r} must be pinned to an exact version tag",
            )
        for dependency, spec in (service.get("depends_on") or {}).items():
            findings.check(dependency in services, f"{name}: depends_on unknown {dependency}")
            findings.check(
                spec.get("condition")
                in ("service_healthy", "service_completed_successfully", "service_started"),
                f"{name}: depends_on {dependency} needs a condition",
            )
            target = services.get(dependency, {})
            if spec.get("condition") == "service_healthy":
                findings.check(
                    target.get("healthcheck") and not target["healthcheck"].get("disable"),
                    f"{name} waits for {dependency} to be healthy, which has no health check",
                )
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                findings.check((DEPLOY / source).exists(), f"{name}: mount source {source} missing")
        one_shot = service.get("restart") == "no"
        if not one_shot:
            findings.check(
                service.get("restart") == "unless-stopped", f"{name}: restart: unless-stopped"
            )
            check = service.get("healthcheck") or {}
            findings.check(check.get("test") and not check.get("disable"), f"{name}: health check")
        if "build" in service:
            findings.check(service.get("read_only") is True, f"{name}: read_only root filesystem")
            findings.check(service.get("cap_drop") == ["ALL"], f"{name}: cap_drop ALL")
            environment = service.get("environment") or {}
            findings.check(
                str(environment.get("GRANTWIRE_EVENT_LOG_ENABLED")).lower() == "false",
                f"{name}: GRANTWIRE_EVENT_LOG_ENABLED=false (the broker declares the event log)",
            )
            amqp = environment.get("GRANTWIRE_AMQP_URL", "")
            user = re.match(r"amqps?://([^:]+):", amqp)
            is_job = service.get("profiles") == ["jobs"]
            if is_job:
                findings.check(not amqp, f"{name}: jobs need MongoDB only, no broker credentials")
            else:
                findings.check(
                    user and user.group(1) in broker_users and amqp.endswith(f"/{VHOST}"),
                    f"{name}: GRANTWIRE_AMQP_URL: a definitions.json user, vhost {VHOST}",
                )
            if not one_shot:
                findings.check(service.get("stop_grace_period"), f"{name}: stop_grace_period")
    for job in ("reconcile", "expire", "audit"):
        service = services.get(job)
        findings.check(service, f"job {job} missing")
        if service:
            findings.check(service.get("profiles") == ["jobs"], f"{job}: profile jobs")
            findings.check(service.get("command") == [job], f"{job}: command [{job}]")
            environment = service.get("environment") or {}
            findings.check(
                environment.get("GRANTWIRE_MONGO_DB") == "grantwire_billing",
                f"{job} is a billing job: billing database and credentials",
            )
    for service_name in SERVICES:
        service = services.get(service_name, {})
        findings.check(service.get("command") == ["serve", service_name], f"{service_name}: serve")
        environment = service.get("environment") or {}
        findings.check(
            environment.get("GRANTWIRE_MONGO_DB") == f"grantwire_{service_name}",
            f"{service_name}: its own database",
        )
        for key in ("GRANTWIRE_AMQP_URL", "GRANTWIRE_MONGO_URL"):
            findings.check(
                f"//{service_name}:" in environment.get(key, ""),
                f"{service_name}: {key} must use its own user",
            )
        if service_name in jwt_services():
            findings.check(
                any(key in environment for key in JWT_KEYS),
                f"{service_name}: needs GRANTWIRE_JWT_SECRET or GRANTWIRE_JWT_PUBLIC_KEY "
                "(it refuses to start without one)",
            )
    mongo_command = services.get("mongo", {}).get("command", [])
    findings.check("--replSet" in mongo_command, "mongo must run as a replica set (transactions)")
    findings.check("--keyFile" in mongo_command, "mongo replica set with auth needs a keyFile")
    conf = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text()
    path_in_conf = re.search(r"^load_definitions\s*=\s*(\S+)", conf, flags=re.M)
    mounts = services.get("rabbitmq", {}).get("volumes", [])
    findings.check(
        path_in_conf and any(m.split(":")[1] == path_in_conf.group(1) for m in mounts),
        "rabbitmq.conf load_definitions must point at the mounted definitions.json",
    )
    return findings.report()


def base64_has_demo(value: str) -> bool:
    import base64
    import binascii

    try:
        return b"demo" in base64.b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return False


# -- RabbitMQ --------------------------------------------------------------------------------
def full_match(pattern: str, name: str) -> bool:
    """RabbitMQ matches permission regexes with re:run, i.e. a search (anchors are explicit)."""
    return re.search(pattern, name) is not None


def check_rabbitmq() -> int:
    findings = Findings("rabbitmq")
    sys.path.insert(0, str(DEPLOY / "rabbitmq"))
    from password_hash import matches  # the helper lives beside the definitions

    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    example = read_env_file(DEPLOY / ".env.example")
    users = {user["name"]: user for user in definitions["users"]}
    expected_users = {*SERVICES, "identity", "grantwire-ops", "grantwire-admin"}
    findings.check(
        set(users) == expected_users, f"users {sorted(users)} != {sorted(expected_users)}"
    )
    demo_password_of = {
        "organizations": "RABBITMQ_ORGANIZATIONS_PASSWORD",
        "invitations": "RABBITMQ_INVITATIONS_PASSWORD",
        "billing": "RABBITMQ_BILLING_PASSWORD",
        "identity": "RABBITMQ_IDENTITY_PASSWORD",
        "grantwire-ops": "RABBITMQ_OPS_PASSWORD",
        "grantwire-admin": "RABBITMQ_ADMIN_PASSWORD",
    }
    for name, user in users.items():
        findings.check(
            user.get("hashing_algorithm") == "rabbit_password_hashing_sha256",
            f"{name}: hashing algorithm",
        )
        variable = demo_password_of.get(name)
        if variable:
            findings.check(
                variable in example and matches(user["password_hash"], example[variable]),
                f"{name}: password_hash is not the hash of {variable} in .env.example",
            )
        if name != "grantwire-admin":
            findings.check(
                "administrator" not in user.get("tags", []), f"{name} must not be administrator"
            )
    findings.check([v["name"] for v in definitions["vhosts"]] == [VHOST], f"one vhost {VHOST}")
    exchanges = {(x["name"], x["type"], x["durable"]) for x in definitions["exchanges"]}
    findings.check(
        exchanges == {(EVENTS_EXCHANGE, "topic", True), (DEAD_LETTER_EXCHANGE, "direct", True)},
        f"exchanges must be durable topic {EVENTS_EXCHANGE} and direct {DEAD_LETTER_EXCHANGE}",
    )
    # Work queues are declared by the services (with their arguments). The event log stream is
    # the broker's: the services' users may not declare it nor bind `#` (event_log_enabled off).
    queue_names = [q["name"] for q in definitions.get("queues", [])]
    findings.check(
        queue_names == [EVENT_LOG],
        f"only {EVENT_LOG} may be pre-declared (work queues belong to the services): {queue_names}",
    )
    expected_arguments = event_log_arguments()
    for queue in definitions.get("queues", []):
        if queue["name"] == EVENT_LOG:
            findings.check(queue.get("durable") is True, f"{EVENT_LOG} must be durable")
            findings.check(
                queue.get("arguments") == expected_arguments,
                f"{EVENT_LOG} arguments {queue.get('arguments')} differ from shared/topology.py "
                f"{expected_arguments}",
            )
    bindings = [
        (b["source"], b["destination"], b["destination_type"], b["routing_key"])
        for b in definitions.get("bindings", [])
    ]
    findings.check(
        bindings == [(EVENTS_EXCHANGE, EVENT_LOG, "queue", "#")],
        f"the only binding is {EVENTS_EXCHANGE} -> {EVENT_LOG} with '#': {bindings}",
    )
    permissions = {p["user"]: p for p in definitions["permissions"] if p["vhost"] == VHOST}
    topic = {
        t["user"]: t
        for t in definitions.get("topic_permissions", [])
        if t["vhost"] == VHOST and t["exchange"] == EVENTS_EXCHANGE
    }
    for kind in ("configure", "write", "read"):
        for name, permission in permissions.items():
            try:
                re.compile(permission[kind])
            except re.error as exc:
                findings.add(f"{name} {kind} regex invalid: {exc}")
    event_types = sorted(set(contract_event_types().values()))
    findings.check(event_types, "no event types found in shared/contracts.py")
    queues = service_queues(findings)

    def allowed(user: str, kind: str, resource: str) -> bool:
        permission = permissions.get(user)
        return bool(permission) and full_match(permission[kind], resource)

    def topic_allowed(user: str, kind: str, routing_key: str) -> bool:
        permission = topic.get(user)
        # No topic permission for a user and exchange means: everything is allowed.
        return True if permission is None else full_match(permission[kind], routing_key)

    # Every publisher may publish exactly its own event types, nothing else.
    for event_type in event_types:
        owner = PUBLISHER_OF_PREFIX.get(event_type.split(".", 1)[0])
        findings.check(owner, f"event type {event_type}: no publisher known for its prefix")
        for user in (*SERVICES, "identity"):
            may = topic_allowed(user, "write", event_type)
            if user == owner:
                findings.check(may, f"{user} may not publish its own {event_type}")
            else:
                findings.check(not may, f"{user} may publish {event_type}, owned by {owner}")
        findings.check(
            topic_allowed("grantwire-ops", "write", event_type),
            f"grantwire-ops cannot replay {event_type}",
        )
    for user in (*SERVICES, "identity", "grantwire-ops"):
        findings.check(user in topic, f"{user} has no topic permission on {EVENTS_EXCHANGE}")
        for impostor in ("userx.signed_up", "x.user.signed_up", "organizations.created", "#", ""):
            if topic_allowed(user, "write", impostor) and user != "grantwire-admin":
                findings.add(f"{user} may publish with routing key {impostor!r}")
    # The operations each service performs at startup and at run time (shared/topology.py,
    # shared/consumer.py, shared/deadletters.py, shared/publisher.py).
    for service in SERVICES:
        for exchange in (EVENTS_EXCHANGE, DEAD_LETTER_EXCHANGE):
            findings.check(
                allowed(service, "configure", exchange), f"{service}: declare {exchange}"
            )
            findings.check(allowed(service, "read", exchange), f"{service}: bind from {exchange}")
            findings.check(allowed(service, "write", exchange), f"{service}: publish to {exchange}")
        findings.check(
            allowed(service, "write", "amq.default"), f"{service}: retry via default exchange"
        )
        for purpose, consumed in queues[service].items():
            work = f"{service}.{purpose}"
            names = [work, f"{work}.dlq"] + [f"{work}.retry.{n}" for n in range(RETRY_TIERS)]
            for name in names:
                for kind in ("configure", "write", "read"):
                    findings.check(allowed(service, kind, name), f"{service}: {kind} on {name}")
                for other in SERVICES:
                    if other != service:
                        for kind in ("configure", "write", "read"):
                            findings.check(
                                not allowed(other, kind, name), f"{other} may {kind} {name}"
                            )
                for outsider in ("identity", "grantwire-ops"):
                    for kind in ("configure", "read"):
                        findings.check(
                            not allowed(outsider, kind, name), f"{outsider} may {kind} {name}"
                        )
            for event_type in sorted(consumed):
                findings.check(
                    topic_allowed(service, "read", event_type),
                    f"{service} cannot bind {work} to {event_type} (topic read permission)",
                )
        for event_type in event_types:
            consumed_all = set().union(*queues[service].values())
            if event_type not in consumed_all and topic_allowed(service, "read", event_type):
                prefix = event_type.split(".", 1)[0]
                if not any(c.startswith(prefix + ".") for c in consumed_all):
                    findings.add(f"{service} may bind to {event_type}, which it does not consume")
    findings.check(allowed("identity", "write", EVENTS_EXCHANGE), "identity: publish events")
    for user in ("identity", "grantwire-ops"):
        findings.check(
            not allowed(user, "configure", EVENTS_EXCHANGE),
            f"{user} may configure (and so delete) {EVENTS_EXCHANGE}",
        )
    findings.check(allowed("grantwire-ops", "write", "amq.default"), "ops: replay to a queue")
    findings.check(allowed("grantwire-ops", "read", EVENT_LOG), f"ops: read {EVENT_LOG}")
    for user in (*SERVICES, "identity", "grantwire-ops"):
        findings.check(
            not allowed(user, "configure", EVENT_LOG), f"{user} may configure (delete) {EVENT_LOG}"
        )
        findings.check(
            not topic_allowed(user, "read", "#"), f"{user} may bind '#' (every event type)"
        )
    findings.check(allowed("grantwire-ops", "write", EVENTS_EXCHANGE), "ops: replay to exchange")
    # The operator policy: a length cap on work queues and retry tiers only. Their
    # x-overflow=reject-publish turns the cap into publisher nacks (the outbox relay retries);
    # on the dead-letter queues (default overflow drop-head) a cap would silently drop letters.
    policies = [p for p in definitions.get("parameters", []) if p["component"] == "operator_policy"]
    allowed_keys = {"max-length", "max-length-bytes", "message-ttl", "expires", "delivery-limit"}
    for policy in policies:
        value = policy["value"]
        findings.check(
            set(value["definition"]) <= allowed_keys,
            f"operator policy {policy['name']}: only {sorted(allowed_keys)} are allowed",
        )
        findings.check(
            "message-ttl" not in value["definition"] and "expires" not in value["definition"],
            f"operator policy {policy['name']}: a TTL would silently drop events",
        )
        for service in SERVICES:
            for purpose in queues[service]:
                work = f"{service}.{purpose}"
                findings.check(full_match(value["pattern"], work), f"policy misses {work}")
                findings.check(
                    full_match(value["pattern"], f"{work}.retry.0"), f"policy misses {work}.retry.0"
                )
                findings.check(
                    not full_match(value["pattern"], f"{work}.dlq"),
                    f"policy caps {work}.dlq (drop-head overflow: dead letters would be lost)",
                )
    topology = (REPO / "shared" / "topology.py").read_text()
    findings.check(
        topology.count('"x-overflow": "reject-publish"') >= 2,
        "shared/topology.py no longer declares reject-publish: revisit the operator policy",
    )
    return findings.report()


# -- MongoDB ---------------------------------------------------------------------------------
def check_mongo() -> int:
    findings = Findings("mongo")
    script = (DEPLOY / "mongo" / "initdb.d" / "10-grantwire-users.js").read_text()
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mongo_env = compose["services"]["mongo"].get("environment", {})
    ops_variable = "MONGO_INITDB_GRANTWIRE_OPS_PASSWORD"
    for service in SERVICES:
        findings.check(
            f'{service}: "grantwire_{service}"' in script, f"init script: database of {service}"
        )
        findings.check(
            f"MONGO_INITDB_{service.upper()}_PASSWORD" in mongo_env,
            f"compose mongo lacks MONGO_INITDB_{service.upper()}_PASSWORD",
        )
    findings.check(
        ops_variable in mongo_env and ops_variable in script,
        "grantwire-ops password variable",
    )
    findings.check(
        re.search(r'role: "readWrite", db: database', script), "service users: readWrite, own db"
    )
    findings.check(
        not re.search(r"readWriteAnyDatabase|dbOwner|\broot\b|dbAdminAnyDatabase", script),
        "no broad roles in the init script",
    )
    node = shutil.which("node")
    if node:
        for js in sorted((DEPLOY / "mongo").rglob("*.js")):
            result = subprocess.run([node, "--check", str(js)], capture_output=True, text=True)
            findings.check(result.returncode == 0, f"{js.name}: {result.stderr.strip()}")
    else:
        findings.note("node not found: JavaScript syntax not checked")
    return findings.report()


# -- Kubernetes ------------------------------------------------------------------------------
def pod_spec_of(doc: dict[str, Any]) -> dict[str, Any] | None:
    kind = doc.get("kind")
    if kind == "Deployment":
        return doc["spec"]["template"]["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def check_k8s(rendered: Path, profile: str) -> int:
    findings = Findings(f"k8s-{profile}")
    docs = [doc for doc in yaml.safe_load_all(rendered.read_text()) if doc]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    findings.check(not by_kind.get("Secret"), "Secrets must not be in the repository")
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in by_kind.get("ConfigMap", [])}
    accounts = {a["metadata"]["name"]: a for a in by_kind.get("ServiceAccount", [])}
    for account in accounts.values():
        findings.check(
            account.get("automountServiceAccountToken") is False,
            f"ServiceAccount {account['metadata']['name']}: automountServiceAccountToken false",
        )
    namespaces = by_kind.get("Namespace", [])
    findings.check(
        namespaces
        and namespaces[0]["metadata"]["labels"].get("pod-security.kubernetes.io/enforce")
        == "restricted",
        "namespace must enforce Pod Security 'restricted'",
    )
    hpas = {
        h["spec"]["scaleTargetRef"]["name"]: h for h in by_kind.get("HorizontalPodAutoscaler", [])
    }
    pdbs = by_kind.get("PodDisruptionBudget", [])
    k8s_services = by_kind.get("Service", [])
    secret_refs: set[tuple[str, str]] = set()

    for doc in [*by_kind.get("Deployment", []), *by_kind.get("CronJob", [])]:
        kind, name = doc["kind"], doc["metadata"]["name"]
        where = f"{kind} {name}"
        pod = pod_spec_of(doc)
        assert pod is not None
        context = pod.get("securityContext", {})
        findings.check(context.get("runAsNonRoot") is True, f"{where}: runAsNonRoot")
        findings.check(
            context.get("runAsUser") == APP_UID and context.get("runAsGroup") == APP_UID,
            f"{where}: runAsUser/runAsGroup {APP_UID} (the image's user)",
        )
        findings.check(
            context.get("seccompProfile", {}).get("type") == "RuntimeDefault",
            f"{where}: seccompProfile RuntimeDefault",
        )
        findings.check(pod.get("automountServiceAccountToken") is False, f"{where}: no SA token")
        account = pod.get("serviceAccountName")
        findings.check(account in accounts, f"{where}: ServiceAccount {account} not defined")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        for container in pod["containers"]:
            cwhere = f"{where}/{container['name']}"
            image = container.get("image", "")
            pinned = re.search(r"@sha256:[0-9a-f]{64}$", image) or re.search(
                r":(\d+\.\d+\.\d+[\w.\-]*)$", image
            )
            findings.check(pinned, f"{cwhere}: image {image!r} must be a version tag or digest")
            csc = container.get("securityContext", {})
            findings.check(csc.get("readOnlyRootFilesystem") is True, f"{cwhere}: read-only root")
            findings.check(
                csc.get("allowPrivilegeEscalation") is False, f"{cwhere}: no privilege escalation"
            )
            findings.check(
                csc.get("capabilities", {}).get("drop") == ["ALL"], f"{cwhere}: drop ALL caps"
            )
            resources = container.get("resources", {})
            for section in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    findings.check(
                        resource in resources.get(section, {}),
                        f"{cwhere}: resources.{section}.{resource}",
                    )
            defined: dict[str, str] = {}
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef", {}).get("name")
                findings.check(ref in configmaps, f"{cwhere}: envFrom ConfigMap {ref} not rendered")
                defined.update(configmaps.get(ref, {}))
            for variable in container.get("env", []):
                value = variable.get("value", "")
                for reference in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value):
                    findings.check(
                        reference in defined,
                        f"{cwhere}: {variable['name']} uses $({reference}), not defined before it",
                    )
                secret = variable.get("valueFrom", {}).get("secretKeyRef")
                if secret:
                    secret_refs.add((secret["name"], secret["key"]))
                defined[variable["name"]] = value or "<from secret>"
            urls = ["GRANTWIRE_MONGO_URL"]
            if kind == "Deployment":
                urls.append("GRANTWIRE_AMQP_URL")
            else:
                findings.check(
                    "GRANTWIRE_AMQP_URL" not in defined and "AMQP_PASSWORD" not in defined,
                    f"{cwhere}: jobs need MongoDB only, no broker credentials",
                )
            for url in urls:
                findings.check(url in defined, f"{cwhere}: {url} not set")
                findings.check(
                    url not in configmaps.get("grantwire-common", {}), f"{url} in a ConfigMap"
                )
            for key, value in defined.items():
                if SECRETISH.search(key) and value != "<from secret>":
                    findings.add(f"{cwhere}: {key} must come from a Secret, not plain config")
            if profile == "production" and kind == "Deployment":
                findings.check(
                    defined.get("AMQP_SCHEME") == "amqps" and defined.get("AMQP_PORT") == "5671",
                    f"{cwhere}: production AMQP must be amqps on 5671",
                )
            if profile == "production":
                findings.check(
                    "tls=true" in defined.get("MONGO_OPTIONS", ""),
                    f"{cwhere}: production MongoDB must use tls=true",
                )
            findings.check(
                defined.get("GRANTWIRE_LOG_JSON") == "true", f"{cwhere}: GRANTWIRE_LOG_JSON=true"
            )
            findings.check(
                defined.get("GRANTWIRE_EVENT_LOG_ENABLED") == "false",
                f"{cwhere}: GRANTWIRE_EVENT_LOG_ENABLED=false (the broker owns the event log)",
            )
            if kind == "Deployment":
                service_name = container["args"][-1]
                findings.check(
                    container.get("args") == ["serve", service_name] and service_name in SERVICES,
                    f"{cwhere}: args serve <service>",
                )
                findings.check(
                    defined.get("GRANTWIRE_MONGO_DB") == f"grantwire_{service_name}",
                    f"{cwhere}: GRANTWIRE_MONGO_DB of {service_name}",
                )
                if service_name in jwt_services():
                    findings.check(
                        any(defined.get(key) == "<from secret>" for key in JWT_KEYS),
                        f"{cwhere}: GRANTWIRE_JWT_SECRET or GRANTWIRE_JWT_PUBLIC_KEY from a "
                        "Secret (the service refuses to start without a JWT key)",
                    )
                probes = {
                    probe: container.get(probe, {}).get("httpGet", {}).get("path")
                    for probe in ("livenessProbe", "readinessProbe", "startupProbe")
                }
                findings.check(
                    probes["livenessProbe"] == "/healthz", f"{cwhere}: liveness /healthz"
                )
                findings.check(
                    probes["readinessProbe"] == "/readyz", f"{cwhere}: readiness /readyz"
                )
                findings.check(probes["startupProbe"], f"{cwhere}: startupProbe")
                pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
                sleep = pre_stop.get("command", [])
                sleep_s = int(sleep[1]) if sleep[:1] == ["sleep"] and len(sleep) == 2 else 0
                findings.check(sleep_s > 0, f"{cwhere}: preStop sleep")
                drain = float(defined.get("GRANTWIRE_SHUTDOWN_GRACE_S", "20"))
                findings.check(
                    grace >= sleep_s + drain + 5,
                    f"{cwhere}: terminationGracePeriodSeconds {grace} < preStop {sleep_s} + "
                    f"drain {drain:g} + 5 s margin",
                )
                ports = [p.get("containerPort") for p in container.get("ports", [])]
                findings.check(
                    str(ports[0] if ports else "") == defined.get("GRANTWIRE_HTTP_PORT"),
                    f"{cwhere}: containerPort must equal GRANTWIRE_HTTP_PORT",
                )
                findings.check(
                    defined.get("GRANTWIRE_HTTP_HOST") == "0.0.0.0",  # noqa: S104 — in a pod
                    f"{cwhere}: GRANTWIRE_HTTP_HOST=0.0.0.0",
                )
            else:
                findings.check(
                    not any(p in container for p in ("livenessProbe", "readinessProbe")),
                    f"{cwhere}: jobs serve no HTTP, no probes",
                )
                findings.check(
                    defined.get("GRANTWIRE_MONGO_DB") == "grantwire_billing",
                    f"{cwhere}: billing jobs use the billing database",
                )
        if kind == "Deployment":
            labels = doc["spec"]["selector"]["matchLabels"]
            template_labels = doc["spec"]["template"]["metadata"]["labels"]
            findings.check(
                "replicas" not in doc["spec"], f"{where}: replicas belong to the HPA, remove them"
            )
            findings.check(
                template_labels.get("app.kubernetes.io/part-of") == "grantwire",
                f"{where}: pods need app.kubernetes.io/part-of=grantwire (NetworkPolicies)",
            )
            hpa = hpas.get(name)
            findings.check(hpa, f"{where}: no HorizontalPodAutoscaler")
            matching = [
                p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
            ]
            findings.check(matching, f"{where}: no PodDisruptionBudget")
            for pdb in matching:
                minimum = pdb["spec"].get("minAvailable")
                findings.check(isinstance(minimum, int), f"{where}: PDB minAvailable (integer)")
                if hpa and isinstance(minimum, int):
                    findings.check(
                        minimum < hpa["spec"]["minReplicas"],
                        f"{where}: PDB minAvailable {minimum} >= minReplicas "
                        f"{hpa['spec']['minReplicas']} would block every node drain",
                    )
            if hpa:
                findings.check(hpa["spec"]["minReplicas"] >= 2, f"{where}: at least 2 replicas")
                metrics = [
                    m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"
                ]
                findings.check("cpu" in metrics, f"{where}: HPA on CPU")
            findings.check(
                any(
                    s["spec"].get("selector") and s["spec"]["selector"].items() <= labels.items()
                    for s in k8s_services
                ),
                f"{where}: no Service",
            )
        if kind == "CronJob":
            spec = doc["spec"]
            job_spec = spec["jobTemplate"]["spec"]
            findings.check(
                spec.get("concurrencyPolicy") == "Forbid", f"{where}: concurrencyPolicy Forbid"
            )
            findings.check(spec.get("startingDeadlineSeconds"), f"{where}: startingDeadlineSeconds")
            findings.check("backoffLimit" in job_spec, f"{where}: backoffLimit")
            findings.check(job_spec.get("activeDeadlineSeconds"), f"{where}: activeDeadlineSeconds")
            findings.check(
                pod.get("restartPolicy") in ("Never", "OnFailure"), f"{where}: restartPolicy"
            )
            args = pod["containers"][0].get("args", [])
            if args == ["reconcile"]:
                findings.check(spec["schedule"] == "0 4 * * *", f"{where}: daily at 04:00")
            if spec["schedule"].split()[1] == "*":  # hourly
                findings.check(
                    job_spec.get("activeDeadlineSeconds", 3600) < 3600,
                    f"{where}: an hourly job must end before the next run",
                )
    jobs = {tuple(pod_spec_of(c)["containers"][0]["args"]) for c in by_kind.get("CronJob", [])}  # type: ignore[index]
    for job in ("reconcile", "expire"):
        findings.check((job,) in jobs, f"CronJob for {job} missing")
    deployments = {d["metadata"]["name"] for d in by_kind.get("Deployment", [])}
    findings.check(deployments == set(SERVICES), f"Deployments {sorted(deployments)}")
    policies = by_kind.get("NetworkPolicy", [])
    findings.check(
        any(
            p["spec"]["podSelector"] == {}
            and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress")
            and not p["spec"].get("egress")
            for p in policies
        ),
        "a default-deny NetworkPolicy (ingress and egress) is required",
    )
    egress_ports = {
        port.get("port")
        for p in policies
        for rule in p["spec"].get("egress", [])
        for port in rule.get("ports", [])
    }
    for port in (53, 5671, 5672, 27017):
        findings.check(port in egress_ports, f"egress to port {port} not allowed")
    findings.check(
        any(p["spec"].get("ingress") for p in policies), "no ingress allowed to the HTTP port"
    )
    findings.note(
        "Secrets referenced (create them out of band): "
        + ", ".join(f"{n}/{k}" for n, k in sorted(secret_refs))
    )
    return findings.report()


# -- image simulation ------------------------------------------------------------------------
def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=True, text=True, capture_output=True, **kwargs)


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def check_image_sim(python: str, pip: str, cache: Path) -> int:
    """The Dockerfile's install steps with a local CPython 3.11 (no Docker engine here)."""
    findings = Findings("image-sim")
    lock = DEPLOY / "requirements-runtime.lock"
    build_lock = DEPLOY / "requirements-build.lock"
    key = hashlib.sha256(lock.read_bytes() + build_lock.read_bytes()).hexdigest()[:16]
    venv, build = cache / f"app-{key}", cache / f"build-{key}"
    quiet = ["--disable-pip-version-check", "--no-cache-dir", "-q"]
    try:
        if not (venv / ".deps-installed").exists():
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(parents=True)
            run([python, "-m", "venv", "--without-pip", str(venv)])
            run(
                [
                    pip,
                    "--python",
                    str(venv / "bin" / "python"),
                    "install",
                    *quiet,
                    "--require-hashes",
                    "--no-deps",
                    "--only-binary=:all:",
                    "-r",
                    str(lock),
                ]
            )
            run([python, "-m", "venv", str(build)])
            run(
                [
                    str(build / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    *quiet,
                    "--require-hashes",
                    "--no-deps",
                    "--only-binary=:all:",
                    "-r",
                    str(build_lock),
                ]
            )
            (venv / ".deps-installed").touch()
        source = cache / "src"
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir()
        shutil.copy(REPO / "pyproject.toml", source)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for package in ("shared", "services", "grantwire"):
            shutil.copytree(REPO / package, source / package, ignore=ignore)
        dist = cache / "dist"
        shutil.rmtree(dist, ignore_errors=True)
        run(
            [
                str(build / "bin" / "python"),
                "-m",
                "pip",
                "wheel",
                *quiet,
                "--no-deps",
                "--no-build-isolation",
                "--wheel-dir",
                str(dist),
                str(source),
            ]
        )
        wheel = next(dist.glob("grantwire-*.whl"))
        run(
            [
                pip,
                "--python",
                str(venv / "bin" / "python"),
                "install",
                *quiet,
                "--no-deps",
                "--no-index",
                "--force-reinstall",
                str(wheel),
            ]
        )
        check = subprocess.run(
            [pip, "--python", str(venv / "bin" / "python"), "check"], capture_output=True, text=True
        )
        findings.check(check.returncode == 0, f"pip check: {check.stdout.strip()}")
        frozen = run([pip, "--python", str(venv / "bin" / "python"), "list", "--format=freeze"])
        dev_only = dev_only_names()
        for line in frozen.stdout.splitlines():
            name = requirement_name(line)
            findings.check(name not in dev_only, f"dev-only package in the image: {line}")
        env = {"PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}", "HOME": str(cache)}
        cli = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import typer.main\n"
                "from grantwire.cli import app\n"
                "print(' '.join(sorted(typer.main.get_command(app).commands)))",
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        findings.check(cli.returncode == 0, f"grantwire CLI: {cli.stderr.strip()[-500:]}")
        commands = set(cli.stdout.split())
        # Deploy manifests run these; the CLI is another team's work: a gap is a warning here.
        for command in ("serve", "reconcile", "expire", "audit", "preseed", "dlq", "publish"):
            if command not in commands:
                findings.warn(f"`grantwire {command}` does not exist in the image (yet)")
        entry = subprocess.run(
            [str(venv / "bin" / "grantwire"), "--help"], capture_output=True, text=True, env=env
        )
        findings.check(entry.returncode == 0, "the `grantwire` console script does not run")
        imports = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import importlib, sys\n"
                "for s in ('organizations', 'invitations', 'billing'):\n"
                "    try:\n"
                "        importlib.import_module(f'services.{s}.app')\n"
                "    except ModuleNotFoundError as e:\n"
                "        if e.name != f'services.{s}.app': raise\n"
                "        print(f'services.{s}.app not written yet', file=sys.stderr)\n",
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        findings.check(
            imports.returncode == 0, f"service import failed: {imports.stderr.strip()[-800:]}"
        )
        for line in imports.stderr.strip().splitlines():
            findings.note(line)
        size = directory_size(venv)
        findings.note(f"/opt/grantwire as installed: {size / 1e6:.1f} MB (bytecode included)")
    except subprocess.CalledProcessError as exc:
        findings.add(f"{' '.join(exc.cmd[:4])} ... failed: {(exc.stderr or exc.stdout)[-1500:]}")
    return findings.report()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "check", choices=["locks", "dockerfile", "compose", "rabbitmq", "mongo", "k8s", "image-sim"]
    )
    parser.add_argument("rendered", nargs="?", type=Path)
    parser.add_argument("--profile", default="base")
    parser.add_argument("--python", default="python3.11")
    parser.add_argument("--pip", default="pip")
    parser.add_argument("--cache", type=Path, default=REPO / ".infra" / "tools" / "image-sim")
    options = parser.parse_args()
    if options.check == "k8s":
        return check_k8s(options.rendered, options.profile)
    if options.check == "image-sim":
        return check_image_sim(options.python, options.pip, options.cache)
    return {
        "locks": check_locks,
        "dockerfile": check_dockerfile,
        "compose": check_compose,
        "rabbitmq": check_rabbitmq,
        "mongo": check_mongo,
    }[options.check]()


if __name__ == "__main__":
    sys.exit(main())
