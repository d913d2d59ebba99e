"""py-spy around a burst, and a reading of its samples: where a service's CPU goes."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# A sample belongs to the innermost library on its stack (the event loop only when nothing
# else is there): pymongo code called by billing counts as pymongo, a socket write pymongo
# asked for counts as pymongo.
LIBRARIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("logging (structlog, rendering, writing)", ("structlog/", "logging/", "shared/logging")),
    ("MongoDB driver (pymongo, bson)", ("pymongo/", "bson/")),
    ("AMQP client (aio-pika, aiormq, pamqp)", ("aio_pika/", "aiormq/", "pamqp/")),
    ("pydantic (event models)", ("pydantic/", "pydantic_core/")),
    ("HTTP and metrics (uvicorn, prometheus)", ("prometheus_client/", "starlette/", "fastapi/")),
    ("json", ("json/",)),
    ("Grantwire code (shared/, services/)", ("shared/", "services/")),
)
EVENT_LOOP = ("asyncio/", "selectors.py")
# What the process was doing: the first activity whose entry point is on the stack.
ACTIVITIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("consumer: decode, handler, ack", ("Consumer._on_message (shared/consumer.py)",)),
    ("outbox relay: read pending, publish, mark sent", ("OutboxRelay._run (shared/outbox.py)",)),
    ("outbox change stream (wake-ups)", ("OutboxRelay._watch (shared/outbox.py)",)),
    ("dead-letter keeper", ("DeadLetterKeeper._keep (shared/deadletters.py)",)),
    ("HTTP (readyz, metrics)", ("starlette/", "fastapi/", "prometheus_client/")),
    # Driver and client code running in tasks of their own (pymongo wraps socket writes in
    # asyncio.wait_for), protocol callbacks and the loop itself: no caller on the stack.
    ("event loop: I/O callbacks and tasks without a caller frame", EVENT_LOOP),
)
# The process's entry frames (every stack has them): not a library doing work.
ROOT_FRAMES = ("(services/billing/__main__.py)", "serve (shared/http.py)", "uvicorn/")
SOCKET_WRITE = "_SelectorSocketTransport.write (asyncio/selector_events.py)"
# A thread-pool worker waiting for work shows up as a one-frame stack: not CPU.
IDLE_LEAVES = ("_worker (concurrent/futures/thread.py)",)


def available() -> bool:
    return shutil.which("py-spy") is not None or (Path(sys.executable).parent / "py-spy").exists()


def _py_spy() -> str:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else "py-spy"


class Recording:
    """``py-spy record`` of one process until ``stop`` (raw collapsed stacks)."""

    def __init__(self, pid: int, output: Path, rate: int = 100) -> None:
        self.output = output
        output.parent.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(  # noqa: S603 - py-spy from our own venv, our child's pid
            [
                _py_spy(),
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--nolineno",
                "--rate",
                str(rate),
                "--output",
                str(output),
                "--duration",
                "110",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    async def started(self) -> None:
        await asyncio.sleep(1.0)  # py-spy attaches within a few hundred ms

    async def stop(self) -> str | None:
        """Stop sampling (SIGINT writes the file); returns py-spy's error text if any."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(self._process.wait, 20)
        except subprocess.TimeoutExpired:
            self._process.kill()
            await asyncio.to_thread(self._process.wait, 5)
        stderr = b""
        if self._process.stderr is not None:
            with contextlib.suppress(Exception):
                stderr = self._process.stderr.read()
        if not self.output.exists():
            return stderr.decode(errors="replace")[-500:] or "py-spy wrote no output"
        return None


def read_samples(path: Path) -> list[tuple[list[str], int]]:
    """(frames root..leaf, count) per line of py-spy's raw (collapsed) output."""
    samples = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples.append((stack.split(";"), int(count)))
    return samples


def _library(frames: list[str]) -> str:
    for frame in reversed(frames):
        if any(root in frame for root in ROOT_FRAMES):
            continue
        for name, needles in LIBRARIES:
            if any(needle in frame for needle in needles):
                return name
    if any(needle in frame for frame in frames for needle in EVENT_LOOP):
        return "asyncio event loop"
    return "other"


def _activity(frames: list[str]) -> str:
    for name, needles in ACTIVITIES:
        if any(needle in frame for frame in frames for needle in needles):
            return name
    return "other"


def summarize(path: Path, top: int = 12) -> dict[str, Any]:
    """Shares of CPU samples by library (innermost), by activity, and the top leaves."""
    samples = [
        (frames, count) for frames, count in read_samples(path) if frames[-1] not in IDLE_LEAVES
    ]
    total = sum(count for _, count in samples)
    if total == 0:
        return {"samples": 0}
    libraries: Counter[str] = Counter()
    activities: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    socket_writes: Counter[str] = Counter()
    for frames, count in samples:
        libraries[_library(frames)] += count
        activities[_activity(frames)] += count
        leaves[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        if frames[-1] == SOCKET_WRITE:
            socket_writes[_library(frames)] += count

    def shares(counter: Counter[str], limit: int | None = None) -> list[dict[str, Any]]:
        return [
            {"what": name, "share": round(count / total, 3)}
            for name, count in counter.most_common(limit)
        ]

    return {
        "samples": total,
        "by_library": shares(libraries),
        "by_activity": shares(activities),
        "socket_write_syscalls_by_library": shares(socket_writes),
        "top_self": shares(leaves, top),
        "top_inclusive_grantwire": shares(
            Counter(
                {
                    k: v
                    for k, v in inclusive.items()
                    if ("shared/" in k or "services/" in k)
                    and not any(root in k for root in ROOT_FRAMES)
                }
            ),
            top,
        ),
    }
