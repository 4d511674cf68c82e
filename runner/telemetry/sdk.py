"""Telemetry on: ``from_env`` builds the SDK's providers and exporters, and ``SdkTelemetry``
hands out the run spans over them. With telemetry off, ``from_env`` returns ``NOOP`` and the SDK
is never imported.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from runner.contract import JOB_NAME
from runner.telemetry.config import (
    QUEUE_NAME_DEFAULT,
    SERVICE_NAME_DEFAULT,
    TelemetryConfig,
    config_from_env,
)
from runner.telemetry.instruments import Instruments
from runner.telemetry.interface import NOOP, Telemetry
from runner.telemetry.tracing import OtelRun, parent_context

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider


def from_env(
    environ: Mapping[str, str] = os.environ,
    *,
    service_name_default: str = SERVICE_NAME_DEFAULT,
    queue_name: str = QUEUE_NAME_DEFAULT,
    worker_name: str = "",
    prometheus: bool = False,
) -> Telemetry:
    """``NOOP`` when telemetry and ``prometheus`` are off (the SDK is then never imported), else
    an SDK-backed ``Telemetry`` exporting with a batch span processor and a periodic metric
    reader, plus a Prometheus reader when ``prometheus`` (``/metrics``). ``queue_name`` is the
    BullMQ queue (``messaging.destination.name``, ``bullmq.queue.name``), ``worker_name`` the
    worker's (``bullmq.worker.name``)."""
    config = config_from_env(environ)
    if config is None:
        if not prometheus:
            return NOOP
        config = TelemetryConfig((), (), None, None, _service_name(environ))
    return _build(
        config,
        service_name_default=service_name_default,
        queue_name=queue_name,
        worker_name=worker_name,
        prometheus=prometheus,
    )


def _service_name(environ: Mapping[str, str]) -> str | None:
    return environ.get("OTEL_SERVICE_NAME", "").strip() or None


# --- on: the SDK-backed implementation ---------------------------------------------------------


def _build(
    config: TelemetryConfig,
    *,
    service_name_default: str,
    queue_name: str,
    worker_name: str = "",
    prometheus: bool = False,
) -> Telemetry:
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

    if config.traces_exporters:
        tracer_provider = TracerProvider(resource=resource)
    else:
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

        # Metrics only (/metrics without OTEL_* tracing): spans are not recorded at all.
        tracer_provider = TracerProvider(resource=resource, sampler=ALWAYS_OFF)
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
    registry = None
    if prometheus:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry

        # A registry of its own, not the library's process-wide default: what /metrics shows is
        # exactly this runtime's instruments (tests build several runtimes in one process).
        registry = CollectorRegistry(auto_describe=True)
        readers.append(PrometheusMetricReader(registry=registry))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    return SdkTelemetry(
        tracer_provider,
        meter_provider,
        queue_name,
        worker_name=worker_name,
        tracing=bool(config.traces_exporters),
        registry=registry,
    )


class SdkTelemetry:
    """The enabled ``Telemetry`` over SDK providers; ``from_env`` builds it with exporters, tests
    build it with in-memory ones. ``shutdown`` shuts both providers down."""

    def __init__(
        self,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider,
        queue_name: str = QUEUE_NAME_DEFAULT,
        *,
        worker_name: str = "",
        tracing: bool = True,
        registry: Any = None,
    ) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._queue_name = queue_name
        self._worker_name = worker_name
        self._tracing = tracing
        self._registry = registry
        self._otel = Instruments(tracer_provider, meter_provider, queue_name)
        if tracing:
            from runner.log import log

            log.trace_ids = current_trace_ids

    @property
    def enabled(self) -> bool:
        return True

    @property
    def tracing(self) -> bool:
        return self._tracing

    def job_finished(self, state: str, job_name: str, duration_ms: int) -> None:
        counter = self._otel.jobs.get(state)
        attrs = {
            "bullmq.queue.name": self._queue_name,
            "bullmq.job.name": job_name,
            "bullmq.job.state": state,
        }
        if counter is not None:
            counter.add(1, attrs)
        self._otel.job_duration.record(max(duration_ms, 0), attrs)

    def bind_gauges(self, queue_counts: Any, active: Any, free_slots: Any) -> None:
        gauges = self._otel.gauges
        gauges.queue_counts = queue_counts
        gauges.active = active
        gauges.free_slots = free_slots

    def bind_flow(self, stats: Any) -> None:
        self._otel.gauges.flow = stats

    def prometheus_text(self) -> tuple[bytes, str] | None:
        if self._registry is None:
            return None
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    def run_span(
        self,
        *,
        carrier_json: str | None,
        run_id: str,
        tenant_id: str,
        version_id: str,
        job_id: str,
        queue_wait_ms: int | None,
    ) -> OtelRun:
        attrs: dict[str, str | int] = {
            "bullmq.queue.name": self._queue_name,
            "bullmq.queue.operation": "process",
            "bullmq.worker.name": self._worker_name,
            "bullmq.job.id": job_id,
            "bullmq.job.name": JOB_NAME,
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
        parent = parent_context(self._otel, carrier_json)
        return OtelRun(self._otel, parent, f"process {self._queue_name}", attrs, queue_wait_ms)

    def shutdown(self) -> None:
        from runner.log import log, no_trace_ids

        log.trace_ids = no_trace_ids
        # Traces first: they are what a crash investigation needs; both flush what is queued.
        self._tracer_provider.shutdown()
        self._meter_provider.shutdown()


def current_trace_ids() -> tuple[str, str] | None:
    """The current span's trace and span ids (hex), for log lines and execution-log documents;
    ``None`` outside any span."""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
