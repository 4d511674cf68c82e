"""Build a step's ``HttpRequest`` from its Action and rendered input. Pure: no I/O, no clock.

- The URL is the connection's ``baseUrl`` joined with the Action's ``endpointTemplate``, or the
  template itself (absolute) when the step has no connection.
- ``{name}`` placeholders are filled from ``input.path``, each value percent-encoded as one
  segment (``/``, ``?``, ``#``, ``%``, ``@``, spaces and non-ASCII all encoded); ``.`` and
  ``..`` are refused, since they would change the path once normalised.
- Query values: scalars as text (booleans ``true``/``false``), lists repeat the parameter,
  ``null`` omits it; objects are refused.
- Headers: the Action's ``headersTemplate``, then the step's ``input.headers`` (the step wins,
  names compared case-insensitively). CR or LF in a name or value is refused.
- Body: JSON, with ``Content-Type: application/json`` unless a header sets one.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import msgspec

from runner.errors import DefinitionError, TemplateError
from runner.http.messages import HttpRequest

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_json_encode = msgspec.json.Encoder().encode


def path_params(endpoint_template: str) -> list[str]:
    return _PLACEHOLDER.findall(endpoint_template)


# Credentials belong in a connection's secrets, which live for the run only; a URL is
# configuration, checked once and remembered (``base_url_for``), and aiohttp would send its
# userinfo as Basic auth behind the connection's back.
_NO_USERINFO = "may not carry a user or password (user:password@): use a BASIC connection"


@functools.lru_cache(maxsize=4096)
def base_url_for(
    endpoint_template: str, base_url: str | None, where: str, base_where: str | None = None
) -> str:
    """The URL prefix a step's endpoint hangs from, checked once per Action and connection
    (remembered; a refusal is raised again each time). A URL with userinfo is refused before
    it is remembered. ``where`` names the Action, ``base_where`` the connection (``where``
    when not given)."""
    template = urlsplit(endpoint_template)
    scheme = template.scheme
    absolute = bool(scheme)
    if base_url is None:
        if absolute and scheme not in ("http", "https"):
            raise DefinitionError(f"{where}: endpointTemplate must be an http(s) URL")
        if absolute and "@" in template.netloc:
            raise DefinitionError(f"{where}: endpointTemplate {_NO_USERINFO}")
        if not absolute:
            raise DefinitionError(
                f"{where}: endpointTemplate '{endpoint_template}' must be an absolute URL "
                "when the step has no connection"
            )
        return ""
    if absolute:
        raise DefinitionError(
            f"{where}: endpointTemplate must be relative to the connection's baseUrl"
        )
    where = base_where or where
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DefinitionError(f"{where}: baseUrl must be an http(s) URL with a host")
    if parts.query or parts.fragment:
        raise DefinitionError(f"{where}: baseUrl may not carry a query or fragment")
    if "@" in parts.netloc:
        raise DefinitionError(f"{where}: baseUrl {_NO_USERINFO}")
    return base_url.rstrip("/")


def encode_segment(name: str, value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (str, int, float)):
        text = str(value)
    else:
        kind = "null" if value is None else type(value).__name__
        raise TemplateError(f"path parameter '{name}' must be a string or number, got {kind}")
    if text in ("", ".", ".."):
        raise TemplateError(f"path parameter '{name}' may not be empty, '.' or '..'")
    return quote(text, safe="")


def fill_endpoint(endpoint_template: str, path: Mapping[str, Any]) -> str:
    parts = _endpoint_parts(endpoint_template)
    if len(parts) == 1:
        return endpoint_template
    filled = list(parts)
    for i in range(1, len(parts), 2):
        name = parts[i]
        if name not in path:
            raise TemplateError(f"path parameter '{name}' of '{endpoint_template}' has no value")
        filled[i] = encode_segment(name, path[name])
    return "".join(filled)


@functools.lru_cache(maxsize=4096)
def _endpoint_parts(endpoint_template: str) -> tuple[str, ...]:
    """The template split once: text, a placeholder's name, text, ..., text."""
    return tuple(_PLACEHOLDER.split(endpoint_template))


def query_pairs(query: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    for name, value in query.items():
        for item in value if isinstance(value, list) else [value]:
            if item is None:
                continue
            if isinstance(item, bool):
                pairs.append((name, "true" if item else "false"))
            elif isinstance(item, (str, int, float)):
                pairs.append((name, str(item)))
            else:
                raise TemplateError(f"query parameter '{name}' must be scalar or a list of them")
    return tuple(pairs)


def merge_headers(*layers: Mapping[str, Any]) -> dict[str, str]:
    merged: dict[str, tuple[str, str]] = {}
    for layer in layers:
        for name, value in layer.items():
            if value is None:
                continue
            text = value if isinstance(value, str) else _json_encode(value).decode()
            if not _HEADER_NAME.fullmatch(name):
                raise TemplateError(f"header name '{name[:40]}' is not a valid token")
            if "\r" in text or "\n" in text or "\x00" in text:
                raise TemplateError(f"header '{name}' contains CR, LF or NUL")
            merged[name.lower()] = (name, text)
    return dict(merged.values())


def build_request(
    *,
    method: str,
    base_url: str,
    endpoint_template: str,
    path: Mapping[str, Any],
    query: Mapping[str, Any],
    header_layers: Sequence[Mapping[str, Any]],
    body: Any,
) -> HttpRequest:
    """``header_layers`` merge in order, later layers winning (headersTemplate, the step's
    headers, then the runner's own such as the idempotency key)."""
    filled = fill_endpoint(endpoint_template, path)
    if base_url:
        url = base_url + (filled if filled.startswith("/") else "/" + filled)
    else:
        url = filled
    merged = merge_headers(*header_layers)
    payload: bytes | None = None
    if body is not None:
        payload = _json_encode(body)
        if not any(k.lower() == "content-type" for k in merged):
            merged["Content-Type"] = "application/json"
    if not any(k.lower() == "accept" for k in merged):
        merged["Accept"] = "application/json"
    return HttpRequest(
        method=method, url=url, query=query_pairs(query), headers=merged, body=payload
    )
