"""A run's credentials (CONTRACT §4): unsealed from the job or fetched for the run, never stored.

``sealedCredentials`` is ``v1.<nonce>.<ciphertext||tag>``, base64url without padding,
AES-256-GCM under ``RUNNER_CREDENTIALS_KEY`` with the workflowRunId as associated data, so an
envelope sealed for one run does not open for another. Otherwise, when the run needs any
connection with secrets or any ``secretRefs``, they are fetched from the control plane.

Errors are ``CREDENTIALS_UNAVAILABLE`` and say what is wrong (bad envelope, wrong run, missing
connection) without quoting any value.
"""

from __future__ import annotations

import base64
import binascii
import os

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from runner.contract import (
    Connection,
    ConnectionConfig,
    JobData,
    ResolvedCredentials,
    decode_credentials,
)
from runner.controlplane import ControlPlane
from runner.engine.plan import Plan
from runner.errors import CredentialsError


def parse_key(text: str) -> bytes:
    """``RUNNER_CREDENTIALS_KEY``: 32 bytes, base64 (standard or url-safe, padding optional)."""
    try:
        raw = _b64decode(text.strip())
    except (binascii.Error, ValueError):
        raise SystemExit("RUNNER_CREDENTIALS_KEY: not valid base64") from None
    if len(raw) != 32:
        raise SystemExit(f"RUNNER_CREDENTIALS_KEY: must decode to 32 bytes, got {len(raw)}")
    return raw


def _b64decode(text: str) -> bytes:
    text = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def seal(plaintext: bytes, key: bytes, associated: str) -> str:
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, plaintext, associated.encode())
    return f"v1.{_b64url(nonce)}.{_b64url(sealed)}"


def unseal(envelope: str, key: bytes, associated: str) -> bytes:
    parts = envelope.split(".")
    if len(parts) != 3 or parts[0] != "v1":
        raise CredentialsError("sealedCredentials is not a v1.<nonce>.<ciphertext> envelope")
    try:
        nonce, sealed = _b64decode(parts[1]), _b64decode(parts[2])
    except (binascii.Error, ValueError):
        raise CredentialsError("sealedCredentials is not valid base64url") from None
    if len(nonce) != 12 or len(sealed) < 16:
        raise CredentialsError("sealedCredentials has a wrong nonce or ciphertext length")
    try:
        return AESGCM(key).decrypt(nonce, sealed, associated.encode())
    except InvalidTag:
        raise CredentialsError(
            "sealedCredentials does not decrypt: sealed under another key or for another run"
        ) from None


class CredentialSource:
    def __init__(self, *, control_plane: ControlPlane | None, key: bytes | None) -> None:
        self.control_plane = control_plane
        self.key = key

    async def resolve(self, job: JobData, plan: Plan) -> ResolvedCredentials:
        if job.sealed_credentials:
            if self.key is None:
                raise CredentialsError(
                    "the job carries sealedCredentials but RUNNER_CREDENTIALS_KEY is not set"
                )
            raw = unseal(job.sealed_credentials, self.key, job.workflow_run_id)
            return decode_credentials(raw)
        needed = sorted(
            cid for cid in plan.connection_ids if _needs_secrets(plan.version.connections.get(cid))
        )
        refs = sorted(set(plan.secret_refs.values()))
        if not needed and not refs:
            return ResolvedCredentials()
        if self.control_plane is None:
            raise CredentialsError(
                "the run needs credentials but neither sealedCredentials nor "
                "RUNNER_CONTROL_PLANE_URL is available"
            )
        raw = await self.control_plane.run_credentials(
            job.workflow_run_id, job.tenant_id, needed, refs
        )
        return decode_credentials(raw)


def _explicit_fields(config: ConnectionConfig) -> set[str]:
    defaults = ConnectionConfig()
    return {f for f in config.__struct_fields__ if getattr(config, f) != getattr(defaults, f)}


def _needs_secrets(connection: Connection | None) -> bool:
    # A connection not described in the definition comes with the credentials: fetch it.
    return connection is None or connection.type != "NONE"


def connections_for_run(plan: Plan, creds: ResolvedCredentials) -> dict[str, Connection]:
    """The definition's connections with the secrets the run resolved. The resolved copy is the
    fresher one, so its config wins field by field; what it leaves unset comes from the
    definition. A connection a step names that neither provides is an error naming the step."""
    merged = dict(plan.version.connections)
    for cid, resolved in creds.connections.items():
        known = merged.get(cid)
        if known is not None:
            config = msgspec.structs.replace(
                known.config,
                **{
                    f: getattr(resolved.config, f)
                    for f in resolved.config.__struct_fields__
                    if f in _explicit_fields(resolved.config)
                },
            )
            resolved = msgspec.structs.replace(resolved, config=config)
        merged[cid] = resolved
    for sp in plan.steps:
        named = sp.step.connection_id
        if named is not None and named not in merged:
            raise CredentialsError(
                f"{sp.where}.connectionId: connection '{named}' is neither in the definition "
                "nor in the run's credentials"
            )
    return merged


def secrets_for_run(plan: Plan, creds: ResolvedCredentials) -> dict[str, str]:
    """``{{ secrets.NAME }}`` values: ``envConfig.secretRefs`` maps NAME to a ref id."""
    out: dict[str, str] = {}
    for name, ref in plan.secret_refs.items():
        if ref not in creds.secrets:
            raise CredentialsError(
                f"$.envConfig.secretRefs.{name}: secret ref '{ref}' was not resolved for the run"
            )
        out[name] = creds.secrets[ref]
    return out
