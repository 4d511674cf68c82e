"""OAuth2 access tokens: when to refresh, refreshing once however many runs ask, and keeping the
rotated refresh token.

``OAuth2TokenManager.access_token`` answers with the newest token it knows of and refreshes it
when it expires within the skew or was just rejected with a 401: once per process (a lock per
tenant and connection) and once across processes (a Redis lease; the winner shares the new
tokens sealed with AES-256-GCM, never in plain text). The refresh is the ``refresh_token`` grant;
refused is ``AUTH_FAILED``, not retryable, and an endpoint that is down or slow is ``AUTH_FAILED``,
retryable. New tokens are reported to the control plane so a rotated refresh token is never lost.

The package, by concern: ``tokens`` (token sets, sealing, what this process holds), ``grant``
(the HTTP refresh grant), ``coordination`` (the Redis lease and the shared sealed token),
``report`` (to the control plane), ``manager`` (``OAuth2TokenManager``, which decides and
orchestrates). Import from here.
"""

from runner.http.oauth2.coordination import lease_key, token_key
from runner.http.oauth2.grant import TokenRejected
from runner.http.oauth2.manager import OAuth2TokenManager
from runner.http.oauth2.tokens import (
    TokenSet,
    WarningHook,
    needs_refresh,
    seal_tokens,
    tokens_from_secrets,
    unseal_tokens,
)

__all__ = [
    "OAuth2TokenManager",
    "TokenRejected",
    "TokenSet",
    "WarningHook",
    "lease_key",
    "needs_refresh",
    "seal_tokens",
    "token_key",
    "tokens_from_secrets",
    "unseal_tokens",
]
