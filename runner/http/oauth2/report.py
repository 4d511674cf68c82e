"""Reporting refreshed tokens to the control plane, so that a rotated refresh token is never lost.

``PUT /runner/v1/connections/{id}/oauth2-token``. A failed report is a warning, kept for
``flush``, and never fails the step.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

import aiohttp

from runner.http.oauth2.tokens import TokenKey, TokenSet, WarningHook


class TokenReporter:
    """Reports tokens; remembers, per connection, the newest one whose report failed."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        control_plane_url: str | None,
        control_plane_token: str | None,
        timeout: aiohttp.ClientTimeout,
        on_warning: WarningHook,
    ) -> None:
        self._session = session
        self._control_plane_url = control_plane_url.rstrip("/") if control_plane_url else None
        self._control_plane_token = control_plane_token
        self._timeout = timeout
        self._on_warning = on_warning
        self._unreported: dict[TokenKey, TokenSet] = {}
        self.failures = 0

    async def flush(self, current: Callable[[TokenKey], TokenSet | None]) -> int:
        """Report again the tokens whose report failed and that are still ``current``; returns
        how many are still unreported."""
        for key, tokens in list(self._unreported.items()):
            if current(key) is not tokens:
                # A newer refresh was made (and reported, or queued) since.
                self._unreported.pop(key, None)
                continue
            if await self.report(key, tokens):
                self._unreported.pop(key, None)
        return len(self._unreported)

    async def report(self, key: TokenKey, tokens: TokenSet) -> bool:
        tenant_id, connection_id = key
        fields: dict[str, object] = {"tenantId": tenant_id, "connectionId": connection_id}
        if self._control_plane_url is None:
            self._on_warning(
                "oauth2_token_not_reported", {**fields, "reason": "no control plane URL"}
            )
            return False
        url = (
            f"{self._control_plane_url}/runner/v1/connections/"
            f"{quote(connection_id, safe='')}/oauth2-token"
        )
        headers = {"X-Tenant-Id": tenant_id}
        if self._control_plane_token:
            headers["Authorization"] = f"Bearer {self._control_plane_token}"
        payload = {
            "tenantId": tenant_id,
            "accessToken": tokens.access_token,
            "refreshToken": tokens.refresh_token,
            "expiresAt": tokens.expires_at_ms,
        }
        reason: str
        try:
            async with self._session.put(
                url, json=payload, headers=headers, timeout=self._timeout
            ) as response:
                await response.read()
                if 200 <= response.status < 300:
                    self._unreported.pop(key, None)
                    return True
                reason = f"HTTP {response.status}"
        except TimeoutError:
            reason = "timeout"
        except aiohttp.ClientError as exc:
            reason = type(exc).__name__
        self.failures += 1
        self._unreported[key] = tokens
        self._on_warning("oauth2_token_report_failed", {**fields, "reason": reason})
        return False
