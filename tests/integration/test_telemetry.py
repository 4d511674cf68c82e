"""One trace from the Node control plane to the runner's HTTP attempts, over real OTLP/HTTP.

Given a Node producer that adds a job with ``bullmq-otel`` (so BullMQ writes the W3C carrier into
the job's opts ``tm``), when the runner's telemetry, configured only by ``OTEL_*`` variables,
traces a run of that job read back with the Python ``bullmq`` Queue, then the spans an OTLP/HTTP
receiver inside the test decodes form one trace under the producer's trace id, nested
producer → run → step → attempts, and no exported byte holds the secret in the step's URL.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from bullmq import Queue
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from runner import telemetry
from tests.conftest import REDIS_URL, node_peer, start_server

ROOT = Path(__file__).resolve().parents[2]
OTEL_PRODUCER = ROOT / "tests" / "node" / "otel-producer.mjs"
CANARY = "tm-c4n4ry-9f3e"


@dataclass
class OtlpReceiver:
    """An OTLP/HTTP collector reduced to what the test reads: decoded requests and raw bodies."""

    url: str = ""
    bodies: list[bytes] = field(default_factory=list)
    traces: list[trace_service_pb2.ExportTraceServiceRequest] = field(default_factory=list)
    metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(default_factory=list)

    async def on_traces(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self.traces.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    async def on_metrics(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self.metrics.append(metrics_service_pb2.ExportMetricsServiceRequest.FromString(body))
        reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    async def _body(self, request: web.Request) -> bytes:
        assert request.content_type == "application/x-protobuf", request.content_type
        body = await request.read()  # aiohttp undoes a gzip/deflate Content-Encoding
        self.bodies.append(body)
        return body

    def spans(self) -> list[tuple[dict[str, Any], Span]]:
        """Every exported span with its resource's attributes."""
        out = []
        for req in self.traces:
            for rs in req.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    out.extend((resource, span) for span in ss.spans)
        return out

    def metric_points(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for req in self.metrics:
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        kind = m.WhichOneof("data")
                        out.setdefault(m.name, []).extend(getattr(m, kind).data_points)
        return out


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def _attrs(span: Span) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in span.attributes}


@pytest.fixture
async def otlp_receiver() -> AsyncIterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    app = web.Application()
    app.router.add_post("/v1/traces", receiver.on_traces)
    app.router.add_post("/v1/metrics", receiver.on_metrics)
    runner, receiver.url = await start_server(app)
    yield receiver
    await runner.cleanup()


async def otel_producer(spec: dict[str, Any], timeout_s: float = 60) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(OTEL_PRODUCER),
        "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(json.dumps(spec).encode()), timeout_s)
    assert proc.returncode == 0, f"otel producer failed: {err.decode()}"
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return report


async def test_runner_spans_continue_the_node_producers_trace(
    otlp_receiver: OtlpReceiver, clean_queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given: the runner's environment names only the OTLP endpoint (and a service name); no other
    # OTEL_* setting of the machine leaks in.
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "runner-under-test")
    # Metrics leave on shutdown only, so the test reads one complete export.
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")

    # Given: a traced Node producer added the job.
    run_id = f"run_{uuid.uuid4().hex[:10]}"
    produced = await otel_producer(
        {
            "redis": REDIS_URL,
            "queue": clean_queue,
            "jobs": [
                {
                    "name": "workflow_run",
                    "data": {
                        "workflowRunId": run_id,
                        "workflowVersionId": "wfv_otel",
                        "tenantId": "ten_otel",
                        "input": {},
                    },
                    "opts": {"jobId": run_id},
                }
            ],
        }
    )
    assert produced["ids"] == [run_id]
    (producer_span,) = [s for s in produced["spans"] if s["kind"] == "PRODUCER"]
    assert producer_span["traceId"] == produced["traceId"]

    # When: the runner reads the job the way it consumes it and traces one run of it, whose one
    # step makes two attempts to a URL carrying a secret in its userinfo, query and fragment.
    queue = Queue(clean_queue, {"connection": REDIS_URL})
    try:
        job = await queue.getJob(run_id)
    finally:
        await queue.close()
    assert job is not None
    carrier_json = job.opts["tm"]
    assert json.loads(carrier_json)["traceparent"].split("-")[1:3] == [
        produced["traceId"],
        producer_span["spanId"],
    ]
    tel = telemetry.from_env(queue_name=clean_queue)
    assert tel.enabled
    secret_url = (
        f"https://svc:{CANARY}@api.example.test:8443/customers/42?api_key={CANARY}#{CANARY}"
    )

    async def run_step(run: telemetry.RunSpan) -> None:
        with run.step("fetch_customer") as step:
            with step.attempt("GET", secret_url, 1) as attempt:
                attempt.response(503)
                attempt.error("HTTP_ERROR", 200)
            with step.attempt("GET", secret_url, 2) as attempt:
                attempt.response(200)
            step.end("SUCCESS", 2, 230, None)

    queue_wait_ms = int(time.time() * 1000) - job.timestamp
    with tel.run_span(
        carrier_json=carrier_json,
        run_id=job.data["workflowRunId"],
        tenant_id=job.data["tenantId"],
        version_id=job.data["workflowVersionId"],
        job_id=job.id,
        queue_wait_ms=queue_wait_ms,
    ) as run:
        # The engine runs each step as its own task.
        await asyncio.create_task(run_step(run))
        run.end("SUCCESS", None)
    # Blocking flush: off the loop, so the receiver on this loop can answer it.
    await asyncio.to_thread(tel.shutdown)

    # Then: one trace under the producer's trace id, nested producer → run → step → attempts.
    spans = otlp_receiver.spans()
    assert len(spans) == 4, [s.name for _, s in spans]
    assert {s.trace_id.hex() for _, s in spans} == {produced["traceId"]}
    assert {r["service.name"] for r, _ in spans} == {"runner-under-test"}
    by_kind: dict[int, list[Span]] = {}
    for _, s in spans:
        by_kind.setdefault(s.kind, []).append(s)
    (run_span,) = by_kind[Span.SPAN_KIND_CONSUMER]
    (step_span,) = by_kind[Span.SPAN_KIND_INTERNAL]
    attempts = sorted(by_kind[Span.SPAN_KIND_CLIENT], key=lambda s: s.start_time_unix_nano)
    assert len(attempts) == 2

    assert run_span.name == f"process {clean_queue}"
    assert run_span.parent_span_id.hex() == producer_span["spanId"]
    assert _attrs(run_span) | {"workflow.queue_wait_ms": None} == {
        "bullmq.queue.name": clean_queue,
        "bullmq.queue.operation": "process",
        "bullmq.worker.name": "",
        "bullmq.job.id": run_id,
        "bullmq.job.name": "workflow_run",
        "messaging.system": "bullmq",
        "messaging.operation.type": "process",
        "messaging.destination.name": clean_queue,
        "messaging.message.id": run_id,
        "workflow.run_id": run_id,
        "workflow.tenant_id": "ten_otel",
        "workflow.version_id": "wfv_otel",
        "workflow.queue_wait_ms": None,
        "workflow.run.status": "SUCCESS",
    }
    assert step_span.name == "step fetch_customer"
    assert step_span.parent_span_id == run_span.span_id
    for attempt in attempts:
        assert attempt.name == "GET"
        assert attempt.parent_span_id == step_span.span_id
    first, second = (_attrs(a) for a in attempts)
    assert first["url.full"] == second["url.full"] == "https://api.example.test:8443/customers/42"
    assert (first["server.address"], first["server.port"]) == ("api.example.test", 8443)
    assert (first["http.response.status_code"], first["error.type"]) == (503, "503")
    assert "http.request.resend_count" not in first
    assert (second["http.response.status_code"], second["http.request.resend_count"]) == (200, 1)
    assert "error.type" not in second

    # Then: the metrics of the run arrived at the same receiver.
    points = otlp_receiver.metric_points()
    runs = [(_point_attrs(p), p.as_int) for p in points["workflow.runs"]]
    assert runs == [({"workflow.run.status": "SUCCESS"}, 1)]
    assert [p.as_int for p in points["workflow.step.attempts"]] == [2]
    assert [p.as_int for p in points["workflow.step.retries"]] == [1]
    assert [(p.count, p.sum) for p in points["workflow.step.duration"]] == [(1, 230)]
    assert [p.count for p in points["workflow.queue.wait"]] == [1]

    # Then: the secret is in no exported byte (span, resource or metric).
    assert otlp_receiver.bodies
    assert all(CANARY.encode() not in body for body in otlp_receiver.bodies)


def _point_attrs(point: Any) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in point.attributes}


async def test_a_real_runner_traces_a_node_produced_run_under_the_producers_trace(
    otlp_receiver: OtlpReceiver, clean_queue: str, runner_process: Any, serve: Any, redis: Any
) -> None:
    # Given: a target that fails once then answers, and a runner configured only by OTEL_*.
    answers = iter([503, 200])

    seen_headers: list[dict[str, str]] = []

    async def target(request: web.Request) -> web.Response:
        seen_headers.append({k.lower(): v for k, v in request.headers.items()})
        return web.json_response({"ok": True}, status=next(answers, 200))

    app = web.Application()
    app.router.add_get("/thing", target)
    base = await serve(app)
    clean_env = {n: "" for n in os.environ if n.startswith("OTEL_")}
    runner = await runner_process(
        **clean_env,
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.url,
        OTEL_SERVICE_NAME="runner-process",
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    run_id = f"run_{uuid.uuid4().hex[:10]}"
    version = {
        "id": "wfv_traced",
        "graph": {"steps": [{"key": "fetch", "actionId": "get"}]},
        "actions": {
            "get": {
                "id": "get",
                "method": "GET",
                "endpointTemplate": f"{base}/thing",
                "retryStrategy": "FIXED",
                "maxAttempts": 2,
                "initialDelayMs": 10,
            }
        },
    }
    # When: a traced Node producer adds the job and the runner runs it.
    produced = await otel_producer(
        {
            "redis": REDIS_URL,
            "queue": clean_queue,
            "jobs": [
                {
                    "name": "workflow_run",
                    "data": {
                        "workflowRunId": run_id,
                        "workflowVersionId": "wfv_traced",
                        "tenantId": "ten_otel",
                        "input": {},
                        "workflowVersion": version,
                    },
                    "opts": {"jobId": run_id},
                }
            ],
        }
    )
    (producer_span,) = [s for s in produced["spans"] if s["kind"] == "PRODUCER"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if await redis.zscore(f"bull:{clean_queue}:completed", run_id) is not None:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the traced run did not complete")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(otlp_receiver.spans()) < 4:
        await asyncio.sleep(0.05)

    # Then: run, step and both attempts are one trace under the producer's span.
    spans = [s for _, s in otlp_receiver.spans()]
    assert {s.trace_id.hex() for s in spans} == {produced["traceId"]}
    (run_span,) = [s for s in spans if s.kind == Span.SPAN_KIND_CONSUMER]
    (step_span,) = [s for s in spans if s.kind == Span.SPAN_KIND_INTERNAL]
    attempts = [s for s in spans if s.kind == Span.SPAN_KIND_CLIENT]
    assert run_span.name == f"process {clean_queue}"
    assert _attrs(run_span)["bullmq.worker.name"] == "test-runner-0"
    assert run_span.parent_span_id.hex() == producer_span["spanId"]
    assert step_span.parent_span_id == run_span.span_id
    assert len(attempts) == 2 and {a.parent_span_id for a in attempts} == {step_span.span_id}
    assert sorted(_attrs(a)["http.response.status_code"] for a in attempts) == [200, 503]

    # Then: each request carried a traceparent naming its own attempt span, so the called API's
    # trace joins this one.
    by_start = sorted(attempts, key=lambda s: s.start_time_unix_nano)
    assert [h["traceparent"] for h in seen_headers] == [
        f"00-{produced['traceId']}-{a.span_id.hex()}-01" for a in by_start
    ]

    # Then: the log lines made inside the run name its trace, with ISO-8601 timestamps, and one
    # info line tells how the run ended.
    events = runner.log_events()
    (finished,) = [e for e in events if e.get("event") == "run.finished"]
    assert {k: finished[k] for k in ("runId", "status", "steps", "attempts", "jobAttempt")} == {
        "runId": run_id,
        "status": "SUCCESS",
        "steps": 1,
        "attempts": 2,
        "jobAttempt": 1,
    }
    assert finished["trace_id"] == produced["traceId"]
    assert finished["span_id"] == run_span.span_id.hex()
    assert isinstance(finished["durationMs"], int)
    assert all(datetime.fromisoformat(e["ts"]).tzinfo is not None for e in events)


OTEL_WORKER = ROOT / "tests" / "node" / "otel-worker.mjs"


async def test_a_node_workers_telemetry_and_the_runners_side_by_side_in_one_receiver(
    otlp_receiver: OtlpReceiver,
    clean_queue: str,
    runner_process: Any,
    serve: Any,
    redis: Any,
) -> None:
    # Given: a Node BullMQ Worker with bullmq-otel on one queue and the runner on another, both
    # exporting to the same OTLP receiver
    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/ok", ok)
    base = await serve(app)
    node_queue = f"{clean_queue}-node"
    clean_env = {n: "" for n in os.environ if n.startswith("OTEL_")}
    runner = await runner_process(
        **clean_env,
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.url,
        OTEL_SERVICE_NAME="runner-side",
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_METRIC_EXPORT_INTERVAL="600000",
    )
    version = {
        "id": "wfv_side",
        "graph": {"steps": [{"key": "call", "actionId": "a"}]},
        "actions": {
            "a": {
                "id": "a",
                "method": "GET",
                "endpointTemplate": f"{base}/ok",
                "retryStrategy": "NONE",
            }
        },
    }
    count = 3
    try:
        worker = asyncio.create_task(
            _node_json(
                OTEL_WORKER,
                {
                    "redis": REDIS_URL,
                    "queue": node_queue,
                    "endpoint": otlp_receiver.url,
                    "serviceName": "node-side",
                    "workerName": "node-worker-1",
                    "count": count,
                },
            )
        )
        # When: each gets the same batch of jobs, added by Node
        for queue in (node_queue, clean_queue):
            jobs = [
                {
                    "data": {
                        "workflowRunId": f"run_side_{n}",
                        "workflowVersionId": "wfv_side",
                        "tenantId": "ten_side",
                        "input": {},
                        "workflowVersion": version,
                    },
                    "opts": {"jobId": f"run_side_{n}"},
                }
                for n in range(count)
            ]
            await node_peer("add", {"redis": REDIS_URL, "queue": queue, "jobs": jobs})
        assert await asyncio.wait_for(worker, 60) == {"processed": count, "failed": 0}
        deadline = time.monotonic() + 20
        while await redis.zcard(f"bull:{clean_queue}:completed") < count:
            assert time.monotonic() < deadline, "the runner did not complete its batch"
            await asyncio.sleep(0.05)
        # SIGTERM flushes the runner's metrics; waited for without blocking this loop, which
        # serves the receiver.
        runner.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while runner.proc.poll() is None:
            assert time.monotonic() < deadline, "the runner did not stop"
            await asyncio.sleep(0.05)
        assert runner.proc.returncode == 0
    finally:
        keys = [k async for k in redis.scan_iter(match=f"bull:{node_queue}:*", count=1000)]
        if keys:
            await redis.delete(*keys)

    # Then: the consumer spans of both have BullMQ's shape, told apart by service.name
    consumers: dict[str, list[Span]] = {}
    for resource, span in otlp_receiver.spans():
        if span.kind == Span.SPAN_KIND_CONSUMER:
            consumers.setdefault(resource["service.name"], []).append(span)
    assert set(consumers) == {"node-side", "runner-side"}
    shape_keys = {
        "bullmq.queue.name",
        "bullmq.queue.operation",
        "bullmq.worker.name",
        "bullmq.job.id",
        "bullmq.job.name",
    }
    for service, queue, worker_name in [
        ("node-side", node_queue, "node-worker-1"),
        ("runner-side", clean_queue, "test-runner-0"),
    ]:
        spans = consumers[service]
        assert len(spans) == count, service
        for span in spans:
            assert span.name == f"process {queue}", service
            attrs = _attrs(span)
            assert shape_keys <= set(attrs), (service, attrs)
            assert attrs["bullmq.queue.name"] == queue
            assert attrs["bullmq.queue.operation"] == "process"
            assert attrs["bullmq.worker.name"] == worker_name
            assert attrs["bullmq.job.name"] == "workflow_run"
        assert sorted(_attrs(s)["bullmq.job.id"] for s in spans) == [
            f"run_side_{n}" for n in range(count)
        ]
    # and the runner keeps its own messaging.* and workflow.* attributes beside them
    assert {"messaging.system", "workflow.run_id"} <= set(_attrs(consumers["runner-side"][0]))

    # Then: BullMQ's job metrics arrive under the same names, units and attribute keys
    by_service = _metrics_by_service(otlp_receiver)
    for service, queue in [("node-side", node_queue), ("runner-side", clean_queue)]:
        got = by_service[service]
        # Cumulative points: the last export holds the totals (Node exports doubles, Python ints).
        completed = got["bullmq.jobs.completed"]["points"]
        assert {tuple(sorted(_point_attrs(p).items())) for p in completed} == {
            (
                ("bullmq.job.name", "workflow_run"),
                ("bullmq.job.state", "completed"),
                ("bullmq.queue.name", queue),
            )
        }, service
        assert max(p.as_int or p.as_double for p in completed) == count, service
        assert got["bullmq.job.duration"]["unit"] == "ms", service
        assert max(p.count for p in got["bullmq.job.duration"]["points"]) == count, service
    names = {service: set(got) for service, got in by_service.items()}
    assert (
        names["node-side"] & {"bullmq.jobs.completed", "bullmq.job.duration"}
        <= names["runner-side"]
    )
    # and the runner's HTTP client metric follows the semantic convention
    http = by_service["runner-side"]["http.client.request.duration"]
    assert http["unit"] == "s"
    assert max(p.count for p in http["points"]) == count


def _metrics_by_service(receiver: OtlpReceiver) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for req in receiver.metrics:
        for rm in req.resource_metrics:
            resource = {a.key: _value(a.value) for a in rm.resource.attributes}
            service = out.setdefault(str(resource.get("service.name")), {})
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    entry = service.setdefault(m.name, {"unit": m.unit, "points": []})
                    entry["points"].extend(getattr(m, kind).data_points)
    return out


async def _node_json(script: Path, spec: dict[str, Any], timeout_s: float = 90) -> Any:
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(script),
        "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(json.dumps(spec).encode()), timeout_s)
    assert proc.returncode == 0, f"{script.name} failed: {err.decode()}"
    return json.loads(out.decode().strip().splitlines()[-1])
