"""The wire contract as msgspec Structs: job data, the definition, credentials, status events.

Decoding policy lives on the bases. Wire names are camelCase, Python names snake_case.
Job data and the control plane's entities (WorkflowVersion, Action, Connection) ignore unknown
fields, since producers may add columns; the parts of a definition the runner owns (a step, its
input and retry override) forbid them, so a typo such as ``dependson`` fails loudly.

Decoders are built once here and reused; ``decode_*`` translate msgspec's errors into
``PayloadError`` / ``DefinitionError`` / ``CredentialsError`` whose message names the JSON path.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from runner import jsonlimits
from runner.errors import CredentialsError, DefinitionError, PayloadError

JOB_NAME = "workflow_run"


class Wire(msgspec.Struct, rename="camel", frozen=True, kw_only=True):
    """Producer-owned data: unknown fields are ignored."""


class Owned(msgspec.Struct, rename="camel", frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Runner-owned definition parts: unknown fields are an error."""


# --- section 3: the definition -------------------------------------------------------------

HttpMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
RetryStrategy = Literal["NONE", "FIXED", "EXPONENTIAL"]
ConnectionType = Literal["API_KEY", "BASIC", "OAUTH2", "CUSTOM_HEADER", "NONE"]


class StepInput(Owned, frozen=True):
    path: dict[str, Any] = {}
    query: dict[str, Any] = {}
    headers: dict[str, Any] = {}
    body: Any = None


class RetryOverride(Owned, frozen=True):
    retry_strategy: RetryStrategy | None = None
    max_attempts: int | None = None
    initial_delay_ms: int | None = None
    max_delay_ms: int | None = None


# --- pagination (docs/contract.md "Pagination") ----------------------------------------------

PaginateMode = Literal["cursor", "nextUrl", "offset", "page", "none"]


class Paginate(Owned, frozen=True):
    """How an Action's response continues on further pages. On an Action, and on a step, whose
    fields override the Action's one by one (``mode: "none"`` turns it off). Every field is
    optional here; ``runner.engine.pagination.compile_paginate`` checks the merged whole."""

    mode: PaginateMode | None = None
    items: str | None = None  # JSONPath over a page's body; default "$[*]"
    cursor_path: str | None = None  # cursor: JSONPath of the next cursor in the body
    cursor_param: str | None = None  # cursor: the query parameter it goes in ("cursor")
    next_url_path: str | None = None  # nextUrl: JSONPath of the next URL; absent: Link rel=next
    offset_param: str | None = None  # offset: "offset"
    page_param: str | None = None  # page: "page"
    start: int | None = None  # offset: first offset (0); page: first page number (1)
    limit: int | None = None  # page size, sent as limitParam; required for offset
    limit_param: str | None = None  # "limit"
    stop_path: str | None = None  # stop after a page where this is truthy
    has_more_path: str | None = None  # stop after a page where this is falsy or missing
    max_pages: int | None = None
    max_items: int | None = None
    max_bytes: int | None = None
    on_limit: Literal["TRUNCATE", "FAIL"] | None = None


class Step(Owned, frozen=True):
    key: str
    action_id: str
    connection_id: str | None = None
    input: StepInput = StepInput()
    depends_on: list[str] | None = None
    when: str | None = None
    on_failure: Literal["FAIL_RUN", "CONTINUE"] = "FAIL_RUN"
    retry: RetryOverride | None = None
    timeout_ms: int | None = None
    extract: dict[str, str] = {}
    # --- map over items (docs/contract.md, "forEach") ---
    # An expression yielding a list: "{{ input.ids }}" or bare "input.ids"; absent: one call.
    for_each: str | None = None
    max_parallel: int = 1
    on_item_error: Literal["fail", "continue"] = "fail"
    paginate: Paginate | None = None


class Graph(Owned, frozen=True):
    steps: list[Step]


class Action(Wire, frozen=True):
    id: str
    endpoint_template: str
    name: str = ""
    method: HttpMethod = "GET"
    path_schema: dict[str, Any] | None = None
    query_schema: dict[str, Any] | None = None
    body_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None
    headers_template: dict[str, str] = {}
    retry_strategy: RetryStrategy = "NONE"
    max_attempts: int = 1
    initial_delay_ms: int = 1000
    max_delay_ms: int = 30_000
    timeout_ms: int = 30_000
    idempotency_header: str | None = None
    paginate: Paginate | None = None


class RateLimit(Owned, frozen=True):
    """At most ``requests`` per ``per_ms`` on average, up to ``burst`` of them back to back
    (default 1: evenly spaced)."""

    requests: Annotated[int, msgspec.Meta(ge=1)]
    per_ms: Annotated[int, msgspec.Meta(ge=1)]
    burst: Annotated[int, msgspec.Meta(ge=1)] = 1


class TenantLimits(Owned, frozen=True):
    """Limits of each tenant (``tenantId`` of the job data) on a shared connection. With
    ``fair_share`` each tenant seen in the last ``active_window_ms`` gets at most an equal
    share of the connection's rate, so one tenant's flood cannot starve the others."""

    rate_limit: RateLimit | None = None
    max_concurrency: Annotated[int, msgspec.Meta(ge=1)] | None = None
    fair_share: bool = True
    active_window_ms: Annotated[int, msgspec.Meta(ge=1)] = 10_000


class CircuitBreaker(Owned, frozen=True):
    """Per base URL: ``failures`` consecutive connect errors, timeouts or 5xx within
    ``window_ms`` open it for ``cool_down_ms``; then one probe request may close it. While
    it is open a step waits (``WAIT``) or fails with ``CIRCUIT_OPEN`` (``FAIL``)."""

    failures: Annotated[int, msgspec.Meta(ge=1)] = 5
    window_ms: Annotated[int, msgspec.Meta(ge=1)] = 30_000
    cool_down_ms: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    when_open: Literal["WAIT", "FAIL"] = "WAIT"


class ConnectionConfig(Wire, frozen=True):
    base_url: str | None = None
    api_key_name: str | None = None
    api_key_in: Literal["header", "query"] = "header"
    token_url: str | None = None
    client_id: str | None = None
    scope: str | None = None
    client_auth: Literal["body", "basic"] = "body"
    ca_bundle: str | None = None
    # Send W3C trace context (traceparent, tracestate) when tracing is on; false for an API
    # that rejects headers it does not know.
    propagate_trace: bool = True
    # Flow control shared by every runner (runner.flow); absent means the runner's defaults.
    rate_limit: RateLimit | None = None
    max_concurrency: Annotated[int, msgspec.Meta(ge=1)] | None = None
    tenant_limits: TenantLimits | None = None
    circuit_breaker: CircuitBreaker | None = None


class Connection(Wire, frozen=True):
    id: str
    type: ConnectionType
    config: ConnectionConfig = ConnectionConfig()
    # Only present when resolved for a run; the typed view is ``runner.credentials``'s job.
    secrets: dict[str, Any] | None = None


class EnvConfig(Wire, frozen=True):
    vars: dict[str, str] = {}
    secret_refs: dict[str, str] = {}


class WorkflowVersion(Wire, frozen=True):
    id: str
    graph: Graph
    workflow_id: str | None = None
    version: int | None = None
    parameter_schema: dict[str, Any] | None = None
    env_config: EnvConfig = EnvConfig()
    timeout_ms: int = 300_000
    actions: dict[str, Action] = {}
    connections: dict[str, Connection] = {}


# --- section 2: job data -------------------------------------------------------------------


# An id the runner puts into Redis keys, idempotency keys and events: an empty one would make
# every such job share one checkpoint (``run:`` ) and one idempotency key; a huge one every key.
RunnerId = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class JobData(Wire, frozen=True):
    workflow_run_id: RunnerId
    workflow_version_id: RunnerId
    tenant_id: RunnerId
    input: dict[str, Any]
    # Kept undecoded so that a definition that does not decode is DEFINITION_INVALID, not a
    # payload error.
    workflow_version: dict[str, Any] | None = None
    sealed_credentials: str | None = None
    deadline_at: int | None = None


# --- section 4: credentials ----------------------------------------------------------------


class ResolvedCredentials(Wire, frozen=True):
    connections: dict[str, Connection] = {}
    secrets: dict[str, str] = {}


# --- section 6: status events --------------------------------------------------------------

RunStatus = Literal["RUNNING", "SUCCESS", "FAILED", "CANCELED"]
StepStatus = Literal["RUNNING", "SUCCESS", "FAILED", "SKIPPED", "CANCELED"]


class RunEvent(msgspec.Struct, rename="camel", kw_only=True):
    v: int = 1
    seq: int
    kind: Literal["run"] = "run"
    workflow_run_id: str
    tenant_id: str
    workflow_version_id: str
    job_id: str
    status: RunStatus
    at: int
    started_at: int | None = None
    finished_at: int | None = None
    output: Any = None
    error_code: str | None = None
    error_message: str | None = None


class StepEvent(msgspec.Struct, rename="camel", kw_only=True):
    v: int = 1
    seq: int
    kind: Literal["step"] = "step"
    workflow_run_id: str
    tenant_id: str
    workflow_version_id: str
    job_id: str
    step_key: str
    step_run_id: str
    status: StepStatus
    attempt: int
    at: int
    started_at: int | None = None
    finished_at: int | None = None
    output: Any = None
    error_code: str | None = None
    error_message: str | None = None


class MapStepEvent(StepEvent, kw_only=True):
    """A ``forEach`` step's event: a step event plus its item counts
    (``{"total", "succeeded", "failed"}``); there is no event per item."""

    items: dict[str, int]


class StepWaitEvent(StepEvent, kw_only=True):
    """A RUNNING step that waits before its attempt: for budget (``rate``, ``tenant-rate``,
    ``paused``, ``concurrency``, ``tenant-concurrency``) or for a circuit breaker
    (``circuit-open``, ``circuit-probing``), until about ``waitUntil`` (epoch ms)."""

    wait_reason: str
    wait_until: int
    deferred: bool = False


# --- decoding ------------------------------------------------------------------------------

_job_decoder = msgspec.json.Decoder(JobData)
_version_decoder = msgspec.json.Decoder(WorkflowVersion)
_credentials_decoder = msgspec.json.Decoder(ResolvedCredentials)


def path_of(err: msgspec.ValidationError) -> str:
    # msgspec says "Expected `object`, got `int` - at `$.input`"; we say "$.input: expected object".
    text = str(err)
    message, sep, where = text.rpartition(" - at `")
    if not sep:
        return f"$: {_lower_first(text).replace('`', '')}"
    return f"{where.rstrip('`')}: {_lower_first(message).replace('`', '')}"


_SEGMENT = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _located(path: str, raw: Any, type_: Any) -> str:
    """``path_of``'s text with each ``[...]`` (msgspec's stand-in for a mapping's key) replaced
    by the key, found by decoding the mapping's entries one at a time. Only on the error path:
    "$.connections[...].type" says which of many connections is wrong."""
    where, sep, message = path.partition(": ")
    if "[...]" not in where or not sep:
        return path
    try:
        data = msgspec.json.decode(raw) if isinstance(raw, (bytes, str)) else raw
    except (msgspec.DecodeError, UnicodeEncodeError):
        return path
    parts = where.split("[...]")
    keys: list[str] = []
    for level in range(len(parts) - 1):
        steps = _steps(parts[: level + 1], keys)
        mapping = _walk(data, steps)
        if not isinstance(mapping, dict):
            return path
        for key, value in mapping.items():
            trial = _replaced(data, steps, {key: value})
            try:
                msgspec.convert(trial, type_, str_keys=True)
            except msgspec.ValidationError as err:
                if path_of(err) == path:
                    keys.append(key)
                    data = trial
                    break
        else:
            return path
    shown = [
        f"{part}[{msgspec.json.encode(key).decode()}]"
        for part, key in zip(parts[:-1], keys, strict=True)
    ]
    return "".join(shown) + parts[-1] + sep + message


def _steps(parts: list[str], keys: list[str]) -> list[str | int]:
    """The way down to a node: field names and mapping keys (str), list indexes (int)."""
    steps: list[str | int] = []
    for i, part in enumerate(parts):
        for name, index in _SEGMENT.findall(part[1:] if i == 0 else part):
            steps.append(name if name else int(index))
        if i < len(keys):
            steps.append(keys[i])
    return steps


def _walk(data: Any, steps: list[str | int]) -> Any:
    for step in steps:
        if isinstance(step, str) and isinstance(data, dict):
            data = data.get(step)
        elif isinstance(step, int) and isinstance(data, list) and step < len(data):
            data = data[step]
        else:
            return None
    return data


def _replaced(data: Any, steps: list[str | int], value: Any) -> Any:
    """A copy of ``data`` with the node at ``steps`` replaced (the copy shares the rest)."""
    if not steps:
        return value
    step, rest = steps[0], steps[1:]
    copy: Any = dict(data) if isinstance(step, str) else list(data)
    copy[step] = _replaced(data[step], rest, value)
    return copy


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


# Node's JSON.stringify writes a lone surrogate as its escape ("\udc80"), which no UTF-8 text
# can hold: the data was valid JavaScript, and is not valid JSON text.
JOB_DATA_NOT_TEXT = "$: job data is not valid JSON text (unpaired surrogate?)"


def decode_job_data(raw: Any) -> JobData:
    """From JSON text, or from the object BullMQ already parsed. Text nested deeper than
    ``RUNNER_MAX_JSON_DEPTH`` or holding a duplicate key is refused (``runner.jsonlimits``)."""
    try:
        if isinstance(raw, (bytes, str)):
            jsonlimits.check_text(raw)
            return _job_decoder.decode(raw)
        if jsonlimits.depth_exceeds(raw):
            raise PayloadError(f"$: {jsonlimits.too_deep_message()}")
        return msgspec.convert(raw, JobData)
    except jsonlimits.JsonLimitError as err:
        raise PayloadError(f"$: {err}") from None
    except RecursionError:
        raise PayloadError(f"$: {jsonlimits.too_deep_message()}") from None
    except msgspec.ValidationError as err:
        raise PayloadError(_located(path_of(err), raw, JobData)) from None
    except msgspec.DecodeError as err:
        if "surrogate" in str(err):
            raise PayloadError(JOB_DATA_NOT_TEXT) from None
        raise PayloadError(f"$: not valid JSON ({err})") from None
    except UnicodeEncodeError:
        # A str holding a lone surrogate: msgspec must encode text to UTF-8 before parsing.
        raise PayloadError("$: not valid JSON (text is not valid Unicode)") from None


def decode_workflow_version(raw: Any, where: str = "$") -> WorkflowVersion:
    """From JSON text, or from an already parsed object; paths start at ``where``."""
    try:
        if isinstance(raw, (bytes, str)):
            jsonlimits.check_text(raw)
            return _version_decoder.decode(raw)
        if jsonlimits.depth_exceeds(raw):
            raise DefinitionError(f"{where}: {jsonlimits.too_deep_message()}")
        return msgspec.convert(raw, WorkflowVersion)
    except jsonlimits.JsonLimitError as err:
        raise DefinitionError(f"{where}: {err}") from None
    except RecursionError:
        raise DefinitionError(f"{where}: {jsonlimits.too_deep_message()}") from None
    except msgspec.ValidationError as err:
        path = _located(path_of(err), raw, WorkflowVersion)
        raise DefinitionError(where + path[1:] if path.startswith("$") else path) from None
    except msgspec.DecodeError as err:
        raise DefinitionError(f"{where}: not valid JSON ({err})") from None
    except UnicodeEncodeError:
        raise DefinitionError(f"{where}: not valid JSON (text is not valid Unicode)") from None


def decode_credentials(raw: bytes | str) -> ResolvedCredentials:
    """Credentials' JSON shape; values are never quoted in the error, only the path."""
    try:
        jsonlimits.check_text(raw)
        return _credentials_decoder.decode(raw)
    except (jsonlimits.JsonLimitError, RecursionError):
        raise CredentialsError("credentials are nested too deeply or repeat a key") from None
    except msgspec.ValidationError as err:
        path = _located(path_of(err), raw, ResolvedCredentials)
        raise CredentialsError(f"credentials do not decode: {path}") from None
    except msgspec.DecodeError:
        raise CredentialsError("credentials are not valid JSON") from None
