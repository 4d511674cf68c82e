"""The OpenTelemetry objects the spans use, looked up once: the tracer and the metric instruments.

Metrics: ``workflow.runs`` {workflow.run.status, error.type}, ``workflow.step.duration`` (ms)
{workflow.step.status, error.type}, ``workflow.step.attempts``, ``workflow.step.retries`` (every
attempt after the first), ``workflow.queue.wait`` (ms, from the job's timestamp to its start).
Attributes on metrics are low-cardinality: no run, tenant or step ids. OpenTelemetry is imported
only when ``Instruments`` is built, that is only when telemetry is on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter, Histogram
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Status, Tracer

INSTRUMENTATION_SCOPE = "runner"
# Step durations and queue waits span milliseconds to minutes; the SDK's default buckets stop
# at 10 s, which would put every slow API call and every backlog in one bucket.
DURATION_BUCKETS_MS = (
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000, 900_000,
)  # fmt: skip


class Instruments:
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
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_MS,
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
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_MS,
        )

    def error_status(self, description: str) -> Status:
        return self.trace.Status(self.trace.StatusCode.ERROR, description)
