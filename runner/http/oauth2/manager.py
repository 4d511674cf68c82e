"""``OAuth2TokenManager``: which token a run uses, when it is refreshed, and one refresh however
many runs ask.

``access_token`` answers with the newest token it knows of, from (newest by ``expiresAt``) its
memory, the token another runner process shared, or the run's own secrets, and refreshes it when
it expires within ``skew_ms`` or was just rejected with a 401.

- In one process, an ``asyncio.Lock`` per (tenant, connection), checked again after it is taken
  (as in aiohttp's client-middleware cookbook): the runs that waited use the winner's token.
- Across processes (``coordination``), the winner of the Redis lease refreshes and shares the
  sealed result; the others poll for it until a deadline and use it. A process whose own refresh
  is refused (``invalid_grant``: someone rotated the refresh token first) reads the shared token
  again before giving up. Without Redis or without the credentials key, coordination is per
  process only.

Every refreshed token is kept, masked in every output for a retention window after it is
superseded, and reported to the control plane (``report``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Mapping

import aiohttp
import redis.asyncio
from redis.exceptions import RedisError

from runner.contract import Connection
from runner.errors import AuthError
from runner.http.oauth2.coordination import SharedTokens
from runner.http.oauth2.grant import TokenRejected, refresh_grant
from runner.http.oauth2.report import TokenReporter
from runner.http.oauth2.tokens import (
    HeldTokens,
    TokenKey,
    TokenSet,
    WarningHook,
    needs_refresh,
    tokens_from_secrets,
)
from runner.redact import SecretRegistry

log = logging.getLogger(__name__)


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class OAuth2TokenManager:
    """Process-wide: one per runner process, shared by every run."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        redis: redis.asyncio.Redis | None,
        key_prefix: str,
        credentials_key: bytes | None,
        control_plane_url: str | None,
        control_session: aiohttp.ClientSession | None = None,
        retired_token_retention_ms: int = 24 * 3_600_000,
        control_plane_token: str | None,
        skew_ms: int = 60_000,
        now_ms: Callable[[], int] = _wall_clock_ms,
        lease_ms: int = 10_000,
        token_timeout_s: float = 10.0,
        on_warning: WarningHook | None = None,
        secrets_registry: SecretRegistry | None = None,
    ) -> None:
        if credentials_key is not None and len(credentials_key) != 32:
            raise ValueError("credentials_key must be 32 bytes (AES-256)")
        self._session = session
        self._skew_ms = skew_ms
        self._now_ms = now_ms
        self._timeout = aiohttp.ClientTimeout(total=token_timeout_s)
        # Long enough for the lease holder to time out and for us to take the lease over once.
        self._wait_s = 2 * lease_ms / 1000 + token_timeout_s
        self._on_warning = on_warning or _log_warning
        self._held = HeldTokens(
            secrets_registry, retention_ms=retired_token_retention_ms, now_ms=now_ms
        )
        self._shared: SharedTokens | None = None
        if redis is not None and credentials_key is not None:
            self._shared = SharedTokens(
                redis,
                key_prefix=key_prefix,
                credentials_key=credentials_key,
                lease_ms=lease_ms,
                now_ms=now_ms,
                on_warning=self._on_warning,
            )
        # The control plane is trusted and exempt from the egress policy: it may be reached
        # through a session of its own, while token endpoints use the guarded one.
        self._reporter = TokenReporter(
            control_session or session,
            control_plane_url=control_plane_url,
            control_plane_token=control_plane_token,
            timeout=self._timeout,
            on_warning=self._on_warning,
        )
        self._locks: dict[TokenKey, asyncio.Lock] = {}
        self.refresh_count = 0
        if redis is not None and credentials_key is None:
            self._on_warning(
                "oauth2_coordination_local_only",
                {"reason": "no credentials key: refreshed tokens cannot be shared sealed"},
            )

    @property
    def report_failures(self) -> int:
        """Reports to the control plane that failed, retried ones included."""
        return self._reporter.failures

    async def access_token(
        self,
        tenant_id: str,
        connection: Connection,
        *,
        force_refresh: bool = False,
        rejected_token: str | None = None,
    ) -> str:
        """A bearer token for ``connection``, refreshed first if it expires within the skew, or
        if ``force_refresh`` and the newest known token is ``rejected_token`` (or none was
        named: then a refresh always happens, so pass the rejected token to coalesce)."""
        key = (tenant_id, connection.id)
        from_run = tokens_from_secrets(connection.secrets)
        current = self._held.newest(key, from_run)
        if self._usable(current, force_refresh, rejected_token):
            assert current is not None
            return current.access_token
        # Shielded: a run canceled mid-refresh must not lose a refresh token the endpoint has
        # already rotated; the refresh completes, is kept and reported, whoever still waits.
        task = asyncio.ensure_future(
            self._access_token_locked(key, connection, from_run, force_refresh, rejected_token)
        )
        task.add_done_callback(_retrieve_exception)
        return await asyncio.shield(task)

    async def _access_token_locked(
        self,
        key: TokenKey,
        connection: Connection,
        from_run: TokenSet | None,
        force: bool,
        rejected: str | None,
    ) -> str:
        async with self._locks.setdefault(key, asyncio.Lock()):
            current = self._held.newest(key, from_run)
            if self._usable(current, force, rejected):
                assert current is not None
                return current.access_token
            if self._shared is not None:
                fresh = await self._refresh_shared(
                    self._shared, key, connection, current, force, rejected
                )
            else:
                fresh = await self._refresh_and_keep(key, connection, current)
            return fresh.access_token

    def known_tokens(self, tenant_id: str, connection_id: str) -> TokenSet | None:
        """The newest tokens this process holds for the connection (tests, diagnostics)."""
        return self._held.get((tenant_id, connection_id))

    async def flush_reports(self) -> int:
        """Report again the tokens whose report failed; returns how many are still unreported."""
        return await self._reporter.flush(self._held.get)

    # --- decisions ------------------------------------------------------------------------

    def _usable(self, tokens: TokenSet | None, force: bool, rejected: str | None) -> bool:
        if tokens is None or not tokens.access_token:
            return False
        if force and (rejected is None or tokens.access_token == rejected):
            return False
        return not needs_refresh(tokens.expires_at_ms, self._now_ms(), self._skew_for(tokens))

    def _skew_for(self, tokens: TokenSet) -> int:
        # A token that lives less than twice the skew would be refreshed on every use.
        if tokens.expires_at_ms is not None and tokens.obtained_at_ms is not None:
            return min(self._skew_ms, (tokens.expires_at_ms - tokens.obtained_at_ms) // 2)
        return self._skew_ms

    def _not_expired(self, tokens: TokenSet | None, rejected: str | None) -> bool:
        return (
            tokens is not None
            and tokens.access_token != rejected
            and not needs_refresh(tokens.expires_at_ms, self._now_ms(), 0)
        )

    # --- refreshing -----------------------------------------------------------------------

    async def _refresh_and_keep(
        self, key: TokenKey, connection: Connection, current: TokenSet | None
    ) -> TokenSet:
        fresh = await self._refresh(connection, current)
        self._held.keep(key, fresh)
        await self._reporter.report(key, fresh)
        return fresh

    async def _refresh_shared(
        self,
        shared_tokens: SharedTokens,
        key: TokenKey,
        connection: Connection,
        current: TokenSet | None,
        force: bool,
        rejected: str | None,
    ) -> TokenSet:
        owner = secrets.token_hex(16)
        try:
            shared = await shared_tokens.await_turn(
                key,
                owner,
                usable=lambda tokens: self._usable(tokens, force, rejected),
                wait_s=self._wait_s,
            )
            if shared is not None:
                self._held.keep(key, shared)
                return shared
            try:
                return await self._refresh_as_leader(
                    shared_tokens, key, connection, current, force, rejected
                )
            finally:
                await shared_tokens.release_lease(key, owner)
        except RedisError:
            raise AuthError(
                f"connection {key[1]}: could not coordinate the OAuth2 token refresh"
                " (Redis unavailable)",
                retryable=True,
            ) from None

    async def _refresh_as_leader(
        self,
        shared_tokens: SharedTokens,
        key: TokenKey,
        connection: Connection,
        current: TokenSet | None,
        force: bool,
        rejected: str | None,
    ) -> TokenSet:
        # Check again under the lease: the previous holder may have published just before
        # releasing it, and its refresh token is the only valid one now.
        shared = await shared_tokens.read(key)
        if self._usable(shared, force, rejected):
            assert shared is not None
            self._held.keep(key, shared)
            return shared
        base = current
        if shared is not None and (base is None or shared.age_key > base.age_key):
            base = shared
        try:
            fresh = await self._refresh(connection, base)
        except TokenRejected:
            shared = await shared_tokens.read(key)
            if self._not_expired(shared, rejected) and (
                base is None or shared is None or shared.refresh_token != base.refresh_token
            ):
                assert shared is not None
                self._held.keep(key, shared)
                return shared
            raise
        self._held.keep(key, fresh)
        await shared_tokens.publish(key, fresh)
        await self._reporter.report(key, fresh)
        return fresh

    async def _refresh(self, connection: Connection, base: TokenSet | None) -> TokenSet:
        fresh = await refresh_grant(
            self._session, connection, base, client_timeout=self._timeout, now_ms=self._now_ms
        )
        self.refresh_count += 1
        return fresh


def _retrieve_exception(task: asyncio.Future[str]) -> None:
    # The caller may be gone (canceled); its error is then nobody's, not an "unretrieved" one.
    if not task.cancelled():
        task.exception()


def _log_warning(event: str, fields: Mapping[str, object]) -> None:
    log.warning("%s %s", event, dict(fields))
