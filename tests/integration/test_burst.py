"""Burst mode (``RUNNER_BURST``): the runner processes what is queued, then exits 0 by itself,
so that tests (and one-off drains) wait on the outcome instead of sleeping."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from tests.conftest import node_peer
from tests.integration.harness import action, step, version
from tests.workflows import job_data


async def test_burst_runs_every_queued_job_including_a_delayed_one_then_exits_0(
    serve: Any, runner_process: Any, clean_queue: str, redis: Any
) -> None:
    # Given an API and, already queued, five runs and one run delayed by 800 ms
    hits: list[str] = []

    async def ping(request: web.Request) -> web.Response:
        hits.append(request.query["run"])
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/ping", ping)
    base = await serve(app)
    definition = version(
        [step("ping", input={"query": {"run": "{{ run.id }}"}})],
        [action(f"{base}/ping")],
    )
    jobs = [
        {"data": job_data(f"run_b{i}", definition), "opts": {"jobId": f"run_b{i}"}}
        for i in range(5)
    ]
    jobs.append(
        {
            "data": job_data("run_late", definition),
            "opts": {"jobId": "run_late", "delay": 800},
        }
    )
    await node_peer("add", {"queue": clean_queue, "jobs": jobs})

    # When a runner starts in burst mode
    runner = await runner_process(wait_ready=False, RUNNER_BURST="true")
    code = await asyncio.to_thread(runner.proc.wait, 60)

    # Then it ran every job, the delayed one included, and stopped by itself with 0
    assert code == 0, runner.stderr()
    assert sorted(hits) == sorted([f"run_b{i}" for i in range(5)] + ["run_late"])
    completed = await redis.zrange(f"bull:{clean_queue}:completed", 0, -1)
    assert len(completed) == 6
    stopping = [e for e in runner.log_events() if e.get("event") == "runner.stopping"]
    assert [e["reason"] for e in stopping] == ["burst: queue drained"]


async def test_without_burst_the_runner_keeps_waiting_for_jobs(
    runner_process: Any, clean_queue: str
) -> None:
    # Given a runner on an empty queue, not in burst mode
    runner = await runner_process()

    # When the time a burst runner takes to notice an empty queue has passed several times over
    await asyncio.sleep(1.0)

    # Then it is still running, until told to stop
    assert runner.proc.poll() is None
    assert runner.terminate() == 0
