"""The control plane's HTTP API (CONTRACT §3-4): definitions, run credentials, OAuth2 tokens.

The control plane is trusted and exempt from the egress policy, so its calls go through a
session of their own rather than the steps' guarded session. Every call sends
``Authorization: Bearer {RUNNER_CONTROL_PLANE_TOKEN}`` and ``X-Tenant-Id``. Errors are
translated here into ``RunnerError``s whose messages name the call and the status, never the
token.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec

from runner.errors import (
    ControlPlaneUnavailable,
    CredentialsError,
    DefinitionError,
    ErrorCode,
    RunnerError,
)

_encode = msgspec.json.Encoder().encode


class ControlPlane:
    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, token: str, *, timeout_s: float = 15.0
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def _headers(self, tenant_id: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.token}",
            "X-Tenant-Id": tenant_id,
            "Content-Type": "application/json",
            "Accept": "application/json",
        }

    async def _call(
        self, method: str, path: str, tenant_id: str, body: Any, what: str, error: type[RunnerError]
    ) -> tuple[int, bytes]:
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self.session.request(
                    method,
                    self.base_url + path,
                    headers=self._headers(tenant_id),
                    data=_encode(body) if body is not None else None,
                ) as resp:
                    return resp.status, await resp.read()
        except TimeoutError:
            raise ControlPlaneUnavailable(
                f"control plane did not answer {what} within {self.timeout_s:g} s", retryable=True
            ) from None
        except (aiohttp.ClientError, OSError) as err:
            raise ControlPlaneUnavailable(
                f"control plane unreachable for {what}: {type(err).__name__}", retryable=True
            ) from None

    async def workflow_version(self, version_id: str, tenant_id: str) -> bytes:
        what = f"workflow version '{version_id}'"
        status, body = await self._call(
            "GET",
            f"/runner/v1/workflow-versions/{quote(version_id, safe='')}",
            tenant_id,
            None,
            what,
            DefinitionError,
        )
        if status == 404:
            raise DefinitionError(f"{what} does not exist", code=ErrorCode.DEFINITION_NOT_FOUND)
        _raise_if_unavailable(status, what)
        if status != 200:
            raise DefinitionError(f"control plane answered {status} for {what}")
        return body

    async def run_credentials(
        self, run_id: str, tenant_id: str, connection_ids: list[str], secret_refs: list[str]
    ) -> bytes:
        what = f"the credentials of run '{run_id}'"
        status, body = await self._call(
            "POST",
            f"/runner/v1/runs/{quote(run_id, safe='')}/credentials",
            tenant_id,
            {"tenantId": tenant_id, "connectionIds": connection_ids, "secretRefs": secret_refs},
            what,
            CredentialsError,
        )
        _raise_if_unavailable(status, what)
        if status != 200:
            raise CredentialsError(f"control plane answered {status} for {what}")
        return body

    async def report_oauth2_token(
        self,
        connection_id: str,
        tenant_id: str,
        access_token: str,
        refresh_token: str | None,
        expires_at_ms: int | None,
    ) -> None:
        what = f"the new token of connection '{connection_id}'"
        status, _ = await self._call(
            "PUT",
            f"/runner/v1/connections/{quote(connection_id, safe='')}/oauth2-token",
            tenant_id,
            {
                "tenantId": tenant_id,
                "accessToken": access_token,
                "refreshToken": refresh_token,
                "expiresAt": expires_at_ms,
            },
            what,
            CredentialsError,
        )
        if status >= 300:
            raise CredentialsError(f"control plane answered {status} for {what}", retryable=True)


def _raise_if_unavailable(status: int, what: str) -> None:
    """A 5xx or 429 says the control plane cannot answer now: retry the job, and blame neither
    the definition nor the credentials."""
    if status >= 500 or status == 429:
        raise ControlPlaneUnavailable(f"control plane answered {status} for {what}", retryable=True)
