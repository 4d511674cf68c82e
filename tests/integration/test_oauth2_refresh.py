"""OAuth2 refresh against a real local token endpoint, a fake control plane and the real Redis:
one refresh however many runs and processes ask, rotation, errors, and nothing in Redis in
plain text."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from runner.contract import Connection, ConnectionConfig
from runner.errors import AuthError, ErrorCode
from runner.http.auth import build_auth, send_with_auth
from runner.http.messages import HttpRequest, HttpResponse
from runner.http.oauth2 import OAuth2TokenManager

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

NOW_MS = 1_800_000_000_000
TENANT = "ten_acme"
CREDENTIALS_KEY = bytes(range(32))
CONTROL_PLANE_TOKEN = "cp-token"


@dataclass
class IdentityProvider:
    """A token endpoint that rotates refresh tokens: a used or unknown one gets invalid_grant."""

    valid_refresh: set[str] = field(default_factory=lambda: {"rt-0"})
    issued: int = 0
    attempts: int = 0
    requests: list[tuple[dict[str, str], dict[str, str]]] = field(default_factory=list)
    fail_status: int | None = None
    retry_after: str | None = None
    omit_refresh_token: bool = False
    # Called with the attempt number before answering; lets a test order concurrent refreshes.
    before_answer: Callable[[int], Awaitable[None]] | None = None
    puts: list[tuple[str, dict[str, str], Any]] = field(default_factory=list)
    reported: asyncio.Event = field(default_factory=asyncio.Event)
    control_plane_status: int = 204
    api_accepts: set[str] = field(default_factory=set)

    async def token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.attempts += 1
        attempt = self.attempts
        self.requests.append((form, dict(request.headers)))
        if self.before_answer is not None:
            await self.before_answer(attempt)
        if self.fail_status is not None:
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            return web.json_response(
                {"error": "temporarily_unavailable"}, status=self.fail_status, headers=headers
            )
        presented = form.get("refresh_token", "")
        if form.get("grant_type") != "refresh_token" or presented not in self.valid_refresh:
            # The description echoes the token, as some servers do: it must not reach errors.
            return web.json_response(
                {"error": "invalid_grant", "error_description": f"bad token {presented}"},
                status=400,
            )
        self.valid_refresh.discard(presented)
        self.issued += 1
        body: dict[str, Any] = {
            "access_token": f"at-{self.issued}",
            "token_type": "Bearer",
            "expires_in": 3600,
        }
        if not self.omit_refresh_token:
            body["refresh_token"] = f"rt-{self.issued}"
            self.valid_refresh.add(f"rt-{self.issued}")
        else:
            self.valid_refresh.add(presented)
        return web.json_response(body)

    async def control_plane(self, request: web.Request) -> web.Response:
        self.puts.append((request.path, dict(request.headers), await request.json()))
        self.reported.set()
        return web.Response(status=self.control_plane_status)

    async def api(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return web.json_response({"ok": True}, status=200 if token in self.api_accepts else 401)

    async def never_answers(self, request: web.Request) -> web.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


@pytest.fixture
async def idp() -> AsyncIterator[tuple[IdentityProvider, TestServer]]:
    provider = IdentityProvider()
    app = web.Application()
    app.router.add_post("/token", provider.token)
    app.router.add_post("/slow-token", provider.never_answers)
    app.router.add_put("/runner/v1/connections/{id}/oauth2-token", provider.control_plane)
    app.router.add_get("/api", provider.api)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield provider, server
    await server.close()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    key_prefix = f"test-oauth2-{uuid.uuid4().hex}"
    yield key_prefix
    client = redis.asyncio.Redis(host="127.0.0.1", port=6379)
    keys = [key async for key in client.scan_iter(match=f"{key_prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def make_manager(
    idp: tuple[IdentityProvider, TestServer], prefix: str
) -> AsyncIterator[Callable[..., OAuth2TokenManager]]:
    """Each manager gets its own session and Redis client, as a separate process would."""
    _, server = idp
    sessions: list[aiohttp.ClientSession] = []
    clients: list[redis.asyncio.Redis] = []

    def make(*, shared: bool = True, **kwargs: Any) -> OAuth2TokenManager:
        session = aiohttp.ClientSession()
        sessions.append(session)
        client = None
        if shared:
            client = redis.asyncio.Redis(host="127.0.0.1", port=6379)
            clients.append(client)
        options: dict[str, Any] = {
            "session": session,
            "redis": client,
            "key_prefix": prefix,
            "credentials_key": CREDENTIALS_KEY if shared else None,
            "control_plane_url": str(server.make_url("")),
            "control_plane_token": CONTROL_PLANE_TOKEN,
            "now_ms": lambda: NOW_MS,
            "secrets_registry": None,
        }
        options.update(kwargs)
        return OAuth2TokenManager(**options)

    yield make
    for session in sessions:
        await session.close()
    for client in clients:
        await client.aclose()


def expired_connection(server: TestServer, **config: Any) -> Connection:
    return Connection(
        id="conn_crm",
        type="OAUTH2",
        config=ConnectionConfig(
            token_url=str(server.make_url(config.pop("path", "/token"))),
            client_id="client-1",
            **config,
        ),
        secrets={
            "accessToken": "at-0",
            "refreshToken": "rt-0",
            "expiresAt": NOW_MS + 59_999,  # inside the 60 s skew: refresh before use
            "clientSecret": "cs-1",
        },
    )


# --- one process -----------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True], ids=["local", "redis"])
async def test_twenty_concurrent_runs_cause_one_refresh_and_one_report(
    idp: tuple[IdentityProvider, TestServer],
    make_manager: Callable[..., OAuth2TokenManager],
    shared: bool,
) -> None:
    provider, server = idp
    manager = make_manager(shared=shared)
    conn = expired_connection(server)

    tokens = await asyncio.gather(*(manager.access_token(TENANT, conn) for _ in range(20)))

    assert tokens == ["at-1"] * 20
    assert provider.issued == 1 and provider.attempts == 1 and manager.refresh_count == 1
    [(path, headers, body)] = provider.puts
    assert path == "/runner/v1/connections/conn_crm/oauth2-token"
    assert headers["Authorization"] == f"Bearer {CONTROL_PLANE_TOKEN}"
    assert headers["X-Tenant-Id"] == TENANT
    assert body == {
        "tenantId": TENANT,
        "accessToken": "at-1",
        "refreshToken": "rt-1",
        "expiresAt": NOW_MS + 3_600_000,
    }
    # Later calls use the kept token without asking again.
    assert await manager.access_token(TENANT, conn) == "at-1"
    assert provider.attempts == 1


async def test_a_fresh_token_from_the_run_is_used_without_refreshing(
    idp: tuple[IdentityProvider, TestServer], make_manager: Callable[..., OAuth2TokenManager]
) -> None:
    provider, server = idp
    conn = expired_connection(server)
    assert conn.secrets is not None
    fresh = Connection(
        id=conn.id,
        type=conn.type,
        config=conn.config,
        secrets={**conn.secrets, "expiresAt": NOW_MS + 60_001},
    )

    assert await make_manager().access_token(TENANT, fresh) == "at-0"
    assert provider.attempts == 0


async def test_client_authenticates_in_the_body_or_with_basic(
    idp: tuple[IdentityProvider, TestServer], make_manager: Callable[..., OAuth2TokenManager]
) -> None:
    provider, server = idp
    await make_manager(shared=False).access_token(
        TENANT, expired_connection(server, scope="read write")
    )
    provider.valid_refresh.add("rt-0")
    await make_manager(shared=False).access_token(
        "ten_other", expired_connection(server, client_auth="basic")
    )

    (body_form, body_headers), (basic_form, basic_headers) = provider.requests
    assert body_form == {
        "grant_type": "refresh_token",
        "refresh_token": "rt-0",
        "scope": "read write",
        "client_id": "client-1",
        "client_secret": "cs-1",
    }
    assert "Authorization" not in body_headers
    assert body_headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert basic_form == {"grant_type": "refresh_token", "refresh_token": "rt-0"}
    assert basic_headers["Authorization"] == "Basic " + base64.b64encode(b"client-1:cs-1").decode()


async def test_a_missing_refresh_token_in_the_answer_keeps_the_old_one(
    idp: tuple[IdentityProvider, TestServer], make_manager: Callable[..., OAuth2TokenManager]
) -> None:
    provider, server = idp
    provider.omit_refresh_token = True
    manager = make_manager(shared=False)

    assert await manager.access_token(TENANT, expired_connection(server)) == "at-1"

    kept = manager.known_tokens(TENANT, "conn_crm")
    assert kept is not None and kept.refresh_token == "rt-0"
    assert provider.puts[0][2]["refreshToken"] == "rt-0"


async def test_401_refreshes_once_and_retries_through_the_driver(
    idp: tuple[IdentityProvider, TestServer], make_manager: Callable[..., OAuth2TokenManager]
) -> None:
    provider, server = idp
    provider.api_accepts = {"at-1"}
    manager = make_manager()
    conn = expired_connection(server)
    assert conn.secrets is not None
    # Not expired by the clock, but revoked: the API answers 401.
    conn = Connection(
        id=conn.id,
        type=conn.type,
        config=conn.config,
        secrets={**conn.secrets, "expiresAt": NOW_MS + 3_000_000},
    )
    auth = build_auth(conn, tokens=manager, tenant_id=TENANT, now_ms=lambda: NOW_MS)
    seen: list[str] = []

    async with aiohttp.ClientSession() as session:

        async def send(request: HttpRequest) -> HttpResponse:
            seen.append(request.headers["Authorization"])
            async with session.get(request.url, headers=dict(request.headers)) as response:
                return HttpResponse(response.status, {}, await response.read())

        api = HttpRequest("GET", str(server.make_url("/api")))
        results = await asyncio.gather(*(send_with_auth(auth, api, send) for _ in range(5)))

    assert [r.status for r in results] == [200] * 5
    assert provider.issued == 1
    assert seen.count("Bearer at-0") == 5 and seen.count("Bearer at-1") == 5

    # The new token is refused too: one refresh, one retry, and the 401 is the answer.
    provider.api_accepts = set()
    async with aiohttp.ClientSession() as session:
        final = await send_with_auth(auth, api, send)
    assert final.status == 401 and provider.issued == 2


async def test_a_run_canceled_mid_refresh_does_not_lose_the_rotated_token(
    idp: tuple[IdentityProvider, TestServer], make_manager: Callable[..., OAuth2TokenManager]
) -> None:
    provider, server = idp
    arrived, release = asyncio.Event(), asyncio.Event()

    async def hold(attempt: int) -> None:
        arrived.set()
        await release.wait()

    provider.before_answer = hold
    manager = make_manager()
    conn = expired_connection(server)

    run = asyncio.create_task(manager.access_token(TENANT, conn))
    await arrived.wait()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    release.set()
    await provider.reported.wait()

    kept = manager.known_tokens(TENANT, "conn_crm")
    assert kept is not None and kept.refresh_token == "rt-1"
    assert provider.puts[0][2]["refreshToken"] == "rt-1"
    assert await manager.access_token(TENANT, conn) == "at-1" and provider.attempts == 1


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True], ids=["local", "redis"])
async def test_refused_refresh_is_auth_failed_and_not_retryable(
    idp: tuple[IdentityProvider, TestServer],
    make_manager: Callable[..., OAuth2TokenManager],
    shared: bool,
) -> None:
    provider, server = idp
    provider.valid_refresh = set()

    with pytest.raises(AuthError) as caught:
        await make_manager(shared=shared).access_token(TENANT, expired_connection(server))

    error = caught.value
    assert error.code is ErrorCode.AUTH_FAILED and not error.retryable and error.status == 400
    assert "invalid_grant" in str(error) and "conn_crm" in str(error)
    assert "rt-0" not in str(error) and "cs-1" not in str(error)
    assert provider.puts == []


@pytest.mark.parametrize(
    ("status", "retry_after", "expected_delay_s"),
    [(503, None, None), (500, None, None), (429, "7", 7.0)],
)
async def test_server_errors_and_throttling_are_retryable(
    idp: tuple[IdentityProvider, TestServer],
    make_manager: Callable[..., OAuth2TokenManager],
    status: int,
    retry_after: str | None,
    expected_delay_s: float | None,
) -> None:
    provider, server = idp
    provider.fail_status = status
    provider.retry_after = retry_after

    with pytest.raises(AuthError) as caught:
        await make_manager().access_token(TENANT, expired_connection(server))

    error = caught.value
    assert error.code is ErrorCode.AUTH_FAILED and error.retryable
    assert error.status == status and error.retry_after_s == expected_delay_s


async def test_an_unreachable_or_silent_token_endpoint_is_retryable(
    idp: tuple[IdentityProvider, TestServer], make_manager: Callable[..., OAuth2TokenManager]
) -> None:
    _, server = idp
    manager = make_manager(shared=False, token_timeout_s=0.2)

    with pytest.raises(AuthError) as slow:
        await manager.access_token(TENANT, expired_connection(server, path="/slow-token"))
    unreachable = Connection(
        id="conn_down",
        type="OAUTH2",
        config=ConnectionConfig(token_url="http://127.0.0.1:9/token"),
        secrets={"accessToken": "a", "refreshToken": "r", "expiresAt": NOW_MS},
    )
    with pytest.raises(AuthError) as down:
        await manager.access_token(TENANT, unreachable)

    assert slow.value.retryable and "timed out" in str(slow.value)
    assert down.value.retryable and "unreachable" in str(down.value)


async def test_a_failed_report_is_a_warning_and_the_rotated_token_is_kept(
    idp: tuple[IdentityProvider, TestServer], make_manager: Callable[..., OAuth2TokenManager]
) -> None:
    provider, server = idp
    provider.control_plane_status = 503
    warnings: list[tuple[str, dict[str, object]]] = []
    manager = make_manager(shared=False, on_warning=lambda e, f: warnings.append((e, dict(f))))

    assert await manager.access_token(TENANT, expired_connection(server)) == "at-1"

    assert warnings == [
        (
            "oauth2_token_report_failed",
            {"tenantId": TENANT, "connectionId": "conn_crm", "reason": "HTTP 503"},
        )
    ]
    assert manager.report_failures == 1
    kept = manager.known_tokens(TENANT, "conn_crm")
    assert kept is not None and kept.refresh_token == "rt-1"

    provider.control_plane_status = 204
    assert await manager.flush_reports() == 0
    assert [put[2]["refreshToken"] for put in provider.puts] == ["rt-1", "rt-1"]


# --- several processes -----------------------------------------------------------------------


async def test_two_processes_racing_cause_one_refresh(
    idp: tuple[IdentityProvider, TestServer],
    make_manager: Callable[..., OAuth2TokenManager],
    prefix: str,
) -> None:
    provider, server = idp
    first, second = make_manager(), make_manager()
    conn = expired_connection(server)

    tokens = await asyncio.gather(
        *(m.access_token(TENANT, conn) for _ in range(10) for m in (first, second))
    )

    assert tokens == ["at-1"] * 20
    assert provider.issued == 1 and provider.attempts == 1
    assert first.refresh_count + second.refresh_count == 1
    assert len(provider.puts) == 1
    await assert_nothing_in_plain_text(prefix, ["at-1", "rt-1", "cs-1"])


class SignallingRedis(redis.asyncio.Redis):
    """The real client; sets ``published`` once a token was shared, so a test can wait for it."""

    def __init__(self, published: asyncio.Event) -> None:
        super().__init__(host="127.0.0.1", port=6379)
        self.published = published

    async def set(self, name: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        result = await super().set(name, value, *args, **kwargs)
        if str(name).endswith(":token"):
            self.published.set()
        return result


async def test_the_loser_of_a_rotation_race_rereads_the_shared_token(
    idp: tuple[IdentityProvider, TestServer],
    make_manager: Callable[..., OAuth2TokenManager],
    prefix: str,
) -> None:
    """A's refresh outlives its lease; B takes the lease over and refreshes with the same
    refresh token. A's refresh rotates it, so B's gets invalid_grant; B must then use A's."""
    provider, server = idp
    a_arrived, b_arrived, a_published = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def order(attempt: int) -> None:
        if attempt == 1:  # A: held until B's refresh is in flight
            a_arrived.set()
            await b_arrived.wait()
        else:  # B: answered only once A has shared its token
            b_arrived.set()
            await a_published.wait()

    provider.before_answer = order
    a_redis = SignallingRedis(a_published)
    a = make_manager(lease_ms=100, redis=a_redis)
    b = make_manager(lease_ms=100)
    conn = expired_connection(server)
    try:
        task_a = asyncio.create_task(a.access_token(TENANT, conn))
        await a_arrived.wait()
        token_b = await b.access_token(TENANT, conn)
        token_a = await task_a
    finally:
        await a_redis.aclose()

    assert token_a == token_b == "at-1"
    assert provider.attempts == 2 and provider.issued == 1
    assert a.refresh_count == 1 and b.refresh_count == 0
    assert len(provider.puts) == 1
    kept = b.known_tokens(TENANT, "conn_crm")
    assert kept is not None and kept.refresh_token == "rt-1"
    await assert_nothing_in_plain_text(prefix, ["at-1", "rt-1"])


async def test_a_token_sealed_under_another_key_is_ignored(
    idp: tuple[IdentityProvider, TestServer], make_manager: Callable[..., OAuth2TokenManager]
) -> None:
    provider, server = idp
    conn = expired_connection(server)
    await make_manager().access_token(TENANT, conn)
    provider.valid_refresh.add("rt-0")

    other_key = make_manager(credentials_key=bytes(32))
    assert await other_key.access_token(TENANT, conn) == "at-2"


async def assert_nothing_in_plain_text(prefix: str, tokens: list[str]) -> None:
    client = redis.asyncio.Redis(host="127.0.0.1", port=6379)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        assert keys, "the refreshed token should be shared"
        for key in keys:
            value = await client.get(key)
            assert value is not None
            for token in tokens:
                assert token.encode() not in value
                assert base64.b64encode(token.encode()) not in value
    finally:
        await client.aclose()
