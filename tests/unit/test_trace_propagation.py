"""``traceparent``/``tracestate`` on step requests: sent when tracing is on, naming the attempt's
span; not sent when the connection opts out (``config.propagateTrace: false``), when the step
sets its own, or when only metrics are on."""

from __future__ import annotations

from typing import Any

import msgspec
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from runner.contract import Connection
from runner.engine.step import _with_trace_context
from runner.http.messages import HttpRequest
from runner.telemetry import SdkTelemetry

RUN_ARGS: dict[str, Any] = {
    "run_id": "r",
    "tenant_id": "t",
    "version_id": "v",
    "job_id": "r",
    "queue_wait_ms": None,
}


def connection(**config: Any) -> Connection:
    return msgspec.json.decode(
        msgspec.json.encode({"id": "c", "type": "NONE", "config": config}), type=Connection
    )


def sent_headers(tel: SdkTelemetry, request: HttpRequest, conn: Connection | None) -> Any:
    with tel.run_span(carrier_json=None, **RUN_ARGS) as run:
        with run.step("s") as step, step.attempt("GET", request.url, 1) as attempt:
            return dict(_with_trace_context(request, attempt, conn).headers)


def test_tracing_on_sends_the_attempts_traceparent_unless_the_connection_opts_out() -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tel = SdkTelemetry(provider, MeterProvider(), "q")
    request = HttpRequest("GET", "https://api.test/x", headers={"Accept": "application/json"})
    try:
        headers = sent_headers(tel, request, None)
        attempt = next(s for s in spans.get_finished_spans() if s.name == "GET")
        ctx = attempt.context
        assert headers == {
            "Accept": "application/json",
            "traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}",
        }
        assert "traceparent" in sent_headers(tel, request, connection(baseUrl="https://api.test"))
        opted_out = connection(baseUrl="https://api.test", propagateTrace=False)
        assert sent_headers(tel, request, opted_out) == {"Accept": "application/json"}
        own = HttpRequest("GET", "https://api.test/x", headers={"TraceParent": "00-mine"})
        assert sent_headers(tel, own, None) == {"TraceParent": "00-mine"}
    finally:
        tel.shutdown()


def test_metrics_only_sends_no_trace_context() -> None:
    tel = SdkTelemetry(TracerProvider(sampler=ALWAYS_OFF), MeterProvider(), "q", tracing=False)
    try:
        request = HttpRequest("GET", "https://api.test/x")
        assert sent_headers(tel, request, None) == {}
    finally:
        tel.shutdown()
