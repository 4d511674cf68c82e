"""Auth adapters driven by hand, the driver around a fake ``send``, building adapters from
connections, the refresh decision and token sealing. No sockets."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from runner.contract import Connection, ConnectionConfig
from runner.errors import AuthError, CredentialsError, ErrorCode
from runner.http.auth import (
    ALWAYS_CREDENTIAL_HEADERS,
    ApiKeyAuth,
    Auth,
    BasicAuth,
    CustomHeaderAuth,
    OAuth2Auth,
    TokenNeeded,
    build_auth,
    credential_names,
    secret_values,
    send_with_auth,
    sensitive_names,
)
from runner.http.messages import HttpRequest, HttpResponse
from runner.http.oauth2 import (
    OAuth2TokenManager,
    TokenSet,
    lease_key,
    needs_refresh,
    seal_tokens,
    token_key,
    tokens_from_secrets,
    unseal_tokens,
)

REQUEST = HttpRequest("GET", "https://api.example/v1/things", query=(("page", "2"),))
OK = HttpResponse(200, {}, b"{}")
UNAUTHORIZED = HttpResponse(401, {}, b"")


def connection(kind: Any, secrets: dict[str, Any] | None, **config: Any) -> Connection:
    return Connection(id="conn_1", type=kind, config=ConnectionConfig(**config), secrets=secrets)


class NoTokens(OAuth2TokenManager):
    """build_auth only stores the manager; these tests never reach it."""

    def __init__(self) -> None:
        pass


# --- static adapters -------------------------------------------------------------------------


def test_api_key_in_header_is_set_and_the_flow_ends_after_one_response() -> None:
    flow = ApiKeyAuth("X-API-Key", "k-123", "header").auth_flow(REQUEST)

    sent = next(flow)

    assert isinstance(sent, HttpRequest)
    assert sent.headers == {"X-API-Key": "k-123"}
    assert sent.query == REQUEST.query
    with pytest.raises(StopIteration):
        flow.send(UNAUTHORIZED)


def test_api_key_in_query_replaces_a_parameter_of_the_same_name() -> None:
    request = REQUEST.with_query("api_key", "from-template")
    flow = ApiKeyAuth("api_key", "k-123", "query").auth_flow(request)

    sent = next(flow)

    assert isinstance(sent, HttpRequest)
    assert sent.query == (("page", "2"), ("api_key", "k-123"))
    assert sent.headers == {}


def test_basic_auth_header_is_base64_of_user_colon_password() -> None:
    sent = next(BasicAuth("alice", "pä:ss").auth_flow(REQUEST))

    assert isinstance(sent, HttpRequest)
    scheme, _, encoded = sent.headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == "alice:pä:ss"


def test_custom_headers_are_all_set_replacing_same_named_headers_case_insensitively() -> None:
    request = REQUEST.with_header("x-tenant-secret", "old")
    auth = CustomHeaderAuth({"X-Tenant-Secret": "s1", "X-Signature": "s2"})

    sent = next(auth.auth_flow(request))

    assert isinstance(sent, HttpRequest)
    assert sent.headers == {"X-Tenant-Secret": "s1", "X-Signature": "s2"}


# --- the OAuth2 flow -------------------------------------------------------------------------


def oauth2_auth() -> OAuth2Auth:
    conn = connection("OAUTH2", {"accessToken": "at-0"}, token_url="https://idp/token")
    return OAuth2Auth(NoTokens(), "ten_1", conn)


def test_oauth2_flow_asks_for_a_token_then_sends_it_as_bearer() -> None:
    flow = oauth2_auth().auth_flow(REQUEST)

    assert next(flow) == TokenNeeded(force_refresh=False, rejected_token=None)
    sent = flow.send("at-1")

    assert isinstance(sent, HttpRequest)
    assert sent.headers["Authorization"] == "Bearer at-1"
    with pytest.raises(StopIteration):
        flow.send(OK)


def test_oauth2_flow_on_401_asks_once_for_a_new_token_and_retries_once() -> None:
    flow = oauth2_auth().auth_flow(REQUEST)
    next(flow)
    flow.send("at-1")

    need = flow.send(UNAUTHORIZED)
    assert need == TokenNeeded(force_refresh=True, rejected_token="at-1")
    retried = flow.send("at-2")
    assert isinstance(retried, HttpRequest)
    assert retried.headers["Authorization"] == "Bearer at-2"
    assert retried.url == REQUEST.url and retried.query == REQUEST.query

    # A second 401 is the answer: the flow ends, no third request.
    with pytest.raises(StopIteration):
        flow.send(UNAUTHORIZED)


# --- the driver ------------------------------------------------------------------------------


class ScriptedTokens(OAuth2Auth):
    """The OAuth2 flow with tokens handed out from a list instead of a token endpoint."""

    def __init__(self, tokens: list[str]) -> None:
        super().__init__(NoTokens(), "ten_1", connection("OAUTH2", {}))
        self.tokens = tokens
        self.needs: list[TokenNeeded] = []

    async def obtain_token(self, need: TokenNeeded) -> str:
        self.needs.append(need)
        return self.tokens.pop(0)


class FakeApi:
    """Accepts only ``Bearer <accepted>``; records what it was sent."""

    def __init__(self, accepted: set[str]) -> None:
        self.accepted = accepted
        self.seen: list[str] = []
        self.requests: list[HttpRequest] = []

    async def send(self, request: HttpRequest) -> HttpResponse:
        auth = request.headers.get("Authorization", "")
        self.seen.append(auth)
        self.requests.append(request)
        token = auth.removeprefix("Bearer ")
        return OK if token in self.accepted else UNAUTHORIZED


async def test_driver_without_auth_sends_the_request_as_is() -> None:
    api = FakeApi(set())

    response = await send_with_auth(None, REQUEST, api.send)

    assert response is UNAUTHORIZED
    assert api.seen == [""]


async def test_driver_refreshes_after_401_and_returns_the_retry() -> None:
    auth = ScriptedTokens(["stale", "fresh"])
    api = FakeApi({"fresh"})

    response = await send_with_auth(auth, REQUEST, api.send)

    assert response.status == 200
    assert api.seen == ["Bearer stale", "Bearer fresh"]
    assert auth.needs == [TokenNeeded(), TokenNeeded(force_refresh=True, rejected_token="stale")]


async def test_driver_returns_the_second_401() -> None:
    auth = ScriptedTokens(["stale", "also-bad"])
    api = FakeApi(set())

    response = await send_with_auth(auth, REQUEST, api.send)

    assert response.status == 401
    assert api.seen == ["Bearer stale", "Bearer also-bad"]


async def test_driver_sends_static_auth_once_even_on_401() -> None:
    api = FakeApi(set())

    response = await send_with_auth(BasicAuth("u", "p"), REQUEST, api.send)

    assert response.status == 401
    assert len(api.seen) == 1


@pytest.mark.parametrize(
    "adapter",
    [
        ApiKeyAuth("X-Api-Key", "k1", "header"),
        ApiKeyAuth("key", "k1", "query"),
        BasicAuth("u", "p"),
        CustomHeaderAuth({"X-One": "1", "X-Two": "2"}),
        Auth(),
    ],
    ids=["api-key-header", "api-key-query", "basic", "custom-header", "none"],
)
async def test_a_static_adapter_prepares_the_request_its_flow_would_send(adapter: Auth) -> None:
    api = FakeApi(set())
    await send_with_auth(adapter, REQUEST, api.send)

    assert adapter.static or type(adapter) is Auth
    assert [adapter.prepare(REQUEST)] == api.requests


def test_a_token_adapter_is_not_static_and_cannot_be_prepared() -> None:
    adapter = OAuth2Auth(NoTokens(), "ten_1", connection("OAUTH2", {"accessToken": "t"}))
    assert not adapter.static
    with pytest.raises(TypeError):
        adapter.prepare(REQUEST)


async def test_a_non_token_adapter_cannot_be_asked_for_a_token() -> None:
    with pytest.raises(AuthError) as caught:
        await Auth().obtain_token(TokenNeeded())
    assert caught.value.code is ErrorCode.INTERNAL


# --- build_auth ------------------------------------------------------------------------------


def build(conn: Connection) -> Auth | None:
    return build_auth(conn, tokens=NoTokens(), tenant_id="ten_1", now_ms=lambda: 0)


def test_build_auth_picks_the_adapter_for_each_type() -> None:
    api_key = connection("API_KEY", {"apiKey": "k"}, api_key_name="key", api_key_in="query")
    assert build(connection("NONE", {})) is None
    built = build(api_key)
    assert isinstance(built, ApiKeyAuth) and built.location == "query" and built.name == "key"
    assert isinstance(build(connection("BASIC", {"username": "u", "password": ""})), BasicAuth)
    custom = connection("CUSTOM_HEADER", {"headers": {"X-A": "1", "X-B": "2"}})
    assert isinstance(build(custom), CustomHeaderAuth)
    oauth = connection(
        "OAUTH2",
        {"accessToken": "a", "refreshToken": "r", "expiresAt": 5, "clientSecret": "c"},
        token_url="https://idp/token",
    )
    assert isinstance(build(oauth), OAuth2Auth)


@pytest.mark.parametrize(
    ("conn", "field"),
    [
        (connection("API_KEY", {"apiKey": "sekrit"}), "config.apiKeyName"),
        (connection("API_KEY", {}, api_key_name="X-Key"), "secrets.apiKey"),
        (connection("API_KEY", {"apiKey": ""}, api_key_name="X-Key"), "secrets.apiKey"),
        (connection("BASIC", {"password": "sekrit"}), "secrets.username"),
        (connection("BASIC", {"username": "bob"}), "secrets.password"),
        (connection("CUSTOM_HEADER", {}), "secrets.headers"),
        (connection("OAUTH2", {"refreshToken": "sekrit"}), "secrets.accessToken"),
        (connection("OAUTH2", {"accessToken": "a", "refreshToken": "sekrit"}), "config.tokenUrl"),
    ],
)
def test_build_auth_names_the_missing_field_and_connection_never_a_value(
    conn: Connection, field: str
) -> None:
    with pytest.raises(CredentialsError) as caught:
        build(conn)

    message = str(caught.value)
    assert caught.value.code is ErrorCode.CREDENTIALS_UNAVAILABLE
    assert field in message and "conn_1" in message
    assert "sekrit" not in message and not caught.value.retryable


@pytest.mark.parametrize(
    "conn",
    [
        connection("API_KEY", {"apiKey": 12345}, api_key_name="X-Key"),
        connection("API_KEY", {"apiKey": "sekrit\r\nX-Evil: 1"}, api_key_name="X-Key"),
        connection("API_KEY", {"apiKey": "sekrit"}, api_key_name="Bad Name"),
        connection("CUSTOM_HEADER", {"headers": {"X-A": "sekrit\n"}}),
        connection("CUSTOM_HEADER", {"headers": ["sekrit"]}),
        connection("OAUTH2", {"accessToken": "sekrit", "expiresAt": "soon"}),
        connection("BASIC", {"username": "a:b", "password": "sekrit"}),
        connection("BASIC", None),
    ],
)
def test_build_auth_refuses_malformed_secrets_without_quoting_them(conn: Connection) -> None:
    with pytest.raises(CredentialsError) as caught:
        build(conn)
    assert "sekrit" not in str(caught.value) and "conn_1" in str(caught.value)


def test_redaction_inputs_cover_every_secret_and_the_basic_pair() -> None:
    basic = connection("BASIC", {"username": "bob", "password": "pw"})
    custom = connection("CUSTOM_HEADER", {"headers": {"X-Sig": "s1"}})
    api_key = connection("API_KEY", {"apiKey": "k"}, api_key_name="X-Key")
    oauth = connection(
        "OAUTH2", {"accessToken": "a", "refreshToken": "r", "expiresAt": 1, "clientSecret": "c"}
    )

    assert sorted(secret_values(basic)) == ["bob", "bob:pw", "pw"]
    assert secret_values(custom) == ["s1"] and sensitive_names(custom) == ["X-Sig"]
    assert secret_values(api_key) == ["k"] and sensitive_names(api_key) == ["X-Key"]
    assert sorted(secret_values(oauth)) == ["a", "c", "r"] and sensitive_names(oauth) == []


# --- refresh decisions and sealing ----------------------------------------------------------


@pytest.mark.parametrize(
    ("expires_at_ms", "now_ms", "expected"),
    [
        (100_000, 39_999, False),  # 60_001 ms left: outside the skew
        (100_000, 40_000, True),  # exactly at the skew boundary: refresh
        (100_000, 40_001, True),
        (100_000, 100_000, True),  # expired
        (None, 10**15, False),  # unknown expiry: used until rejected
    ],
)
def test_needs_refresh_at_the_skew_boundary(
    expires_at_ms: int | None, now_ms: int, expected: bool
) -> None:
    assert needs_refresh(expires_at_ms, now_ms, 60_000) is expected


def test_tokens_from_secrets_reads_the_contract_shape() -> None:
    tokens = tokens_from_secrets({"accessToken": "a", "refreshToken": "r", "expiresAt": 7.0})
    assert tokens == TokenSet("a", "r", 7)
    assert tokens_from_secrets({"accessToken": "a"}) == TokenSet("a", None, None)
    assert tokens_from_secrets(None) is None


def test_token_set_repr_never_shows_the_tokens() -> None:
    assert "sekrit" not in repr(TokenSet("sekrit", "sekrit2", 1, 0))


def test_sealed_tokens_round_trip_only_in_their_own_context() -> None:
    key = bytes(range(32))
    tokens = TokenSet("at-secret", "rt-secret", 1_000, 500)

    sealed = seal_tokens(key, tokens, b"ten_1:conn_1")

    assert "secret" not in sealed and sealed.startswith("v1.")
    assert unseal_tokens(key, sealed, b"ten_1:conn_1") == tokens
    with pytest.raises(ValueError):
        unseal_tokens(key, sealed, b"ten_2:conn_1")
    with pytest.raises(ValueError):
        unseal_tokens(bytes(32), sealed, b"ten_1:conn_1")
    with pytest.raises(ValueError):
        unseal_tokens(key, "v0.x.y", b"ten_1:conn_1")


def test_redis_keys_carry_prefix_tenant_and_connection() -> None:
    assert lease_key("bull:workflow-runs", "t", "c") == "bull:workflow-runs:oauth2:t:c:lease"
    assert token_key("bull:workflow-runs", "t", "c") == "bull:workflow-runs:oauth2:t:c:token"


# --- what each adapter names as credentials (the redirect follower strips these) ------------


@pytest.mark.parametrize(
    ("adapter", "headers", "query"),
    [
        (ApiKeyAuth("X-API-Key", "k", "header"), {"x-api-key"}, set()),
        (ApiKeyAuth("api_key", "k", "query"), set(), {"api_key"}),
        (BasicAuth("u", "p"), {"authorization"}, set()),
        (CustomHeaderAuth({"X-Tenant": "t", "X-Sig": "s"}), {"x-tenant", "x-sig"}, set()),
        (OAuth2Auth(NoTokens(), "ten", connection("OAUTH2", {})), {"authorization"}, set()),
    ],
)
def test_every_adapter_names_what_its_flow_sets(
    adapter: Auth, headers: set[str], query: set[str]
) -> None:
    names = credential_names(adapter)

    assert names.headers == ALWAYS_CREDENTIAL_HEADERS | headers
    assert names.query == query
    if adapter.static:
        # And stripping those names takes off everything the flow put on.
        assert names.strip(adapter.prepare(REQUEST)) == REQUEST


def test_stripping_keeps_what_is_not_a_credential() -> None:
    request = REQUEST.with_header("Accept", "application/json").with_header("Cookie", "sid=1")

    stripped = credential_names(None).strip(request)

    assert stripped.headers == {"Accept": "application/json"}
    assert stripped.query == REQUEST.query
