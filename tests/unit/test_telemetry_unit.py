"""runner.telemetry without sockets: the off switch, the env decisions, and the spans and metrics
an enabled Telemetry makes, read back from the SDK's in-memory exporter and reader."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextvars import Context
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from runner import telemetry
from runner.telemetry import NOOP, SdkTelemetry, TelemetryConfig, config_from_env, from_env

ROOT = Path(__file__).resolve().parents[2]
CANARY = "c4n4ry-s3cret"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PRODUCER_SPAN_ID = "b7ad6b7169203331"
CARRIER = json.dumps({"traceparent": f"00-{TRACE_ID}-{PRODUCER_SPAN_ID}-01"})

RUN_ARGS: dict[str, Any] = {
    "run_id": "run_1",
    "tenant_id": "ten_1",
    "version_id": "wfv_1",
    "job_id": "run_1",
    "queue_wait_ms": 250,
}


# --- off ---------------------------------------------------------------------------------------


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"},
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "otlp"},
    ],
)
def test_off_imports_no_opentelemetry_and_every_hook_runs(env: dict[str, str]) -> None:
    # Given telemetry is off in a fresh interpreter, when the runner's whole call sequence runs,
    # then nothing of OpenTelemetry (not even the API) has been imported.
    result = _python(
        """
        import sys
        from runner import telemetry
        t = telemetry.from_env()
        assert t is telemetry.NOOP and not t.enabled
        with t.run_span(carrier_json='{"traceparent": "x"}', run_id="r", tenant_id="t",
                        version_id="v", job_id="j", queue_wait_ms=5) as run:
            with run.step("a") as step:
                with step.attempt("GET", "https://h/p?k=v", 1) as attempt:
                    attempt.response(503)
                    attempt.error("HTTP_ERROR", 100)
                step.end("SUCCESS", 1, 10, None)
            run.end("SUCCESS", None)
        t.shutdown()
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        print(loaded)
        assert not loaded, loaded
        """,
        env,
    )
    assert result.returncode == 0, result.stderr


def test_on_imports_the_sdk() -> None:
    # The subprocess check above can only fail if this one can pass: the same code path with an
    # endpoint does load the SDK.
    result = _python(
        """
        import sys
        from runner import telemetry
        t = telemetry.from_env()
        assert t.enabled
        assert "opentelemetry.sdk" in sys.modules
        """,
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "none"},
    )
    assert result.returncode == 0, result.stderr


def test_noop_hands_out_one_shared_object() -> None:
    run_cm = NOOP.run_span(carrier_json=CARRIER, **RUN_ARGS)
    with run_cm as run:
        step_cm = run.step("a")
        with step_cm as step:
            attempt_cm = step.attempt("GET", "https://h/", 1)
            with attempt_cm as attempt:
                assert attempt.response(200) is None
    shared = {id(run_cm), id(run), id(step_cm), id(step), id(attempt_cm), id(attempt)}
    assert len(shared) == 1
    assert NOOP.run_span(carrier_json=None, **RUN_ARGS) is run_cm


# --- the decision ------------------------------------------------------------------------------

ENDPOINT = "http://collector:4318"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_RESOURCE_ATTRIBUTES": "a=b"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": "true"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": " TRUE "}, None),
        ({"OTEL_TRACES_EXPORTER": "none"}, None),
        ({"OTEL_METRICS_EXPORTER": "otlp"}, None),
        ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"{ENDPOINT}/v1/metrics"}, None),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT,
                "OTEL_TRACES_EXPORTER": "none",
                "OTEL_METRICS_EXPORTER": "none",
            },
            None,
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT + "/", "OTEL_SDK_DISABLED": "false"},
            TelemetryConfig(
                ("otlp",), ("otlp",), f"{ENDPOINT}/v1/traces", f"{ENDPOINT}/v1/metrics", None
            ),
        ),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/x", "OTEL_SERVICE_NAME": "w"},
            TelemetryConfig(("otlp",), (), "http://t:1/x", None, "w"),
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT,
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/x",
                "OTEL_METRICS_EXPORTER": "none",
            },
            TelemetryConfig(("otlp",), (), "http://t:1/x", None, None),
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_TRACES_EXPORTER": "none"},
            TelemetryConfig((), ("otlp",), None, f"{ENDPOINT}/v1/metrics", None),
        ),
        (
            {"OTEL_TRACES_EXPORTER": "console, otlp,console"},
            TelemetryConfig(("console", "otlp"), (), None, None, None),
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "otlp"},
            TelemetryConfig(("otlp",), ("otlp",), None, None, None),
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            },
            TelemetryConfig(
                ("otlp",), ("otlp",), f"{ENDPOINT}/v1/traces", f"{ENDPOINT}/v1/metrics", None
            ),
        ),
    ],
)
def test_config_from_env(env: dict[str, str], expected: TelemetryConfig | None) -> None:
    assert config_from_env(env) == expected


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "grpc"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/json",
            },
            "http/json",
        ),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "zipkin"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_METRICS_EXPORTER": "prometheus"}, "prom"),
    ],
)
def test_a_configuration_this_install_cannot_honour_fails_loudly(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        config_from_env(env)


def test_grpc_for_a_signal_that_is_off_is_no_error() -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
    }
    assert config_from_env(env) == TelemetryConfig(("console",), (), None, None, None)


def test_from_env_off_is_noop() -> None:
    assert from_env({}) is NOOP
    assert from_env({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}) is NOOP


# --- on: spans and metrics, in memory ----------------------------------------------------------


class Recorded:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.metrics = InMemoryMetricReader()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.telemetry = SdkTelemetry(
            tracer_provider, MeterProvider(metric_readers=[self.metrics]), "q-1", worker_name="w-1"
        )

    def by_name(self) -> dict[str, ReadableSpan]:
        spans = [s for s in self.spans.get_finished_spans() if s.kind is not SpanKind.CLIENT]
        named = {s.name: s for s in spans}
        assert len(named) == len(spans), [s.name for s in spans]
        return named

    def points(self) -> dict[str, list[Any]]:
        data = self.metrics.get_metrics_data()
        assert data is not None
        out: dict[str, list[Any]] = {}
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    out[metric.name] = list(metric.data.data_points)
        return out


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    r = Recorded()
    yield r
    r.telemetry.shutdown()


async def test_parallel_steps_nest_under_their_run_and_attempts_under_their_step(
    recorded: Recorded,
) -> None:
    t = recorded.telemetry
    both_started = asyncio.Barrier(2)

    async def attempt(s: telemetry.StepSpan, key: str, n: int, status: int) -> None:
        with s.attempt("get", f"https://api.test/{key}", n) as a:
            await asyncio.sleep(0)
            a.response(status)
            if status >= 500:
                a.error("HTTP_ERROR", 100)

    async def step(run: telemetry.RunSpan, key: str, statuses: list[int]) -> None:
        with run.step(key) as s:
            await both_started.wait()  # both step spans are open at once, in two tasks
            for n, status in enumerate(statuses, start=1):
                # In a task whose context holds no span at all: only an explicit parent helps.
                await asyncio.create_task(attempt(s, key, n, status), context=Context())
            s.end("SUCCESS", len(statuses), 120, None)

    with t.run_span(carrier_json=CARRIER, **RUN_ARGS) as run:
        await asyncio.gather(
            asyncio.create_task(step(run, "a", [503, 200]), context=Context()),
            asyncio.create_task(step(run, "b", [200]), context=Context()),
        )
        run.end("SUCCESS", None)

    spans = recorded.spans.get_finished_spans()
    assert {s.context.trace_id for s in spans} == {int(TRACE_ID, 16)}
    (run_span,) = [s for s in spans if s.kind is SpanKind.CONSUMER]
    assert run_span.name == "process q-1"
    assert run_span.parent is not None and run_span.parent.span_id == int(PRODUCER_SPAN_ID, 16)
    assert run_span.parent.is_remote
    steps = {s.name: s for s in spans if s.kind is SpanKind.INTERNAL}
    assert set(steps) == {"step a", "step b"}
    for s in steps.values():
        assert s.parent is not None and s.parent.span_id == run_span.context.span_id
    attempts = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert [s.name for s in attempts] == ["GET"] * 3
    by_parent: dict[str, list[str]] = {}
    for a in attempts:
        assert a.parent is not None
        parent = next(s for s in steps.values() if s.context.span_id == a.parent.span_id)
        assert a.attributes is not None
        by_parent.setdefault(parent.name, []).append(str(a.attributes["url.full"]))
    assert by_parent == {
        "step a": ["https://api.test/a", "https://api.test/a"],
        "step b": ["https://api.test/b"],
    }


async def test_run_span_attributes_and_metrics(recorded: Recorded) -> None:
    t = recorded.telemetry
    with t.run_span(carrier_json=None, **RUN_ARGS) as run:
        with run.step("a") as s:
            with s.attempt("POST", "https://api.test/x", 1) as a:
                a.response(503)
                a.error("HTTP_ERROR", 400)
            with s.attempt("POST", "https://api.test/x", 2) as a:
                a.error("TIMEOUT", None)
            s.end("FAILED", 2, 1500, "TIMEOUT")
        with run.step("b") as s:
            s.end("CANCELED", 0, 0, "CANCELED")
        run.end("FAILED", "TIMEOUT")

    spans = recorded.by_name()
    run_span = spans["process q-1"]
    assert run_span.parent is None  # no carrier: a new trace
    assert dict(run_span.attributes or {}) == {
        # BullMQ's own (Node Worker.processJob), for dashboards built on Node workers.
        "bullmq.queue.name": "q-1",
        "bullmq.queue.operation": "process",
        "bullmq.worker.name": "w-1",
        "bullmq.job.id": "run_1",
        "bullmq.job.name": "workflow_run",
        "messaging.system": "bullmq",
        "messaging.operation.type": "process",
        "messaging.destination.name": "q-1",
        "messaging.message.id": "run_1",
        "workflow.run_id": "run_1",
        "workflow.tenant_id": "ten_1",
        "workflow.version_id": "wfv_1",
        "workflow.queue_wait_ms": 250,
        "workflow.run.status": "FAILED",
        "error.type": "TIMEOUT",
    }
    assert run_span.status.status_code is StatusCode.ERROR
    assert spans["step a"].status.status_code is StatusCode.ERROR
    assert spans["step b"].status.status_code is StatusCode.UNSET
    assert (spans["step b"].attributes or {})["workflow.step.status"] == "CANCELED"
    first, second = sorted(
        (s for s in recorded.spans.get_finished_spans() if s.kind is SpanKind.CLIENT),
        key=lambda s: s.start_time or 0,
    )
    assert dict(first.attributes or {}) == {
        "http.request.method": "POST",
        "url.full": "https://api.test/x",
        "server.address": "api.test",
        "server.port": 443,
        "url.scheme": "https",
        "http.response.status_code": 503,
        "error.type": "503",
        "workflow.error_code": "HTTP_ERROR",
        "workflow.retry.delay_ms": 400,
    }
    assert dict(second.attributes or {}) == {
        "http.request.method": "POST",
        "url.full": "https://api.test/x",
        "server.address": "api.test",
        "server.port": 443,
        "url.scheme": "https",
        "http.request.resend_count": 1,
        "error.type": "TIMEOUT",
        "workflow.error_code": "TIMEOUT",
    }

    points = recorded.points()
    assert [(dict(p.attributes), p.value) for p in points["workflow.runs"]] == [
        ({"workflow.run.status": "FAILED", "error.type": "TIMEOUT"}, 1)
    ]
    assert [p.value for p in points["workflow.step.attempts"]] == [2]
    assert [p.value for p in points["workflow.step.retries"]] == [1]
    durations = {
        p.attributes["workflow.step.status"]: (p.count, p.sum)
        for p in points["workflow.step.duration"]
    }
    assert durations == {"FAILED": (1, 1500), "CANCELED": (1, 0)}
    assert [(p.count, p.sum) for p in points["workflow.queue.wait"]] == [(1, 250)]
    # The HTTP client semantic convention's metric, in seconds, one point per attempt outcome.
    http = {
        tuple(sorted(dict(p.attributes).items())): p.count
        for p in points["http.client.request.duration"]
    }
    base = {
        "http.request.method": "POST",
        "server.address": "api.test",
        "server.port": 443,
        "url.scheme": "https",
    }
    assert http == {
        tuple(sorted({**base, "http.response.status_code": 503, "error.type": "503"}.items())): 1,
        tuple(sorted({**base, "error.type": "TIMEOUT"}.items())): 1,
    }


@pytest.mark.parametrize(
    ("method", "url", "expected"),
    [
        (
            "GET",
            f"https://user:{CANARY}@api.test:8443/v1/c?api_key={CANARY}#{CANARY}",
            {
                "http.request.method": "GET",
                "url.full": "https://api.test:8443/v1/c",
                "server.address": "api.test",
                "server.port": 8443,
                "url.scheme": "https",
            },
        ),
        (
            "delete",
            "http://[::1]/x?token=1",
            {
                "http.request.method": "DELETE",
                "url.full": "http://[::1]/x",
                "server.address": "::1",
                "server.port": 80,
                "url.scheme": "http",
            },
        ),
        (
            "PURGE",
            "https://api.test:99999/x",
            {"http.request.method": "_OTHER", "http.request.method_original": "PURGE"},
        ),
    ],
)
def test_attempt_url_attributes_keep_no_userinfo_query_or_fragment(
    recorded: Recorded, method: str, url: str, expected: dict[str, Any]
) -> None:
    with recorded.telemetry.run_span(carrier_json=None, **RUN_ARGS) as run:
        with run.step("a") as s, s.attempt(method, url, 1):
            pass
    (attempt,) = [s for s in recorded.spans.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert dict(attempt.attributes or {}) == expected
    assert attempt.name == ("HTTP" if method == "PURGE" else method.upper())


def test_an_escaping_exception_records_its_type_never_its_message(recorded: Recorded) -> None:
    class Leaky(Exception):
        pass

    with pytest.raises(Leaky):
        with recorded.telemetry.run_span(carrier_json=None, **RUN_ARGS) as run:
            with run.step("a") as s, s.attempt("GET", "https://api.test/", 1):
                raise Leaky(f"https://api.test/?key={CANARY}")
    spans = recorded.spans.get_finished_spans()
    assert len(spans) == 3
    for span in spans:
        assert span.status.status_code is StatusCode.ERROR
        assert (span.attributes or {})["error.type"] == Leaky.__qualname__
        assert not span.events
        assert CANARY not in repr(span.to_json())
    # An unfinished run is not counted as any final status.
    assert "workflow.runs" not in recorded.points()


@pytest.mark.parametrize(
    "carrier",
    ["", "not json", "[1, 2]", '{"traceparent": 7}', '{"traceparent": "00-zz-zz-01"}'],
)
def test_a_bad_carrier_starts_a_new_trace(recorded: Recorded, carrier: str) -> None:
    with recorded.telemetry.run_span(carrier_json=carrier, **RUN_ARGS) as run:
        run.end("SUCCESS", None)
    (span,) = recorded.spans.get_finished_spans()
    assert span.parent is None
    assert span.context.trace_id != 0


def test_end_twice_counts_once(recorded: Recorded) -> None:
    with recorded.telemetry.run_span(carrier_json=None, **RUN_ARGS) as run:
        with run.step("a") as s:
            s.end("SUCCESS", 1, 5, None)
            s.end("FAILED", 1, 5, "INTERNAL")
        run.end("SUCCESS", None)
        run.end("FAILED", "INTERNAL")
    points = recorded.points()
    assert [(dict(p.attributes), p.value) for p in points["workflow.runs"]] == [
        ({"workflow.run.status": "SUCCESS"}, 1)
    ]
    assert [p.count for p in points["workflow.step.duration"]] == [1]


def test_from_env_builds_the_service_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=unit")
    t = from_env(
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "none"},
        service_name_default="svc-default",
    )
    try:
        assert isinstance(t, SdkTelemetry) and t.enabled
        attrs = t._tracer_provider.resource.attributes
        assert attrs["service.name"] == "svc-default"
        assert attrs["deployment.environment"] == "unit"
        assert attrs["service.instance.id"]
    finally:
        t.shutdown()
    named = from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "svc-env"})
    try:
        assert isinstance(named, SdkTelemetry)
        assert named._tracer_provider.resource.attributes["service.name"] == "svc-env"
    finally:
        named.shutdown()


def test_an_attempt_under_flow_control_says_what_it_waited_for(recorded: Recorded) -> None:
    with recorded.telemetry.run_span(carrier_json=None, **RUN_ARGS) as run:
        with run.step("a") as s, s.attempt("GET", "https://api.test/", 1) as attempt:
            attempt.flow("crm", 1200, "paused", True)
    (span,) = [s for s in recorded.spans.get_finished_spans() if s.kind is SpanKind.CLIENT]
    attrs = dict(span.attributes or {})
    assert attrs["workflow.flow.connection"] == "crm"
    assert attrs["workflow.flow.wait_ms"] == 1200
    assert attrs["workflow.flow.wait_reason"] == "paused"
    assert attrs["workflow.flow.breaker_probe"] is True
