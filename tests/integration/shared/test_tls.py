"""TLS options of the database and broker connections.

MongoDB: a TLS-only `mongod` with a private CA, started for this test; the service's
client connects with the CA from settings and is refused without it. RabbitMQ TLS
needs a broker listener this shared machine's broker does not have, so the broker side
checks the TLS context the settings build (CA, client certificate, verification).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import ipaddress
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pymongo.errors import ServerSelectionTimeoutError

from shared.mongo import create_client, ping
from shared.settings import ServiceSettings

pytestmark = pytest.mark.integration


def _mongod() -> str | None:
    spec = importlib.util.find_spec("fiftyone")
    if spec and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "db" / "bin" / "mongod"
        if candidate.exists():
            return str(candidate)
    return shutil.which("mongod")


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificates(folder: Path) -> tuple[Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 signed by it."""
    now = dt.datetime.now(dt.UTC)
    ca_key, server_key = _key(), _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "grantwire test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = folder / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_file = folder / "server.pem"
    server_file.write_bytes(server.public_bytes(serialization.Encoding.PEM) + _pem_key(server_key))
    return ca_file, server_file


@pytest.fixture(scope="module")
def tls_mongod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    binary = _mongod()
    if binary is None:
        pytest.fail("no mongod binary (install the dev dependencies: make install)")
    folder = tmp_path_factory.mktemp("tls-mongod")
    ca_file, server_file = _certificates(folder)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (folder / "data").mkdir()
    process = subprocess.Popen(
        [
            binary,
            "--bind_ip",
            "127.0.0.1",
            "--port",
            str(port),
            "--dbpath",
            str(folder / "data"),
            "--wiredTigerCacheSizeGB",
            "0.25",
            "--tlsMode",
            "requireTLS",
            "--tlsCertificateKeyFile",
            str(server_file),
            "--tlsCAFile",
            str(ca_file),
            "--tlsAllowConnectionsWithoutCertificates",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("TLS mongod did not start")
        time.sleep(0.05)
    yield port, ca_file
    process.terminate()
    process.wait(20)


async def test_database_connection_uses_tls_with_the_ca_from_settings(
    tls_mongod: tuple[int, Path],
) -> None:
    port, ca_file = tls_mongod
    settings = ServiceSettings(
        mongo_url=f"mongodb://127.0.0.1:{port}/?directConnection=true",  # type: ignore[arg-type]
        mongo_tls=True,
        mongo_tls_ca_file=str(ca_file),
    )
    client = create_client(
        settings.mongo_url.get_secret_value(),
        app_name="tls-test",
        timeout_ms=5_000,
        tls_options=settings.mongo_tls_options(),
    )
    try:
        await ping(client)
    finally:
        await client.close()


async def test_database_connection_without_tls_or_without_the_ca_is_refused(
    tls_mongod: tuple[int, Path],
) -> None:
    port, _ = tls_mongod
    url = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    for options in ({}, {"tls": True}):  # plain text; TLS without trusting the private CA
        client = create_client(url, app_name="tls-test", timeout_ms=1_500, tls_options=options)
        try:
            with pytest.raises(ServerSelectionTimeoutError):
                await ping(client)
        finally:
            await client.close()


def test_broker_tls_context_trusts_the_configured_ca_and_verifies(tmp_path: Path) -> None:
    ca_file, _ = _certificates(tmp_path)
    plain = ServiceSettings(amqp_url="amqp://u:p@rabbit:5672/")  # type: ignore[arg-type]
    assert plain.amqp_ssl_context() is None
    secured = ServiceSettings(
        amqp_url="amqps://u:p@rabbit:5671/",  # type: ignore[arg-type]
        amqp_tls_ca_file=str(ca_file),
    )
    context = secured.amqp_ssl_context()
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert any("grantwire test CA" in str(c.get("subject")) for c in context.get_ca_certs())
