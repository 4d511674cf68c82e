"""The wire contract as msgspec Structs: job data, the definition, credentials, status events.

Decoding policy lives on the bases. Wire names are camelCase, Python names snake_case.
Job data and the control plane's entities (WorkflowVersion, Action, Connection) ignore unknown
fields, since producers may add columns; the parts of a definition the runner owns (a step, its
input and retry override) forbid them, so a typo such as ``dependson`` fails loudly.

Decoders are built once here and reused; ``decode_*`` translate msgspec's errors into
``PayloadError`` / ``DefinitionError`` / ``CredentialsError`` whose message names the JSON path.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

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


class ConnectionConfig(Wire, frozen=True):
    base_url: str | None = None
    api_key_name: str | None = None
    api_key_in: Literal["header", "query"] = "header"
    token_url: str | None = None
    client_id: str | None = None
    scope: str | None = None
    client_auth: Literal["body", "basic"] = "body"
    ca_bundle: str | None = None


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


class JobData(Wire, frozen=True):
    workflow_run_id: str
    workflow_version_id: str
    tenant_id: str
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


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def decode_job_data(raw: Any) -> JobData:
    """From JSON text, or from the object BullMQ already parsed."""
    try:
        if isinstance(raw, (bytes, str)):
            return _job_decoder.decode(raw)
        return msgspec.convert(raw, JobData)
    except msgspec.ValidationError as err:
        raise PayloadError(path_of(err)) from None
    except msgspec.DecodeError as err:
        raise PayloadError(f"$: not valid JSON ({err})") from None
    except UnicodeEncodeError:
        # A str holding a lone surrogate: msgspec must encode text to UTF-8 before parsing.
        raise PayloadError("$: not valid JSON (text is not valid Unicode)") from None


def decode_workflow_version(raw: Any, where: str = "$") -> WorkflowVersion:
    """From JSON text, or from an already parsed object; paths start at ``where``."""
    try:
        if isinstance(raw, (bytes, str)):
            return _version_decoder.decode(raw)
        return msgspec.convert(raw, WorkflowVersion)
    except msgspec.ValidationError as err:
        path = path_of(err)
        raise DefinitionError(where + path[1:] if path.startswith("$") else path) from None
    except msgspec.DecodeError as err:
        raise DefinitionError(f"{where}: not valid JSON ({err})") from None
    except UnicodeEncodeError:
        raise DefinitionError(f"{where}: not valid JSON (text is not valid Unicode)") from None


def decode_credentials(raw: bytes | str) -> ResolvedCredentials:
    """Credentials' JSON shape; values are never quoted in the error, only the path."""
    try:
        return _credentials_decoder.decode(raw)
    except msgspec.ValidationError as err:
        raise CredentialsError(f"credentials do not decode: {path_of(err)}") from None
    except msgspec.DecodeError:
        raise CredentialsError("credentials are not valid JSON") from None
