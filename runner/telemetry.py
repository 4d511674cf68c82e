"""OpenTelemetry for the runner: one trace per run, and the run, step and HTTP metrics.

The engine talks to a ``Telemetry`` and never to OpenTelemetry itself::

    with telemetry.run_span(carrier_json=job.opts.get("tm"), run_id=..., tenant_id=...,
                            version_id=..., job_id=job.id, queue_wait_ms=...) as run:
        with run.step("fetch_customer") as step:            # in the step's own asyncio task
            with step.attempt("GET", redacted_url, 1) as attempt:
                attempt.response(503)
                attempt.error("HTTP_ERROR", 1000)
            with step.attempt("GET", redacted_url, 2) as attempt:
                attempt.response(200)
            step.end("SUCCESS", 2, 1234, None)
        run.end("SUCCESS", None)
    telemetry.shutdown()                                    # blocking: flushes what is queued

Spans: ``workflow_run {versionId}`` (CONSUMER, child of the producer's span found in the job's
``tm`` carrier, CONTRACT §2) → ``step {key}`` (INTERNAL) → ``{METHOD}`` (CLIENT, HTTP client
semantic conventions). Each child names its parent explicitly, so parallel DAG steps running as
separate asyncio tasks nest correctly whatever the current context of the task is.

Metrics: ``workflow.runs`` {workflow.run.status, error.type}, ``workflow.step.duration`` (ms)
{workflow.step.status, error.type}, ``workflow.step.attempts``, ``workflow.step.retries`` (every
attempt after the first), ``workflow.queue.wait`` (ms, from the job's timestamp to its start).
Attributes are low-cardinality on metrics (no run, tenant or step ids) and never hold a secret on
spans: no header, no body, no exception message (only its type), and URLs lose their userinfo,
query and fragment here even though the caller already passes them redacted.

Off by default, and then free: ``NOOP`` is a set of shared singletons whose methods do nothing,
and with telemetry off the SDK is never imported. ``from_env`` turns it on from the standard
variables (see ``config_from_env``); the SDK itself reads the rest (``OTEL_EXPORTER_OTLP_HEADERS``,
``..._TIMEOUT``, ``..._COMPRESSION``, certificates, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``, ``OTEL_PROPAGATORS``, ``OTEL_BSP_*``, ``OTEL_METRIC_EXPORT_INTERVAL``)
from the process environment. Only OTLP over HTTP/protobuf is shipped: a configuration that asks
for gRPC, or for an exporter that is not installed, fails at startup instead of losing data.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.metrics import Counter, Histogram
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Status, Tracer

__all__ = [
    "NOOP",
    "AttemptSpan",
    "RunSpan",
    "SdkTelemetry",
    "StepSpan",
    "Telemetry",
    "TelemetryConfig",
    "config_from_env",
    "from_env",
]

SERVICE_NAME_DEFAULT = "workflow-runner"
QUEUE_NAME_DEFAULT = "workflow-runs"
INSTRUMENTATION_SCOPE = "runner"

_SUPPORTED_TRACES_EXPORTERS = frozenset({"otlp", "console"})
_SUPPORTED_METRICS_EXPORTERS = frozenset({"otlp", "console"})
_SUPPORTED_PROTOCOLS = frozenset({"http/protobuf"})
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Step durations and queue waits span milliseconds to minutes; the SDK's default buckets stop
# at 10 s, which would put every slow API call and every backlog in one bucket.
_DURATION_BUCKETS_MS = (
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000, 900_000,
)  # fmt: skip


# --- the interface the engine uses ------------------------------------------------------------


class AttemptSpan(Protocol):
    def response(self, status_code: int) -> None:
        """The attempt got an HTTP response (any status)."""

    def error(self, error_code: str, retry_delay_ms: int | None) -> None:
        """The attempt failed with ``error_code``; ``retry_delay_ms`` is set when another
        attempt follows after that delay."""


class StepSpan(Protocol):
    def attempt(
        self, method: str, url_redacted: str, attempt_no: int
    ) -> AbstractContextManager[AttemptSpan]:
        """One HTTP attempt (``attempt_no`` from 1); ``url_redacted`` must already be redacted."""

    def end(self, status: str, attempts: int, duration_ms: int, error_code: str | None) -> None:
        """The step's terminal state; records ``workflow.step.duration``."""


class RunSpan(Protocol):
    def step(self, key: str) -> AbstractContextManager[StepSpan]:
        """A step of this run; safe to enter from any asyncio task."""

    def end(self, status: str, error_code: str | None) -> None:
        """The run's terminal state; records ``workflow.runs``."""


class Telemetry(Protocol):
    @property
    def enabled(self) -> bool: ...

    def run_span(
        self,
        *,
        carrier_json: str | None,
        run_id: str,
        tenant_id: str,
        version_id: str,
        job_id: str,
        queue_wait_ms: int | None,
    ) -> AbstractContextManager[RunSpan]:
        """A run, continuing the trace in ``carrier_json`` (the job's opts ``tm``) if any."""

    def shutdown(self) -> None:
        """Flush and stop exporting. Blocking (network I/O): call it off the event loop."""


# --- off: shared singletons that do nothing ---------------------------------------------------


class _NoopSpan:
    """Run, step and attempt at once: every hook returns this one object or ``None``."""

    __slots__ = ()

    def __enter__(self) -> _NoopSpan:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def step(self, key: str) -> _NoopSpan:
        return self

    def attempt(self, method: str, url_redacted: str, attempt_no: int) -> _NoopSpan:
        return self

    def response(self, status_code: int) -> None:
        return None

    def error(self, error_code: str, retry_delay_ms: int | None) -> None:
        return None

    def end(self, status: str, *args: Any) -> None:
        return None


_NOOP_SPAN = _NoopSpan()
# The no-op run span, for code that runs without telemetry (tests, the engine's default).
NOOP_SPAN: RunSpan = _NOOP_SPAN
NOOP_STEP_SPAN: StepSpan = _NOOP_SPAN


class _NoopTelemetry:
    __slots__ = ()

    @property
    def enabled(self) -> bool:
        return False

    def run_span(
        self,
        *,
        carrier_json: str | None,
        run_id: str,
        tenant_id: str,
        version_id: str,
        job_id: str,
        queue_wait_ms: int | None,
    ) -> _NoopSpan:
        return _NOOP_SPAN

    def shutdown(self) -> None:
        return None


NOOP: Telemetry = _NoopTelemetry()


# --- configuration: pure, from the standard variables -----------------------------------------


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """What ``from_env`` builds. An endpoint is the full signal URL, or ``None`` when the signal
    has no OTLP exporter or none is configured (the SDK then uses its default)."""

    traces_exporters: tuple[str, ...]
    metrics_exporters: tuple[str, ...]
    traces_endpoint: str | None
    metrics_endpoint: str | None
    service_name: str | None


def _get(environ: Mapping[str, str], name: str) -> str | None:
    # The specification treats an empty value as unset.
    value = environ.get(name, "").strip()
    return value or None


def _exporters(
    environ: Mapping[str, str], name: str, default: tuple[str, ...], supported: frozenset[str]
) -> tuple[str, ...]:
    raw = _get(environ, name)
    if raw is None:
        return default
    names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
    if "none" in names:
        return ()
    unsupported = [n for n in names if n not in supported]
    if unsupported:
        raise ValueError(
            f"{name}={raw!r}: exporter {unsupported[0]!r} is not installed "
            f"(supported: {', '.join(sorted(supported))}, none)"
        )
    return names


def _signal_endpoint(environ: Mapping[str, str], signal: str) -> str | None:
    specific = _get(environ, f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    if specific is not None:
        return specific
    base = _get(environ, "OTEL_EXPORTER_OTLP_ENDPOINT")
    return None if base is None else f"{base.removesuffix('/')}/v1/{signal}"


def _check_protocol(environ: Mapping[str, str], signal: str) -> None:
    for name in (f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = _get(environ, name)
        if protocol is not None:
            if protocol.lower() not in _SUPPORTED_PROTOCOLS:
                raise ValueError(
                    f"{name}={protocol!r}: only http/protobuf is installed "
                    "(point the endpoint at the collector's OTLP/HTTP port, usually 4318)"
                )
            return


def config_from_env(environ: Mapping[str, str]) -> TelemetryConfig | None:
    """``None`` (off) unless ``OTEL_SDK_DISABLED`` is not ``true`` and an OTLP endpoint
    (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``..._TRACES_ENDPOINT``) is set or
    ``OTEL_TRACES_EXPORTER`` names an exporter. When on, traces go to ``OTEL_TRACES_EXPORTER``
    (default ``otlp``) and metrics to ``OTEL_METRICS_EXPORTER`` (default ``otlp`` when an endpoint
    for metrics is set, else none, so that a traces-only endpoint does not send metrics to the
    SDK's localhost default). ``none`` turns a signal off. Raises ``ValueError`` for a
    configuration this install cannot honour."""
    if (_get(environ, "OTEL_SDK_DISABLED") or "").lower() == "true":
        return None
    traces_exporter_set = _get(environ, "OTEL_TRACES_EXPORTER")
    triggered = (
        _get(environ, "OTEL_EXPORTER_OTLP_ENDPOINT") is not None
        or _get(environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") is not None
        or (traces_exporter_set is not None and traces_exporter_set.lower() != "none")
    )
    if not triggered:
        return None
    traces = _exporters(environ, "OTEL_TRACES_EXPORTER", ("otlp",), _SUPPORTED_TRACES_EXPORTERS)
    metrics_endpoint = _signal_endpoint(environ, "metrics")
    metrics_default: tuple[str, ...] = ("otlp",) if metrics_endpoint is not None else ()
    metrics = _exporters(
        environ, "OTEL_METRICS_EXPORTER", metrics_default, _SUPPORTED_METRICS_EXPORTERS
    )
    if not traces and not metrics:
        return None
    if "otlp" in traces:
        _check_protocol(environ, "traces")
    if "otlp" in metrics:
        _check_protocol(environ, "metrics")
    return TelemetryConfig(
        traces_exporters=traces,
        metrics_exporters=metrics,
        traces_endpoint=_signal_endpoint(environ, "traces") if "otlp" in traces else None,
        metrics_endpoint=metrics_endpoint if "otlp" in metrics else None,
        service_name=_get(environ, "OTEL_SERVICE_NAME"),
    )


def from_env(
    environ: Mapping[str, str] = os.environ,
    *,
    service_name_default: str = SERVICE_NAME_DEFAULT,
    queue_name: str = QUEUE_NAME_DEFAULT,
) -> Telemetry:
    """``NOOP`` when telemetry is off (the SDK is then never imported), else an SDK-backed
    ``Telemetry`` exporting with a batch span processor and a periodic metric reader.
    ``queue_name`` is the BullMQ queue, reported as ``messaging.destination.name``."""
    config = config_from_env(environ)
    if config is None:
        return NOOP
    return _build(config, service_name_default=service_name_default, queue_name=queue_name)


# --- on: the SDK-backed implementation ---------------------------------------------------------


def _build(config: TelemetryConfig, *, service_name_default: str, queue_name: str) -> Telemetry:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes: dict[str, str] = {}
    if config.service_name is not None:
        attributes["service.name"] = config.service_name
    resource = Resource.create(attributes)
    defaults: dict[str, str] = {}
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        defaults["service.name"] = service_name_default
    if "service.instance.id" not in resource.attributes:
        # Tells one worker process from another in the backend (the collector keeps it as a label).
        defaults["service.instance.id"] = uuid.uuid4().hex
    if defaults:
        resource = resource.merge(Resource(defaults))

    tracer_provider = TracerProvider(resource=resource)
    for name in config.traces_exporters:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter: Any = OTLPSpanExporter(endpoint=config.traces_endpoint)
        else:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            # stdout carries the runner's JSON log lines.
            exporter = ConsoleSpanExporter(out=sys.stderr)
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))

    readers: list[MetricReader] = []
    for name in config.metrics_exporters:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )

            metric_exporter: Any = OTLPMetricExporter(endpoint=config.metrics_endpoint)
        else:
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

            metric_exporter = ConsoleMetricExporter(out=sys.stderr)
        readers.append(PeriodicExportingMetricReader(metric_exporter))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    return SdkTelemetry(tracer_provider, meter_provider, queue_name)


class _Instruments:
    """The OpenTelemetry API objects the spans use, looked up once."""

    def __init__(self, tracer_provider: TracerProvider, meter_provider: MeterProvider) -> None:
        from opentelemetry import context, propagate, trace

        self.tracer: Tracer = tracer_provider.get_tracer(INSTRUMENTATION_SCOPE)
        self.trace = trace
        self.context = context
        self.extract = propagate.extract
        meter = meter_provider.get_meter(INSTRUMENTATION_SCOPE)
        self.runs: Counter = meter.create_counter(
            "workflow.runs", unit="{run}", description="Runs finished, by final status."
        )
        self.step_duration: Histogram = meter.create_histogram(
            "workflow.step.duration",
            unit="ms",
            description="Duration of a step, all attempts and retry delays included.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS_MS,
        )
        self.attempts: Counter = meter.create_counter(
            "workflow.step.attempts", unit="{attempt}", description="HTTP attempts made by steps."
        )
        self.retries: Counter = meter.create_counter(
            "workflow.step.retries",
            unit="{attempt}",
            description="HTTP attempts that retried an earlier one.",
        )
        self.queue_wait: Histogram = meter.create_histogram(
            "workflow.queue.wait",
            unit="ms",
            description="Time a job waited in the queue, from its timestamp to its start.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS_MS,
        )

    def error_status(self, description: str) -> Status:
        return self.trace.Status(self.trace.StatusCode.ERROR, description)


def _parent_context(otel: _Instruments, carrier_json: str | None) -> Context | None:
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
    if parts.hostname:
        attrs["server.address"] = parts.hostname
    if port is None:
        port = _DEFAULT_PORTS.get(parts.scheme.lower())
    if port is not None:
        attrs["server.port"] = port
    return attrs


class _OtelAttempt:
    __slots__ = ("_attrs", "_error_type", "_otel", "_parent", "_span", "_token")

    def __init__(self, otel: _Instruments, parent: Context, attrs: dict[str, str | int]) -> None:
        self._otel = otel
        self._parent = parent
        self._attrs = attrs
        self._error_type: str | None = None
        self._span: Span | None = None
        self._token: Token[Context] | None = None

    def __enter__(self) -> _OtelAttempt:
        otel = self._otel
        name = str(self._attrs["http.request.method"])
        self._span = otel.tracer.start_span(
            "HTTP" if name == "_OTHER" else name,
            context=self._parent,
            kind=otel.trace.SpanKind.CLIENT,
            attributes=self._attrs,
        )
        self._token = otel.context.attach(otel.trace.set_span_in_context(self._span))
        otel.attempts.add(1)
        if int(self._attrs.get("http.request.resend_count", 0)) > 0:
            otel.retries.add(1)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        assert span is not None
        try:
            if exc_type is not None and self._error_type is None:
                # The type only: an exception's message can hold a URL with its query.
                self._fail(span, exc_type.__qualname__)
        finally:
            if self._token is not None:
                self._otel.context.detach(self._token)
            span.end()

    def _fail(self, span: Span, error_type: str) -> None:
        self._error_type = error_type
        span.set_attribute("error.type", error_type)
        span.set_status(self._otel.error_status(error_type))

    def response(self, status_code: int) -> None:
        span = self._span
        assert span is not None
        span.set_attribute("http.response.status_code", status_code)
        if status_code >= 400:
            self._fail(span, str(status_code))

    def error(self, error_code: str, retry_delay_ms: int | None) -> None:
        span = self._span
        assert span is not None
        span.set_attribute("workflow.error_code", str(error_code))
        if retry_delay_ms is not None:
            span.set_attribute("workflow.retry.delay_ms", retry_delay_ms)
        if self._error_type is None:
            self._fail(span, str(error_code))


class _Scope:
    """A span that is the current one while its ``with`` block runs: the run's or a step's.
    Leaving the block by an exception records the exception's type only (its message could
    hold a URL with its query); ``end()`` having been called first records nothing more."""

    __slots__ = ("_ended", "_otel", "_parent", "_span", "_token")

    def __init__(self, otel: _Instruments, parent: Context | None) -> None:
        self._otel = otel
        self._parent = parent
        self._ended = False
        self._span: Span | None = None
        self._token: Token[Context] | None = None

    def _open(self, name: str, kind: Any, attributes: dict[str, str | int]) -> Span:
        otel = self._otel
        span = otel.tracer.start_span(name, context=self._parent, kind=kind, attributes=attributes)
        self._span = span
        self._token = otel.context.attach(otel.trace.set_span_in_context(span))
        return span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        assert span is not None
        try:
            if exc_type is not None and not self._ended:
                span.set_attribute("error.type", exc_type.__qualname__)
                span.set_status(self._otel.error_status(exc_type.__qualname__))
        finally:
            if self._token is not None:
                self._otel.context.detach(self._token)
            span.end()


class _OtelStep(_Scope):
    __slots__ = ("_key",)

    def __init__(self, otel: _Instruments, parent: Context, key: str) -> None:
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
        span = self._span
        if span is None or self._ended:
            return
        self._ended = True
        status = str(status)
        span.set_attribute("workflow.step.status", status)
        span.set_attribute("workflow.step.attempts", attempts)
        metric_attrs = {"workflow.step.status": status}
        if error_code is not None:
            span.set_attribute("error.type", str(error_code))
            metric_attrs["error.type"] = str(error_code)
        if status == "FAILED":
            span.set_status(self._otel.error_status(str(error_code or status)))
        self._otel.step_duration.record(max(duration_ms, 0), metric_attrs)


class _OtelRun(_Scope):
    __slots__ = ("_attrs", "_name", "_wait_ms")

    def __init__(
        self,
        otel: _Instruments,
        parent: Context | None,
        name: str,
        attrs: dict[str, str | int],
        queue_wait_ms: int | None,
    ) -> None:
        super().__init__(otel, parent)
        self._name = name
        self._attrs = attrs
        self._wait_ms = queue_wait_ms

    def __enter__(self) -> _OtelRun:
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
        span = self._span
        if span is None or self._ended:
            return
        self._ended = True
        status = str(status)
        span.set_attribute("workflow.run.status", status)
        metric_attrs = {"workflow.run.status": status}
        if error_code is not None:
            span.set_attribute("error.type", str(error_code))
            metric_attrs["error.type"] = str(error_code)
        if status == "FAILED":
            span.set_status(self._otel.error_status(str(error_code or status)))
        self._otel.runs.add(1, metric_attrs)


class SdkTelemetry:
    """The enabled ``Telemetry`` over SDK providers; ``from_env`` builds it with exporters, tests
    build it with in-memory ones. ``shutdown`` shuts both providers down."""

    def __init__(
        self,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider,
        queue_name: str = QUEUE_NAME_DEFAULT,
    ) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._queue_name = queue_name
        self._otel = _Instruments(tracer_provider, meter_provider)

    @property
    def enabled(self) -> bool:
        return True

    def run_span(
        self,
        *,
        carrier_json: str | None,
        run_id: str,
        tenant_id: str,
        version_id: str,
        job_id: str,
        queue_wait_ms: int | None,
    ) -> _OtelRun:
        attrs: dict[str, str | int] = {
            "messaging.system": "bullmq",
            "messaging.operation.type": "process",
            "messaging.destination.name": self._queue_name,
            "messaging.message.id": job_id,
            "workflow.run_id": run_id,
            "workflow.tenant_id": tenant_id,
            "workflow.version_id": version_id,
        }
        if queue_wait_ms is not None:
            attrs["workflow.queue_wait_ms"] = queue_wait_ms
        parent = _parent_context(self._otel, carrier_json)
        return _OtelRun(self._otel, parent, f"workflow_run {version_id}", attrs, queue_wait_ms)

    def shutdown(self) -> None:
        # Traces first: they are what a crash investigation needs; both flush what is queued.
        self._tracer_provider.shutdown()
        self._meter_provider.shutdown()
