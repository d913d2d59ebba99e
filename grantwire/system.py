"""The three services as real local processes: start, wait until ready, stop cleanly.

Used by `grantwire demo`, `grantwire up` / `grantwire down` and the end-to-end tests.
Each service is its own OS process (`python -m services.<name>`), configured only by
environment variables, logging to `.infra/logs/<name>.log`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

SERVICES = ("organizations", "invitations", "billing")
DEFAULT_PORTS = {"organizations": 8001, "invitations": 8002, "billing": 8003}
ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / ".infra" / "system"


def read_infra_env(path: Path = ROOT / ".infra" / "env") -> dict[str, str]:
    """URLs written by `make infra-up` (``KEY=VALUE`` lines)."""
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make infra-up` first")
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def free_port(preferred: int | None = None) -> int:
    """``preferred`` when it is free on 127.0.0.1, else any free port."""
    for candidate in (preferred, 0):
        if candidate is None:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError("no free port")


@dataclass
class ServiceProcess:
    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, detached: bool = False) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", f"services.{self.name}"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=detached,
        )
        log.close()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait for a clean exit; SIGKILL only past ``timeout``. Returns the code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        """SIGKILL: a crash, for tests that prove nothing is lost."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@dataclass
class LocalSystem:
    """The three services with one shared configuration."""

    base_env: dict[str, str]
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    logs: Path = ROOT / ".infra" / "logs"
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    # The demo's ports (8001-8003) when free; tests pass False: any free port, so a run
    # beside another system never binds (or reads /readyz from) the other's port.
    default_ports: bool = True

    def __post_init__(self) -> None:
        for name in SERVICES:
            port = free_port(DEFAULT_PORTS[name] if self.default_ports else None)
            env = {
                **os.environ,
                **self.base_env,
                **self.service_env.get(name, {}),
                "GRANTWIRE_HTTP_PORT": str(port),
                "PYTHONUNBUFFERED": "1",
            }
            env.setdefault("GRANTWIRE_MONGO_DB", f"grantwire_{name}")
            if "GRANTWIRE_MONGO_DB" in self.base_env:
                env["GRANTWIRE_MONGO_DB"] = f"{self.base_env['GRANTWIRE_MONGO_DB']}_{name}"
            self.processes[name] = ServiceProcess(name, port, env, self.logs / f"{name}.log")

    def __getitem__(self, name: str) -> ServiceProcess:
        return self.processes[name]

    def start(self, *, detached: bool = False) -> None:
        for process in self.processes.values():
            process.start(detached=detached)

    def restart(self, name: str) -> None:
        self.processes[name].start()

    def wait_ready(self, timeout: float = 60.0, names: tuple[str, ...] = SERVICES) -> None:
        """Block until every service answers ``/readyz`` with 200 (or fail clearly)."""
        deadline = time.monotonic() + timeout
        pending = set(names)
        with httpx.Client(timeout=2.0) as client:
            while pending:
                for name in sorted(pending):
                    proc = self.processes[name]
                    if proc.process is not None and proc.process.poll() is not None:
                        raise RuntimeError(
                            f"{name} exited with {proc.process.returncode}; see {proc.log_path}"
                        )
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(f"{proc.url}/readyz").status_code == 200:
                            pending.discard(name)
                if pending and time.monotonic() > deadline:
                    raise TimeoutError(f"not ready after {timeout}s: {sorted(pending)}")
                if pending:
                    time.sleep(0.1)

    def stop(self) -> dict[str, int | None]:
        """Stop every service with SIGTERM; returns each exit code."""
        return {name: proc.stop() for name, proc in self.processes.items()}

    def save(self) -> None:
        """Remember pids and URLs so `grantwire down` can stop a detached system."""
        STATE.mkdir(parents=True, exist_ok=True)
        state = {
            name: {"pid": proc.process.pid if proc.process else None, "url": proc.url}
            for name, proc in self.processes.items()
        }
        (STATE / "processes.json").write_text(json.dumps(state, indent=2))


def stop_saved(timeout: float = 30.0) -> list[str]:
    """Stop the processes `grantwire up` started (by pid); returns what was stopped."""
    state_file = STATE / "processes.json"
    if not state_file.exists():
        return []
    stopped = []
    for name, info in json.loads(state_file.read_text()).items():
        pid = info.get("pid")
        if not pid or not _alive(pid):
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        stopped.append(name)
    state_file.unlink()
    (STATE / "jwt-secret").unlink(missing_ok=True)
    return stopped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    return not cmdline.exists() or b"services." in cmdline.read_bytes()
