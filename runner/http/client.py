"""The one aiohttp session of the process, and the transport the engine sends steps through.

This is the only module that sees aiohttp's exceptions: each attempt either returns an
``HttpResponse`` or raises a ``RunnerError`` (``TIMEOUT``, ``CONNECTION_ERROR``,
``RESPONSE_TOO_LARGE``, ``EGRESS_DENIED``). Messages name the host, never the URL, so a query
secret cannot ride along.

- Each attempt is bounded as a whole (connect, send, headers and the body read) by its timeout.
- Bodies are read as a stream and cut off past ``max_response_bytes``.
- Redirects are not followed unless enabled; then each hop is checked by the egress policy
  again. Once a hop leaves the first request's origin (scheme, host, port), it and every later
  hop carry none of the credentials the auth layer names (``credential_names``): no
  Authorization, no API key header or query parameter, no custom header, no cookie. A
  same-origin hop keeps them (a static adapter's are set on it again). 303, and 301/302 after a
  POST, turn into a GET without body (HEAD stays HEAD), as in httpx and the Fetch standard.
- The egress policy lives in the session ``make_session`` builds (a middleware for IP literals,
  the resolver for names), so every request on it is checked, whoever sends it, and the
  address connected to is the address checked. No other code in ``runner`` builds a session
  (a test scans for it); the control plane's, in app.py, is exempt by design.
"""

from __future__ import annotations

import ssl
import traceback
from collections.abc import Callable

import aiohttp
from yarl import URL

from runner.contract import Connection
from runner.deadline import deadline
from runner.errors import ErrorCode, RunnerError, TransportError
from runner.http.auth import Auth, CredentialNames, build_auth, credential_names, send_with_auth
from runner.http.egress import EgressPolicy, GuardedResolver, egress_error, egress_middleware
from runner.http.messages import HttpRequest, HttpResponse
from runner.http.oauth2 import OAuth2TokenManager

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Dropped with the body when a redirect turns the request into a GET (Fetch: request-body-header).
_BODY_HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "content-encoding",
        "content-language",
        "content-location",
        "transfer-encoding",
    }
)


def make_session(
    policy: EgressPolicy, *, user_agent: str = "workflow-runner"
) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=0,  # runs are bounded by the worker's concurrency, not by the pool
        limit_per_host=0,
        ttl_dns_cache=10,
        resolver=GuardedResolver(policy),
        enable_cleanup_closed=True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": user_agent},
        auto_decompress=True,
        raise_for_status=False,
        # Timeouts are per attempt (``deadline`` below); the session sets none of its own.
        timeout=aiohttp.ClientTimeout(total=None),
        cookie_jar=aiohttp.DummyCookieJar(),
        # The egress check lives in the session, so every request sent on it (a step, a
        # redirect hop, the OAuth2 token endpoint) is checked: IP literals here, names in the
        # resolver. Nothing that holds this session can send around the policy.
        middlewares=(egress_middleware(policy),),
        trust_env=False,  # a proxy would resolve names itself, out of the policy's sight
    )


class HttpTransport:
    """The engine's ``Transport``: auth, egress, timeout, size cap, error translation."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        policy: EgressPolicy,
        tokens: OAuth2TokenManager,
        now_ms: Callable[[], int],
        max_response_bytes: int,
        follow_redirects: bool = False,
        max_redirects: int = 5,
    ) -> None:
        self.session = session
        self.policy = policy
        self.tokens = tokens
        self.now_ms = now_ms
        self.max_response_bytes = max_response_bytes
        self.follow_redirects = follow_redirects
        self.max_redirects = max_redirects
        self._ssl: dict[str, ssl.SSLContext] = {}

    async def send(
        self,
        request: HttpRequest,
        *,
        connection: Connection | None,
        tenant_id: str,
        timeout_s: float,
    ) -> HttpResponse:
        auth = None
        if connection is not None:
            auth = build_auth(
                connection, tokens=self.tokens, tenant_id=tenant_id, now_ms=self.now_ms
            )
        ssl_context = self._ssl_for(connection)
        names = credential_names(auth)
        static: Auth | None = None
        if auth is not None and auth.static:
            static, auth = auth, None
            request = static.prepare(request)
        try:
            async with deadline(timeout_s):
                if auth is None and not self.follow_redirects:
                    # The common case, sent straight: no flow to drive, no redirect to follow.
                    return await self._send_once(request, ssl_context)
                return await send_with_auth(
                    auth,
                    request,
                    lambda r: self._send_following(r, ssl_context, names, static),
                )
        except TimeoutError:
            raise TransportError(
                f"no complete response from {_host(request.url)} within {timeout_s:.3g} s",
                code=ErrorCode.TIMEOUT,
            ) from None

    async def _send_following(
        self,
        request: HttpRequest,
        ssl_context: ssl.SSLContext | bool,
        names: CredentialNames,
        static: Auth | None,
    ) -> HttpResponse:
        """Send ``request``, then follow its redirects while enabled, up to ``max_redirects``."""
        response = await self._send_once(request, ssl_context)
        origin = URL(request.url, encoded=True).origin()
        left_origin = False
        hops = 0
        while self.follow_redirects and response.status in _REDIRECTS:
            location = response.headers.get("location")
            if not location or hops >= self.max_redirects:
                break
            hops += 1
            request = _redirected(request, response.status, location)
            # Sticky: a hop back to the first origin after a foreign one is not trusted again.
            left_origin = left_origin or URL(request.url, encoded=True).origin() != origin
            if left_origin:
                request = names.strip(request)
            elif static is not None:
                request = static.prepare(request)  # e.g. an API key in the query, set again
            response = await self._send_once(request, ssl_context)
        return response

    async def _send_once(
        self, request: HttpRequest, ssl_context: ssl.SSLContext | bool
    ) -> HttpResponse:
        url = URL(request.url, encoded=True)
        if request.query:
            url = url.with_query(list(request.query))
        host = url.host or ""
        try:
            async with self.session.request(
                request.method,
                url,
                headers=dict(request.headers),
                data=request.body,
                allow_redirects=False,
                ssl=ssl_context,
            ) as resp:
                body = await self._read_capped(resp, host)
                headers = {k.lower(): v for k, v in resp.headers.items()}
                return HttpResponse(status=resp.status, headers=headers, body=body)
        except RunnerError:
            raise
        except (aiohttp.ClientError, OSError) as err:
            _release_frames(err)
            raise self._translated(err, host, url.port) from None

    def _translated(self, err: BaseException, host: str, port: int | None) -> RunnerError:
        if isinstance(err, aiohttp.ClientConnectorCertificateError):
            # Say what failed in words an operator acts on (the fix is a caBundle, or the
            # server's certificate), not OpenSSL's "[ssl: ...] (_ssl.c:1006)".
            cert_error = err.certificate_error
            detail = getattr(cert_error, "verify_message", None) or "certificate verify failed"
            return TransportError(
                f"TLS certificate of {host} could not be verified: {str(detail).rstrip('.')}",
                code=ErrorCode.CONNECTION_ERROR,
            )
        denied = egress_error(err)
        if denied is not None:
            return denied
        if isinstance(err, aiohttp.ClientConnectorError):
            reason = err.os_error.strerror if err.os_error and err.os_error.strerror else "failed"
            return TransportError(
                f"could not connect to {host}:{port}: {reason.lower()}",
                code=ErrorCode.CONNECTION_ERROR,
            )
        return TransportError(
            f"connection to {host} failed: {type(err).__name__}",
            code=ErrorCode.CONNECTION_ERROR,
        )

    async def _read_capped(self, resp: aiohttp.ClientResponse, host: str) -> bytes:
        limit = self.max_response_bytes
        if resp.content_length is not None and resp.content_length > limit:
            raise TransportError(
                f"response from {host} declares {resp.content_length} bytes, over the {limit}-byte limit",
                code=ErrorCode.RESPONSE_TOO_LARGE,
            )
        if resp.content_length is not None and "Content-Encoding" not in resp.headers:
            # Declared and within the cap, and not inflated on the way: aiohttp's parser reads
            # exactly that many bytes, so one read is bounded.
            return await resp.content.read()
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise TransportError(
                    f"response from {host} is over the {limit}-byte limit",
                    code=ErrorCode.RESPONSE_TOO_LARGE,
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _ssl_for(self, connection: Connection | None) -> ssl.SSLContext | bool:
        bundle = connection.config.ca_bundle if connection is not None else None
        if not bundle:
            return True  # aiohttp's default: verify against the system store
        context = self._ssl.get(bundle)
        if context is None:
            try:
                if bundle.lstrip().startswith("-----BEGIN"):
                    context = ssl.create_default_context(cadata=bundle)
                else:
                    context = ssl.create_default_context(cafile=bundle)
            except (OSError, ssl.SSLError):
                raise TransportError(
                    f"connection '{connection.id if connection else ''}': caBundle cannot be loaded",
                    code=ErrorCode.CONNECTION_ERROR,
                ) from None
            self._ssl[bundle] = context
        return context


def _redirected(request: HttpRequest, status: int, location: str) -> HttpRequest:
    """The request a ``status`` redirect to ``location`` asks for, credentials left to the
    caller: the method and body as httpx keeps them, the query from ``location``."""
    target = URL(request.url, encoded=True).join(URL(location))
    if target.scheme not in ("http", "https"):
        raise TransportError(
            f"redirect to a {target.scheme or 'relative'} URL refused",
            code=ErrorCode.EGRESS_DENIED,
        )
    method, body, headers = request.method, request.body, dict(request.headers)
    if method != "HEAD" and (status == 303 or (status in (301, 302) and method == "POST")):
        method, body = "GET", None
        headers = {k: v for k, v in headers.items() if k.lower() not in _BODY_HEADERS}
    return HttpRequest(
        method=method,
        url=str(target.with_query(None).with_fragment(None)),
        query=tuple(target.query.items()),
        headers=headers,
        body=body,
    )


def _host(url: str) -> str:
    try:
        return URL(url, encoded=True).host or "?"
    except ValueError:
        return "?"


def _release_frames(err: BaseException) -> None:
    """Clear the frames in the tracebacks of ``err`` and the errors chained to it. aiohttp's
    connection failures hold themselves through those frames (the happy-eyeballs attempts keep
    their exceptions in a list that a frame holds), and the cycle keeps the request, its
    headers (credentials included) and the failed socket alive until the cyclic collector
    runs. Nothing reads these frames: the error is translated to a ``TransportError``.

    The frames are those the errors propagated out of, which have finished, and the one that
    caught the last of them (this call's), which is running: ``clear_frames`` skips it."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__
