"""The request and response values that cross the HTTP seam.

Plain data, no I/O: request building produces an ``HttpRequest``, auth adapters transform it,
the client sends it and hands back an ``HttpResponse``. Keeping them free of aiohttp lets auth
flows and request building be tested without sockets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    # scheme://host[:port]/path with the path already percent-encoded; no query string.
    url: str
    query: tuple[tuple[str, str], ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None

    def with_header(self, name: str, value: str) -> HttpRequest:
        headers = {k: v for k, v in self.headers.items() if k.lower() != name.lower()}
        headers[name] = value
        return replace(self, headers=headers)

    def with_query(self, name: str, value: str) -> HttpRequest:
        return replace(self, query=(*self.query, (name, value)))


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    # Lower-cased header names.
    headers: Mapping[str, str]
    body: bytes
