"""The process log's fields: ISO-8601 timestamps, the current span's ids when tracing is on, and
internal errors with their message and a redacted traceback (issue 27)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from runner.log import log
from runner.queue.worker import QueueWorker
from runner.redact import SecretRegistry
from runner.reporting.execlog.documents import LogLine, build_document
from runner.settings import Settings
from runner.telemetry import SdkTelemetry

RUN_ARGS: dict[str, Any] = {
    "run_id": "run_1",
    "tenant_id": "ten_1",
    "version_id": "wfv_1",
    "job_id": "run_1",
    "queue_wait_ms": None,
}


# The process's registry, as the composition root hands it to the logger.
SECRETS = SecretRegistry()


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    out = io.StringIO()
    saved = (log.threshold, log.scrub, log.stream, log.static)
    log.configure(level="info", scrub=lambda line: SECRETS.redactor().text(line), stream=out)
    yield out
    log.threshold, log.scrub, log.stream, log.static = saved


def records(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_timestamps_are_iso_8601_utc_with_milliseconds(lines: io.StringIO) -> None:
    log.info("x")
    (record,) = records(lines)
    assert record["ts"].endswith("Z") and len(record["ts"]) == len("2026-12-04T18:55:00.123Z")
    assert datetime.fromisoformat(record["ts"]).utcoffset() is not None


def test_lines_carry_the_current_spans_ids_only_while_tracing_is_on(lines: io.StringIO) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tel = SdkTelemetry(provider, MeterProvider(), "q")
    log.info("outside")
    with tel.run_span(carrier_json=None, **RUN_ARGS) as run:
        log.info("inside")
        run.end("SUCCESS", None)
    tel.shutdown()
    log.info("after")
    outside, inside, after = records(lines)
    (span,) = spans.get_finished_spans()
    assert "trace_id" not in outside and "trace_id" not in after
    assert inside["trace_id"] == format(span.context.trace_id, "032x")
    assert inside["span_id"] == format(span.context.span_id, "016x")


def test_execution_log_documents_carry_trace_ids_when_given() -> None:
    line = LogLine(
        tenant_id="t",
        workflow_run_id="r",
        job_id="j",
        worker_id="w",
        level="info",
        message="m",
        timestamp_ms=0,
        trace_ids=("a" * 32, "b" * 16),
    )
    doc = build_document(line)
    assert (doc["traceId"], doc["spanId"]) == ("a" * 32, "b" * 16)
    untraced = build_document(LogLine(**{**msgspec_fields(line), "trace_ids": None}))
    assert "traceId" not in untraced and "spanId" not in untraced


def msgspec_fields(line: LogLine) -> dict[str, Any]:
    return {f: getattr(line, f) for f in line.__struct_fields__}


class Job:
    id = "job-1"


async def test_an_internal_error_is_logged_with_its_message_and_a_redacted_traceback(
    lines: io.StringIO,
) -> None:
    # Given a run secret in flight and a failure whose message quotes it
    handle = SECRETS.register(["s3cr3t-in-flight"])
    try:

        async def handler(job: Any, token: str) -> None:
            raise RuntimeError(
                "control plane unreachable: GET https://u:pw@cp.test/x (token s3cr3t-in-flight)"
            )

        with pytest.raises(RuntimeError, match=r"^INTERNAL: RuntimeError$"):
            await QueueWorker(Settings(), handler)._process(Job(), "t")
    finally:
        SECRETS.unregister(handle)
    (record,) = [r for r in records(lines) if r["event"] == "job.internal_error"]
    assert record["level"] == "error" and record["jobId"] == "job-1"
    assert record["error"] == "RuntimeError"
    # Then the message says what failed, the traceback where, and neither leaks
    assert record["message"].startswith("control plane unreachable: GET https://")
    assert "cp.test/x" in record["message"]
    assert "Traceback (most recent call last)" in record["traceback"]
    assert "in handler" in record["traceback"]
    text = lines.getvalue()
    assert "s3cr3t-in-flight" not in text and "u:pw@" not in text
