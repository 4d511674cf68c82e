"""OAuth2 token sets: what a connection's tokens are, when they need a refresh, and sealing them.

Sealed is ``v1.<nonce>.<ciphertext>`` (base64url, AES-256-GCM), the format of sealed credentials;
the associated data binds a sealed token to its ``tenant:connection``. Also the vocabulary the
rest of the package shares: ``TokenKey`` and ``WarningHook``. ``HeldTokens`` is what this process
holds, newest per connection, and keeps masked in every output.
"""

from __future__ import annotations

import base64
import json
import os
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from runner.redact import SecretRegistry

# (tenant id, connection id): what a token, its lock and its lease belong to.
TokenKey = tuple[str, str]
WarningHook = Callable[[str, Mapping[str, object]], None]


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


class HeldTokens:
    """The newest tokens this process holds per (tenant, connection), each set masked in every
    output through the secrets registry while it is held and for ``retention_ms`` after."""

    def __init__(
        self, registry: SecretRegistry | None, *, retention_ms: int, now_ms: Callable[[], int]
    ) -> None:
        self._registry = registry
        self._retention_ms = retention_ms
        self._now_ms = now_ms
        self._tokens: dict[TokenKey, TokenSet] = {}
        # Per connection: (registered at ms, SECRETS handle) of each token pair it has held.
        self._registered: dict[TokenKey, deque[tuple[int, int]]] = {}

    def get(self, key: TokenKey) -> TokenSet | None:
        return self._tokens.get(key)

    def newest(self, key: TokenKey, from_run: TokenSet | None) -> TokenSet | None:
        """What is held, or the run's own tokens where they are newer."""
        held = self._tokens.get(key)
        if held is None or (from_run is not None and from_run.age_key > held.age_key):
            return from_run
        return held

    def keep(self, key: TokenKey, tokens: TokenSet) -> None:
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
            handles.append((now, self._registry.register(values, minted=True)))
            # A superseded token may still be on a request in flight, or echoed in a response
            # that arrives later, however often it was rotated since: keep masking it for the
            # retention window (longer than any run), then forget it.
            while len(handles) > 1 and now - handles[1][0] > self._retention_ms:
                self._registry.unregister(handles.popleft()[1])
