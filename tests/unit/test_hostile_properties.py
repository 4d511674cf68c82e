"""Hostile inputs to the pure parts, without sockets: whatever a definition or an API sends ends
as one of the contract's errors, or succeeds, and never costs more than linear work.

- Templates: any text compiles or is ``DefinitionError``; the scan for ``{{ ... }}`` is linear
  (20,000 unclosed ``{{`` took 8 s on the old regex) and agrees with the old regex otherwise.
- JSONPath: any text compiles or is ``DefinitionError``; filters (``?(...)``, ``=~`` regexes)
  and recursive descent (``..``) are refused when the definition compiles, so no JSONPath
  regex ever runs, backtracking or not. Over documents as deep as the limit allows, finding
  is iterative and total.
- A 2xx response of any bytes and any Content-Type becomes an output, or ``ResponseError`` /
  ``SchemaError``: NUL, lone surrogates as JSON escapes, non-UTF-8, ``1e999``, huge integers,
  ``__proto__`` keys, deep nesting.
- The OAuth2 token response: any body is a token set or ``AuthError``, under the JSON
  depth limit; a token a header cannot carry is refused.
- Redaction of any value holding a secret removes it, whatever characters surround it.

Examples per property are bounded (``BOUNDED``); ``HYPOTHESIS_PROFILE=soak`` runs many more.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from runner import jsonlimits
from runner.contract import decode_workflow_version
from runner.engine.plan import compile_plan
from runner.engine.step import response_output
from runner.errors import AuthError, DefinitionError, ResponseError, SchemaError, TemplateError
from runner.http.messages import HttpResponse
from runner.http.oauth2.grant import _oauth_error, _parse_token_response
from runner.http.oauth2.tokens import TokenSet
from runner.looplag import LoopLag
from runner.redact import REDACTED, Redactor
from runner.templating import compile_jsonpath, compile_value, render
from tests.hostile import BOUNDED, MAX_LOOP_LAG_MS, hostile_json_text, hostile_text, json_documents

# --- templates ----------------------------------------------------------------------------------

# The scan this file's linear one replaced: the oracle for text without a newline (``.`` did
# not cross one; the scanner reads a template to its ``}}`` and refuses what is not a path).
_OLD_TEMPLATE = re.compile(r"(?<!\\)\{\{\s*(.*?)\s*\}\}")

template_text = st.lists(
    st.sampled_from(["{", "}", "\\", " ", "input", ".", "a", "[0]", "x"]), max_size=40
).map("".join)


@given(template_text | hostile_text)
@BOUNDED
def test_any_text_compiles_as_a_template_or_is_a_definition_error(text: str) -> None:
    try:
        compiled = compile_value({"v": text, "l": [text]})
    except DefinitionError:
        return
    try:
        render(compiled, {"input": {"a": [1], "x": None}})
    except TemplateError:
        pass


@given(template_text)
@BOUNDED
def test_the_linear_scan_finds_the_templates_the_old_regex_found(text: str) -> None:
    old = [m.group(1) for m in _OLD_TEMPLATE.finditer(text)]
    try:
        compiled = compile_value(text)
    except DefinitionError:
        # Refused: then the old scan found an expression that is not a path, too.
        assert old, text
        return
    from runner.templating import refs_of

    assert [ref.text for ref, _ in refs_of(compiled)] == old


@pytest.mark.parametrize(
    "text",
    [
        "{{" * 20_000,
        "{{ input.a " * 20_000,
        "\\{{ " * 20_000 + "{{ input.a }}",
        "{" * 200_000,
    ],
)
async def test_unclosed_templates_do_not_hold_the_event_loop(text: str) -> None:
    # Given a loop-lag probe; when a definition's string of unclosed templates compiles on the
    # loop (as the worker compiles a plan), then the loop was held less than issue 21's bound.
    # The old scan restarted from every unclosed ``{{``: 8 s for 20,000 of them.
    lag = LoopLag(interval_s=0.01)
    lag.start()
    await asyncio.sleep(0.02)
    for _ in range(3):
        compile_value({"a": text})
        await asyncio.sleep(0.02)
    await lag.stop()
    assert lag.max_ms < MAX_LOOP_LAG_MS, lag.max_ms


# --- JSONPath -----------------------------------------------------------------------------------

jsonpath_text = st.lists(
    st.sampled_from(["$", ".", "..", "*", "[", "]", "'", '"', "?", "@", "=~", "a", "0"]),
    max_size=30,
).map(lambda parts: "$" + "".join(parts))


@given(jsonpath_text | hostile_text)
@BOUNDED
def test_any_jsonpath_compiles_or_is_a_definition_error(text: str) -> None:
    try:
        path = compile_jsonpath(text, "$.graph.steps[0].extract.x")
    except DefinitionError as err:
        assert "$.graph.steps[0].extract.x" in str(err)
        return
    path.find({"a": [{"a": 1}]})


@pytest.mark.parametrize(
    "text",
    [
        "$.items[?(@.name =~ /^(a+)+$/)]",
        "$[?(@.a =~ /x/i)]",
        "$.items[?(@.price < 10)]",
        "$..id",
        "$..[?(@.x)]",
        "$.a[(@.length-1)]",
        "$.a[0:2]",
    ],
)
def test_filters_regexes_and_recursive_descent_are_refused_when_the_definition_compiles(
    text: str,
) -> None:
    # Given a definition whose extract uses JSONPath beyond the runner's subset
    definition = {
        "id": "wfv_jp",
        "workflowId": "wf",
        "version": 1,
        "graph": {"steps": [{"key": "s", "actionId": "a", "extract": {"x": text}}]},
        "actions": {"a": {"id": "a", "name": "a", "method": "GET", "endpointTemplate": "/x"}},
    }
    # When it compiles, then it is DEFINITION_INVALID naming the extract
    with pytest.raises(DefinitionError) as caught:
        compile_plan(decode_workflow_version(definition))
    assert "$.graph.steps[0].extract.x" in str(caught.value)
    assert str(caught.value).startswith("DEFINITION_INVALID")


def test_a_wildcard_over_the_deepest_document_allowed_is_found_iteratively() -> None:
    # Given a document nested to the depth limit, lists of one object each
    doc: Any = 1
    for _ in range(jsonlimits.DEFAULT_MAX_DEPTH - 1):
        doc = [{"a": doc}]
    path = compile_jsonpath("$" + "[*].a" * (jsonlimits.DEFAULT_MAX_DEPTH // 2), "$.x")
    # When a wildcard path walks it, then it finds the values without recursion
    assert path.find(doc) is not None


# --- responses ----------------------------------------------------------------------------------


def _step_plan(extract: dict[str, str] | None = None) -> Any:
    definition = {
        "id": "wfv_resp",
        "workflowId": "wf",
        "version": 1,
        "graph": {"steps": [{"key": "s", "actionId": "a", "extract": extract or {}}]},
        "actions": {
            "a": {
                "id": "a",
                "name": "a",
                "method": "GET",
                "endpointTemplate": "/x",
                "outputSchema": {
                    "type": ["object", "array", "string", "number", "null", "boolean"],
                    "properties": {"__proto__": {"type": "object"}},
                    "patternProperties": {"^(a+)+$": {"type": "string"}},
                },
            }
        },
    }
    plan = compile_plan(decode_workflow_version(definition))
    return plan, plan.steps[0]


_PLAN, _STEP = _step_plan({"first": "$.body[0]", "all": "$.body.*", "proto": "$.body.__proto__"})
CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=latin-1",
        "application/problem+json",
        "text/plain",
        "text/html; charset=utf-8",
        "application/octet-stream",
        "",
        "json",
    ]
)


@given(body=hostile_json_text | st.binary(max_size=200), content_type=CONTENT_TYPES)
@BOUNDED
@example(body=b'{"x": 1e999, "n": ' + b"9" * 5000 + b"}", content_type="application/json")
@example(body=b'"\\ud800\\udfff\\ud800"', content_type="application/json")
@example(body=b"\xff\xfe{\x00}", content_type="application/json")
@example(
    body=b'{"__proto__": {"polluted": true}, "a": "aaaaaaaaaaaaaaaaaaaaaaaaa!"}',
    content_type="application/json",
)
@example(body=b"[" * 5000 + b"]" * 5000, content_type="application/json")
def test_any_response_body_is_an_output_or_a_step_error(
    body: str | bytes, content_type: str
) -> None:
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    response = HttpResponse(200, {"content-type": content_type}, raw)
    try:
        output = response_output(_STEP, response, _PLAN.schemas)
    except (ResponseError, SchemaError) as err:
        assert str(err).startswith(("RESPONSE_INVALID: s:", "SCHEMA_VALIDATION: s"))
        return
    # What the step keeps can be encoded for the status stream and the checkpoint
    assert not jsonlimits.depth_exceeds(output, 2 * jsonlimits.max_depth())
    json.dumps(output, default=str)


# --- the OAuth2 token response -------------------------------------------------------------------

BASE_TOKENS = TokenSet(
    access_token="old", refresh_token="refresh", expires_at_ms=None, obtained_at_ms=0
)


@given(hostile_json_text | st.binary(max_size=200))
@BOUNDED
@example(b'{"access_token": "t", "expires_in": 1e999}')
@example(b'{"access_token": "t", "expires_in": -1e999}')
@example(b'{"access_token": "t", "expires_in": NaN}')
@example(b'{"access_token": "t", "expires_in": ' + b"9" * 4000 + b"}")
@example(b'{"access_token": "t", "expires_in": "99999999999999999999999999999"}')
@example(b'{"access_token": "t", "expires_in": 1e300}')
@example(b'{"access_token": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
@example(b"[" * 500_000)
@example(b'{"access_token": "a", "access_token": "b"}')
def test_any_token_response_is_a_token_set_or_an_auth_error(body: str | bytes) -> None:
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    try:
        tokens = _parse_token_response("connection c: token endpoint", raw, BASE_TOKENS, lambda: 0)
    except AuthError as err:
        assert str(err).startswith("AUTH_FAILED: connection c: token endpoint")
    else:
        assert isinstance(tokens.access_token, str) and tokens.access_token
        assert tokens.expires_at_ms is None or isinstance(tokens.expires_at_ms, int)
        # A token set is stored as JSON: what was parsed must encode again
        json.dumps([tokens.access_token, tokens.refresh_token, tokens.expires_at_ms])
    # and a refused grant's body reads as an OAuth2 error code or none, never raising
    assert isinstance(_oauth_error(raw), str)


# --- redaction ----------------------------------------------------------------------------------


@given(
    secret=st.text(min_size=8, max_size=24).filter(lambda s: s.strip() == s and len(set(s)) > 3),
    value=json_documents,
    around=hostile_text,
)
@BOUNDED
def test_a_secret_never_survives_redaction_among_hostile_characters(
    secret: str, value: Any, around: str
) -> None:
    redactor = Redactor([secret])
    holder = {"a": [value, f"{around}{secret}{around}"], f"k{secret}": secret}
    out = redactor.value(holder)
    text = json.dumps(out, ensure_ascii=False)
    assert secret not in text
    assert REDACTED in text
