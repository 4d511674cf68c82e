"""A control plane that is down or answers 5xx is infrastructure's fault, not the definition's.

Real control-plane servers (one answering 503, a port nobody listens on), a real runner process,
the Node producer. The failure is retried under the job's ``attempts`` with its reason kept in
``failedReason`` (as a Node Worker keeps the error's message), and after the last attempt the
run is reported FAILED once, with ``CONTROL_PLANE_UNAVAILABLE``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import free_port, node_peer, read_stream
from tests.workflows import job_data

pytestmark = pytest.mark.integration


def _unavailable(calls: list[str]) -> web.Application:
    async def version(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.Response(status=503, text="maintenance")

    app = web.Application()
    app.router.add_get("/runner/v1/workflow-versions/{vid}", version)
    return app


async def _failed_reason_while_retrying(redis: Any, queue: str, job_id: str) -> str | None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        key = f"bull:{queue}:{job_id}"
        if await redis.zscore(f"bull:{queue}:delayed", job_id) is not None:
            reason = await redis.hget(key, "failedReason")
            return reason.decode() if reason is not None else None
        await asyncio.sleep(0.02)
    return None


async def test_a_503_is_retried_with_its_reason_and_fails_as_control_plane_unavailable(
    serve: Any, runner_process: Any, clean_queue: str, redis: Any
) -> None:
    # Given a control plane that answers 503
    calls: list[str] = []
    base = await serve(_unavailable(calls))
    await runner_process(RUNNER_CONTROL_PLANE_URL=base, RUNNER_CONTROL_PLANE_TOKEN="cp-token-1")

    # When a run that needs its definition has two attempts
    run_id = "run_cp_503"
    opts = {"jobId": run_id, "attempts": 2, "backoff": {"type": "fixed", "delay": 1500}}
    spec = {
        "queue": clean_queue,
        "jobs": [{"data": job_data(run_id, None, version_id="wfv_remote"), "opts": opts}],
    }
    running = asyncio.ensure_future(node_peer("run", spec))

    # Then, while it waits for its retry, its failedReason keeps the 503
    expected = (
        "CONTROL_PLANE_UNAVAILABLE: control plane answered 503 for workflow version 'wfv_remote'"
    )
    assert await _failed_reason_while_retrying(redis, clean_queue, run_id) == expected

    # and after the last attempt the job failed with the same reason
    job = (await running)["jobs"][run_id]
    assert (job["state"], job["attemptsMade"], job["failedReason"]) == ("failed", 2, expected)
    assert len(calls) == 2
    # and the stream has one terminal event, after the last attempt, with that code
    events = [
        (e["status"], e["errorCode"])
        for e in await read_stream(redis, f"bull:{clean_queue}:status")
        if e["workflowRunId"] == run_id
    ]
    assert events == [("RUNNING", None), ("FAILED", "CONTROL_PLANE_UNAVAILABLE")]


async def test_a_control_plane_that_refuses_connections_is_not_a_definition_error(
    runner_process: Any, clean_queue: str, redis: Any
) -> None:
    # Given a control plane URL where nothing listens
    await runner_process(
        RUNNER_CONTROL_PLANE_URL=f"http://127.0.0.1:{free_port()}",
        RUNNER_CONTROL_PLANE_TOKEN="cp-token-2",
    )

    # When a run that needs its definition has one attempt
    run_id = "run_cp_down"
    spec = {
        "queue": clean_queue,
        "jobs": [
            {"data": job_data(run_id, None, version_id="wfv_remote"), "opts": {"jobId": run_id}}
        ],
    }
    job = (await node_peer("run", spec))["jobs"][run_id]

    # Then it fails as the control plane's unavailability, naming what it could not reach
    assert job["state"] == "failed"
    assert job["failedReason"] == (
        "CONTROL_PLANE_UNAVAILABLE: control plane unreachable for workflow version 'wfv_remote':"
        " ClientConnectorError"
    )
    final = [
        e
        for e in await read_stream(redis, f"bull:{clean_queue}:status")
        if e["workflowRunId"] == run_id and e["status"] != "RUNNING"
    ]
    assert [(e["status"], e["errorCode"]) for e in final] == [
        ("FAILED", "CONTROL_PLANE_UNAVAILABLE")
    ]
