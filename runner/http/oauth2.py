"""OAuth2 access tokens: when to refresh, refreshing once however many runs ask, and keeping the
rotated refresh token.

``OAuth2TokenManager.access_token`` answers with the newest token it knows of, from (newest by
``expiresAt``) its memory, the token another runner process shared, or the run's own secrets, and
refreshes it when it expires within ``skew_ms`` or was just rejected with a 401.

One refresh however many runs ask:

- in one process, an ``asyncio.Lock`` per (tenant, connection), checked again after it is taken
  (as in aiohttp's client-middleware cookbook): the runs that waited use the winner's token;
- across processes, a Redis lease (``SET NX PX``) per (tenant, connection). The winner seals the
  new tokens with AES-256-GCM under the credentials key (associated data ``tenant:connection``)
  and stores them under a key that expires with the access token; the others poll for that key
  until a deadline and use it. A token is never written to Redis in plain text. A process whose
  own refresh is refused (``invalid_grant``: someone rotated the refresh token first) reads the
  shared token again before giving up. Without Redis or without the credentials key,
  coordination is per process only.

The refresh is the ``refresh_token`` grant against ``config.tokenUrl`` (form-encoded, client
authenticating in the body or with HTTP Basic per ``config.clientAuth``). Its outcome is data on
the error: refused (4xx) is ``AUTH_FAILED``, not retryable; a 5xx, a 429 or an unreachable or
slow endpoint is ``AUTH_FAILED``, retryable. New tokens are reported to the control plane
(``PUT /runner/v1/connections/{id}/oauth2-token``) so a rotated refresh token is never lost; a
failed report is a warning, kept for ``flush_reports()``, and never fails the step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import redis.asyncio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.exceptions import RedisError

from runner.contract import Connection
from runner.errors import AuthError
from runner.http.auth import basic_auth_header
from runner.redact import SECRETS, SecretRegistry

log = logging.getLogger(__name__)

WarningHook = Callable[[str, Mapping[str, object]], None]

# A token whose lifetime is unknown is shared for this long; it is refreshed on a 401 anyway.
_UNKNOWN_LIFETIME_TTL_MS = 3_600_000
_MIN_SHARED_TTL_MS = 1_000
_POLL_FIRST_DELAY_S = 0.02
_POLL_MAX_DELAY_S = 0.25
_MAX_TOKEN_RESPONSE_BYTES = 1 << 20
_OAUTH_ERROR = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def needs_refresh(expires_at_ms: int | None, now_ms: int, skew_ms: int) -> bool:
    """True once ``now_ms`` is within ``skew_ms`` of expiry (the boundary included). A token of
    unknown expiry is used until it is rejected."""
    return expires_at_ms is not None and now_ms >= expires_at_ms - skew_ms


@dataclass(frozen=True, slots=True)
class TokenSet:
    access_token: str
    refresh_token: str | None
    expires_at_ms: int | None
    obtained_at_ms: int | None = None

    def __repr__(self) -> str:
        # Never print the tokens, even in a debugger or an assertion message.
        return f"TokenSet(expires_at_ms={self.expires_at_ms}, obtained_at_ms={self.obtained_at_ms})"

    @property
    def age_key(self) -> tuple[int, int]:
        return (
            -1 if self.expires_at_ms is None else self.expires_at_ms,
            -1 if self.obtained_at_ms is None else self.obtained_at_ms,
        )


def tokens_from_secrets(secrets_: Mapping[str, Any] | None) -> TokenSet | None:
    """The run's OAUTH2 secrets as a TokenSet (shape checked by ``build_auth``)."""
    if not secrets_:
        return None
    access = secrets_.get("accessToken")
    refresh = secrets_.get("refreshToken")
    expires = secrets_.get("expiresAt")
    return TokenSet(
        access_token=access if isinstance(access, str) else "",
        refresh_token=refresh if isinstance(refresh, str) and refresh else None,
        expires_at_ms=int(expires) if isinstance(expires, int | float) else None,
    )


# --- sharing tokens between processes -------------------------------------------------------


def lease_key(key_prefix: str, tenant_id: str, connection_id: str) -> str:
    return f"{key_prefix}:oauth2:{tenant_id}:{connection_id}:lease"


def token_key(key_prefix: str, tenant_id: str, connection_id: str) -> str:
    return f"{key_prefix}:oauth2:{tenant_id}:{connection_id}:token"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def seal_tokens(key: bytes, tokens: TokenSet, associated_data: bytes) -> str:
    """``v1.<nonce>.<ciphertext>``, base64url, AES-256-GCM: the format of sealed credentials."""
    plain = json.dumps(
        {
            "accessToken": tokens.access_token,
            "refreshToken": tokens.refresh_token,
            "expiresAt": tokens.expires_at_ms,
            "obtainedAt": tokens.obtained_at_ms,
        }
    ).encode()
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, plain, associated_data)
    return f"v1.{_b64url(nonce)}.{_b64url(sealed)}"


def unseal_tokens(key: bytes, sealed: str, associated_data: bytes) -> TokenSet:
    """Raises ``ValueError`` when ``sealed`` is malformed or was not sealed for this context."""
    version, _, rest = sealed.partition(".")
    nonce_text, _, cipher_text = rest.partition(".")
    if version != "v1" or not nonce_text or not cipher_text:
        raise ValueError("not a v1 sealed token")
    try:
        plain = AESGCM(key).decrypt(_unb64url(nonce_text), _unb64url(cipher_text), associated_data)
    except InvalidTag:
        raise ValueError("sealed token does not authenticate") from None
    data = json.loads(plain)
    access, refresh = data.get("accessToken"), data.get("refreshToken")
    expires, obtained = data.get("expiresAt"), data.get("obtainedAt")
    if not isinstance(access, str) or not access:
        raise ValueError("sealed token has no access token")
    return TokenSet(
        access_token=access,
        refresh_token=refresh if isinstance(refresh, str) else None,
        expires_at_ms=expires if isinstance(expires, int) else None,
        obtained_at_ms=obtained if isinstance(obtained, int) else None,
    )


class TokenRejected(AuthError):
    """The token endpoint refused the refresh (4xx, e.g. ``invalid_grant``): not retryable."""

    def __init__(self, message: str, *, oauth_error: str, status: int) -> None:
        super().__init__(message, retryable=False, status=status)
        self.oauth_error = oauth_error


# --- the manager ----------------------------------------------------------------------------

_Key = tuple[str, str]


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
        secrets_registry: SecretRegistry | None = SECRETS,
    ) -> None:
        if credentials_key is not None and len(credentials_key) != 32:
            raise ValueError("credentials_key must be 32 bytes (AES-256)")
        self._session = session
        # The control plane is trusted and exempt from the egress policy: it may be reached
        # through a session of its own, while token endpoints use the guarded one.
        self._control_session = control_session or session
        self._retired_retention_ms = retired_token_retention_ms
        self._redis = redis
        self._key_prefix = key_prefix
        self._credentials_key = credentials_key
        self._control_plane_url = control_plane_url.rstrip("/") if control_plane_url else None
        self._control_plane_token = control_plane_token
        self._skew_ms = skew_ms
        self._now_ms = now_ms
        self._lease_ms = lease_ms
        self._timeout = aiohttp.ClientTimeout(total=token_timeout_s)
        # Long enough for the lease holder to time out and for us to take the lease over once.
        self._wait_s = 2 * lease_ms / 1000 + token_timeout_s
        self._on_warning = on_warning or _log_warning
        self._registry = secrets_registry
        self._tokens: dict[_Key, TokenSet] = {}
        self._locks: dict[_Key, asyncio.Lock] = {}
        # Per connection: (registered at ms, SECRETS handle) of each token pair it has held.
        self._registered: dict[_Key, deque[tuple[int, int]]] = {}
        self._unreported: dict[_Key, TokenSet] = {}
        self.refresh_count = 0
        self.report_failures = 0
        if redis is not None and credentials_key is None:
            self._on_warning(
                "oauth2_coordination_local_only",
                {"reason": "no credentials key: refreshed tokens cannot be shared sealed"},
            )

    @property
    def _shared(self) -> bool:
        return self._redis is not None and self._credentials_key is not None

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
        current = self._newest(key, from_run)
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
        key: _Key,
        connection: Connection,
        from_run: TokenSet | None,
        force: bool,
        rejected: str | None,
    ) -> str:
        async with self._locks.setdefault(key, asyncio.Lock()):
            current = self._newest(key, from_run)
            if self._usable(current, force, rejected):
                assert current is not None
                return current.access_token
            if self._shared:
                fresh = await self._refresh_shared(key, connection, current, force, rejected)
            else:
                fresh = await self._refresh_and_keep(key, connection, current)
            return fresh.access_token

    def known_tokens(self, tenant_id: str, connection_id: str) -> TokenSet | None:
        """The newest tokens this process holds for the connection (tests, diagnostics)."""
        return self._tokens.get((tenant_id, connection_id))

    async def flush_reports(self) -> int:
        """Report again the tokens whose report failed; returns how many are still unreported."""
        for key, tokens in list(self._unreported.items()):
            if self._tokens.get(key) is not tokens:
                # A newer refresh was made (and reported, or queued) since.
                self._unreported.pop(key, None)
                continue
            if await self._report(key, tokens):
                self._unreported.pop(key, None)
        return len(self._unreported)

    # --- decisions ------------------------------------------------------------------------

    def _newest(self, key: _Key, from_run: TokenSet | None) -> TokenSet | None:
        held = self._tokens.get(key)
        if held is None or (from_run is not None and from_run.age_key > held.age_key):
            return from_run
        return held

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

    def _keep(self, key: _Key, tokens: TokenSet) -> None:
        if self._tokens.get(key) == tokens:
            return
        self._tokens[key] = tokens
        if self._registry is not None:
            values = [
                tokens.access_token,
                *([tokens.refresh_token] if tokens.refresh_token else []),
            ]
            handles = self._registered.setdefault(key, deque())
            now = self._now_ms()
            handles.append((now, self._registry.register(values)))
            # A superseded token may still be on a request in flight, or echoed in a response
            # that arrives later, however often it was rotated since: keep masking it for the
            # retention window (longer than any run), then forget it.
            while len(handles) > 1 and now - handles[1][0] > self._retired_retention_ms:
                self._registry.unregister(handles.popleft()[1])

    # --- refreshing -----------------------------------------------------------------------

    async def _refresh_and_keep(
        self, key: _Key, connection: Connection, current: TokenSet | None
    ) -> TokenSet:
        fresh = await self._refresh(connection, current)
        self._keep(key, fresh)
        await self._report(key, fresh)
        return fresh

    async def _refresh_shared(
        self,
        key: _Key,
        connection: Connection,
        current: TokenSet | None,
        force: bool,
        rejected: str | None,
    ) -> TokenSet:
        assert self._redis is not None
        tenant_id, connection_id = key
        lease = lease_key(self._key_prefix, tenant_id, connection_id)
        owner = secrets.token_hex(16)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        delay_s = _POLL_FIRST_DELAY_S
        try:
            while True:
                shared = await self._read_shared(key)
                if self._usable(shared, force, rejected):
                    assert shared is not None
                    self._keep(key, shared)
                    return shared
                if await self._redis.set(lease, owner, nx=True, px=self._lease_ms):
                    try:
                        return await self._refresh_as_leader(
                            key, connection, current, force, rejected
                        )
                    finally:
                        await self._release(lease, owner)
                if loop.time() >= deadline:
                    raise AuthError(
                        f"connection {connection_id}: timed out waiting for another runner"
                        " process to refresh the OAuth2 token",
                        retryable=True,
                    )
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, _POLL_MAX_DELAY_S)
        except RedisError:
            raise AuthError(
                f"connection {connection_id}: could not coordinate the OAuth2 token refresh"
                " (Redis unavailable)",
                retryable=True,
            ) from None

    async def _refresh_as_leader(
        self,
        key: _Key,
        connection: Connection,
        current: TokenSet | None,
        force: bool,
        rejected: str | None,
    ) -> TokenSet:
        # Check again under the lease: the previous holder may have published just before
        # releasing it, and its refresh token is the only valid one now.
        shared = await self._read_shared(key)
        if self._usable(shared, force, rejected):
            assert shared is not None
            self._keep(key, shared)
            return shared
        base = current
        if shared is not None and (base is None or shared.age_key > base.age_key):
            base = shared
        try:
            fresh = await self._refresh(connection, base)
        except TokenRejected:
            shared = await self._read_shared(key)
            if self._not_expired(shared, rejected) and (
                base is None or shared is None or shared.refresh_token != base.refresh_token
            ):
                assert shared is not None
                self._keep(key, shared)
                return shared
            raise
        self._keep(key, fresh)
        await self._publish(key, fresh)
        await self._report(key, fresh)
        return fresh

    async def _refresh(self, connection: Connection, base: TokenSet | None) -> TokenSet:
        config = connection.config
        if base is None or not base.refresh_token:
            raise AuthError(
                f"connection {connection.id}: the OAuth2 access token expired or was rejected"
                " and there is no refresh token"
            )
        if not config.token_url:
            raise AuthError(f"connection {connection.id}: config.tokenUrl is missing")
        run_secrets = connection.secrets or {}
        client_secret = run_secrets.get("clientSecret")
        client_secret = client_secret if isinstance(client_secret, str) else None
        form = {"grant_type": "refresh_token", "refresh_token": base.refresh_token}
        if config.scope:
            form["scope"] = config.scope
        headers = {"Accept": "application/json"}
        if config.client_auth == "basic":
            if not config.client_id:
                raise AuthError(f"connection {connection.id}: config.clientId is missing")
            # RFC 6749 2.3.1: id and secret are form-encoded before the Basic encoding.
            headers["Authorization"] = basic_auth_header(
                quote(config.client_id, safe=""), quote(client_secret or "", safe="")
            )
        else:
            if config.client_id:
                form["client_id"] = config.client_id
            if client_secret:
                form["client_secret"] = client_secret
        where = f"connection {connection.id}: token endpoint"
        try:
            async with self._session.post(
                config.token_url,
                data=form,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                status = response.status
                retry_after = response.headers.get("Retry-After")
                body = await _read_limited(response, _MAX_TOKEN_RESPONSE_BYTES)
        except TimeoutError:
            raise AuthError(f"{where} timed out", retryable=True) from None
        except aiohttp.ClientError as exc:
            # The exception's text may carry the URL; its type is enough.
            raise AuthError(f"{where} unreachable ({type(exc).__name__})", retryable=True) from None
        if status == 429 or status >= 500:
            raise AuthError(
                f"{where} answered HTTP {status}",
                retryable=True,
                retry_after_s=_retry_after_s(retry_after),
                status=status,
            )
        if 400 <= status < 500:
            oauth_error = _oauth_error(body)
            raise TokenRejected(
                f"{where} refused the refresh: HTTP {status} {oauth_error}",
                oauth_error=oauth_error,
                status=status,
            )
        if not 200 <= status < 300:
            raise AuthError(f"{where} answered HTTP {status}", status=status)
        return self._parse_token_response(where, body, base)

    def _parse_token_response(self, where: str, body: bytes, base: TokenSet) -> TokenSet:
        try:
            data = json.loads(body)
        except ValueError:
            raise AuthError(f"{where} answered with a body that is not JSON") from None
        access = data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(access, str) or not access:
            raise AuthError(f"{where} answered without an access_token")
        refresh = data.get("refresh_token")
        expires_in = data.get("expires_in")
        if isinstance(expires_in, str) and expires_in.isdigit():
            expires_in = int(expires_in)
        now = self._now_ms()
        self.refresh_count += 1
        return TokenSet(
            access_token=access,
            # No refresh_token in the answer: the old one stays valid (RFC 6749 6).
            refresh_token=refresh if isinstance(refresh, str) and refresh else base.refresh_token,
            expires_at_ms=(
                now + int(expires_in * 1000)
                if isinstance(expires_in, int | float) and not isinstance(expires_in, bool)
                else None
            ),
            obtained_at_ms=now,
        )

    # --- Redis ----------------------------------------------------------------------------

    def _associated_data(self, key: _Key) -> bytes:
        return f"{key[0]}:{key[1]}".encode()

    async def _read_shared(self, key: _Key) -> TokenSet | None:
        assert self._redis is not None and self._credentials_key is not None
        raw = await self._redis.get(token_key(self._key_prefix, *key))
        if raw is None:
            return None
        text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
        try:
            return unseal_tokens(self._credentials_key, text, self._associated_data(key))
        except ValueError:
            # Sealed under another key (a rotation) or damaged: as if absent.
            return None

    async def _publish(self, key: _Key, tokens: TokenSet) -> None:
        assert self._redis is not None and self._credentials_key is not None
        if tokens.expires_at_ms is None:
            ttl_ms = _UNKNOWN_LIFETIME_TTL_MS
        else:
            ttl_ms = max(tokens.expires_at_ms - self._now_ms(), _MIN_SHARED_TTL_MS)
        sealed = seal_tokens(self._credentials_key, tokens, self._associated_data(key))
        try:
            await self._redis.set(token_key(self._key_prefix, *key), sealed, px=ttl_ms)
        except RedisError as exc:
            # The refresh succeeded and is kept in memory and reported; others will wait, then
            # refresh with the rotated token they cannot see and fail once: not worth failing
            # this step for.
            self._on_warning(
                "oauth2_token_share_failed",
                {"tenantId": key[0], "connectionId": key[1], "reason": type(exc).__name__},
            )

    async def _release(self, lease: str, owner: str) -> None:
        assert self._redis is not None
        try:
            # Compare-and-delete: after our lease expired someone else may hold it.
            await self._redis.eval(_RELEASE_LEASE, 1, lease, owner)
        except RedisError:
            pass  # It expires by itself.

    # --- the control plane ----------------------------------------------------------------

    async def _report(self, key: _Key, tokens: TokenSet) -> bool:
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
            async with self._control_session.put(
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
        self.report_failures += 1
        self._unreported[key] = tokens
        self._on_warning("oauth2_token_report_failed", {**fields, "reason": reason})
        return False


async def _read_limited(response: aiohttp.ClientResponse, limit_bytes: int) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_chunked(65_536):
        body += chunk
        if len(body) > limit_bytes:
            raise AuthError(f"token endpoint answered more than {limit_bytes} bytes")
    return bytes(body)


def _retry_after_s(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _oauth_error(body: bytes) -> str:
    # Only the RFC 6749 error code, checked to be a bare word: error_description is free text
    # and could echo what was sent.
    try:
        data = json.loads(body)
    except ValueError:
        return "(no OAuth2 error code)"
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, str) and _OAUTH_ERROR.fullmatch(error):
        return error
    return "(no OAuth2 error code)"


def _retrieve_exception(task: asyncio.Future[str]) -> None:
    # The caller may be gone (canceled); its error is then nobody's, not an "unretrieved" one.
    if not task.cancelled():
        task.exception()


def _log_warning(event: str, fields: Mapping[str, object]) -> None:
    log.warning("%s %s", event, dict(fields))
