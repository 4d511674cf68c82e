"""``RunnerMetrics.wrap``: a delivery's end counted as BullMQ counts it, runs in flight and free
slots while it runs (the /metrics integration test covers completed and failed end to end)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from bullmq.custom_errors import DelayedError, UnrecoverableError
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from runner.metrics import RunnerMetrics
from runner.telemetry import SdkTelemetry


class Job:
    name = "workflow_run"

    def __init__(self, attempts_made: int = 0, attempts: int = 1) -> None:
        self.attemptsMade = attempts_made
        self.opts = {"attempts": attempts}


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        m.name: list(m.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }


async def test_each_end_is_counted_as_bullmq_counts_it() -> None:
    reader = InMemoryMetricReader()
    tel = SdkTelemetry(TracerProvider(), MeterProvider(metric_readers=[reader]), "q")
    metrics = RunnerMetrics(tel, redis=None, queue_base="bull:q", concurrency=3)
    inside = asyncio.Event()
    release = asyncio.Event()

    async def handler(job: Any, token: str) -> Any:
        outcome = token
        if outcome == "wait":
            inside.set()
            await release.wait()
            return {}
        if outcome == "delayed":
            raise DelayedError()
        if outcome == "failed":
            raise UnrecoverableError("FAILED: x")
        if outcome == "infra":
            raise RuntimeError("control plane unreachable")
        return {}

    wrapped = metrics.wrap(handler)
    waiting = asyncio.create_task(wrapped(Job(), "wait"))
    await inside.wait()
    assert (metrics.in_flight, metrics.free_slots) == (1, 2)
    release.set()
    await waiting
    await wrapped(Job(), "ok")
    for token, job, error in [
        ("delayed", Job(), DelayedError),
        ("failed", Job(), UnrecoverableError),
        ("infra", Job(attempts_made=0, attempts=3), RuntimeError),  # attempts left: retried
        ("infra", Job(attempts_made=2, attempts=3), RuntimeError),  # the last: failed
    ]:
        with pytest.raises(error):
            await wrapped(job, token)
    assert (metrics.in_flight, metrics.free_slots) == (0, 3)
    got = points(reader)
    counts = {
        name: sum(p.value for p in got[name])
        for name in ("bullmq.jobs.completed", "bullmq.jobs.delayed", "bullmq.jobs.failed")
    }
    counts["bullmq.jobs.retried"] = sum(p.value for p in got["bullmq.jobs.retried"])
    assert counts == {
        "bullmq.jobs.completed": 2,
        "bullmq.jobs.delayed": 1,
        "bullmq.jobs.failed": 2,
        "bullmq.jobs.retried": 1,
    }
    assert sum(p.count for p in got["bullmq.job.duration"]) == 6
    (active,) = got["workflow.runs.active"]
    (free,) = got["workflow.worker.slots.free"]
    assert (active.value, free.value) == (0, 3)
    tel.shutdown()
