"""`grantwire` — one command line for services, jobs and operator tools.

Each subcommand imports its service lazily, so `grantwire --help` stays fast and a
service's dependencies load only when that service runs.
"""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="Grantwire: referral credits, granted at once.")


@app.callback()
def main() -> None:
    """Grantwire command line."""
