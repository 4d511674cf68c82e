"""Run identity for jobs the control plane did not name (CONTRACT "Run identity").

A Node job scheduler repeats the same job data, ``workflowRunId`` included, under generated job
ids ``repeat:<scheduler>:<millis>``. Each iteration must be a run of its own: it calls the API,
has its own checkpoint, ``seq``, start, status rows (the status sink's) and cancel target.
Real Redis, a real runner process, the Node producer, the Node status sink and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

import psycopg
import pytest
from aiohttp import web

from tests.conftest import node_peer, read_stream
from tests.integration.harness import action, step, version
from tests.integration.test_status_sink import (  # noqa: F401  (fixtures)
    Sink,
    _sink_installed,
    database_url,
    r,
    start_sink,
    stream,
)
from tests.workflows import job_data

pytestmark = pytest.mark.integration


def _api(
    calls: list[dict[str, Any]],
    hang_first: asyncio.Event | None = None,
    release: asyncio.Event | None = None,
) -> web.Application:
    async def ping(request: web.Request) -> web.Response:
        calls.append({"key": request.headers.get("Idempotency-Key")})
        if hang_first is not None and release is not None and len(calls) == 1:
            hang_first.set()
            await asyncio.wait_for(release.wait(), 30)
        return web.json_response({"n": len(calls)})

    app = web.Application()
    app.router.add_post("/ping", ping)
    return app


def _version(base: str) -> dict[str, Any]:
    return version(
        [step("ping")],
        [action(f"{base}/ping", method="POST", idempotencyHeader="Idempotency-Key")],
        version_id="wfv_sched",
    )


async def test_each_scheduler_iteration_is_a_run_of_its_own(
    serve: Any,
    runner_process: Any,
    clean_queue: str,
    redis: Any,
    stream: str,  # noqa: F811
    database_url: str,  # noqa: F811
    start_sink: Any,  # noqa: F811
) -> None:
    # Given an API, a runner writing to the sink's stream and the Node status sink
    calls: list[dict[str, Any]] = []
    base = await serve(_api(calls))
    await runner_process(RUNNER_STATUS_STREAM=stream)
    sink: Sink = start_sink(database_url)
    sink.wait_started()

    # When a job scheduler repeats the same job data three times
    data = job_data("run_sched", _version(base))
    report = await node_peer(
        "schedule",
        {
            "queue": clean_queue,
            "schedulerId": "every-700",
            "repeat": {"every": 700},
            "template": {"name": "workflow_run", "data": data},
            "iterations": 3,
        },
    )

    # Then every iteration called the API, each with an idempotency key of its own
    jobs = report["jobs"]
    assert len(jobs) >= 3, jobs
    ids = list(jobs)[:3]
    assert all(job_id.startswith("repeat:every-700:") for job_id in ids)
    assert all(jobs[i]["state"] == "completed" for i in ids), jobs
    run_ids = [jobs[i]["returnvalue"]["workflowRunId"] for i in ids]
    assert run_ids == [f"run_sched:{i}" for i in ids]
    keys = [c["key"] for c in calls]
    assert len(calls) >= 3 and len(set(keys)) == len(keys), calls
    assert keys[:3] == [f"{rid}:ping" for rid in run_ids]

    # and each iteration's events are a run of their own: seq from 1, started at its own start
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in await read_stream(redis, stream):
        by_run[event["workflowRunId"]].append(event)
    for job_id, run_id in zip(ids, run_ids, strict=True):
        events = by_run[run_id]
        assert [e["seq"] for e in events] == [1, 2, 3, 4], events
        assert {e["jobId"] for e in events} == {job_id}
        started = events[0]["startedAt"]
        timestamp = int(job_id.rsplit(":", 1)[1])
        assert started >= timestamp, (job_id, started)  # not the first iteration's start
    assert "run_sched" not in by_run

    # and the status sink wrote one row per iteration
    def rows() -> list[tuple[str, str, str]]:
        with psycopg.connect(database_url) as conn:
            return conn.execute(
                "SELECT id, job_id, status FROM workflow_runs WHERE id = ANY(%s) ORDER BY id",
                (run_ids,),
            ).fetchall()

    done = sink.wait(lambda: len(rows()) == 3 and rows(), "three iteration rows")
    assert sorted(done) == sorted(
        (rid, jid, "SUCCESS") for rid, jid in zip(run_ids, ids, strict=True)
    )
    with psycopg.connect(database_url) as conn:
        steps = conn.execute(
            "SELECT workflow_run_id FROM step_runs WHERE workflow_run_id = ANY(%s)", (run_ids,)
        ).fetchall()
    assert sorted(s[0] for s in steps) == sorted(run_ids)


async def test_a_cancel_stops_one_iteration_not_the_next(
    serve: Any, runner_process: Any, clean_queue: str, redis: Any
) -> None:
    # Given an API whose first call hangs
    calls: list[dict[str, Any]] = []
    hanging, release = asyncio.Event(), asyncio.Event()
    base = await serve(_api(calls, hanging, release))
    await runner_process()
    data = job_data("run_sched_c", _version(base))
    spec = {
        "queue": clean_queue,
        "schedulerId": "every-500",
        "repeat": {"every": 500},
        "template": {"name": "workflow_run", "data": data},
        "iterations": 2,
    }
    scheduled = asyncio.ensure_future(node_peer("schedule", spec))

    # When the control plane cancels the hanging iteration by the run id it was reported under
    await asyncio.wait_for(hanging.wait(), 15)
    first_run = calls[0]["key"].rsplit(":", 1)[0]
    assert first_run.startswith("run_sched_c:repeat:every-500:")
    await node_peer("cancel", {"queue": clean_queue, "runId": first_run, "reason": "stop it"})
    report = await scheduled
    release.set()

    # Then that iteration ended CANCELED, and the next one ran and succeeded
    jobs = report["jobs"]
    states = [(j["state"], j["failedReason"]) for j in jobs.values()]
    assert states[0] == ("failed", "CANCELED: stop it"), jobs
    assert ("completed", None) in states[1:], jobs
    assert len(calls) >= 2
    # and the cancel key names that iteration only: the scheduler's template run is untouched
    assert await redis.get(f"bull:{clean_queue}:cancel:run_sched_c") is None
    assert json.dumps(jobs).count("CANCELED") == 1
