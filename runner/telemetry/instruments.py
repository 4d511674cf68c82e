"""The OpenTelemetry objects the spans use, looked up once: the tracer and the metric instruments.

Metrics: ``workflow.runs`` {workflow.run.status, error.type}, ``workflow.step.duration`` (ms)
{workflow.step.status, error.type}, ``workflow.step.attempts``, ``workflow.step.retries`` (every
attempt after the first), ``workflow.queue.wait`` (ms, from the job's timestamp to its start).
Beside them, for dashboards built for other tools: ``http.client.request.duration`` (s, the HTTP
client semantic convention and its attributes), BullMQ's own names as its Node telemetry records
them (``bullmq.jobs.completed|failed|delayed|retried`` {bullmq.queue.name, bullmq.job.name,
bullmq.job.state}, ``bullmq.job.duration`` in ms as BullMQ has it, and the gauge
``bullmq.queue.jobs`` {bullmq.queue.name, bullmq.queue.jobs.state}), and the gauges
``workflow.runs.active`` and ``workflow.worker.slots.free``. docs/operations.md lists them all.
Attributes on metrics are low-cardinality: no run, tenant or step ids. OpenTelemetry is imported
only when ``Instruments`` is built, that is only when telemetry or /metrics is on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Observation
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Status, Tracer

INSTRUMENTATION_SCOPE = "runner"
# Step durations and queue waits span milliseconds to minutes; the SDK's default buckets stop
# at 10 s, which would put every slow API call and every backlog in one bucket.
DURATION_BUCKETS_MS = (
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000, 900_000,
)  # fmt: skip


# The HTTP client semantic convention's advisory buckets, in seconds.
HTTP_DURATION_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
# BullMQ's job outcome counters, by the state its Node Job.recordJobMetrics names.
JOB_COUNTERS = {
    "completed": "bullmq.jobs.completed",
    "failed": "bullmq.jobs.failed",
    "delayed": "bullmq.jobs.delayed",
    "retried": "bullmq.jobs.retried",
}


class GaugeSource:
    """What the observable gauges read at each collection: values a timer or a scrape keeps
    fresh (``runner.metrics``), so a collection never does I/O."""

    def __init__(self) -> None:
        self.queue_counts: Mapping[str, int] = {}
        self.active: Callable[[], int] = lambda: 0
        self.free_slots: Callable[[], int] = lambda: 0
        # runner.flow.stats.FlowStats, when flow control is built (untyped: no import here).
        self.flow: Any = None


class Instruments:
    """The OpenTelemetry API objects the spans use, looked up once."""

    def __init__(
        self,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider,
        queue_name: str = "workflow-runs",
    ) -> None:
        from opentelemetry import context, propagate, trace
        from opentelemetry.metrics import Observation

        self.tracer: Tracer = tracer_provider.get_tracer(INSTRUMENTATION_SCOPE)
        self.trace = trace
        self.context = context
        self.extract = propagate.extract
        self.inject = propagate.inject
        self.queue_name = queue_name
        self.gauges = GaugeSource()
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

        self.http_duration: Histogram = meter.create_histogram(
            "http.client.request.duration",
            unit="s",
            description="Duration of HTTP client requests.",
            explicit_bucket_boundaries_advisory=HTTP_DURATION_BUCKETS_S,
        )
        self.jobs: dict[str, Counter] = {
            state: meter.create_counter(name, unit="1", description=f"Number of jobs {state}")
            for state, name in JOB_COUNTERS.items()
        }
        self.job_duration: Histogram = meter.create_histogram(
            "bullmq.job.duration",
            unit="ms",
            description="Job processing duration",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_MS,
        )
        gauges = self.gauges
        queue_attr = {"bullmq.queue.name": queue_name}

        def queue_jobs(_: CallbackOptions) -> list[Observation]:
            return [
                Observation(count, {**queue_attr, "bullmq.queue.jobs.state": state})
                for state, count in gauges.queue_counts.items()
            ]

        meter.create_observable_gauge(
            "bullmq.queue.jobs",
            [queue_jobs],
            unit="{jobs}",
            description="Number of jobs in the queue by state",
        )
        meter.create_observable_gauge(
            "workflow.runs.active",
            [lambda _: [Observation(gauges.active(), queue_attr)]],
            unit="{run}",
            description="Runs in flight in this worker process.",
        )
        meter.create_observable_gauge(
            "workflow.worker.slots.free",
            [lambda _: [Observation(gauges.free_slots(), queue_attr)]],
            unit="{slot}",
            description="Job slots free in this worker process (concurrency minus runs in flight).",
        )

        def flow_wait(_: CallbackOptions) -> list[Observation]:
            stats = gauges.flow
            if stats is None:
                return []
            return [
                Observation(ms, {"workflow.connection": c, "workflow.flow.reason": r})
                for (c, r), ms in list(stats.wait_ms.items())
            ]

        def flow_waits(_: CallbackOptions) -> list[Observation]:
            stats = gauges.flow
            if stats is None:
                return []
            return [
                Observation(n, {"workflow.connection": c, "workflow.flow.reason": r})
                for (c, r), n in list(stats.waits.items())
            ]

        def flow_adaptations(_: CallbackOptions) -> list[Observation]:
            stats = gauges.flow
            if stats is None:
                return []
            return [
                Observation(n, {"workflow.connection": c, "workflow.flow.adaptation": how})
                for (c, how), n in list(stats.adaptations.items())
            ]

        def breaker_state(_: CallbackOptions) -> list[Observation]:
            from runner.flow.stats import BREAKER_STATES

            stats = gauges.flow
            if stats is None:
                return []
            return [
                Observation(BREAKER_STATES.get(state, 0), {"workflow.connection": c})
                for c, state in list(stats.breaker.items())
            ]

        meter.create_observable_counter(
            "workflow.flow.wait",
            [flow_wait],
            unit="ms",
            description="Time steps waited for flow control (budget, slots, breaker), by reason.",
        )
        meter.create_observable_counter(
            "workflow.flow.waits",
            [flow_waits],
            unit="{wait}",
            description="Waits for flow control, by reason.",
        )
        meter.create_observable_counter(
            "workflow.flow.adaptations",
            [flow_adaptations],
            unit="{answer}",
            description="API answers that paused, lowered or backed off a connection's budget.",
        )
        meter.create_observable_gauge(
            "workflow.flow.breaker.state",
            [breaker_state],
            unit="1",
            description="Circuit breaker last seen per connection: 0 closed, 1 half-open, 2 open.",
        )

    def error_status(self, description: str) -> Status:
        return self.trace.Status(self.trace.StatusCode.ERROR, description)
