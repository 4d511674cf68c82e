"""Auth adapters: how a connection's credentials go onto a request, and the one driver that runs
them.

Each adapter is an I/O-free generator flow, as in httpx: ``auth_flow(request)`` yields the
request to send and receives its response, so "refresh on 401, retry once" is a few lines and
every adapter is tested by driving the generator by hand. The one piece of I/O auth needs, an
OAuth2 access token, is asked for by yielding ``TokenNeeded``; the driver answers by sending the
token (a ``str``) back into the flow::

    flow = auth.auth_flow(request)
    step = next(flow)                       # HttpRequest to send, or TokenNeeded
    step = flow.send(response_or_token)     # ... until StopIteration: the last response stands

``send_with_auth`` is that loop for the HTTP client; ``build_auth`` turns a resolved
``Connection`` into an adapter (or ``None`` for ``NONE``), failing with
``CREDENTIALS_UNAVAILABLE`` when a field is missing, naming the field and the connection, never
a value. ``secret_values`` and ``sensitive_names`` say what the run's ``Redactor`` must mask.

Each adapter also names what it puts on a request (``credential_names``): the redirect follower
strips exactly those, and the headers that always carry credentials, when a hop leaves the
origin, so a new adapter cannot add a credential that a redirect carries away.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from runner.contract import Connection
from runner.errors import AuthError, CredentialsError, ErrorCode
from runner.http.messages import HttpRequest, HttpResponse

if TYPE_CHECKING:
    from runner.http.oauth2 import OAuth2TokenManager


@dataclass(frozen=True, slots=True)
class TokenNeeded:
    """Yielded by a flow that needs an access token; the driver sends the token back.

    ``force_refresh`` asks for a new token; ``rejected_token`` is the one the API just refused,
    so that a refresh already made by someone else is reused rather than repeated."""

    force_refresh: bool = False
    rejected_token: str | None = None


AuthFlow = Generator[HttpRequest | TokenNeeded, HttpResponse | str, None]

# Headers that carry credentials whoever set them (an adapter, a step's headers, a template).
ALWAYS_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


@dataclass(frozen=True, slots=True)
class CredentialNames:
    """The header names (lower-cased) and query-parameter names that carry a credential."""

    headers: frozenset[str] = ALWAYS_CREDENTIAL_HEADERS
    query: frozenset[str] = frozenset()

    def strip(self, request: HttpRequest) -> HttpRequest:
        """``request`` without any of these headers or query parameters."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in self.headers}
        query = tuple((k, v) for k, v in request.query if k not in self.query)
        return HttpRequest(request.method, request.url, query, headers, request.body)


def credential_names(auth: Auth | None) -> CredentialNames:
    """What ``auth`` puts on a request, with the headers that always carry credentials."""
    if auth is None:
        return CredentialNames()
    headers, query = auth.credential_names()
    return CredentialNames(
        headers=ALWAYS_CREDENTIAL_HEADERS | {h.lower() for h in headers},
        query=frozenset(query),
    )


class Auth:
    """Base adapter: sends the request unchanged."""

    # A static adapter's flow yields one request and ignores its response: ``prepare`` gives
    # that request without a driver around the send.
    static = False

    def auth_flow(self, request: HttpRequest) -> AuthFlow:
        yield request

    def prepare(self, request: HttpRequest) -> HttpRequest:
        """The one request a static adapter's flow sends."""
        flow = self.auth_flow(request)
        try:
            step = next(flow)
        finally:
            flow.close()
        if not isinstance(step, HttpRequest):
            raise TypeError(f"{type(self).__name__} is not static: it needs a token")
        return step

    async def obtain_token(self, need: TokenNeeded) -> str:
        raise AuthError(f"{type(self).__name__} does not use tokens", code=ErrorCode.INTERNAL)

    def credential_names(self) -> tuple[frozenset[str], frozenset[str]]:
        """The header names and query-parameter names this adapter's flow sets."""
        return frozenset(), frozenset()


class ApiKeyAuth(Auth):
    static = True

    def __init__(self, name: str, value: str, location: Literal["header", "query"]) -> None:
        self.name = name
        self._value = value
        self.location = location

    def auth_flow(self, request: HttpRequest) -> AuthFlow:
        if self.location == "header":
            yield request.with_header(self.name, self._value)
        else:
            # Replace rather than append: a template-supplied parameter of the same name must not
            # travel next to the key.
            yield request.with_query_replaced(self.name, self._value)

    def credential_names(self) -> tuple[frozenset[str], frozenset[str]]:
        if self.location == "header":
            return frozenset({self.name}), frozenset()
        return frozenset(), frozenset({self.name})


class BasicAuth(Auth):
    static = True

    def __init__(self, username: str, password: str) -> None:
        self._header = basic_auth_header(username, password)

    def auth_flow(self, request: HttpRequest) -> AuthFlow:
        yield request.with_header("Authorization", self._header)

    def credential_names(self) -> tuple[frozenset[str], frozenset[str]]:
        return frozenset({"Authorization"}), frozenset()


class CustomHeaderAuth(Auth):
    static = True

    def __init__(self, headers: Mapping[str, str]) -> None:
        self._headers = dict(headers)

    def auth_flow(self, request: HttpRequest) -> AuthFlow:
        for name, value in self._headers.items():
            request = request.with_header(name, value)
        yield request

    def credential_names(self) -> tuple[frozenset[str], frozenset[str]]:
        return frozenset(self._headers), frozenset()


class OAuth2Auth(Auth):
    """Bearer token from the token manager, which refreshes it before use when it is about to
    expire; after a 401 the flow asks once for a new token and retries once. A second 401 is the
    answer."""

    def __init__(self, tokens: OAuth2TokenManager, tenant_id: str, connection: Connection) -> None:
        self._tokens = tokens
        self._tenant_id = tenant_id
        self._connection = connection

    def auth_flow(self, request: HttpRequest) -> AuthFlow:
        token = _expect_token((yield TokenNeeded()))
        response = yield request.with_header("Authorization", f"Bearer {token}")
        if not isinstance(response, HttpResponse) or response.status != 401:
            return
        token = _expect_token((yield TokenNeeded(force_refresh=True, rejected_token=token)))
        yield request.with_header("Authorization", f"Bearer {token}")

    def credential_names(self) -> tuple[frozenset[str], frozenset[str]]:
        return frozenset({"Authorization"}), frozenset()

    async def obtain_token(self, need: TokenNeeded) -> str:
        return await self._tokens.access_token(
            self._tenant_id,
            self._connection,
            force_refresh=need.force_refresh,
            rejected_token=need.rejected_token,
        )


def _expect_token(sent: HttpResponse | str) -> str:
    if not isinstance(sent, str):
        raise TypeError("the auth flow expected a token, got a response")
    return sent


def basic_auth_header(username: str, password: str) -> str:
    raw = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


async def send_with_auth(
    auth: Auth | None,
    request: HttpRequest,
    send: Callable[[HttpRequest], Awaitable[HttpResponse]],
) -> HttpResponse:
    """Run ``auth``'s flow around ``send``: the last response the flow saw is the result."""
    if auth is None:
        return await send(request)
    flow = auth.auth_flow(request)
    try:
        step = next(flow)
        while True:
            if isinstance(step, TokenNeeded):
                step = flow.send(await auth.obtain_token(step))
                continue
            response = await send(step)
            try:
                step = flow.send(response)
            except StopIteration:
                return response
    finally:
        flow.close()


# --- building adapters from a resolved connection ------------------------------------------

# RFC 9110 token characters: anything else as a header name is refused by aiohttp with the name
# (and sometimes the value) in the message.
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def build_auth(
    connection: Connection,
    *,
    tokens: OAuth2TokenManager,
    tenant_id: str,
    now_ms: Callable[[], int] | None = None,
) -> Auth | None:
    """The adapter for ``connection``; ``None`` for ``NONE``. ``now_ms`` is accepted for the
    client's convenience; expiry decisions belong to the token manager's clock."""
    kind = connection.type
    if kind == "NONE":
        return None
    secrets = _secrets_of(connection)
    if kind == "API_KEY":
        name = connection.config.api_key_name
        if not name:
            raise _missing(connection, "config.apiKeyName")
        _check_header_name(connection, "config.apiKeyName", name)
        value = _secret_str(connection, secrets, "apiKey")
        return ApiKeyAuth(name, value, connection.config.api_key_in)
    if kind == "BASIC":
        username = _secret_str(connection, secrets, "username")
        password = _secret_str(connection, secrets, "password", allow_empty=True)
        if ":" in username:
            raise CredentialsError(
                f"connection {connection.id}: secrets.username must not contain ':'"
            )
        return BasicAuth(username, password)
    if kind == "CUSTOM_HEADER":
        return CustomHeaderAuth(_custom_headers(connection, secrets))
    if kind == "OAUTH2":
        _secret_str(connection, secrets, "accessToken")
        if secrets.get("refreshToken") is not None:
            _secret_str(connection, secrets, "refreshToken")
            if not connection.config.token_url:
                raise _missing(connection, "config.tokenUrl")
        expires_at = secrets.get("expiresAt")
        if expires_at is not None and (
            isinstance(expires_at, bool) or not isinstance(expires_at, int | float)
        ):
            raise CredentialsError(
                f"connection {connection.id}: secrets.expiresAt must be epoch milliseconds"
            )
        if secrets.get("clientSecret") is not None:
            _secret_str(connection, secrets, "clientSecret")
        return OAuth2Auth(tokens, tenant_id, connection)
    raise CredentialsError(f"connection {connection.id}: unknown connection type {kind!r}")


def _secrets_of(connection: Connection) -> dict[str, Any]:
    if connection.secrets is None:
        raise CredentialsError(
            f"connection {connection.id} ({connection.type}): no secrets were resolved for it"
        )
    return connection.secrets


def _missing(connection: Connection, field: str) -> CredentialsError:
    return CredentialsError(f"connection {connection.id} ({connection.type}): {field} is missing")


def _secret_str(
    connection: Connection, secrets: Mapping[str, Any], key: str, *, allow_empty: bool = False
) -> str:
    value = secrets.get(key)
    if value is None or (value == "" and not allow_empty):
        raise _missing(connection, f"secrets.{key}")
    if not isinstance(value, str):
        raise CredentialsError(f"connection {connection.id}: secrets.{key} must be a string")
    _check_header_value(connection, f"secrets.{key}", value)
    return value


def _custom_headers(connection: Connection, secrets: Mapping[str, Any]) -> dict[str, str]:
    headers = secrets.get("headers")
    if headers is None:
        raise _missing(connection, "secrets.headers")
    if not isinstance(headers, dict):
        raise CredentialsError(f"connection {connection.id}: secrets.headers must be an object")
    out: dict[str, str] = {}
    for name, value in headers.items():
        _check_header_name(connection, "a secrets.headers name", name)
        if not isinstance(value, str):
            raise CredentialsError(
                f"connection {connection.id}: secrets.headers.{name} must be a string"
            )
        _check_header_value(connection, f"secrets.headers.{name}", value)
        out[name] = value
    return out


def _check_header_name(connection: Connection, field: str, name: object) -> None:
    if not isinstance(name, str) or not _HEADER_NAME.match(name):
        raise CredentialsError(f"connection {connection.id}: {field} is not a valid header name")


def _check_header_value(connection: Connection, field: str, value: str) -> None:
    # A line break would be header injection, and aiohttp's error for it quotes the value.
    if "\r" in value or "\n" in value or "\x00" in value:
        raise CredentialsError(f"connection {connection.id}: {field} contains a line break")


# --- what the redactor must know about a connection ----------------------------------------


def secret_values(connection: Connection) -> list[str]:
    """Every secret string of ``connection`` (and the ``user:pass`` pair Basic auth encodes)."""
    secrets = connection.secrets or {}
    out: list[str] = []
    for key, value in secrets.items():
        if key == "headers" and isinstance(value, dict):
            out.extend(v for v in value.values() if isinstance(v, str))
        elif key != "expiresAt" and isinstance(value, str):
            out.append(value)
    username, password = secrets.get("username"), secrets.get("password")
    if isinstance(username, str) and isinstance(password, str):
        out.append(f"{username}:{password}")
    return [v for v in out if v]


def sensitive_names(connection: Connection) -> list[str]:
    """Header and query-parameter names whose values are secret for ``connection``."""
    names: list[str] = []
    if connection.type == "API_KEY" and connection.config.api_key_name:
        names.append(connection.config.api_key_name)
    if connection.type == "CUSTOM_HEADER" and connection.secrets:
        headers = connection.secrets.get("headers")
        if isinstance(headers, dict):
            names.extend(n for n in headers if isinstance(n, str))
    return names
