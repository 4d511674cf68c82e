"""``RUNNER_PROCESSES``: one command per host runs several supervised runner processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest

from tests.conftest import node_peer
from tests.workflows import job_data

pytestmark = pytest.mark.integration


def started_pids(runner: Any) -> list[int]:
    return [e["pid"] for e in runner.log_events() if e.get("event") == "supervisor.started_child"]


async def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_two_processes_share_the_queue_and_a_dead_one_is_restarted(
    runner_process: Any, clean_queue: str, serve: Any
) -> None:
    from aiohttp import web

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"id": "x"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    base = await serve(app)
    runner = await runner_process(
        wait_ready=False, RUNNER_PROCESSES="2", RUNNER_WORKER_NAME="host-a"
    )

    await wait_until(
        lambda: len([e for e in runner.log_events() if e.get("event") == "runner.started"]) == 2,
        20,
        "two runners",
    )
    first, second = started_pids(runner)

    # When one child dies, the supervisor starts another in its place
    os.kill(first, signal.SIGKILL)
    await wait_until(lambda: len(started_pids(runner)) == 3, 10, "a restarted child")
    assert any(e.get("event") == "supervisor.child_died" for e in runner.log_events())
    await wait_until(
        lambda: len([e for e in runner.log_events() if e.get("event") == "runner.started"]) == 3,
        20,
        "the restarted runner",
    )

    # and both processes serve the queue, each under its own name
    version = {
        "id": "wfv_sup",
        "graph": {"steps": [{"key": "one", "actionId": "a"}]},
        "actions": {"a": {"id": "a", "endpointTemplate": f"{base}/x"}},
    }
    jobs = [
        {"data": job_data(f"run_s{i}", version), "opts": {"jobId": f"run_s{i}"}} for i in range(20)
    ]
    report = await node_peer("run", {"queue": clean_queue, "jobs": jobs})
    assert all(j["state"] == "completed" for j in report["jobs"].values())
    seen_workers = {j["processedBy"] for j in report["jobs"].values()}
    assert seen_workers <= {"host-a-0", "host-a-1"} and seen_workers

    # When the supervisor is told to stop, every child stops and it exits 0
    assert runner.terminate(signal.SIGTERM, timeout_s=40) == 0
    for pid in (second, started_pids(runner)[-1]):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
