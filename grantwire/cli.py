"""`grantwire` — one command line for services, jobs and operator tools.

Each subcommand imports its service lazily, so `grantwire --help` stays fast and a
service's dependencies load only when that service runs.
"""

from __future__ import annotations

import typer

from grantwire import publish

app = typer.Typer(no_args_is_help=True, help="Grantwire: referral credits, granted at once.")
publish.register(app)


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
