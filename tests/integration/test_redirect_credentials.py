"""Credentials never follow a redirect to another origin (issue 21, item 5).

Two real local aiohttp servers on two ports are two origins (an origin is scheme, host and
port). The first redirects to the second; whichever auth adapter the step's connection uses,
the second never sees the secret: not as a header, not in the query, not as a cookie. A
redirect within the first origin still authenticates.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from runner.contract import Connection, ConnectionConfig
from runner.http.client import HttpTransport, make_session
from runner.http.egress import EgressPolicy
from runner.http.messages import HttpRequest
from runner.http.oauth2 import OAuth2TokenManager

SECRET = "s3cr3t-never-elsewhere"


@dataclass
class Seen:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes

    def carries(self, secret: str) -> bool:
        return any(secret in v for _, v in self.query) or any(
            secret in v for v in self.headers.values()
        )


@dataclass
class Origin:
    """A local server that records every request and answers by path."""

    base: str = ""
    seen: list[Seen] = field(default_factory=list)
    # path -> (status, Location): a redirect; any other path answers 200.
    redirects: dict[str, tuple[int, str]] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(
            Seen(
                request.method,
                request.path,
                list(request.query.items()),
                dict(request.headers),
                await request.read(),
            )
        )
        if request.path in self.redirects:
            status, location = self.redirects[request.path]
            if "{query}" in location:  # an API that keeps the query string on its redirect
                location = location.replace("{query}", request.query_string)
            # A cookie set by the first origin must not be replayed anywhere either.
            return web.Response(
                status=status, headers={"Location": location, "Set-Cookie": f"sid={SECRET}"}
            )
        return web.json_response({"ok": True})


Serve = Callable[[], Awaitable[Origin]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start() -> Origin:
        origin = Origin()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", origin.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        origin.base = f"http://127.0.0.1:{port}"
        return origin

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def transport() -> AsyncIterator[HttpTransport]:
    policy = EgressPolicy(("127.0.0.0/8",))
    session = make_session(policy)
    tokens = OAuth2TokenManager(
        session=session,
        redis=None,
        key_prefix="it:redirects",
        credentials_key=None,
        control_plane_url=None,
        control_plane_token=None,
    )
    yield HttpTransport(
        session,
        policy=policy,
        tokens=tokens,
        now_ms=lambda: 0,
        max_response_bytes=1 << 20,
        follow_redirects=True,
    )
    await session.close()


CONNECTIONS: dict[str, Connection] = {
    "api key header": Connection(
        id="c_hdr",
        type="API_KEY",
        config=ConnectionConfig(api_key_name="X-Api-Key", api_key_in="header"),
        secrets={"apiKey": SECRET},
    ),
    "api key query": Connection(
        id="c_q",
        type="API_KEY",
        config=ConnectionConfig(api_key_name="api_key", api_key_in="query"),
        secrets={"apiKey": SECRET},
    ),
    "basic": Connection(
        id="c_basic", type="BASIC", secrets={"username": "alice", "password": SECRET}
    ),
    "custom headers": Connection(
        id="c_custom",
        type="CUSTOM_HEADER",
        secrets={"headers": {"X-Tenant-Token": SECRET, "Cookie": f"session={SECRET}"}},
    ),
    "oauth2 bearer": Connection(id="c_oauth", type="OAUTH2", secrets={"accessToken": SECRET}),
}


def authenticated(seen: Seen, connection: Connection) -> bool:
    if connection.type == "BASIC":
        return seen.headers.get("Authorization", "").startswith("Basic ")
    return seen.carries(SECRET)


async def send(
    transport: HttpTransport, url: str, connection: Connection, method: str = "GET"
) -> int:
    body = b'{"a": 1}' if method == "POST" else None
    headers = {"Content-Type": "application/json"} if body else {}
    request = HttpRequest(method, url, query=(("page", "1"),), headers=headers, body=body)
    response = await transport.send(
        request, connection=connection, tenant_id="ten_redirects", timeout_s=10
    )
    return response.status


@pytest.mark.parametrize("kind", list(CONNECTIONS))
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_to_another_origin_carries_no_credential(
    serve: Serve, transport: HttpTransport, kind: str, status: int
) -> None:
    # Given an API that redirects, keeping the query string, to a server on another port
    api, elsewhere = await serve(), await serve()
    api.redirects["/start"] = (status, elsewhere.base + "/landing?{query}")
    connection = CONNECTIONS[kind]

    # When a step with that connection calls it, redirects followed
    assert await send(transport, api.base + "/start", connection) == 200

    # Then the API was authenticated, and the other origin saw no secret in any form
    assert authenticated(api.seen[0], connection)
    assert [s.path for s in elsewhere.seen] == ["/landing"]
    landing = elsewhere.seen[0]
    assert not landing.carries(SECRET), landing
    assert "Authorization" not in landing.headers
    assert "Cookie" not in landing.headers
    assert ("page", "1") in landing.query  # what is not a credential travels on


@pytest.mark.parametrize("kind", list(CONNECTIONS))
async def test_a_redirect_within_the_origin_still_authenticates(
    serve: Serve, transport: HttpTransport, kind: str
) -> None:
    api = await serve()
    api.redirects["/start"] = (307, "/moved")  # no query kept: a query key is set again
    connection = CONNECTIONS[kind]

    assert await send(transport, api.base + "/start", connection) == 200

    assert [s.path for s in api.seen] == ["/start", "/moved"]
    assert authenticated(api.seen[1], connection)
    assert "sid=" not in api.seen[1].headers.get("Cookie", "")  # no cookie jar


async def test_a_hop_back_to_the_first_origin_is_not_trusted_again(
    serve: Serve, transport: HttpTransport
) -> None:
    api, elsewhere = await serve(), await serve()
    api.redirects["/start"] = (302, elsewhere.base + "/bounce")
    elsewhere.redirects["/bounce"] = (302, api.base + "/back")

    assert await send(transport, api.base + "/start", CONNECTIONS["api key header"]) == 200

    assert [s.path for s in api.seen] == ["/start", "/back"]
    assert not elsewhere.seen[0].carries(SECRET)
    assert not api.seen[1].carries(SECRET)


@pytest.mark.parametrize(
    ("status", "method", "expected"),
    [
        (303, "POST", "GET"),
        (303, "HEAD", "HEAD"),
        (302, "POST", "GET"),
        (301, "POST", "GET"),
        (307, "POST", "POST"),
        (308, "POST", "POST"),
    ],
)
async def test_the_method_after_a_redirect_is_as_httpx_sends_it(
    serve: Serve, transport: HttpTransport, status: int, method: str, expected: str
) -> None:
    api = await serve()
    api.redirects["/start"] = (status, "/next")
    connection = CONNECTIONS["api key header"]

    await send(transport, api.base + "/start", connection, method=method)

    hop = api.seen[1]
    assert hop.method == expected
    if expected == "GET":
        assert hop.body == b""
        assert "Content-Type" not in hop.headers
    elif expected == "POST":
        assert hop.body == b'{"a": 1}'
