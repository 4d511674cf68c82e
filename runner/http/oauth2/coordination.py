"""One refresh across runner processes, through Redis: the refresh lease and the shared token.

The lease (``SET NX PX``) per (tenant, connection) says which process refreshes; that process
seals the new tokens with AES-256-GCM under the credentials key (associated data
``tenant:connection``) and stores them under a key that expires with the access token, where the
others find them. A token is never written to Redis in plain text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio
from redis.exceptions import RedisError

from runner.errors import AuthError
from runner.http.oauth2.tokens import TokenKey, TokenSet, WarningHook, seal_tokens, unseal_tokens

# A token whose lifetime is unknown is shared for this long; it is refreshed on a 401 anyway.
_UNKNOWN_LIFETIME_TTL_MS = 3_600_000
_MIN_SHARED_TTL_MS = 1_000
_POLL_FIRST_DELAY_S = 0.02
_POLL_MAX_DELAY_S = 0.25
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def lease_key(key_prefix: str, tenant_id: str, connection_id: str) -> str:
    return f"{key_prefix}:oauth2:{tenant_id}:{connection_id}:lease"


def token_key(key_prefix: str, tenant_id: str, connection_id: str) -> str:
    return f"{key_prefix}:oauth2:{tenant_id}:{connection_id}:token"


class SharedTokens:
    """The sealed token and the refresh lease of each (tenant, connection) in Redis. ``read``,
    ``await_turn`` and ``take_lease`` raise ``RedisError`` while Redis is unavailable; a failed
    ``publish`` is a warning, a failed ``release_lease`` is ignored (the lease expires)."""

    def __init__(
        self,
        redis: redis.asyncio.Redis,
        *,
        key_prefix: str,
        credentials_key: bytes,
        lease_ms: int,
        now_ms: Callable[[], int],
        on_warning: WarningHook,
    ) -> None:
        self._redis = redis
        self._key_prefix = key_prefix
        self._credentials_key = credentials_key
        self._lease_ms = lease_ms
        self._now_ms = now_ms
        self._on_warning = on_warning

    def _associated_data(self, key: TokenKey) -> bytes:
        return f"{key[0]}:{key[1]}".encode()

    async def read(self, key: TokenKey) -> TokenSet | None:
        raw = await self._redis.get(token_key(self._key_prefix, *key))
        if raw is None:
            return None
        text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
        try:
            return unseal_tokens(self._credentials_key, text, self._associated_data(key))
        except ValueError:
            # Sealed under another key (a rotation) or damaged: as if absent.
            return None

    async def publish(self, key: TokenKey, tokens: TokenSet) -> None:
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

    async def await_turn(
        self,
        key: TokenKey,
        owner: str,
        *,
        usable: Callable[[TokenSet | None], bool],
        wait_s: float,
    ) -> TokenSet | None:
        """A ``usable`` shared token, or ``None`` once ``owner`` holds the refresh lease (then
        refresh, and ``release_lease``). Polls for either for at most ``wait_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        delay_s = _POLL_FIRST_DELAY_S
        while True:
            shared = await self.read(key)
            if usable(shared):
                return shared
            if await self.take_lease(key, owner):
                return None
            if loop.time() >= deadline:
                raise AuthError(
                    f"connection {key[1]}: timed out waiting for another runner"
                    " process to refresh the OAuth2 token",
                    retryable=True,
                )
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, _POLL_MAX_DELAY_S)

    async def take_lease(self, key: TokenKey, owner: str) -> bool:
        """``SET NX PX``: whether ``owner`` now holds the refresh lease of ``key``."""
        lease = lease_key(self._key_prefix, *key)
        return bool(await self._redis.set(lease, owner, nx=True, px=self._lease_ms))

    async def release_lease(self, key: TokenKey, owner: str) -> None:
        try:
            # Compare-and-delete: after our lease expired someone else may hold it.
            await self._redis.eval(_RELEASE_LEASE, 1, lease_key(self._key_prefix, *key), owner)
        except RedisError:
            pass  # It expires by itself.
