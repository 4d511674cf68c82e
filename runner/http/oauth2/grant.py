"""The OAuth2 ``refresh_token`` grant: one POST to ``config.tokenUrl``, its outcome as data.

Form-encoded, the client authenticating in the body or with HTTP Basic per ``config.clientAuth``.
Refused (4xx) is ``TokenRejected``: ``AUTH_FAILED``, not retryable; a 5xx, a 429 or an unreachable
or slow endpoint is ``AUTH_FAILED``, retryable. An error's text never holds a token, a secret or
the endpoint's free-text ``error_description``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp

from runner import jsonlimits
from runner.contract import Connection
from runner.errors import AuthError
from runner.http.auth import basic_auth_header
from runner.http.oauth2.tokens import TokenSet

_MAX_TOKEN_RESPONSE_BYTES = 1 << 20
_OAUTH_ERROR = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# RFC 6749 A.12/A.17: tokens are visible ASCII; anything else cannot go into a header.
_TOKEN_CHARS = re.compile(r"[\x20-\x7e]+")
_MAX_EXPIRES_IN_S = 10 * 365 * 86_400  # past this (or negative, or not finite): not an expiry


class TokenRejected(AuthError):
    """The token endpoint refused the refresh (4xx, e.g. ``invalid_grant``): not retryable."""

    def __init__(self, message: str, *, oauth_error: str, status: int) -> None:
        super().__init__(message, retryable=False, status=status)
        self.oauth_error = oauth_error


async def refresh_grant(
    session: aiohttp.ClientSession,
    connection: Connection,
    base: TokenSet | None,
    *,
    client_timeout: aiohttp.ClientTimeout,
    now_ms: Callable[[], int],
) -> TokenSet:
    """New tokens for ``connection`` from ``base``'s refresh token; raises ``AuthError``."""
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
        async with session.post(
            config.token_url,
            data=form,
            headers=headers,
            timeout=client_timeout,
            allow_redirects=False,
        ) as response:
            status = response.status
            retry_after = response.headers.get("Retry-After")
            body = await _read_limited(response, _MAX_TOKEN_RESPONSE_BYTES, where)
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
    return _parse_token_response(where, body, base, now_ms)


def _parse_token_response(
    where: str, body: bytes, base: TokenSet, now_ms: Callable[[], int]
) -> TokenSet:
    try:
        data = _decode(body)
    except jsonlimits.JsonLimitError as err:
        raise AuthError(f"{where} answered a body {err}") from None
    except ValueError:
        raise AuthError(f"{where} answered with a body that is not JSON") from None
    if not isinstance(data, dict):
        raise AuthError(f"{where} answered without an access_token")
    access = data.get("access_token")
    if not isinstance(access, str) or not access:
        raise AuthError(f"{where} answered without an access_token")
    refresh = data.get("refresh_token")
    if not _TOKEN_CHARS.fullmatch(access) or (
        isinstance(refresh, str) and refresh and not _TOKEN_CHARS.fullmatch(refresh)
    ):
        raise AuthError(f"{where} answered a token with characters outside visible ASCII")
    expires_in = data.get("expires_in")
    if isinstance(expires_in, str) and expires_in.isdigit() and len(expires_in) <= 12:
        expires_in = int(expires_in)
    if not (
        isinstance(expires_in, int | float)
        and not isinstance(expires_in, bool)
        and 0 <= expires_in <= _MAX_EXPIRES_IN_S
    ):
        expires_in = None  # NaN and 1e999 fail every comparison; the token lives until a 401
    now = now_ms()
    return TokenSet(
        access_token=access,
        # No refresh_token in the answer: the old one stays valid (RFC 6749 6).
        refresh_token=refresh if isinstance(refresh, str) and refresh else base.refresh_token,
        expires_at_ms=now + int(expires_in * 1000) if expires_in is not None else None,
        obtained_at_ms=now,
    )


async def _read_limited(response: aiohttp.ClientResponse, limit_bytes: int, where: str) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_chunked(65_536):
        body += chunk
        if len(body) > limit_bytes:
            raise AuthError(f"{where} answered more than {limit_bytes} bytes")
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
        data = _decode(body)
    except (ValueError, jsonlimits.JsonLimitError):
        return "(no OAuth2 error code)"
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, str) and _OAUTH_ERROR.fullmatch(error):
        return error
    return "(no OAuth2 error code)"


def _decode(body: bytes) -> Any:
    """The token endpoint's JSON under the limits of every decoded body (``runner.jsonlimits``):
    no deeper than ``RUNNER_MAX_JSON_DEPTH``, no duplicate key (two ``access_token`` would mean
    one thing here and another to a client that keeps the first), no NaN or Infinity.
    Raises ``JsonLimitError`` or ``ValueError``."""
    jsonlimits.check_text(body)
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise jsonlimits.JsonLimitError(jsonlimits.too_deep_message()) from None


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")
