"""``GET /metrics`` on ``RUNNER_HEALTH_PORT``: Prometheus text from a real runner process after a
batch of real runs (Node adds the jobs, a local API answers), parsed with prometheus-client's
own parser, names and values checked: BullMQ's job counters and queue gauges, the HTTP client
semantic convention's duration in seconds, the runner's ``workflow.*`` and its slot gauges.
"""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, node_peer
from tests.workflows import job_data

pytestmark = pytest.mark.integration

CONCURRENCY = 4


def _version(base: str, path: str, version_id: str) -> dict[str, Any]:
    return {
        "id": version_id,
        "graph": {"steps": [{"key": "call", "actionId": "act"}]},
        "actions": {
            "act": {
                "id": "act",
                "method": "GET",
                "endpointTemplate": f"{base}{path}",
                "retryStrategy": "NONE",
            }
        },
    }


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(
    got: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    matching = [v for (n, ls), v in got.items() if n == name and set(labels.items()) <= set(ls)]
    assert len(matching) == 1, (name, labels, [k for k in got if k[0] == name])
    return matching[0]


async def test_metrics_after_a_batch_name_every_instrument_with_its_value(
    runner_process: Any, serve: Any, clean_queue: str
) -> None:
    # Given: an API that answers /ok with 200 and /missing with 404, and a runner serving /metrics
    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def missing(_: web.Request) -> web.Response:
        return web.json_response({"no": 1}, status=404)

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/missing", missing)
    base = await serve(app)
    port = free_port()
    await runner_process(RUNNER_HEALTH_PORT=str(port), RUNNER_CONCURRENCY=str(CONCURRENCY))

    # When: a batch of five runs that succeed and two that fail on a 404 is run to its end
    good, bad = 5, 2
    jobs = [
        {
            "data": job_data(f"run_ok_{i}_{uuid.uuid4().hex[:6]}", _version(base, "/ok", "wfv_ok")),
        }
        for i in range(good)
    ] + [
        {"data": job_data(f"run_bad_{i}", _version(base, "/missing", "wfv_bad"))}
        for i in range(bad)
    ]
    for job in jobs:
        job["opts"] = {"jobId": job["data"]["workflowRunId"]}
    report = await node_peer("run", {"queue": clean_queue, "jobs": jobs})
    states = sorted(j["state"] for j in report["jobs"].values())
    assert states == ["completed"] * good + ["failed"] * bad

    # Then: /metrics answers Prometheus text with every instrument and the batch's values
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=")
            text = await response.text()
    got = samples(text)
    q = {"bullmq_queue_name": clean_queue}
    job = {**q, "bullmq_job_name": "workflow_run"}
    # BullMQ's names, as Node's worker records them
    assert value(got, "bullmq_jobs_completed_total", **job, bullmq_job_state="completed") == good
    assert value(got, "bullmq_jobs_failed_total", **job, bullmq_job_state="failed") == bad
    assert (
        value(got, "bullmq_job_duration_milliseconds_count", **job, bullmq_job_state="completed")
        == good
    )
    # The queue's depth per state, read from Redis at the scrape
    for state, expected in [
        ("completed", good),
        ("failed", bad),
        ("waiting", 0),
        ("active", 0),
        ("delayed", 0),
        ("prioritized", 0),
    ]:
        assert value(got, "bullmq_queue_jobs", **q, bullmq_queue_jobs_state=state) == expected
    # Runs in flight and free slots, now that the batch is done
    assert value(got, "workflow_runs_active", **q) == 0
    assert value(got, "workflow_worker_slots_free", **q) == CONCURRENCY
    # The HTTP client semantic convention: seconds, method, server, scheme, status
    http_labels = {
        "http_request_method": "GET",
        "server_address": "127.0.0.1",
        "url_scheme": "http",
    }
    assert (
        value(
            got,
            "http_client_request_duration_seconds_count",
            **http_labels,
            http_response_status_code="200",
        )
        == good
    )
    assert (
        value(
            got,
            "http_client_request_duration_seconds_count",
            **http_labels,
            http_response_status_code="404",
            error_type="404",
        )
        == bad
    )
    assert (
        0
        < value(
            got,
            "http_client_request_duration_seconds_sum",
            **http_labels,
            http_response_status_code="200",
        )
        < 60
    )
    # The runner's own
    assert value(got, "workflow_runs_total", workflow_run_status="SUCCESS") == good
    assert value(got, "workflow_runs_total", workflow_run_status="FAILED") == bad
    assert value(got, "workflow_step_attempts_total") == good + bad
