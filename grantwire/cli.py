"""`grantwire` — one command line for services, jobs and operator tools.

Each subcommand imports its service lazily, so `grantwire --help` stays fast and a
service's dependencies load only when that service runs.
"""

from __future__ import annotations

from typing import Annotated

import typer

from grantwire import dlq, publish

app = typer.Typer(no_args_is_help=True, help="Grantwire: referral credits, granted at once.")
publish.register(app)
dlq.register(app)


@app.command()
def demo() -> None:
    """Play the whole referral story on three real local service processes."""
    from grantwire import demo as story

    raise typer.Exit(story.main(keep_running=False))


@app.command()
def up() -> None:
    """Start the three services in the background (demo configuration) and print URLs."""
    from grantwire import demo as story

    raise typer.Exit(story.main(keep_running=True))


@app.command()
def docs(
    check: bool = typer.Option(False, "--check", help="fail when docs/ is not current"),
) -> None:
    """Generate docs/asyncapi.json and docs/events.md from the code."""
    from grantwire import asyncapi

    if check:
        stale = asyncapi.stale_docs()
        if stale:
            typer.echo(f"stale generated docs: {', '.join(stale)}; run `make docs`", err=True)
            raise typer.Exit(1)
        typer.echo("docs are current")
        return
    for path in asyncapi.write_docs():
        typer.echo(f"wrote {path}")


@app.command()
def token(
    sub: str = typer.Option("operator", help="user id (the token's sub)"),
    email: str = typer.Option("operator@example.com"),
    role: Annotated[
        list[str] | None, typer.Option("--role", help="e.g. admin (repeatable)")
    ] = None,
    minutes: int = typer.Option(60, min=1, max=24 * 60),
) -> None:
    """A bearer token for the APIs of the system `make up` runs (local exploration only)."""
    import os
    import time

    import jwt

    from grantwire.system import STATE

    key_file = STATE / "jwt-secret"
    secret = os.environ.get("GRANTWIRE_JWT_SECRET") or (
        key_file.read_text() if key_file.exists() else None
    )
    if not secret:
        typer.echo("no signing key: run `make up` or set GRANTWIRE_JWT_SECRET", err=True)
        raise typer.Exit(1)
    roles = role or []
    claims = {"sub": sub, "email": email, "roles": roles, "exp": int(time.time()) + 60 * minutes}
    typer.echo(jwt.encode(claims, secret, algorithm="HS256"))


@app.command()
def down() -> None:
    """Stop the services `grantwire up` started."""
    from grantwire.system import stop_saved

    stopped = stop_saved()
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.callback()
def main() -> None:
    """Grantwire command line."""


SERVICES = ("organizations", "invitations", "billing")


@app.command()
def serve(service: str = typer.Argument(..., help="organizations | invitations | billing")) -> None:
    """Run one service (its consumers, outbox relay and HTTP API) until SIGTERM."""
    if service not in SERVICES:
        raise typer.BadParameter(f"unknown service {service!r}; choose one of {SERVICES}")
    import importlib

    importlib.import_module(f"services.{service}.__main__").main()


# -- billing jobs (each also runs as a Kubernetes CronJob with the same command) ---------
def _billing_job(name: str) -> None:
    """Run a billing job from the environment; one JSON report line; exit 1 on problems."""
    import json

    from services.billing import jobs

    report = jobs.run(name)
    typer.echo(json.dumps(report.as_dict(), default=str))
    raise typer.Exit(report.exit_code)


@app.command()
def reconcile() -> None:
    """Billing safety net (daily): grant every referral side still open; exit 1 on errors."""
    _billing_job("reconcile")


@app.command()
def expire() -> None:
    """Billing: one `expiration` entry per expired topup for its unspent units (idempotent)."""
    _billing_job("expire")


@app.command()
def audit() -> None:
    """Billing: every balance equals its ledger sum, no key twice; exit 1 on any finding."""
    _billing_job("audit")


@app.command()
def preseed() -> None:
    """Billing, before the first enable: close open referral sides so old ones stay uncredited."""
    _billing_job("preseed")


_DATABASE_PREFIX = typer.Option(
    "grantwire", "--database-prefix", help="the services' databases are <prefix>_<service>"
)
_ALLOWED_POISON = typer.Option(
    [], "--allow-dead-letter-reason", help="dead letters with this reason are expected poison"
)


@app.command()
def invariants(
    database_prefix: str = _DATABASE_PREFIX,
    allow_dead_letter_reason: list[str] = _ALLOWED_POISON,
) -> None:
    """System audit across the three databases: billing's audit, every referral key exactly
    once, signup grants, outboxes drained, dead letters accounted for; exit 1 on any violation."""
    from grantwire import invariants as system

    raise typer.Exit(system.main(database_prefix, allow_dead_letter_reason))
