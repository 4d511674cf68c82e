"""The page-state machine as pure functions: given a page, the next request or the stop; and
how ``paginate`` settings compile (DEFINITION_INVALID naming the JSON path)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from runner.contract import Paginate, decode_workflow_version
from runner.engine.pagination import (
    Page,
    PageLimits,
    PaginateSpec,
    Progress,
    advance,
    compile_paginate,
    first_position,
    link_next,
    origin_of,
    output_of,
    request_for,
)
from runner.errors import DefinitionError, ErrorCode, RunnerError
from runner.http.messages import HttpRequest
from runner.reporting.checkpoint import parse_checkpoint

BASE = HttpRequest("GET", "https://api.example/v1/users", (("q", "x"),), {"Accept": "a/j"})
ORIGIN = origin_of(BASE.url)
LIMITS = PageLimits()
A, S = "$.actions.act.paginate", "$.graph.steps[0].paginate"


def spec(**fields: Any) -> PaginateSpec:
    compiled = compile_paginate(msgspec.convert(fields, Paginate), None, A, S)
    assert compiled is not None
    return compiled


def page(body: Any, *, headers: dict[str, str] | None = None, size: int = 100) -> Page:
    return Page(200, headers or {}, body, size)


def walk(
    sp: PaginateSpec, bodies: list[Any], limits: PageLimits = LIMITS
) -> tuple[list[HttpRequest], dict[str, Any]]:
    """Drive the machine over scripted pages: the requests it made and the output."""
    progress = Progress(position=first_position(sp))
    requests: list[HttpRequest] = []
    items: list[Any] = []
    for body in bodies:
        request = request_for(sp, BASE, progress.position)
        requests.append(request)
        step = advance(sp, limits, progress, page(body), request, ORIGIN)
        items += step.items
        progress = step.progress
        if step.stop is not None:
            return requests, output_of(progress, items, step.stop, step.truncated)
    raise AssertionError("the machine did not stop")


# --- the modes --------------------------------------------------------------------------------


def test_cursor_mode_puts_the_next_cursor_in_its_query_parameter_until_there_is_none() -> None:
    sp = spec(mode="cursor", items="$.data[*]", cursorPath="$.next", cursorParam="after")
    requests, out = walk(
        sp,
        [{"data": [1, 2], "next": "c2"}, {"data": [3], "next": "c3"}, {"data": [4], "next": None}],
    )
    assert [r.query for r in requests] == [
        (("q", "x"),),
        (("q", "x"), ("after", "c2")),
        (("q", "x"), ("after", "c3")),
    ]
    assert out == {
        "status": 200,
        "items": [1, 2, 3, 4],
        "pages": 3,
        "itemCount": 4,
        "truncated": False,
        "stoppedBy": "end",
    }


def test_offset_mode_advances_by_the_items_received_and_stops_on_a_short_page() -> None:
    sp = spec(mode="offset", items="$.rows", limit=2)
    requests, out = walk(sp, [{"rows": [1, 2]}, {"rows": [3, 4]}, {"rows": [5]}])
    assert [dict(r.query) for r in requests] == [
        {"q": "x", "limit": "2", "offset": "0"},
        {"q": "x", "limit": "2", "offset": "2"},
        {"q": "x", "limit": "2", "offset": "4"},
    ]
    assert out["items"] == [1, 2, 3, 4, 5] and out["stoppedBy"] == "shortPage"


def test_page_mode_counts_from_start_and_stops_on_an_empty_page() -> None:
    sp = spec(mode="page", pageParam="p", start=1)
    requests, out = walk(sp, [["a"], ["b"], []])
    assert [dict(r.query)["p"] for r in requests] == ["1", "2", "3"]
    assert out["items"] == ["a", "b"] and out["stoppedBy"] == "emptyPage"
    assert out["pages"] == 3


def test_next_url_from_the_body_is_resolved_and_replaces_url_and_query() -> None:
    sp = spec(mode="nextUrl", items="$.items[*]", nextUrlPath="$.links.next")
    requests, out = walk(
        sp,
        [
            {"items": [1], "links": {"next": "/v1/users?page=2&q=x"}},
            {"items": [2], "links": {"next": "https://api.example/v1/users?page=3"}},
            {"items": [3], "links": {}},
        ],
    )
    assert [(r.url, r.query) for r in requests[1:]] == [
        ("https://api.example/v1/users", (("page", "2"), ("q", "x"))),
        ("https://api.example/v1/users", (("page", "3"),)),
    ]
    assert requests[1].headers == BASE.headers
    assert out["items"] == [1, 2, 3] and out["stoppedBy"] == "end"


def test_link_header_rel_next_is_followed() -> None:
    sp = spec(mode="nextUrl")
    progress = Progress()
    header = '<https://api.example/v1/users?page=9>; rel="last", <?page=2>; rel="next"'
    step = advance(sp, LIMITS, progress, page([1], headers={"link": header}), BASE, ORIGIN)
    assert step.stop is None and step.progress.position == "https://api.example/v1/users?page=2"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('<https://a/x?p=2>; rel="next"', "https://a/x?p=2"),
        ("<https://a/x?p=2>; rel=next", "https://a/x?p=2"),
        ('<https://a/1>; rel="prev", <https://a/3>; rel="next last"', "https://a/3"),
        ('<https://a/1>; rel="prev"', None),
        ("", None),
        (None, None),
    ],
)
def test_link_next_reads_rfc8288_headers(header: str | None, expected: str | None) -> None:
    assert link_next(header) == expected


# --- stop conditions and caps -----------------------------------------------------------------


def test_stop_path_truthy_or_has_more_path_falsy_ends_after_that_page() -> None:
    sp = spec(mode="page", items="$.d", stopPath="$.last")
    _, out = walk(sp, [{"d": [1]}, {"d": [2], "last": True}, {"d": [3]}])
    assert out["items"] == [1, 2] and out["stoppedBy"] == "stopPath"
    sp = spec(mode="page", items="$.d", hasMorePath="$.has_more")
    _, out = walk(sp, [{"d": [1], "has_more": True}, {"d": [2], "has_more": False}])
    assert out["items"] == [1, 2] and out["stoppedBy"] == "hasMorePath"


def test_max_pages_truncates_when_more_pages_exist() -> None:
    sp = spec(mode="page", maxPages=2)
    _, out = walk(sp, [[1], [2], [3]])
    assert out == {
        "status": 200,
        "items": [1, 2],
        "pages": 2,
        "itemCount": 2,
        "truncated": True,
        "stoppedBy": "maxPages",
    }


def test_max_items_cuts_the_page_that_passes_it() -> None:
    sp = spec(mode="page", maxItems=3)
    _, out = walk(sp, [[1, 2], [3, 4], [5]])
    assert out["items"] == [1, 2, 3] and out["truncated"] and out["stoppedBy"] == "maxItems"


def test_a_last_page_that_ends_naturally_at_a_cap_is_not_truncated() -> None:
    # The second page is the cap and says it is the last: nothing was left out.
    sp = spec(mode="page", items="$.d", maxPages=2, hasMorePath="$.more")
    _, out = walk(sp, [{"d": [1], "more": True}, {"d": [2], "more": False}])
    assert (out["truncated"], out["stoppedBy"]) == (False, "hasMorePath")
    # Reaching maxItems exactly while the API says there is more: truncated.
    sp = spec(mode="page", items="$.d", maxItems=2, hasMorePath="$.more")
    _, out = walk(sp, [{"d": [1, 2], "more": True}])
    assert (out["truncated"], out["stoppedBy"]) == (True, "maxItems")


def test_max_bytes_drops_the_page_that_would_pass_it() -> None:
    sp = spec(mode="page", maxBytes=250)
    _, out = walk(sp, [[1], [2], [3]])  # each page is 100 bytes
    assert out["items"] == [1, 2] and out["stoppedBy"] == "maxBytes" and out["truncated"]


def test_the_settings_are_the_ceiling_of_a_definitions_caps() -> None:
    sp = spec(mode="page", maxPages=50)
    _, out = walk(sp, [[1], [2], [3]], PageLimits(max_pages=2))
    assert out["pages"] == 2 and out["stoppedBy"] == "maxPages"


def test_on_limit_fail_raises_pagination_limit() -> None:
    sp = spec(mode="page", maxPages=2, onLimit="FAIL")
    with pytest.raises(RunnerError) as info:
        walk(sp, [[1], [2], [3]])
    assert info.value.code == ErrorCode.PAGINATION_LIMIT
    assert info.value.message == "maxPages (2) reached after 2 pages and 2 items (onLimit FAIL)"


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("next_url", "says"),
    [
        ("https://other.example/v1/users?page=2", "another origin (other.example)"),
        ("http://api.example/v1/users?page=2", "another origin (api.example)"),
        ("https://api.example:8443/v1/users", "another origin (api.example)"),
        ("http://169.254.169.254/latest/meta-data", "another origin (169.254.169.254)"),
        ("https://u:p@api.example/v1/users", "user or password"),
        ("file:///etc/passwd", "not http(s)"),
    ],
)
def test_a_next_url_elsewhere_is_egress_denied(next_url: str, says: str) -> None:
    sp = spec(mode="nextUrl", items="$.d", nextUrlPath="$.next")
    with pytest.raises(RunnerError) as info:
        advance(sp, LIMITS, Progress(), page({"d": [1], "next": next_url}), BASE, ORIGIN)
    assert info.value.code == ErrorCode.EGRESS_DENIED
    assert says in info.value.message


def test_a_cursor_that_does_not_move_or_is_not_scalar_is_response_invalid() -> None:
    sp = spec(mode="cursor", items="$.d", cursorPath="$.next")
    with pytest.raises(RunnerError) as info:
        advance(sp, LIMITS, Progress(position="c1"), page({"d": [1], "next": "c1"}), BASE, ORIGIN)
    assert info.value.code == ErrorCode.RESPONSE_INVALID
    with pytest.raises(RunnerError) as info:
        advance(sp, LIMITS, Progress(), page({"d": [1], "next": {"a": 1}}), BASE, ORIGIN)
    assert info.value.code == ErrorCode.RESPONSE_INVALID


def test_items_that_are_not_a_list_are_response_invalid() -> None:
    sp = spec(mode="page", items="$.d")
    with pytest.raises(RunnerError) as info:
        advance(sp, LIMITS, Progress(position=1), page({"d": {"a": 1}}), BASE, ORIGIN)
    assert info.value.code == ErrorCode.RESPONSE_INVALID
    assert "paginate.items $.d is a dict, not a list" in info.value.message


# --- compiling ----------------------------------------------------------------------------


def test_a_steps_fields_override_the_actions_one_by_one_and_none_turns_it_off() -> None:
    action = Paginate(mode="page", limit=10, max_pages=5)
    merged = compile_paginate(action, Paginate(max_pages=2), A, S)
    assert merged is not None and (merged.limit, merged.max_pages) == (10, 2)
    assert compile_paginate(action, Paginate(mode="none"), A, S) is None
    assert compile_paginate(None, None, A, S) is None


@pytest.mark.parametrize(
    ("action", "step", "message"),
    [
        ({"limit": 5}, None, f"{A}.mode: required: cursor, nextUrl, offset, page or none"),
        ({"mode": "cursor"}, None, f"{A}.cursorPath: required in mode cursor"),
        ({"mode": "page", "limit": 0}, None, f"{A}.limit: must be at least 1"),
        ({"mode": "page"}, {"maxItems": 0}, f"{S}.maxItems: must be at least 1"),
        ({"mode": "page", "cursorPath": "$.n"}, None, f"{A}.cursorPath: applies to mode cursor"),
        ({"mode": "page", "items": "data"}, None, f"{A}.items: JSONPath 'data' must start"),
        ({"mode": "page"}, {"stopPath": "$.a[?"}, f"{S}.stopPath: cannot parse JSONPath"),
        ({"mode": "offset", "start": -1}, None, f"{A}.start: must be at least 0"),
    ],
)
def test_bad_settings_are_definition_invalid_naming_the_field(
    action: dict[str, Any], step: dict[str, Any] | None, message: str
) -> None:
    with pytest.raises(DefinitionError) as info:
        compile_paginate(
            msgspec.convert(action, Paginate),
            msgspec.convert(step, Paginate) if step is not None else None,
            A,
            S,
        )
    assert info.value.message.startswith(message), info.value.message


def test_an_unknown_or_mistyped_paginate_field_fails_decoding_with_its_path() -> None:
    doc = {
        "id": "v",
        "graph": {"steps": [{"key": "a", "actionId": "act", "paginate": {"maxpages": 3}}]},
        "actions": {"act": {"id": "act", "endpointTemplate": "https://x/y"}},
    }
    with pytest.raises(DefinitionError) as info:
        decode_workflow_version(doc)
    assert info.value.message == "$.graph.steps[0].paginate: object contains unknown field maxpages"
    doc["graph"] = {"steps": [{"key": "a", "actionId": "act"}]}
    doc["actions"]["act"]["paginate"] = {"mode": "sideways"}  # type: ignore[index]
    with pytest.raises(DefinitionError) as info:
        decode_workflow_version(doc)
    assert info.value.message == """$.actions["act"].paginate.mode: invalid enum value 'sideways'"""


# --- the checkpoint -----------------------------------------------------------------------


def test_a_checkpoint_restores_progress_and_items_of_every_saved_page() -> None:
    state = msgspec.json.encode(Progress(pages=2, items=3, position="c3", attempts=2))
    raw = {
        b"seq": b"4",
        b"page:list": state,
        b"page:list:1": b"[1,2]",
        b"page:list:2": b"[3]",
        b"page:gone": msgspec.json.encode(Progress(pages=2)),
        b"page:gone:1": b"[1]",  # page 2 is missing: that step starts over
    }
    cp = parse_checkpoint(raw)
    assert list(cp.pages) == ["list"]
    assert cp.pages["list"].items == [1, 2, 3]
    assert cp.pages["list"].progress.position == "c3"
