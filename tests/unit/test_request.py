"""runner.http.request: a step's HttpRequest from its Action and rendered input. Path
encoding, base URLs, query, header merge, body. Pure functions, no sockets."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from runner.errors import DefinitionError, ErrorCode, TemplateError
from runner.http.messages import HttpRequest
from runner.http.request import (
    base_url_for,
    build_request,
    encode_segment,
    fill_endpoint,
    merge_headers,
    path_params,
    query_pairs,
)


def request(
    *,
    method: str = "GET",
    base_url: str = "https://api.test/v1",
    endpoint_template: str = "/things",
    path: dict[str, Any] | None = None,
    query: dict[str, Any] | None = None,
    header_layers: tuple[dict[str, Any], ...] = (),
    body: Any = None,
) -> HttpRequest:
    return build_request(
        method=method,
        base_url=base_url,
        endpoint_template=endpoint_template,
        path=path or {},
        query=query or {},
        header_layers=header_layers,
        body=body,
    )


# --- path segments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("a/b", "a%2Fb"),
        ("a?b", "a%3Fb"),
        ("a#b", "a%23b"),
        ("a b", "a%20b"),
        ("é", "%C3%A9"),
        ("日本", "%E6%97%A5%E6%9C%AC"),
        ("%2F", "%252F"),
        ("100%", "100%25"),
        ("u@h", "u%40h"),
        ("a;b=c&d", "a%3Bb%3Dc%26d"),
        ("a+b", "a%2Bb"),
        ("../etc", "..%2Fetc"),
        ("a.b", "a.b"),
        ("~_-.", "~_-."),
        ("c_42", "c_42"),
        (42, "42"),
        (1.5, "1.5"),
        (True, "true"),
        (False, "false"),
    ],
)
def test_given_a_path_value_when_encoded_then_it_stays_one_segment(
    value: Any, encoded: str
) -> None:
    assert encode_segment("id", value) == encoded


@pytest.mark.parametrize("value", ["", ".", ".."])
def test_given_a_dot_segment_or_empty_when_encoded_then_it_is_refused(value: str) -> None:
    # Once normalised, "." and ".." would move the request to another path.
    with pytest.raises(TemplateError) as info:
        encode_segment("id", value)

    assert info.value.code == ErrorCode.TEMPLATE_ERROR
    assert info.value.message == "path parameter 'id' may not be empty, '.' or '..'"


@pytest.mark.parametrize(("value", "kind"), [(None, "null"), ({"a": 1}, "dict"), ([1], "list")])
def test_given_a_non_scalar_path_value_when_encoded_then_it_is_refused(
    value: Any, kind: str
) -> None:
    with pytest.raises(TemplateError) as info:
        encode_segment("id", value)

    assert info.value.message == f"path parameter 'id' must be a string or number, got {kind}"


def test_given_a_template_with_placeholders_when_filled_then_each_value_is_encoded() -> None:
    url = fill_endpoint(
        "/customers/{customerId}/orders/{orderId}", {"customerId": "a/b c", "orderId": 7}
    )

    assert url == "/customers/a%2Fb%20c/orders/7"
    assert path_params("/customers/{customerId}/orders/{orderId}") == ["customerId", "orderId"]


def test_placeholders_side_by_side_repeated_or_at_the_ends_are_each_filled() -> None:
    assert fill_endpoint("{a}{b}/x/{a}", {"a": "1/2", "b": "é"}) == "1%2F2%C3%A9/x/1%2F2"
    assert fill_endpoint("/plain/{ not a name }", {}) == "/plain/{ not a name }"


def test_given_a_missing_path_param_when_filled_then_template_error_names_it() -> None:
    with pytest.raises(TemplateError) as info:
        fill_endpoint("/c/{id}/o/{oid}", {"id": "x"})

    assert info.value.message == "path parameter 'oid' of '/c/{id}/o/{oid}' has no value"


def test_given_a_hostile_path_value_when_built_then_the_url_keeps_host_and_path() -> None:
    req = request(
        base_url="https://api.test/v1",
        endpoint_template="/customers/{id}",
        path={"id": "../admin?x=1#frag @evil.test/é"},
    )

    assert req.url == (
        "https://api.test/v1/customers/..%2Fadmin%3Fx%3D1%23frag%20%40evil.test%2F%C3%A9"
    )
    assert req.query == ()


# --- base URL -----------------------------------------------------------------------------


def test_given_no_connection_when_the_endpoint_is_absolute_then_it_is_used_as_is() -> None:
    assert base_url_for("https://api.test/x/{id}", None, "$.actions.a") == ""
    req = request(base_url="", endpoint_template="https://api.test/x/{id}", path={"id": "a b"})
    assert req.url == "https://api.test/x/a%20b"


def test_given_no_connection_when_the_endpoint_is_relative_then_it_is_refused() -> None:
    with pytest.raises(DefinitionError) as info:
        base_url_for("/x", None, "$.actions.a")

    assert info.value.message == (
        "$.actions.a: endpointTemplate '/x' must be an absolute URL when the step has no connection"
    )


def test_given_a_connection_when_the_endpoint_is_absolute_then_it_is_refused() -> None:
    with pytest.raises(DefinitionError) as info:
        base_url_for("https://other.test/x", "https://api.test", "$.actions.a")
    # Every time: what is remembered is a base URL, never a refusal.
    with pytest.raises(DefinitionError):
        base_url_for("https://other.test/x", "https://api.test", "$.actions.a")

    assert info.value.message == (
        "$.actions.a: endpointTemplate must be relative to the connection's baseUrl"
    )


@pytest.mark.parametrize("base", ["https://api.test/api/v1", "https://api.test/api/v1/"])
def test_given_a_base_with_a_path_when_joined_then_the_endpoint_hangs_below_it(
    base: str,
) -> None:
    prefix = base_url_for("/customers/{id}", base, "$.actions.a")

    req = request(base_url=prefix, endpoint_template="/customers/{id}", path={"id": "c 1"})

    assert req.url == "https://api.test/api/v1/customers/c%201"


@pytest.mark.parametrize("base", ["https://api.test/api/v1", "https://api.test/api/v1/"])
def test_given_an_endpoint_without_a_leading_slash_when_joined_then_one_slash_separates(
    base: str,
) -> None:
    # "customers/{id}" below ".../api/v1" must not glue into ".../api/v1customers/...".
    prefix = base_url_for("customers/{id}", base, "$.actions.a")

    req = request(base_url=prefix, endpoint_template="customers/{id}", path={"id": "x"})

    assert req.url == "https://api.test/api/v1/customers/x"


_NO_USERINFO = "may not carry a user or password (user:password@): use a BASIC connection"


@pytest.mark.parametrize(
    ("base", "fragment"),
    [
        ("https://api.test/api?key=1", "may not carry a query or fragment"),
        ("https://api.test/api#top", "may not carry a query or fragment"),
        ("ftp://api.test", "must be an http(s) URL with a host"),
        ("api.test", "must be an http(s) URL with a host"),
        ("https:///nohost", "must be an http(s) URL with a host"),
        ("https://svc:hunter2@api.test/api", _NO_USERINFO),
        ("https://svc@api.test", _NO_USERINFO),
    ],
)
def test_given_a_bad_base_url_when_checked_then_it_is_refused(base: str, fragment: str) -> None:
    with pytest.raises(DefinitionError) as info:
        base_url_for("/x", base, "$.connections.c")

    assert info.value.message == f"$.connections.c: baseUrl {fragment}"
    assert "hunter2" not in str(info.value)


def test_given_where_the_base_url_comes_from_when_refused_then_that_is_named() -> None:
    with pytest.raises(DefinitionError) as info:
        base_url_for("/x", "https://svc:hunter2@api.test", "$.actions.a", "$.connections.c.config")
    assert info.value.message == f"$.connections.c.config: baseUrl {_NO_USERINFO}"

    with pytest.raises(DefinitionError) as info:  # the endpoint is the Action's
        base_url_for("https://api.test/x", "https://api.test", "$.actions.a", "$.connections.c")
    assert info.value.message.startswith("$.actions.a: endpointTemplate")


def test_given_an_absolute_endpoint_with_a_password_when_checked_then_it_is_refused() -> None:
    # A URL is configuration and is remembered once checked: a password in it would outlive
    # the run (CONTRACT §4), and aiohttp would send it as Basic auth unasked.
    with pytest.raises(DefinitionError) as info:
        base_url_for("https://svc:hunter2@api.test/x", None, "$.actions.a")

    assert info.value.message == f"$.actions.a: endpointTemplate {_NO_USERINFO}"


# --- query --------------------------------------------------------------------------------


def test_given_scalars_lists_bools_and_nulls_when_queried_then_pairs_follow_the_rules() -> None:
    pairs = query_pairs(
        {"q": "a b", "n": 3, "f": 1.5, "t": True, "no": False, "z": None, "tag": ["x", None, 2]}
    )

    assert pairs == (
        ("q", "a b"),  # encoding the query string is the client's job
        ("n", "3"),
        ("f", "1.5"),
        ("t", "true"),
        ("no", "false"),
        ("tag", "x"),
        ("tag", "2"),
    )


@pytest.mark.parametrize("value", [{"a": 1}, [[1]], [{"a": 1}]])
def test_given_an_object_in_the_query_when_built_then_it_is_refused(value: Any) -> None:
    with pytest.raises(TemplateError) as info:
        query_pairs({"filter": value})

    assert info.value.message == "query parameter 'filter' must be scalar or a list of them"


def test_given_a_query_when_built_then_it_is_kept_apart_from_the_url() -> None:
    req = request(query={"page": 2, "tag": ["a", "b"]})

    assert req.url == "https://api.test/v1/things"
    assert req.query == (("page", "2"), ("tag", "a"), ("tag", "b"))


# --- headers ------------------------------------------------------------------------------


def test_given_header_layers_when_merged_then_later_layers_win_case_insensitively() -> None:
    merged = merge_headers(
        {"X-Trace": "action", "Accept": "text/plain", "X-Only-Action": "1"},
        {"x-trace": "step", "X-Only-Step": "2"},
        {"X-TRACE": "runner"},
    )

    assert merged == {
        "X-TRACE": "runner",
        "Accept": "text/plain",
        "X-Only-Action": "1",
        "X-Only-Step": "2",
    }


def test_given_non_string_header_values_when_merged_then_they_are_json_and_null_is_omitted() -> (
    None
):
    assert merge_headers({"X-N": 5, "X-B": True, "X-Z": None}) == {"X-N": "5", "X-B": "true"}


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"X-A": "a\r\nSet-Cookie: x=1"}, id="crlf-in-value"),
        pytest.param({"X-A": "a\nb"}, id="lf-in-value"),
        pytest.param({"X-A": "a\rb"}, id="cr-in-value"),
        pytest.param({"X-A": "a\x00b"}, id="nul-in-value"),
        pytest.param({"X-A\r\nX-B": "v"}, id="crlf-inside-name"),
        pytest.param({"X-A\n": "v"}, id="lf-ending-name"),
        pytest.param({"X A": "v"}, id="space-in-name"),
        pytest.param({"": "v"}, id="empty-name"),
    ],
)
def test_given_cr_lf_or_a_bad_name_when_merged_then_it_is_refused(headers: dict[str, Any]) -> None:
    with pytest.raises(TemplateError):
        merge_headers(headers)


def test_given_a_crlf_value_when_refused_then_the_message_does_not_quote_the_value() -> None:
    with pytest.raises(TemplateError) as info:
        merge_headers({"X-A": "secret-ish\r\nvalue"})

    assert "secret-ish" not in str(info.value)
    assert info.value.message == "header 'X-A' contains CR, LF or NUL"


# --- body, Content-Type, Accept -----------------------------------------------------------


def test_given_a_json_body_when_built_then_content_type_and_accept_default_to_json() -> None:
    req = request(method="POST", body={"a": 1, "é": [True, None]})

    assert req.method == "POST"
    assert msgspec.json.decode(req.body or b"") == {"a": 1, "é": [True, None]}
    assert req.headers == {"Content-Type": "application/json", "Accept": "application/json"}


@pytest.mark.parametrize("body", [[], 0, False, "", "text"])
def test_given_a_falsy_or_scalar_body_when_built_then_it_is_still_sent_as_json(body: Any) -> None:
    req = request(method="POST", body=body)

    assert req.body == msgspec.json.encode(body)
    assert req.headers["Content-Type"] == "application/json"


def test_given_a_content_type_header_when_built_then_it_is_kept() -> None:
    req = request(
        method="PATCH",
        body={"a": 1},
        header_layers=({"content-type": "application/merge-patch+json"},),
    )

    assert req.headers == {
        "content-type": "application/merge-patch+json",
        "Accept": "application/json",
    }


def test_given_no_body_when_built_then_no_content_type_and_accept_still_defaults() -> None:
    req = request()

    assert req.body is None
    assert req.headers == {"Accept": "application/json"}


def test_given_an_accept_header_in_any_case_when_built_then_it_is_kept() -> None:
    req = request(header_layers=({"ACCEPT": "text/csv"},))

    assert req.headers == {"ACCEPT": "text/csv"}


def test_given_all_parts_when_built_then_the_request_carries_each_of_them() -> None:
    req = request(
        method="PUT",
        endpoint_template="/customers/{id}/notes/{note}",
        path={"id": "c/42", "note": "ü"},
        query={"dry": True},
        header_layers=({"X-Action": "a", "X-Both": "action"}, {"x-both": "step"}),
        body={"text": "hi"},
    )

    assert req == HttpRequest(
        method="PUT",
        url="https://api.test/v1/customers/c%2F42/notes/%C3%BC",
        query=(("dry", "true"),),
        headers={
            "X-Action": "a",
            "x-both": "step",
            "Content-Type": "application/json",
            "Accept": "application/json",
        },
        body=b'{"text":"hi"}',
    )


def test_a_request_shows_no_header_value_and_derives_rather_than_changes() -> None:
    req = HttpRequest(
        "GET",
        "https://api.test/x",
        query=(("k", "template"), ("page", "2")),
        headers={"Authorization": "Bearer s3cr3t-value"},
    )

    assert "s3cr3t" not in repr(req) and "Authorization" in repr(req)
    keyed = req.with_query_replaced("k", "key").with_header("authorization", "Basic other")
    assert keyed.query == (("page", "2"), ("k", "key"))
    assert dict(keyed.headers) == {"authorization": "Basic other"}
    assert req.query == (("k", "template"), ("page", "2"))  # the original is untouched
    assert req != keyed and req == HttpRequest(
        "GET", "https://api.test/x", (("k", "template"), ("page", "2")), dict(req.headers)
    )
