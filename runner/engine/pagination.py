"""Pagination as a pure state machine: given a page's response, the next request or the stop.

No I/O and no clock: ``runner.engine.paged`` sends each page through the same attempt loop as
any request (auth, egress, retry, timeouts, the response cap) and calls these in between.

- ``compile_paginate`` merges a step's ``paginate`` over its Action's, field by field, and
  checks the whole (``DEFINITION_INVALID`` naming the JSON path of the field at fault).
- ``request_for`` is the request of the page at a position: the cursor, the next URL, the
  offset or the page number, set in the base request (a query parameter, or the URL itself).
- ``advance`` reads a page: the items it adds, the next position, and why it stops (if it does).
- ``Progress`` is what a checkpoint holds between pages, so a resumed run continues there.

Stop conditions, checked after each page: no next cursor or URL (``end``), a page without items
(``emptyPage``), fewer items than ``limit`` (``shortPage``), ``stopPath`` truthy (``stopPath``),
``hasMorePath`` falsy or missing (``hasMorePath``). Caps (``maxPages``, ``maxItems``,
``maxBytes``, each at most its ``RUNNER_PAGINATE_*`` setting) end the step as ``truncated`` under
``onLimit: TRUNCATE`` (the default) or fail it with ``PAGINATION_LIMIT`` under ``FAIL``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from yarl import URL

from runner.contract import Paginate, PaginateMode
from runner.errors import (
    DefinitionError,
    ErrorCode,
    PaginationLimit,
    ResponseError,
    TransportError,
)
from runner.http.messages import HttpRequest
from runner.templating import JsonPath, compile_jsonpath, truthy

DEFAULT_ITEMS: Final = "$[*]"

# The fields that mean something in one mode only; the rest apply to every mode.
_MODE_FIELDS: Final[dict[str, PaginateMode]] = {
    "cursor_path": "cursor",
    "cursor_param": "cursor",
    "next_url_path": "nextUrl",
    "offset_param": "offset",
    "page_param": "page",
}


@dataclass(frozen=True, slots=True)
class PageLimits:
    """The process's ceilings (``RUNNER_PAGINATE_*``): a definition may ask for less."""

    max_pages: int = 1000
    max_items: int = 100_000
    max_bytes: int = 16 * 1024 * 1024
    checkpoint_bytes: int = 1024 * 1024


@dataclass(frozen=True, slots=True)
class PaginateSpec:
    """A step's pagination, merged and compiled: every default filled in."""

    mode: PaginateMode
    items: JsonPath
    cursor_path: JsonPath | None = None
    cursor_param: str = "cursor"
    next_url_path: JsonPath | None = None
    offset_param: str = "offset"
    page_param: str = "page"
    start: int = 0
    limit: int | None = None
    limit_param: str = "limit"
    stop_path: JsonPath | None = None
    has_more_path: JsonPath | None = None
    max_pages: int | None = None
    max_items: int | None = None
    max_bytes: int | None = None
    on_limit: str = "TRUNCATE"


class Progress(msgspec.Struct, rename="camel", frozen=True, kw_only=True):
    """Where a paginated step stands after its last finished page (checkpointed as it is)."""

    pages: int = 0  # pages whose items were gathered
    items: int = 0  # items gathered
    bytes: int = 0  # body bytes read, those pages
    attempts: int = 0  # attempts those pages took
    position: str | int | None = None  # the next page's cursor, URL, offset or page number
    status: int = 0  # the last page's status
    saved_bytes: int = 0  # bytes of items the checkpoint holds


@dataclass(frozen=True, slots=True)
class SavedPages:
    """A checkpoint's pages of a step: where it stands, and the items of those pages."""

    progress: Progress
    items: list[Any]


@dataclass(frozen=True, slots=True)
class Page:
    """A 2xx page as the attempt loop hands it over: decoded body and its size on the wire."""

    status: int
    headers: Mapping[str, str]
    body: Any
    size: int


@dataclass(frozen=True, slots=True)
class Advance:
    """What a page did: the items it adds, the progress after it, and the stop, if any."""

    items: list[Any]
    progress: Progress
    stop: str | None = None
    truncated: bool = False


# --- compiling ----------------------------------------------------------------------------


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def compile_paginate(
    action: Paginate | None,
    step: Paginate | None,
    action_where: str,
    step_where: str,
) -> PaginateSpec | None:
    """The step's pagination (``None``: the step takes one response). ``*_where`` are the JSON
    paths of the two ``paginate`` objects; an error names the one that set the field."""
    if action is None and step is None:
        return None
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    for name in Paginate.__struct_fields__:
        for source, at in ((step, step_where), (action, action_where)):
            value = getattr(source, name) if source is not None else None
            if value is not None:
                values[name], where[name] = value, f"{at}.{_camel(name)}"
                break
    mode = values.get("mode")
    if mode is None:
        at = step_where if step is not None else action_where
        raise DefinitionError(f"{at}.mode: required: cursor, nextUrl, offset, page or none")
    if mode == "none":
        return None
    mode_level = where["mode"].rsplit(".", 1)[0]
    for name, only in _MODE_FIELDS.items():
        if name in values and only != mode and where[name].rsplit(".", 1)[0] == mode_level:
            raise DefinitionError(f"{where[name]}: applies to mode {only} only, not {mode}")
    if mode == "cursor" and "cursor_path" not in values:
        raise DefinitionError(f"{mode_level}.cursorPath: required in mode cursor")
    for name in ("limit", "max_pages", "max_items", "max_bytes"):
        if name in values and values[name] < 1:
            raise DefinitionError(f"{where[name]}: must be at least 1")
    if values.get("start", 0) < 0:
        raise DefinitionError(f"{where['start']}: must be at least 0")
    for name in ("cursor_param", "offset_param", "page_param", "limit_param"):
        if name in values and not values[name]:
            raise DefinitionError(f"{where[name]}: must not be empty")
    paths = {
        name: compile_jsonpath(values[name], where[name])
        for name in ("cursor_path", "next_url_path", "stop_path", "has_more_path")
        if name in values
    }
    items = compile_jsonpath(values.get("items", DEFAULT_ITEMS), where.get("items", mode_level))
    return PaginateSpec(
        mode=mode,
        items=items,
        cursor_path=paths.get("cursor_path"),
        cursor_param=values.get("cursor_param", "cursor"),
        next_url_path=paths.get("next_url_path"),
        offset_param=values.get("offset_param", "offset"),
        page_param=values.get("page_param", "page"),
        start=values.get("start", 1 if mode == "page" else 0),
        limit=values.get("limit"),
        limit_param=values.get("limit_param", "limit"),
        stop_path=paths.get("stop_path"),
        has_more_path=paths.get("has_more_path"),
        max_pages=values.get("max_pages"),
        max_items=values.get("max_items"),
        max_bytes=values.get("max_bytes"),
        on_limit=values.get("on_limit", "TRUNCATE"),
    )


# --- the state machine --------------------------------------------------------------------


def first_position(spec: PaginateSpec) -> str | int | None:
    """The first page's position: the start offset or page number; none for cursor/nextUrl."""
    return spec.start if spec.mode in ("offset", "page") else None


def request_for(spec: PaginateSpec, base: HttpRequest, position: str | int | None) -> HttpRequest:
    """The request for the page at ``position``, built from the step's own request."""
    if spec.mode == "nextUrl":
        if position is None:
            return _with_limit(spec, base)
        url = URL(str(position), encoded=True)
        return HttpRequest(
            base.method,
            str(url.with_query(None).with_fragment(None)),
            tuple(url.query.items()),
            base.headers,
            base.body,
        )
    request = _with_limit(spec, base)
    if position is None:
        return request
    param = {"cursor": spec.cursor_param, "offset": spec.offset_param}.get(spec.mode)
    return request.with_query_replaced(param or spec.page_param, str(position))


def _with_limit(spec: PaginateSpec, request: HttpRequest) -> HttpRequest:
    if spec.limit is None:
        return request
    return request.with_query_replaced(spec.limit_param, str(spec.limit))


def effective_caps(spec: PaginateSpec, limits: PageLimits) -> tuple[int, int, int]:
    """maxPages, maxItems, maxBytes: the definition's, at most the settings' (their default)."""
    return (
        min(spec.max_pages or limits.max_pages, limits.max_pages),
        min(spec.max_items or limits.max_items, limits.max_items),
        min(spec.max_bytes or limits.max_bytes, limits.max_bytes),
    )


def advance(
    spec: PaginateSpec,
    limits: PageLimits,
    progress: Progress,
    page: Page,
    request: HttpRequest,
    origin: str,
) -> Advance:
    """Read ``page``, fetched by ``request``; ``origin`` is the first page's (scheme://host:port).
    Raises ``ResponseError`` for a page it cannot read, ``TransportError`` (EGRESS_DENIED) for a
    next URL elsewhere, ``PaginationLimit`` for a cap under ``onLimit: FAIL``."""
    max_pages, max_items, max_bytes = effective_caps(spec, limits)
    read = progress.bytes + page.size
    if read > max_bytes:
        # The page that would pass the cap is not used: what is gathered stays within it.
        return _limited(spec, progress, [], "maxBytes", max_bytes)
    items = items_of(spec, page.body)
    reason = _end_of(spec, page, items)
    position = None if reason else _next_position(spec, progress, page, items, request, origin)
    if reason is None and position is None:
        reason = "end"
    after = msgspec.structs.replace(
        progress,
        pages=progress.pages + 1,
        items=progress.items + len(items),
        bytes=read,
        position=position,
        status=page.status,
    )
    if after.items > max_items:
        kept = items[: max_items - progress.items]
        after = msgspec.structs.replace(after, items=max_items)
        return _limited(spec, after, kept, "maxItems", max_items)
    if reason is not None:
        return Advance(items, after, reason)
    if after.pages >= max_pages:
        return _limited(spec, after, items, "maxPages", max_pages)
    if after.items == max_items:
        return _limited(spec, after, items, "maxItems", max_items)
    return Advance(items, after)


def _limited(
    spec: PaginateSpec, progress: Progress, items: list[Any], cap: str, value: int
) -> Advance:
    if spec.on_limit == "FAIL":
        raise PaginationLimit(
            f"{cap} ({value}) reached after {progress.pages} pages and {progress.items} items"
            " (onLimit FAIL)"
        )
    return Advance(items, progress, cap, truncated=True)


def items_of(spec: PaginateSpec, body: Any) -> list[Any]:
    """The page's items: a wildcard path's matches, or the list a plain path names."""
    found = spec.items.find(body)
    if spec.items.has_wildcard:
        return list(found)
    if found is None:
        return []
    if not isinstance(found, list):
        raise ResponseError(
            f"paginate.items {spec.items.text} is a {type(found).__name__}, not a list"
        )
    return found


def _end_of(spec: PaginateSpec, page: Page, items: list[Any]) -> str | None:
    if not items:
        return "emptyPage"
    if spec.limit is not None and len(items) < spec.limit:
        return "shortPage"
    if spec.stop_path is not None and truthy(spec.stop_path.find(page.body)):
        return "stopPath"
    if spec.has_more_path is not None and not truthy(spec.has_more_path.find(page.body)):
        return "hasMorePath"
    return None


def _next_position(
    spec: PaginateSpec,
    progress: Progress,
    page: Page,
    items: list[Any],
    request: HttpRequest,
    origin: str,
) -> str | int | None:
    if spec.mode == "offset":
        return int(progress.position or 0) + len(items)
    if spec.mode == "page":
        return int(progress.position or 0) + 1
    if spec.mode == "cursor":
        assert spec.cursor_path is not None
        cursor = spec.cursor_path.find(page.body)
        if cursor is None or cursor == "" or cursor is False:
            return None
        if isinstance(cursor, bool) or not isinstance(cursor, (str, int)):
            raise ResponseError(
                f"paginate.cursorPath {spec.cursor_path.text} is a {type(cursor).__name__},"
                " not a string or number"
            )
        if str(cursor) == str(progress.position):
            raise ResponseError(f"the next cursor is the one just used: page {progress.pages + 2}")
        return str(cursor)
    return _next_url(spec, page, request, origin)


def _next_url(spec: PaginateSpec, page: Page, request: HttpRequest, origin: str) -> str | None:
    if spec.next_url_path is not None:
        found = spec.next_url_path.find(page.body)
        if found is None or found == "":
            return None
        if not isinstance(found, str):
            raise ResponseError(
                f"paginate.nextUrlPath {spec.next_url_path.text} is a {type(found).__name__},"
                " not a URL"
            )
        text = found
    else:
        link = link_next(page.headers.get("link"))
        if link is None:
            return None
        text = link
    current = URL(request.url, encoded=True).with_query(list(request.query))
    try:
        target = current.join(URL(text.strip()))
    except ValueError:
        raise ResponseError("the next page's URL does not parse") from None
    if target.scheme not in ("http", "https"):
        raise TransportError(
            f"the next page's URL is not http(s) ({target.scheme or 'none'}): refused",
            code=ErrorCode.EGRESS_DENIED,
        )
    if target.user is not None or target.password is not None:
        raise TransportError(
            "the next page's URL carries a user or password: refused",
            code=ErrorCode.EGRESS_DENIED,
        )
    if str(target.origin()) != origin:
        raise TransportError(
            f"the next page's URL is on another origin ({target.host}): refused, since the"
            " connection's credentials go to its own origin only",
            code=ErrorCode.EGRESS_DENIED,
        )
    url = str(target.with_fragment(None))
    if url == str(current):
        raise ResponseError("the next page's URL is the one just fetched")
    return url


def origin_of(url: str) -> str:
    return str(URL(url, encoded=True).origin())


_LINK = re.compile(r"<([^>]*)>((?:\s*;\s*[^;,]*)*)")
_REL = re.compile(r"""\brel\s*=\s*(?:"([^"]*)"|([^\s;,"]+))""", re.IGNORECASE)


def link_next(header: str | None) -> str | None:
    """The target of the ``rel="next"`` link in a Link header (RFC 8288), or None."""
    if not header:
        return None
    for match in _LINK.finditer(header):
        rel = _REL.search(match.group(2))
        if rel is not None and "next" in (rel.group(1) or rel.group(2) or "").lower().split():
            return match.group(1)
    return None


def output_of(progress: Progress, items: list[Any], stop: str, truncated: bool) -> dict[str, Any]:
    """A paginated step's output (docs/contract.md "Pagination")."""
    return {
        "status": progress.status,
        "items": items,
        "pages": progress.pages,
        "itemCount": len(items),
        "truncated": truncated,
        "stoppedBy": stop,
    }
