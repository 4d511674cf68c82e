"""The request and response values that cross the HTTP seam.

Plain data, no I/O: request building produces an ``HttpRequest``, auth adapters transform it,
the client sends it and hands back an ``HttpResponse``. Keeping them free of aiohttp lets auth
flows and request building be tested without sockets.

Both are immutable: their attributes are ``Final`` (mypy refuses an assignment). They are
plain classes rather than frozen dataclasses because a frozen dataclass sets each field through
``object.__setattr__``, a cost paid several times per run. Their ``repr`` names the headers but never shows a value: a header may carry a credential.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final


class HttpRequest:
    __slots__ = ("body", "headers", "method", "query", "url")

    def __init__(
        self,
        method: str,
        # scheme://host[:port]/path with the path already percent-encoded; no query string.
        url: str,
        query: tuple[tuple[str, str], ...] = (),
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> None:
        self.method: Final = method
        self.url: Final = url
        self.query: Final = query
        self.headers: Final[Mapping[str, str]] = headers if headers is not None else {}
        self.body: Final = body

    def with_header(self, name: str, value: str) -> HttpRequest:
        lowered = name.lower()
        headers = {k: v for k, v in self.headers.items() if k.lower() != lowered}
        headers[name] = value
        return HttpRequest(self.method, self.url, self.query, headers, self.body)

    def with_query(self, name: str, value: str) -> HttpRequest:
        return HttpRequest(
            self.method, self.url, (*self.query, (name, value)), self.headers, self.body
        )

    def with_query_replaced(self, name: str, value: str) -> HttpRequest:
        """``name`` set to ``value`` alone: any parameter of that name before is dropped."""
        query = tuple((k, v) for k, v in self.query if k != name)
        return HttpRequest(self.method, self.url, (*query, (name, value)), self.headers, self.body)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HttpRequest):
            return NotImplemented
        return (self.method, self.url, self.query, dict(self.headers), self.body) == (
            other.method,
            other.url,
            other.query,
            dict(other.headers),
            other.body,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"HttpRequest({self.method} {self.url}, headers={sorted(self.headers)!r})"


class HttpResponse:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status: Final = status
        # Lower-cased header names.
        self.headers: Final = headers
        self.body: Final = body

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HttpResponse):
            return NotImplemented
        return (self.status, dict(self.headers), self.body) == (
            other.status,
            dict(other.headers),
            other.body,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"HttpResponse({self.status}, headers={sorted(self.headers)!r}, {len(self.body)} bytes)"
        )
