"""Every error the runner reports, with its wire ``errorCode``, and the signals around them.

One root for what a run reports; the code is data on the error, not a class per code::

    RunnerError(code, message, *, retryable=False, retry_after_s=None, status=None)
    ├── PayloadError          INVALID_PAYLOAD          job data does not decode
    ├── DefinitionError       DEFINITION_INVALID | DEFINITION_NOT_FOUND
    ├── CredentialsError      CREDENTIALS_UNAVAILABLE
    ├── ControlPlaneUnavailable CONTROL_PLANE_UNAVAILABLE  unreachable, timed out, 5xx/429: retryable
    ├── TemplateError         TEMPLATE_ERROR            found before the request is sent
    ├── SchemaError           SCHEMA_VALIDATION | INVALID_INPUT
    ├── AuthError             AUTH_FAILED
    │   └── TokenRejected     (runner.http.oauth2.grant) the token endpoint refused: not retryable
    ├── StepHTTPError         HTTP_ERROR                carries ``status``
    ├── TransportError        TIMEOUT | CONNECTION_ERROR | RESPONSE_TOO_LARGE | EGRESS_DENIED
    ├── ResponseError         RESPONSE_INVALID          a 2xx body that cannot be used
    ├── PaginationLimit       PAGINATION_LIMIT          a cap reached under ``onLimit: FAIL``
    ├── CircuitOpen           CIRCUIT_OPEN              the base URL's breaker is open (whenOpen FAIL)
    ├── WorkflowTimeout       WORKFLOW_TIMEOUT
    ├── Canceled              CANCELED
    └── HandBack              (runner.engine.run) a run stopped without ending: shutdown

Signals that end an attempt without a reported error (never an ``errorCode``)::

    Exception
    ├── RetryLater            a retryable RunnerError with job attempts left: BullMQ retries
    ├── Deferral              (runner.engine.ports) the next attempt is far away: job to delayed
    ├── ItemFailed            (runner.engine.map) a forEach item failed under onItemError fail
    └── ScriptError           (runner.queue.finish) Redis refused a BullMQ script call

``INTERNAL`` is what the job boundary (``runner.queue.worker``) reports for anything else that
reaches it: a bug, logged with its message and a redacted traceback.

Module-local exceptions (``jsonlimits.JsonLimitError``, ``engine.schemas.PatternRefused``,
``resp.Redirected``, ``redis_connect.RedisSetupError``, ``expressions.ExpressionError`` and its
``expressions._OverBudget``) never leave their caller: each is turned
into one of the above, or into a start-up message, where it is caught.

Third-party exceptions are translated at one place per boundary, and everything inward sees
only these: HTTP to the APIs in ``runner.http.client``; the token endpoint in
``runner.http.oauth2.grant``; the control plane in ``runner.controlplane``; job data and
definitions (msgspec) in ``runner.contract``; a response body in ``runner.engine.step``; Redis
for OAuth2 coordination in ``runner.http.oauth2.manager`` and ``.coordination``. ``str(error)`` is
``"<code>: <message>"`` and must never hold a secret: messages are built from names and
locations, and every message still passes through ``runner.redact`` before it leaves.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self


class ErrorCode(StrEnum):
    INVALID_PAYLOAD = "INVALID_PAYLOAD"
    INVALID_INPUT = "INVALID_INPUT"
    DEFINITION_NOT_FOUND = "DEFINITION_NOT_FOUND"
    DEFINITION_INVALID = "DEFINITION_INVALID"
    CREDENTIALS_UNAVAILABLE = "CREDENTIALS_UNAVAILABLE"
    CONTROL_PLANE_UNAVAILABLE = "CONTROL_PLANE_UNAVAILABLE"
    TEMPLATE_ERROR = "TEMPLATE_ERROR"
    SCHEMA_VALIDATION = "SCHEMA_VALIDATION"
    AUTH_FAILED = "AUTH_FAILED"
    HTTP_ERROR = "HTTP_ERROR"
    TIMEOUT = "TIMEOUT"
    CONNECTION_ERROR = "CONNECTION_ERROR"
    RESPONSE_TOO_LARGE = "RESPONSE_TOO_LARGE"
    RESPONSE_INVALID = "RESPONSE_INVALID"
    PAGINATION_LIMIT = "PAGINATION_LIMIT"
    EGRESS_DENIED = "EGRESS_DENIED"
    CIRCUIT_OPEN = "CIRCUIT_OPEN"
    WORKFLOW_TIMEOUT = "WORKFLOW_TIMEOUT"
    CANCELED = "CANCELED"
    INTERNAL = "INTERNAL"


class RunnerError(Exception):
    """The root. ``code`` is the wire errorCode; ``retryable`` and ``retry_after_s`` are hints
    that the retry policy reads (it never inspects messages)."""

    default_code: ErrorCode = ErrorCode.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code: ErrorCode = code or self.default_code
        self.message = message
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.status = status

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def as_record(self) -> Self:
        """This error, kept as data (an attempt's record, a step's result): without the
        traceback and context of where it was raised. Those are never reported (the code and
        message are), and they would tie the error to the frames that hold it, a reference
        cycle that only the cyclic collector frees: a failed run's context, credentials
        included, would stay in memory past the run until a collection happened to run."""
        self.__traceback__ = None
        self.__context__ = None
        return self


class PayloadError(RunnerError):
    default_code = ErrorCode.INVALID_PAYLOAD


class DefinitionError(RunnerError):
    default_code = ErrorCode.DEFINITION_INVALID


class CredentialsError(RunnerError):
    default_code = ErrorCode.CREDENTIALS_UNAVAILABLE


class ControlPlaneUnavailable(RunnerError):
    """The control plane could not be reached or answered 5xx/429: infrastructure's fault,
    retried under the job's ``attempts``, never the definition's or the credentials'."""

    default_code = ErrorCode.CONTROL_PLANE_UNAVAILABLE


class RetryLater(Exception):
    """An infrastructure failure with job attempts left: BullMQ retries the job, and its
    message (``"<code>: <message>"``, redacted) is the job's failedReason meanwhile, as a Node
    Worker keeps a thrown error's message."""


class TemplateError(RunnerError):
    default_code = ErrorCode.TEMPLATE_ERROR


class SchemaError(RunnerError):
    default_code = ErrorCode.SCHEMA_VALIDATION


class AuthError(RunnerError):
    default_code = ErrorCode.AUTH_FAILED


class StepHTTPError(RunnerError):
    default_code = ErrorCode.HTTP_ERROR


class TransportError(RunnerError):
    default_code = ErrorCode.CONNECTION_ERROR


class ResponseError(RunnerError):
    """A response the step cannot use: its body does not decode as its Content-Type says, or
    nests deeper than ``RUNNER_MAX_JSON_DEPTH``, or an ``extract`` path fails on it."""

    default_code = ErrorCode.RESPONSE_INVALID


class PaginationLimit(RunnerError):
    """A paginated step reached maxPages, maxItems or maxBytes with ``onLimit: FAIL``."""

    default_code = ErrorCode.PAGINATION_LIMIT


class CircuitOpen(RunnerError):
    """The circuit breaker of the step's base URL is open and its connection says
    ``whenOpen: FAIL``: the step fails at once, without a request."""

    default_code = ErrorCode.CIRCUIT_OPEN


class WorkflowTimeout(RunnerError):
    default_code = ErrorCode.WORKFLOW_TIMEOUT


class Canceled(RunnerError):
    default_code = ErrorCode.CANCELED
