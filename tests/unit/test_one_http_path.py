"""Every request to a URL from a definition or a connection passes the egress policy, by
construction: the check lives in the session ``make_session`` builds, so a caller that posts on
it (the OAuth2 grant, a step, a redirect hop) cannot go around it (issue 21, item 2)."""

from __future__ import annotations

import ast
import pathlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from runner.contract import Connection, ConnectionConfig
from runner.errors import ErrorCode, TransportError
from runner.http.client import make_session
from runner.http.egress import EgressPolicy
from runner.http.oauth2.grant import refresh_grant
from runner.http.oauth2.tokens import TokenSet

RUNNER = pathlib.Path(__file__).resolve().parents[2] / "runner"


@pytest.fixture
async def token_server() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A real token endpoint on 127.0.0.1 that records every body it receives."""
    received: list[bytes] = []

    async def token(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.json_response({"access_token": "new", "expires_in": 60})

    app = web.Application()
    app.router.add_post("/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield port, received
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("host", ["127.0.0.1", "0x7f.1", "[::ffff:127.0.0.1]"])
async def test_oauth2_token_endpoint_on_a_denied_literal_is_refused(
    token_server: tuple[int, list[bytes]], host: str
) -> None:
    port, received = token_server
    conn = Connection(
        id="conn_1",
        type="OAUTH2",
        config=ConnectionConfig(token_url=f"http://{host}:{port}/token", client_id="cid"),
        secrets={"clientSecret": "s3cret-client"},
    )
    base = TokenSet(access_token="old", refresh_token="r3fresh-token", expires_at_ms=0)
    async with make_session(EgressPolicy()) as session:
        with pytest.raises(TransportError) as info:
            await refresh_grant(
                session, conn, base, client_timeout=aiohttp.ClientTimeout(total=5), now_ms=lambda: 0
            )
    assert info.value.code == ErrorCode.EGRESS_DENIED
    assert received == []  # neither the refresh token nor the client secret left the process


async def test_the_same_endpoint_is_reached_when_allow_listed(
    token_server: tuple[int, list[bytes]],
) -> None:
    port, received = token_server
    conn = Connection(
        id="conn_1",
        type="OAUTH2",
        config=ConnectionConfig(token_url=f"http://127.0.0.1:{port}/token", client_id="cid"),
        secrets={"clientSecret": "s3cret-client"},
    )
    base = TokenSet(access_token="old", refresh_token="r3fresh-token", expires_at_ms=0)
    async with make_session(EgressPolicy(["127.0.0.1"])) as session:
        tokens = await refresh_grant(
            session, conn, base, client_timeout=aiohttp.ClientTimeout(total=5), now_ms=lambda: 0
        )
    assert tokens.access_token == "new"
    assert len(received) == 1


async def test_any_request_on_the_session_is_checked(token_server: tuple[int, list[bytes]]) -> None:
    """Whatever code posts on the session, the literal host is checked before it connects."""
    port, received = token_server
    async with make_session(EgressPolicy()) as session:
        with pytest.raises(TransportError) as info:
            async with session.post(f"http://127.0.0.1:{port}/token", data=b"x"):
                pass
    assert info.value.code == ErrorCode.EGRESS_DENIED
    assert received == []


# Files allowed to build an aiohttp session, and why: client.py is the one factory of the
# egress-checked session; app.py builds the control plane's session, which the policy exempts
# (docs/operations.md).
_SESSION_BUILDERS = {"http/client.py": 1, "app.py": 1}


def _session_constructions(tree: ast.AST) -> int:
    count = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("ClientSession", "request") and (
                name == "ClientSession"
                or (isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "aiohttp")
            ):
                count += 1
    return count


def test_no_code_builds_a_session_outside_the_one_factory() -> None:
    found: dict[str, int] = {}
    for path in sorted(RUNNER.rglob("*.py")):
        n = _session_constructions(ast.parse(path.read_text(), str(path)))
        if n:
            found[path.relative_to(RUNNER).as_posix()] = n
    assert found == _SESSION_BUILDERS, (
        "an aiohttp session or aiohttp.request outside runner/http/client.py make_session "
        "would send without the egress check"
    )


async def test_the_factory_installs_the_check() -> None:
    async with make_session(EgressPolicy()) as session:
        assert session._middlewares, "make_session must install egress_middleware"
