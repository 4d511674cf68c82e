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
        self._otel = Instruments(tracer_provider, meter_provider)

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
    ) -> OtelRun:
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
        parent = parent_context(self._otel, carrier_json)
        return OtelRun(self._otel, parent, f"workflow_run {version_id}", attrs, queue_wait_ms)

    def shutdown(self) -> None:
        # Traces first: they are what a crash investigation needs; both flush what is queued.
        self._tracer_provider.shutdown()
        self._meter_provider.shutdown()
