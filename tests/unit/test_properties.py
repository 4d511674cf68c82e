"""Property tests (hypothesis) for what hostile definitions, jobs and APIs cannot do. No sockets.

- Decoding never raises anything but the contract's errors, and compiling a decoded definition
  raises only ``DefinitionError``.
- A rendered URL never changes the scheme, host or port of the connection's base URL, never
  leaves its base path and never adds a path segment; query values cannot add a parameter or a
  fragment once the client builds the final URL.
- No secret survives redaction in any rendering: plain, base64 (alone and inside a Basic
  credential), percent-encoded, JSON-escaped, yarl's query quoting, nested objects.
- The egress check agrees with Python's ``ipaddress``: see ``tests/unit/test_egress.py``
  (``test_ipv4_denied_exactly_when_python_flags_it`` and the tests around it); not repeated here.

Each property runs a bounded number of examples so the file stays within a few seconds.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import string
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urlsplit

import msgspec
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st
from yarl import URL

from runner.contract import WorkflowVersion, decode_job_data, decode_workflow_version
from runner.engine.plan import compile_plan
from runner.errors import DefinitionError, PayloadError, TemplateError
from runner.http.request import base_url_for, build_request, path_params
from runner.redact import REDACTED, Redactor

BOUNDED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Drawing a whole definition costs about ten times a JSON value: fewer of them, for the same time.
BOUNDED_DEFINITIONS = settings(BOUNDED, max_examples=80)

# --- strategies: JSON ---------------------------------------------------------------------------

# Field names of the contract, so that generated objects get past the first check now and then.
WIRE_KEYS = (
    "workflowRunId",
    "workflowVersionId",
    "tenantId",
    "input",
    "workflowVersion",
    "sealedCredentials",
    "deadlineAt",
    "id",
    "graph",
    "steps",
    "actions",
    "connections",
    "envConfig",
    "timeoutMs",
    "key",
    "actionId",
    "endpointTemplate",
    "dependsOn",
    "extract",
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(WIRE_KEYS) | st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=15,
)
# Small values in place of a field: generating big ones inside a definition costs seconds.
json_small = (
    json_scalars
    | st.lists(json_scalars, max_size=2)
    | st.dictionaries(st.sampled_from(WIRE_KEYS), json_scalars, max_size=2)
)


_ONE_IN_16 = st.sampled_from(range(16))


@st.composite
def mostly(draw: st.DrawFn, good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
    """``good``, and one time in 16 ``bad``: a definition has a dozen fields, so a higher rate
    would leave almost none that get past the first error."""
    if draw(_ONE_IN_16) == 15:
        return draw(bad)
    return draw(good)


# Cached: building a strategy costs more than drawing from it.
@functools.cache
def maybe_garbage(valid: st.SearchStrategy[Any], noisy: bool) -> st.SearchStrategy[Any]:
    """``valid``, or when ``noisy`` now and then a value of another shape in its place."""
    return mostly(valid, json_small) if noisy else valid


# --- strategies: definitions that are nearly right ----------------------------------------------

ACTION_IDS = ("act_a", "act_b")
GOOD_PIECES = (
    "{{ input.id }}",
    "{{ steps.s0.output.body.id }}",
    "{{ env.REGION }}",
    "{{ secrets.KEY }}",
    "{{ run.id }}",
    "{{ input[0] }}",
    "{{ input.a.0 }}",
    "\\{{",
    "text ",
    "/",
    "}}",
)
# Templates that try to reach past the run's context, or do not parse.
HOSTILE_PIECES = (
    "{{ __import__('os') }}",
    "{{ input.__class__ }}",
    "{{ steps['x'] }}",
    "{{ config }}",
    "{{ input.x() }}",
    "{{ }}",
    "{{ input | safe }}",
)
GOOD_PATHS = ("$.body.id", "$.body[*].id", "$['a']", "$.a.*", "$")
BAD_PATHS = ("$..x", "body.id", "$[", "")
GOOD_SCHEMAS: tuple[Any, ...] = (
    {"type": "object"},
    {"type": "object", "required": ["id"]},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-z]+$"}}},
)
BAD_SCHEMAS: tuple[Any, ...] = (
    {"type": "string", "pattern": "("},
    {"$ref": "http://example.com/schema.json"},
    {"$ref": "file:///etc/passwd"},
    {"$ref": "#/definitions/missing"},
    {"type": "no-such-type"},
    {"minimum": "not a number"},
)

templates = st.lists(
    mostly(st.sampled_from(GOOD_PIECES), st.sampled_from(HOSTILE_PIECES)), min_size=1, max_size=3
).map("".join)
templated_values = (
    templates
    | json_scalars
    | st.lists(templates, max_size=2)
    | st.dictionaries(st.sampled_from(("id", "x")), templates, max_size=2)
)
schemas = mostly(st.sampled_from(GOOD_SCHEMAS), st.sampled_from(BAD_SCHEMAS))
timeouts_ms = mostly(st.integers(1, 2**40), st.integers(-(2**40), 0))


@functools.cache
def step_fields(index: int) -> dict[str, st.SearchStrategy[Any]]:
    """The optional fields of step ``index``; built once, since building strategies costs more
    than drawing from them."""
    earlier = [f"s{i}" for i in range(index)]
    return {
        "connectionId": mostly(st.just("conn"), st.just("conn_missing")),
        "input": st.fixed_dictionaries(
            {},
            optional={
                "path": st.dictionaries(st.sampled_from(("id", "x")), templated_values),
                "query": st.dictionaries(st.text(max_size=4), templated_values, max_size=2),
                "headers": st.dictionaries(st.text(max_size=4), templated_values, max_size=2),
                "body": templated_values,
            },
        ),
        # Earlier steps, and now and then a later one, itself or an unknown one (cycles).
        "dependsOn": st.lists(
            mostly(
                st.sampled_from(earlier) if earlier else st.nothing(),
                st.sampled_from((f"s{index}", "s3", "nope")),
            ),
            max_size=2,
        ),
        "when": templates,
        "onFailure": st.sampled_from(("FAIL_RUN", "CONTINUE")),
        "retry": st.fixed_dictionaries(
            {},
            optional={
                "retryStrategy": st.sampled_from(("NONE", "FIXED", "EXPONENTIAL")),
                "maxAttempts": st.integers(-5, 10),
                "initialDelayMs": st.integers(-(2**40), 2**40),
                "maxDelayMs": st.integers(-(2**40), 2**40),
            },
        ),
        "timeoutMs": timeouts_ms,
        "extract": st.dictionaries(
            st.text(max_size=4),
            mostly(st.sampled_from(GOOD_PATHS), st.sampled_from(BAD_PATHS)),
            max_size=2,
        ),
    }


ACTION_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "method": st.sampled_from(("GET", "POST")),
    "headersTemplate": st.dictionaries(st.text(max_size=4), templates, max_size=2),
    "retryStrategy": st.sampled_from(("NONE", "FIXED", "EXPONENTIAL")),
    "maxAttempts": st.integers(-5, 10),
    "timeoutMs": timeouts_ms,
    "bodySchema": schemas,
    "outputSchema": schemas,
}
ENDPOINTS = st.sampled_from(("/items/{id}", "https://x.example/{x}", "{id}", "/a?b={id}"))
STEP_KEYS = [mostly(st.just(f"s{i}"), st.sampled_from(("1bad", "a.b", "", "s0"))) for i in range(4)]
ACTION_REFS = mostly(st.sampled_from(ACTION_IDS), st.just("act_missing"))


def draw_fields(
    draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]], noisy: bool
) -> dict[str, Any]:
    """Each optional field present or not, each maybe misshapen."""
    return {
        name: draw(maybe_garbage(strategy, noisy))
        for name, strategy in fields.items()
        if draw(st.booleans())
    }


@st.composite
def step_dicts(draw: st.DrawFn, index: int, noisy: bool) -> dict[str, Any]:
    return {
        "key": draw(maybe_garbage(STEP_KEYS[index], noisy)),
        "actionId": draw(maybe_garbage(ACTION_REFS, noisy)),
        **draw_fields(draw, step_fields(index), noisy),
    }


@st.composite
def action_dicts(draw: st.DrawFn, action_id: str, noisy: bool) -> dict[str, Any]:
    return {
        "id": action_id,
        "endpointTemplate": draw(maybe_garbage(ENDPOINTS, noisy)),
        **draw_fields(draw, ACTION_FIELDS, noisy),
    }


@st.composite
def definitions(draw: st.DrawFn, noisy: bool) -> dict[str, Any]:
    """A definition from the contract's building blocks. With ``noisy``, any field may hold a
    value of the wrong shape (decoding fails); without, every field decodes and now and then
    the meaning is wrong (unknown action, bad key, cycle, schema, template, JSONPath)."""
    actions = {aid: draw(action_dicts(aid, noisy)) for aid in ACTION_IDS}
    count = draw(st.integers(0, 4))
    definition: dict[str, Any] = {
        "id": draw(maybe_garbage(st.just("wfv_p"), noisy)),
        "graph": {"steps": [draw(step_dicts(i, noisy)) for i in range(count)]},
        "actions": draw(maybe_garbage(st.just(actions), noisy)),
        "connections": {
            "conn": {"id": "conn", "type": "NONE", "config": {"baseUrl": "https://api.example"}}
        },
    }
    if draw(st.booleans()):
        definition["parameterSchema"] = draw(maybe_garbage(schemas, noisy))
    if draw(st.booleans()):
        env = {"vars": {"REGION": "eu"}, "secretRefs": {"KEY": "sec_1"}}
        definition["envConfig"] = draw(maybe_garbage(st.just(env), noisy))
    if draw(st.booleans()):
        definition["timeoutMs"] = draw(maybe_garbage(timeouts_ms, noisy))
    return definition


# --- (a) decoding raises only the contract's errors ---------------------------------------------

raw_inputs = (
    st.binary(max_size=200)
    | st.text(max_size=100)
    # Lone surrogates: text that no UTF-8 encoder accepts, raw and inside a JSON string.
    | st.text(st.characters(categories=["Cs", "Lu", "Po"]), max_size=20)
    | st.text(st.characters(categories=["Cs", "Lu", "Po"]), max_size=20).map(json.dumps)
)


def decode_job_or_payload_error(raw: Any) -> None:
    try:
        decode_job_data(raw)
    except PayloadError as err:
        assert err.message.startswith("$"), err.message


def decode_version_or_definition_error(raw: Any) -> WorkflowVersion | None:
    try:
        return decode_workflow_version(raw)
    except DefinitionError as err:
        assert err.message.startswith("$"), err.message
        return None


@BOUNDED
@given(json_values)
def test_job_data_of_any_json_value_decodes_or_is_a_payload_error(value: Any) -> None:
    decode_job_or_payload_error(value)
    decode_job_or_payload_error(json.dumps(value).encode())


@BOUNDED
@given(raw_inputs)
def test_job_data_of_any_bytes_or_text_decodes_or_is_a_payload_error(raw: bytes | str) -> None:
    decode_job_or_payload_error(raw)


@BOUNDED
@given(
    st.fixed_dictionaries(
        {
            "workflowRunId": maybe_garbage(st.just("run_1"), noisy=True),
            "workflowVersionId": maybe_garbage(st.just("wfv_1"), noisy=True),
            "tenantId": maybe_garbage(st.just("ten_1"), noisy=True),
            "input": maybe_garbage(st.just({"x": 1}), noisy=True),
        },
        optional={
            "workflowVersion": json_small,
            "sealedCredentials": json_small,
            "deadlineAt": json_small,
        },
    )
)
def test_nearly_valid_job_data_decodes_or_is_a_payload_error(value: dict[str, Any]) -> None:
    decode_job_or_payload_error(value)
    decode_job_or_payload_error(json.dumps(value))


@BOUNDED
@given(json_values | raw_inputs)
def test_a_definition_of_any_value_decodes_or_is_a_definition_error(raw: Any) -> None:
    decode_version_or_definition_error(raw)


def compile_or_definition_error(version: WorkflowVersion) -> None:
    try:
        compile_plan(version)
    except DefinitionError as err:
        assert err.message.startswith("$"), err.message


@BOUNDED_DEFINITIONS
@given(definitions(noisy=True))
def test_a_definition_with_misshapen_fields_is_a_definition_error(
    definition: dict[str, Any],
) -> None:
    for raw in (definition, json.dumps(definition).encode()):
        version = decode_version_or_definition_error(raw)
        if version is not None:
            compile_or_definition_error(version)


@BOUNDED_DEFINITIONS
@given(definitions(noisy=False))
def test_a_well_shaped_definition_compiles_or_is_a_definition_error(
    definition: dict[str, Any],
) -> None:
    version = decode_workflow_version(json.dumps(definition).encode())
    compile_or_definition_error(version)


def compiles_with_steps(definition: dict[str, Any], count: int) -> bool:
    try:
        plan = compile_plan(decode_workflow_version(definition))
    except DefinitionError:
        return False
    return len(plan.steps) >= count and any(s.depends_on for s in plan.steps)


def test_the_well_shaped_strategy_reaches_a_compiled_plan() -> None:
    # The property above proves little if every generated definition failed early: the
    # strategy must also produce plans of several dependent steps.
    found = find(
        definitions(noisy=False),
        lambda d: compiles_with_steps(d, 3),
        settings=settings(
            max_examples=500, database=None, phases=[Phase.generate], derandomize=True
        ),
    )
    assert compiles_with_steps(found, 3)


# --- (b) a rendered URL stays on the connection's origin and path -------------------------------

SAFE = string.ascii_letters + string.digits + "-_~"
safe_words = st.text(SAFE, min_size=1, max_size=6)
PLACEHOLDERS = ("a", "b", "id", "name")
placeholder_names = st.sampled_from(PLACEHOLDERS)


@st.composite
def endpoint_segments(draw: st.DrawFn) -> str:
    """A literal, a placeholder, or a literal with placeholders in it (``v{a}.{b}``)."""
    parts = draw(
        st.lists(
            safe_words | st.just(".") | placeholder_names.map(lambda n: "{" + n + "}"),
            min_size=1,
            max_size=3,
        )
    )
    text = "".join(parts)
    # Only placeholders may fill a segment with dots; a literal "." or ".." is the author's own.
    return "x" if text.strip(".") == "" else text


base_urls = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
    st.sampled_from(("http", "https")),
    st.sampled_from(("api.example", "127.0.0.1", "[::1]", "xn--bcher-kva.example", "a-b.io")),
    st.sampled_from(("", ":8443", ":80", ":1")),
    st.lists(safe_words, max_size=2).map(lambda segs: "".join("/" + s for s in segs)),
)
param_values = (
    st.text(max_size=12)
    | st.sampled_from(("..", ".", "../../admin", "a/b", "%2F", "@evil.example", "?x=1", "#f"))
    | st.integers()
    | st.floats()
    | st.booleans()
)
query_scalars = st.text(max_size=10) | st.integers() | st.booleans() | st.none()


def origin(url: str) -> tuple[str, str | None, int | None]:
    parsed = URL(url, encoded=True)
    return (parsed.scheme, parsed.host, parsed.port)


def split_origin(url: str) -> tuple[str, str | None, int | None]:
    # yarl writes no default port (":80" goes away), so compare the port connected to.
    parts = urlsplit(url)
    return (parts.scheme, parts.hostname, parts.port or {"http": 80, "https": 443}[parts.scheme])


@BOUNDED
@given(
    base=base_urls,
    segments=st.lists(endpoint_segments(), min_size=1, max_size=4),
    path=mostly(
        st.fixed_dictionaries({name: param_values for name in PLACEHOLDERS}),
        st.dictionaries(placeholder_names, param_values),  # some missing
    ),
)
def test_a_rendered_url_never_leaves_the_base_origin_or_path(
    base: str, segments: list[str], path: dict[str, Any]
) -> None:
    template = "/" + "/".join(segments)
    base_url = base_url_for(template, base, "$.actions.act")
    try:
        request = build_request(
            method="GET",
            base_url=base_url,
            endpoint_template=template,
            path=path,
            query={},
            header_layers=(),
            body=None,
        )
    except TemplateError:
        assert set(path_params(template)) - set(path) or any(
            isinstance(v, str) and v in ("", ".", "..") for v in path.values()
        ), f"refused {template} with {path}"
        return

    sent = URL(request.url, encoded=True)
    assert origin(request.url) == origin(base_url)
    assert split_origin(request.url) == split_origin(base_url)
    base_path = URL(base_url, encoded=True).raw_path.rstrip("/")
    assert sent.raw_path.startswith(base_path + "/")
    # Exactly the template's segments, none of them a dot segment, and nothing after the path.
    rendered = sent.raw_path[len(base_path) + 1 :].split("/")
    assert len(rendered) == len(segments)
    assert not {".", ".."} & set(rendered)
    assert sent.raw_query_string == "" and sent.raw_fragment == ""
    parts = urlsplit(request.url)
    assert parts.query == "" and parts.fragment == ""


@BOUNDED
@given(
    base=base_urls,
    query=st.dictionaries(
        st.text(min_size=1, max_size=8), query_scalars | st.lists(query_scalars, max_size=3)
    ),
)
def test_query_values_cannot_add_a_parameter_or_a_fragment(
    base: str, query: dict[str, Any]
) -> None:
    request = build_request(
        method="GET",
        base_url=base_url_for("/search", base, "$.actions.act"),
        endpoint_template="/search",
        path={},
        query=query,
        header_layers=(),
        body=None,
    )
    # What runner.http.client sends:
    final = URL(request.url, encoded=True).with_query(list(request.query))
    text = str(final)

    expected = list(request.query)
    assert len(expected) == sum(
        len([v for v in (value if isinstance(value, list) else [value]) if v is not None])
        for value in query.values()
    )
    assert origin(text) == origin(request.url)
    assert split_origin(text) == split_origin(request.url)
    reparsed = URL(text, encoded=True)
    assert reparsed.raw_path == URL(request.url, encoded=True).raw_path
    assert reparsed.raw_fragment == ""
    assert list(reparsed.query.items()) == expected
    parts = urlsplit(text)
    assert parts.fragment == ""
    assert parse_qsl(parts.query, keep_blank_values=True) == expected


# --- (c) no secret survives redaction in any rendering ------------------------------------------

# Printable text in any script; "\x00" is left out so that it can stand in for the mask below.
printable = st.characters(blacklist_categories=("Cc", "Cs", "Co", "Cn"))
secrets_ = st.text(printable, min_size=4, max_size=24).filter(lambda s: s.strip())
surroundings = st.text(printable, max_size=16)
usernames = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=10)


def survivors(out: str) -> str:
    # The mask is a stand-in, not text: a secret such as "ACTE" must not be "found" inside
    # "[REDACTED]". Replaced by a character no secret contains, masked spans stay apart.
    return out.replace(REDACTED, "\x00")


def b64_core(prefix: bytes, secret: bytes) -> str:
    """The base64 characters of ``prefix + secret`` that depend on ``secret`` alone."""
    encoded = base64.b64encode(prefix + secret).decode()
    start = -(-8 * len(prefix) // 6)
    end = 8 * (len(prefix) + len(secret)) // 6
    return encoded[start:end]


def renderings(secret: str) -> set[str]:
    """Every form of ``secret`` that must not survive."""
    out = {
        secret,
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        msgspec.json.encode(secret).decode()[1:-1],
        quote(secret),
        quote(secret, safe=""),
        quote_plus(secret),
        base64.b64encode(secret.encode()).decode(),
        base64.urlsafe_b64encode(secret.encode()).decode(),
    }
    return {r for r in out if r}


def assert_masked(out: str, secret: str) -> None:
    left = survivors(out)
    for form in renderings(secret):
        assert form not in left, f"{form!r} survived in {out!r}"


@BOUNDED
@given(secret=secrets_, before=surroundings, after=surroundings)
def test_a_secret_never_survives_in_any_text_rendering(
    secret: str, before: str, after: str
) -> None:
    redactor = Redactor([secret])
    text = before + secret + after
    for rendered in (
        text,
        json.dumps(text),
        json.dumps(text, ensure_ascii=False),
        json.dumps({"value": text}),
        msgspec.json.encode({"value": text}).decode(),
        quote(text),
        quote(text, safe=""),
        quote_plus(text),
        str(URL("https://api.example/p").with_query({"q": text})),
        base64.b64encode(secret.encode()).decode(),
        base64.urlsafe_b64encode(secret.encode()).decode(),
    ):
        assert_masked(redactor.text(rendered), secret)


@BOUNDED
@given(secret=secrets_, user=usernames)
def test_a_secret_never_survives_inside_a_basic_credential(secret: str, user: str) -> None:
    redactor = Redactor([secret])
    prefix = f"{user}:".encode()
    token = base64.b64encode(prefix + secret.encode()).decode()

    out = survivors(redactor.text(f"Basic {token}"))

    assert token not in out
    core = b64_core(prefix, secret.encode())
    assert core not in out, f"the secret's part {core!r} of {token!r} survived in {out!r}"


nested = st.recursive(
    st.sampled_from(("SECRET", "before SECRET after", "plain")) | json_scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(("SECRET", "k", "SECRET_key")), children, max_size=3)
    ),
    max_leaves=12,
)


_JSON_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{4}|.)")


def with_secret(obj: Any, secret: str) -> Any:
    if isinstance(obj, str):
        return obj.replace("SECRET", secret)
    if isinstance(obj, list):
        return [with_secret(v, secret) for v in obj]
    if isinstance(obj, dict):
        return {with_secret(k, secret): with_secret(v, secret) for k, v in obj.items()}
    return obj


def strings_of(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, list | tuple):
        return [s for v in obj for s in strings_of(v)]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in (*strings_of(k), *strings_of(v))]
    return []


@BOUNDED
@given(secret=secrets_, template=nested)
def test_a_secret_never_survives_in_a_nested_value(secret: str, template: Any) -> None:
    obj = with_secret(template, secret)

    masked = Redactor([secret]).value(obj)

    # Every string, keys included, at any depth. (The document as a whole is not checked: a
    # secret such as "null" or "1.5" is also the JSON of a value that holds no secret.)
    for text in strings_of(masked):
        assert_masked(text, secret)
        # The JSON of the text, less its escape sequences: "\u0000" holds "0000" without
        # holding a secret "0000".
        assert_masked(_JSON_ESCAPE.sub("", json.dumps(text)), secret)
