"""The egress policy wired into a real aiohttp client against a real local server.

Given a server on 127.0.0.1 that counts the requests it receives, and a session built the way
``runner.http.egress`` documents (GuardedResolver in the connector, egress_middleware on the
session), when a step aims at a denied address in any spelling or by a name that resolves to
one, then the request fails with EGRESS_DENIED and the server receives nothing.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from runner.errors import ErrorCode, TransportError
from runner.http.egress import EgressPolicy, GuardedResolver, egress_error, egress_middleware

pytestmark = pytest.mark.integration

SECRET = "s3cr3t-query-value"
# Generous: a denial is immediate, while a real attempt at 169.254.169.254 hangs far longer.
IMMEDIATE_S = 5.0


class StaticResolver(AbstractResolver):
    """A real resolver with a fixed table, standing in for DNS names we cannot register."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        if host not in self.table:
            raise OSError(f"{host} not found")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for address in self.table[host]
        ]

    async def close(self) -> None:
        pass


NAMES = {
    "loopback.test": ["127.0.0.1"],
    "private.test": ["192.168.77.1"],
    "metadata.test": ["169.254.169.254"],
}


@dataclass
class Server:
    port: int
    paths: list[str] = field(default_factory=list)

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server(port=0)

    async def hello(request: web.Request) -> web.Response:
        state.paths.append(request.path)
        return web.Response(text="hello")

    async def redirect(request: web.Request) -> web.Response:
        state.paths.append(request.path)
        raise web.HTTPFound(location=request.query["to"])

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_get("/redirect", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.port = runner.addresses[0][1]
    try:
        yield state
    finally:
        await runner.cleanup()


@dataclass
class Events:
    """What the connector did, from aiohttp's public tracing hooks."""

    connections_started: int = 0
    connections_made: int = 0
    lookups: list[str] = field(default_factory=list)

    def trace_config(self) -> aiohttp.TraceConfig:
        config = aiohttp.TraceConfig()

        async def started(*_: object) -> None:
            self.connections_started += 1

        async def made(*_: object) -> None:
            self.connections_made += 1

        async def lookup(
            _s: object, _c: object, params: aiohttp.TraceDnsResolveHostStartParams
        ) -> None:
            self.lookups.append(params.host)

        config.on_connection_create_start.append(started)
        config.on_connection_create_end.append(made)
        config.on_dns_resolvehost_start.append(lookup)
        return config


Client = Callable[..., Awaitable[tuple[aiohttp.ClientSession, Events]]]


@pytest.fixture
async def make_client() -> AsyncIterator[Client]:
    sessions: list[aiohttp.ClientSession] = []

    async def make(
        allow: str | None = None,
        *,
        inner: AbstractResolver | None = None,
        middleware: bool = True,
    ) -> tuple[aiohttp.ClientSession, Events]:
        policy = EgressPolicy.from_setting(allow)
        events = Events()
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=GuardedResolver(policy, inner)),
            middlewares=(egress_middleware(policy),) if middleware else (),
            trust_env=False,
            trace_configs=[events.trace_config()],
        )
        sessions.append(session)
        return session, events

    yield make
    for session in sessions:
        await session.close()


async def fetch(session: aiohttp.ClientSession, url: str, **kwargs: object) -> int:
    async with asyncio.timeout(IMMEDIATE_S):
        async with session.get(url, **kwargs) as response:  # type: ignore[arg-type]
            await response.read()
            return response.status


async def denied(session: aiohttp.ClientSession, url: str, **kwargs: object) -> TransportError:
    with pytest.raises(BaseException) as caught:
        await fetch(session, url, **kwargs)
    error = egress_error(caught.value)
    assert error is not None, f"not an egress denial: {caught.value!r}"
    assert error.code == ErrorCode.EGRESS_DENIED
    assert SECRET not in str(error)
    return error


async def test_literal_loopback_is_denied_without_the_allow_list(
    server: Server, make_client: Client
) -> None:
    session, events = await make_client()
    error = await denied(session, server.url(f"/?api_key={SECRET}"))
    assert error.message == "127.0.0.1 is loopback"
    assert server.paths == []
    assert events.connections_started == 0


async def test_metadata_address_fails_before_any_connection_is_attempted(
    make_client: Client,
) -> None:
    session, events = await make_client()
    error = await denied(session, f"http://169.254.169.254/latest/meta-data/?token={SECRET}")
    assert error.message == "169.254.169.254 is link-local"
    assert events.connections_started == 0
    assert events.lookups == []


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("[::ffff:127.0.0.1]", "loopback (IPv4-mapped 127.0.0.1)"),
        ("2130706433", "(127.0.0.1) is loopback"),
        ("0177.0.0.1", "(127.0.0.1) is loopback"),
        ("0x7f.1", "(127.0.0.1) is loopback"),
        ("127.1", "(127.0.0.1) is loopback"),
        ("localhost", "localhost is a loopback name"),
    ],
)
async def test_other_spellings_of_loopback_are_denied(
    server: Server, make_client: Client, host: str, reason: str
) -> None:
    session, events = await make_client()
    error = await denied(session, server.url("/", host=host))
    assert reason in error.message
    assert server.paths == []
    assert events.connections_made == 0


async def test_a_name_that_resolves_to_loopback_is_denied_by_the_resolver(
    server: Server, make_client: Client
) -> None:
    inner = StaticResolver(NAMES)
    session, events = await make_client(inner=inner)
    error = await denied(session, server.url("/", host="loopback.test"))
    assert error.message == "loopback.test resolves to 127.0.0.1, which is loopback"
    assert inner.asked == ["loopback.test"]
    assert events.connections_made == 0
    assert server.paths == []


async def test_the_resolver_alone_catches_spellings_aiohttp_passes_to_it(
    server: Server, make_client: Client
) -> None:
    # Without the middleware, 0x7f.1 is not a literal to aiohttp and reaches the resolver,
    # which getaddrinfo would answer with 127.0.0.1.
    session, events = await make_client(middleware=False)
    error = await denied(session, server.url("/", host="0x7f.1"))
    assert "loopback" in error.message
    assert events.lookups == ["0x7f.1"]
    assert server.paths == []


async def test_literal_hosts_bypass_the_resolver_so_the_client_check_is_needed(
    server: Server, make_client: Client
) -> None:
    # The reason egress_middleware (or check_url_host) exists: aiohttp connects to a literal
    # IP without asking the resolver, so the resolver alone lets 127.0.0.1 through.
    session, events = await make_client(middleware=False)
    assert await fetch(session, server.url("/")) == 200
    assert events.lookups == []
    assert server.paths == ["/"]

    guarded, _ = await make_client(middleware=True)
    await denied(guarded, server.url("/"))
    assert server.paths == ["/"]


async def test_the_allow_list_reaches_the_same_server(server: Server, make_client: Client) -> None:
    session, _ = await make_client("127.0.0.0/8", inner=StaticResolver(NAMES))
    assert await fetch(session, server.url("/")) == 200
    assert await fetch(session, server.url("/", host="[::ffff:127.0.0.1]")) == 200
    assert await fetch(session, server.url("/", host="loopback.test")) == 200
    assert server.paths == ["/", "/", "/"]
    await denied(session, server.url("/", host="private.test"))


async def test_an_allowed_name_reaches_the_server(server: Server, make_client: Client) -> None:
    session, _ = await make_client("loopback.test", inner=StaticResolver(NAMES))
    assert await fetch(session, server.url("/", host="loopback.test")) == 200
    await denied(session, server.url("/"))
    assert server.paths == ["/"]


def redirect_to(server: Server, target: str) -> str:
    return server.url("/redirect?" + urlencode({"to": target}))


async def test_redirects_are_returned_when_not_followed(
    server: Server, make_client: Client
) -> None:
    session, events = await make_client("127.0.0.0/8")
    url = redirect_to(server, f"http://169.254.169.254/?token={SECRET}")
    assert await fetch(session, url, allow_redirects=False) == 302
    assert server.paths == ["/redirect"]
    assert events.connections_started == 1


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (f"http://169.254.169.254/latest/?token={SECRET}", "169.254.169.254 is link-local"),
        ("http://10.0.0.1/", "10.0.0.1 is private"),
        ("http://[fd00::1]/", "fd00::1 is private (unique local)"),
        ("http://3232235777/", "3232235777 (192.168.1.1) is private"),
        ("http://private.test/", "private.test resolves to 192.168.77.1, which is private"),
        ("http://metadata.test/", "metadata.test resolves to 169.254.169.254, which is link"),
    ],
)
async def test_each_followed_redirect_hop_is_checked_again(
    server: Server, make_client: Client, target: str, reason: str
) -> None:
    session, events = await make_client("127.0.0.0/8", inner=StaticResolver(NAMES))
    error = await denied(session, redirect_to(server, target), allow_redirects=True)
    assert reason in error.message
    assert server.paths == ["/redirect"]
    assert events.connections_made == 1  # only the allowed first hop


async def test_an_allowed_redirect_hop_is_followed(server: Server, make_client: Client) -> None:
    session, _ = await make_client("127.0.0.0/8", inner=StaticResolver(NAMES))
    target = server.url("/", host="loopback.test")
    assert await fetch(session, redirect_to(server, target), allow_redirects=True) == 200
    assert server.paths == ["/redirect", "/"]


async def test_the_denial_is_not_wrapped_by_aiohttp(server: Server, make_client: Client) -> None:
    # aiohttp 3.14 wraps only OSErrors from the resolver; ours is not one, so it arrives as is.
    session, _ = await make_client(inner=StaticResolver(NAMES))
    with pytest.raises(TransportError) as caught:
        await fetch(session, server.url("/", host="loopback.test"))
    assert caught.value.code == ErrorCode.EGRESS_DENIED
    # A plain DNS failure stays an aiohttp error, not a denial.
    with pytest.raises(aiohttp.ClientConnectorDNSError) as dns:
        await fetch(session, server.url("/", host="unknown.test"))
    assert egress_error(dns.value) is None
