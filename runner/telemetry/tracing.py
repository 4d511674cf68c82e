"""The spans of an enabled telemetry: the run, its steps, and each step's HTTP attempts.

``process {queue}`` (CONSUMER, BullMQ's name and ``bullmq.*`` attributes beside ``messaging.*`` and
``workflow.*``; child of the producer's span found in the job's ``tm`` carrier, CONTRACT §2) → ``step {key}`` (INTERNAL) → ``{METHOD}`` (CLIENT, HTTP client semantic
conventions). Each child names its parent explicitly, so parallel DAG steps running as separate
asyncio tasks nest correctly whatever the current context of the task is. Ending a span records
its metric. Spans never hold a secret: no header, no body, no exception message (only its type),
and URLs lose their userinfo, query and fragment here even though the caller already passes them
redacted.
"""

from __future__ import annotations

import json
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from runner.telemetry.instruments import Instruments

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.trace import Span

_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def parent_context(otel: Instruments, carrier_json: str | None) -> Context | None:
    """The producer's context from the job's ``tm`` carrier; ``None`` (a new trace) when it is
    absent or malformed: a bad carrier must never fail a run."""
    if not carrier_json:
        return None
    try:
        carrier = json.loads(carrier_json)
    except ValueError:
        return None
    if not isinstance(carrier, dict):
        return None
    return otel.extract({k: v for k, v in carrier.items() if isinstance(v, str)})


def _url_attributes(method: str, url_redacted: str) -> dict[str, str | int]:
    upper = method.upper()
    attrs: dict[str, str | int] = {}
    if upper in _KNOWN_METHODS:
        attrs["http.request.method"] = upper
    else:
        attrs["http.request.method"] = "_OTHER"
        attrs["http.request.method_original"] = method
    try:
        parts = urlsplit(url_redacted)
        port = parts.port
    except ValueError:
        return attrs
    # Userinfo, query and fragment are dropped whatever the caller redacted: they are where
    # credentials travel (API keys in ?api_key=, https://user:pass@host).
    host_port = parts.netloc.rpartition("@")[2]
    attrs["url.full"] = f"{parts.scheme}://{host_port}{parts.path}"
    if parts.scheme:
        attrs["url.scheme"] = parts.scheme.lower()
    if parts.hostname:
        attrs["server.address"] = parts.hostname
    if port is None:
        port = _DEFAULT_PORTS.get(parts.scheme.lower())
    if port is not None:
        attrs["server.port"] = port
    return attrs


class _Scope:
    """A span that is the current one while its ``with`` block runs: the run's, a step's or an
    attempt's. Leaving the block by an exception records the exception's type only (its message
    could hold a URL with its query); an outcome recorded before (``end()``, an attempt's
    failure) is not overwritten."""

    __slots__ = ("_otel", "_parent", "_recorded", "_span", "_token")

    def __init__(self, otel: Instruments, parent: Context | None) -> None:
        self._otel = otel
        self._parent = parent
        self._recorded = False
        self._span: Span | None = None
        self._token: Token[Context] | None = None

    def _open(self, name: str, kind: Any, attributes: dict[str, str | int]) -> Span:
        otel = self._otel
        span = otel.tracer.start_span(name, context=self._parent, kind=kind, attributes=attributes)
        self._span = span
        self._token = otel.context.attach(otel.trace.set_span_in_context(span))
        return span

    def _end(
        self, status_attribute: str, status: str, error_code: str | None
    ) -> dict[str, str] | None:
        """Record the outcome on the span, once: its status, the error type and, for a failure,
        the span's error status. Returns the metric attributes, or None if already ended."""
        span = self._span
        if span is None or self._recorded:
            return None
        self._recorded = True
        span.set_attribute(status_attribute, status)
        metric_attrs = {status_attribute: status}
        if error_code is not None:
            span.set_attribute("error.type", str(error_code))
            metric_attrs["error.type"] = str(error_code)
        if status == "FAILED":
            span.set_status(self._otel.error_status(str(error_code or status)))
        return metric_attrs

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        assert span is not None
        try:
            if exc_type is not None and not self._recorded:
                self._fail(span, exc_type.__qualname__)
        finally:
            if self._token is not None:
                self._otel.context.detach(self._token)
            span.end()

    def _fail(self, span: Span, error_type: str) -> None:
        self._recorded = True
        span.set_attribute("error.type", error_type)
        span.set_status(self._otel.error_status(error_type))


# The attributes ``http.client.request.duration`` carries (the convention's, low-cardinality).
_HTTP_METRIC_ATTRIBUTES = ("http.request.method", "server.address", "server.port", "url.scheme")


class _OtelAttempt(_Scope):
    """One HTTP attempt (CLIENT); the first failure seen (an error status, the runner's error
    code, an exception) is the one it records. Leaving it records ``http.client.request.duration``
    in seconds."""

    __slots__ = ("_attrs", "_error_type", "_started", "_status")

    def __init__(self, otel: Instruments, parent: Context, attrs: dict[str, str | int]) -> None:
        super().__init__(otel, parent)
        self._attrs = attrs
        self._started = 0.0
        self._status: int | None = None
        self._error_type: str | None = None

    def headers(self) -> dict[str, str]:
        """``traceparent`` (and ``tracestate``) naming this attempt's span, for the request."""
        span = self._span
        assert span is not None, "headers() outside the attempt's with-block"
        if not span.is_recording():
            return {}  # tracing off (metrics only): nothing to join
        carrier: dict[str, str] = {}
        self._otel.inject(carrier, context=self._otel.trace.set_span_in_context(span))
        return carrier

    def _fail(self, span: Span, error_type: str) -> None:
        super()._fail(span, error_type)
        if self._error_type is None:
            self._error_type = error_type

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            super().__exit__(exc_type, exc, tb)
        finally:
            attrs: dict[str, str | int] = {
                k: self._attrs[k] for k in _HTTP_METRIC_ATTRIBUTES if k in self._attrs
            }
            if self._status is not None:
                attrs["http.response.status_code"] = self._status
            error_type = self._error_type or (exc_type.__qualname__ if exc_type else None)
            if error_type is not None:
                attrs["error.type"] = error_type
            self._otel.http_duration.record(max(time.perf_counter() - self._started, 0.0), attrs)

    def __enter__(self) -> _OtelAttempt:
        otel = self._otel
        name = str(self._attrs["http.request.method"])
        kind = otel.trace.SpanKind.CLIENT
        self._open("HTTP" if name == "_OTHER" else name, kind, self._attrs)
        self._started = time.perf_counter()
        otel.attempts.add(1)
        if int(self._attrs.get("http.request.resend_count", 0)) > 0:
            otel.retries.add(1)
        return self

    def response(self, status_code: int) -> None:
        span = self._span
        assert span is not None
        span.set_attribute("http.response.status_code", status_code)
        self._status = status_code
        if status_code >= 400:
            self._fail(span, str(status_code))

    def flow(self, connection: str, waited_ms: int, reason: str, probe: bool) -> None:
        span = self._span
        assert span is not None
        span.set_attribute("workflow.flow.connection", connection)
        span.set_attribute("workflow.flow.wait_ms", waited_ms)
        if waited_ms:
            span.set_attribute("workflow.flow.wait_reason", reason)
        if probe:
            span.set_attribute("workflow.flow.breaker_probe", True)

    def error(self, error_code: str, retry_delay_ms: int | None) -> None:
        span = self._span
        assert span is not None
        span.set_attribute("workflow.error_code", str(error_code))
        if retry_delay_ms is not None:
            span.set_attribute("workflow.retry.delay_ms", retry_delay_ms)
        if not self._recorded:
            self._fail(span, str(error_code))


class _OtelStep(_Scope):
    __slots__ = ("_key",)

    def __init__(self, otel: Instruments, parent: Context, key: str) -> None:
        super().__init__(otel, parent)
        self._key = key

    def __enter__(self) -> _OtelStep:
        kind = self._otel.trace.SpanKind.INTERNAL
        self._open(f"step {self._key}", kind, {"workflow.step.key": self._key})
        return self

    def attempt(self, method: str, url_redacted: str, attempt_no: int) -> _OtelAttempt:
        span = self._span
        assert span is not None, "attempt() outside the step's with-block"
        attrs = _url_attributes(method, url_redacted)
        if attempt_no > 1:
            attrs["http.request.resend_count"] = attempt_no - 1
        return _OtelAttempt(self._otel, self._otel.trace.set_span_in_context(span), attrs)

    def end(self, status: str, attempts: int, duration_ms: int, error_code: str | None) -> None:
        metric_attrs = self._end("workflow.step.status", str(status), error_code)
        if metric_attrs is None:
            return
        assert self._span is not None
        self._span.set_attribute("workflow.step.attempts", attempts)
        self._otel.step_duration.record(max(duration_ms, 0), metric_attrs)


class OtelRun(_Scope):
    __slots__ = ("_attrs", "_name", "_wait_ms")

    def __init__(
        self,
        otel: Instruments,
        parent: Context | None,
        name: str,
        attrs: dict[str, str | int],
        queue_wait_ms: int | None,
    ) -> None:
        super().__init__(otel, parent)
        self._name = name
        self._attrs = attrs
        self._wait_ms = queue_wait_ms

    def __enter__(self) -> OtelRun:
        otel = self._otel
        self._open(self._name, otel.trace.SpanKind.CONSUMER, self._attrs)
        if self._wait_ms is not None:
            # Clocks of producer and worker hosts differ; a negative wait is skew, not time.
            otel.queue_wait.record(max(self._wait_ms, 0))
        return self

    def step(self, key: str) -> _OtelStep:
        span = self._span
        assert span is not None, "step() outside the run's with-block"
        return _OtelStep(self._otel, self._otel.trace.set_span_in_context(span), key)

    def end(self, status: str, error_code: str | None) -> None:
        metric_attrs = self._end("workflow.run.status", str(status), error_code)
        if metric_attrs is not None:
            self._otel.runs.add(1, metric_attrs)
