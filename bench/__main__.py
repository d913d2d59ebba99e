"""`python -m bench [--part NAME ...] [--quick] [--no-profile]` (what `make bench` runs)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import traceback
from datetime import UTC, datetime
from typing import Any

from bench import report
from bench.common import Bench, machine_info, out, wait_for_quiet

PARTS = ("baseline", "pipeline", "latency", "reconcile", "dlq")
# Parts whose figure is a ratio to the raw-broker baseline measured in the same run.
NEEDS_BASELINE = {"pipeline", "latency", "dlq"}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Grantwire benchmarks on the local infrastructure (see bench/__init__.py).",
    )
    parser.add_argument(
        "--part",
        action="append",
        choices=PARTS,
        help="run only this part (repeatable); pipeline, latency and dlq also run the "
        "baseline they are compared with (not an extra latency run with --rate/--seconds). "
        "Memory is measured during pipeline and latency.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="shorter runs for development (the figures are not the issue's)",
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the py-spy run of the pipeline part"
    )
    parser.add_argument(
        "--rate",
        type=float,
        help="latency part: offered stories/s (default 200; other rates are kept as "
        "'latency@<rate>' beside the headline, not instead of it)",
    )
    parser.add_argument("--seconds", type=float, help="latency part: duration (default 60)")
    return parser.parse_args(argv)


def command_of(args: argparse.Namespace) -> str:
    plain = not (args.part or args.quick or args.no_profile or args.rate or args.seconds)
    if plain and _from_make():
        return "make bench"
    words = ["python -m bench"]
    words += [f"--part {p}" for p in args.part or []]
    words += ["--quick"] if args.quick else []
    words += ["--no-profile"] if args.no_profile else []
    words += [f"--rate {args.rate:g}"] if args.rate else []
    words += [f"--seconds {args.seconds:g}"] if args.seconds else []
    return " ".join(words)


def _from_make() -> bool:
    return "MAKELEVEL" in os.environ


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(
        quick=args.quick,
        command=command_of(args),
        profile=not args.no_profile,
        latency_rate=args.rate,
        latency_seconds=args.seconds,
    )
    chosen = list(dict.fromkeys(args.part or PARTS))
    needs = NEEDS_BASELINE - ({"latency"} if args.rate or args.seconds else set())
    if needs & set(chosen) and "baseline" not in chosen:
        chosen.insert(0, "baseline")
    chosen.sort(key=PARTS.index)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "run_id": bench.run_id,
        "stamp": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
        "command": bench.command,
        "quick": bench.quick,
        "machine": await machine_info(bench),
        "parts": {},
    }
    out(f"Grantwire bench {bench.run_id}: {', '.join(chosen)}  ({bench.command})")
    parts: dict[str, Any] = results["parts"]
    for name in chosen:
        out(f"\n== {name} ==")
        quiet = await wait_for_quiet(timeout=30.0 if not parts else 10.0)
        part_started = time.perf_counter()
        key = name
        if name == "latency" and (args.rate or args.seconds):
            key = f"latency@{args.rate or 200:g}per_s_{args.seconds or 60:g}s"
        try:
            parts[key] = await run_part(name, bench, parts.get("baseline"))
        except Exception as exc:  # one part failing must not lose the others' figures
            out("  FAILED:\n" + "".join(traceback.format_exception(exc)[-6:]))
            parts[key] = {
                "error": f"{type(exc).__name__}: {exc}"[:2000],
                "command": bench.figure_command(name),
            }
        parts[key]["machine_before"] = quiet
        parts[key]["part_seconds"] = round(time.perf_counter() - part_started, 1)
        parts[key]["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        out(f"  ({name} took {parts[key]['part_seconds']} s)")
        results["duration_s"] = round(time.perf_counter() - started, 1)
        report.write(results)  # after every part: a later failure keeps what was measured
    results["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    results["duration_s"] = round(time.perf_counter() - started, 1)
    return results


async def run_part(name: str, bench: Bench, baseline: dict[str, Any] | None) -> dict[str, Any]:
    if name == "baseline":
        from bench import baseline as part

        return await part.run(bench)
    if name == "pipeline":
        from bench import pipeline

        return await pipeline.run(bench, baseline)
    if name == "latency":
        from bench import latency

        return await latency.run(bench, baseline)
    if name == "reconcile":
        from bench import reconcile

        return await reconcile.run(bench)
    from bench import dlq

    return await dlq.run(bench, baseline)


def quiet_service_logs() -> None:
    """Seeding calls the services' use cases in this process: keep their INFO lines out."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    quiet_service_logs()
    results = asyncio.run(main_async(args))
    written = report.write(results)
    out("")
    out(report.table(report.merged_latest()))
    out("")
    for path in written:
        out(f"wrote {path}")
    out(f"total {results['duration_s']} s")
    failed = [name for name, part in results["parts"].items() if "error" in part]
    if failed:
        out(f"FAILED parts: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
