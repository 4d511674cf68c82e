"""TLS: certificates are verified, always, unless a connection's config names its own CA bundle.

A throwaway CA and server certificates are made with ``cryptography`` in the test; aiohttp
serves HTTPS on 127.0.0.1 with them. Node BullMQ sends one job per case to a real
``python -m runner``, each with an inline definition whose connection (type NONE) points at
one of those servers, with or without ``config.caBundle`` (PEM text or a file path).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.integration.test_hostile_jobs import send_and_settle
from tests.workflows import job_data

pytestmark = pytest.mark.integration


# --- certificates ---------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass(frozen=True)
class Pki:
    ca_pem: str
    key: ec.EllipticCurvePrivateKey
    ca: x509.Certificate

    @classmethod
    def create(cls) -> Pki:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        ca = (
            x509.CertificateBuilder()
            .subject_name(_name("runner test CA"))
            .issuer_name(_name("runner test CA"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(ca.public_bytes(serialization.Encoding.PEM).decode(), key, ca)

    def server_files(self, directory: Path, *names: str) -> tuple[Path, Path]:
        """A certificate for ``names`` (DNS names or IP addresses) signed by this CA, and its
        key, as PEM files."""
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_path = directory / f"{names[0]}.crt"
        key_path = directory / f"{names[0]}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path


# --- HTTPS servers --------------------------------------------------------------------------


@dataclass
class HttpsApi:
    base_url: str
    hits: list[str]


@pytest.fixture
async def https_server() -> AsyncIterator[Any]:
    """``api = await https_server(cert, key)``: an HTTPS API on a free loopback port that
    answers ``{"ok": true}`` and records each request's path."""
    runners: list[web.AppRunner] = []

    async def start(cert_path: Path, key_path: Path) -> HttpsApi:
        hits: list[str] = []

        async def handle(request: web.Request) -> web.StreamResponse:
            hits.append(request.raw_path)
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_path, key_path)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return HttpsApi(f"https://127.0.0.1:{port}", hits)

    yield start
    for runner in runners:
        await runner.cleanup()


def one_call(version_id: str, base_url: str, ca_bundle: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {"baseUrl": base_url}
    if ca_bundle is not None:
        config["caBundle"] = ca_bundle
    return {
        "id": version_id,
        "workflowId": "wf_tls",
        "version": 1,
        "timeoutMs": 30_000,
        "graph": {"steps": [{"key": "call", "actionId": "act", "connectionId": "conn"}]},
        "actions": {
            # No retries: a certificate that does not verify will not verify next time either.
            "act": {"id": "act", "name": "call", "method": "GET", "endpointTemplate": "/status"}
        },
        "connections": {"conn": {"id": "conn", "type": "NONE", "config": config}},
    }


async def test_certificates_are_verified_unless_the_connection_names_its_ca_bundle(
    tmp_path: Path,
    https_server: Any,
    runner_process: Any,
    clean_queue: str,
    redis: aioredis.Redis,
) -> None:
    # Given a private CA, a server with a certificate for 127.0.0.1 and localhost from it, and
    # one whose certificate (from the same CA) names another host only
    pki = Pki.create()
    good = await https_server(*pki.server_files(tmp_path, "127.0.0.1", "localhost"))
    wrong_name = await https_server(*pki.server_files(tmp_path, "other.example"))
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(pki.ca_pem)
    await runner_process()

    # When Node sends one run per case
    cases = {
        "run_tls_system_store": one_call("wfv_tls_1", good.base_url, None),
        "run_tls_ca_text": one_call("wfv_tls_2", good.base_url, pki.ca_pem),
        "run_tls_ca_file": one_call("wfv_tls_3", good.base_url, str(ca_file)),
        "run_tls_wrong_ip": one_call("wfv_tls_4", wrong_name.base_url, pki.ca_pem),
        "run_tls_wrong_name": one_call(
            "wfv_tls_5", wrong_name.base_url.replace("127.0.0.1", "localhost"), pki.ca_pem
        ),
    }
    jobs = await send_and_settle(
        redis,
        clean_queue,
        [
            {"data": job_data(run_id, definition), "opts": {"jobId": run_id}}
            for run_id, definition in cases.items()
        ],
    )

    # Then without a caBundle the private CA is not trusted: CONNECTION_ERROR saying why
    failed = jobs["run_tls_system_store"]
    assert failed["state"] == "failed", failed
    assert failed["failedReason"] == (
        "CONNECTION_ERROR: call: TLS certificate of 127.0.0.1 could not be verified: "
        "unable to get local issuer certificate"
    )
    # and with the CA given as PEM text or as a file path, the same server is trusted
    for run_id in ("run_tls_ca_text", "run_tls_ca_file"):
        assert jobs[run_id]["state"] == "completed", jobs[run_id]
        assert jobs[run_id]["returnvalue"]["status"] == "SUCCESS"
    assert good.hits == ["/status", "/status"]
    # and a certificate from the trusted CA for another host still fails the host check, by
    # IP address and by name
    for run_id, reason in (
        ("run_tls_wrong_ip", "127.0.0.1 could not be verified: IP address mismatch"),
        ("run_tls_wrong_name", "localhost could not be verified: Hostname mismatch"),
    ):
        host = "127.0.0.1" if run_id.endswith("ip") else "localhost"
        assert jobs[run_id]["state"] == "failed", jobs[run_id]
        assert jobs[run_id]["failedReason"] == (
            f"CONNECTION_ERROR: call: TLS certificate of {reason}, "
            f"certificate is not valid for '{host}'"
        )
    assert wrong_name.hits == []
