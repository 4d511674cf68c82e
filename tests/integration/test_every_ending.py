"""Every ending is reported (issue 21): a job that ends failed in BullMQ, by whatever path, has
a terminal run event on the status stream with the errorCode of its failedReason; a failure
with job attempts left writes none.

The runtime is built as ``python -m runner`` builds it, in this process, against the real
Redis; a failure is injected in one layer at a time (decoding the definition, compiling the
plan, credentials, the engine, reporting a step, the bookkeeping after the run) for the runs
named ``boom*`` only, so the worker's next job shows it still serves.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from bullmq import Queue

from runner import definitions, runs
from runner.app import Runtime, build
from runner.engine.run import Engine
from runner.settings import Settings
from tests.conftest import REDIS_URL, read_stream

pytestmark = pytest.mark.integration

SECRET_LOOKING = "injected-failure-detail-never-reported"


def version(base: str, version_id: str) -> dict[str, Any]:
    return {
        "id": version_id,
        "graph": {"steps": [{"key": "call", "actionId": "get"}]},
        "actions": {"get": {"id": "get", "method": "GET", "endpointTemplate": f"{base}/ok"}},
    }


def job(run_id: str, base: str) -> dict[str, Any]:
    # Each run its own version id: the plan cache does not hide the definition layers.
    return {
        "workflowRunId": run_id,
        "workflowVersionId": f"wfv_{run_id}",
        "tenantId": "ten_endings",
        "input": {},
        "workflowVersion": version(base, f"wfv_{run_id}"),
    }


def boom(name: str) -> bool:
    return "boom" in name


def fail() -> None:
    raise TypeError(SECRET_LOOKING)


def inject(layer: str, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``layer`` raise a TypeError (a bug, not a RunnerError) for the boom runs."""
    service = runtime.service
    if layer == "definition decode":
        original_decode = definitions.decode_workflow_version

        def decode(raw: Any, where: str = "$") -> Any:
            if boom(str(raw.get("id"))):
                fail()
            return original_decode(raw, where)

        monkeypatch.setattr(definitions, "decode_workflow_version", decode)
    elif layer == "plan":
        original_compile = definitions.compile_plan

        def compile_plan(version: Any) -> Any:
            if boom(version.id):
                fail()
            return original_compile(version)

        monkeypatch.setattr(definitions, "compile_plan", compile_plan)
    elif layer == "credentials":
        original_resolve = service.credentials.resolve

        async def resolve(data: Any, plan: Any) -> Any:
            if boom(data.workflow_run_id):
                fail()
            return await original_resolve(data, plan)

        monkeypatch.setattr(service.credentials, "resolve", resolve)
    elif layer == "engine":
        original_step = Engine._step

        async def step(self: Engine, state: Any, sp: Any) -> Any:
            if boom(state.ctx.run_id):
                fail()
            return await original_step(self, state, sp)

        monkeypatch.setattr(Engine, "_step", step)
    elif layer == "reporting":
        sink = service.sink
        original_write = sink.write

        def write(*transitions: Any) -> Any:
            for t in transitions:
                if boom(t.run_id) and b'"stepKey"' in t.event:
                    fail()  # a step's event cannot be written; the run's can
            return original_write(*transitions)

        monkeypatch.setattr(sink, "write", write)
    elif layer == "finish":
        original_log_end = runs._log_run_end

        def log_end(job: Any, data: Any, *args: Any) -> None:
            if boom(data.workflow_run_id):
                fail()
            original_log_end(job, data, *args)

        monkeypatch.setattr(runs, "_log_run_end", log_end)
    else:
        raise AssertionError(layer)


@pytest.fixture
async def api() -> AsyncIterator[str]:
    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/ok", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


@pytest.fixture
async def runtime(clean_queue: str) -> AsyncIterator[Runtime]:
    settings = Settings.from_env(
        {
            "RUNNER_REDIS_URL": REDIS_URL,
            "RUNNER_QUEUE": clean_queue,
            "RUNNER_EGRESS_ALLOW": "127.0.0.0/8",
            "RUNNER_LOG_LEVEL": "error",
        }
    )
    built = await build(settings)
    yield built
    await built.worker.close(5.0)
    await built.close()


async def settle(queue: Queue, job_ids: list[str]) -> dict[str, Any]:
    jobs: dict[str, Any] = {}
    for _ in range(400):
        jobs = {jid: await queue.getJob(jid) for jid in job_ids}
        states = {jid: await queue.getJobState(jid) for jid in job_ids}
        if all(s in ("completed", "failed") for s in states.values()):
            return {jid: (states[jid], jobs[jid]) for jid in job_ids}
        await asyncio.sleep(0.05)
    raise AssertionError(f"jobs did not settle: {states}")


def run_events(events: list[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("workflowRunId") == run_id and "stepKey" not in e]


TERMINAL = {"SUCCESS", "FAILED", "CANCELED"}

LAYERS = ["definition decode", "plan", "credentials", "engine", "reporting", "finish"]


@pytest.mark.parametrize("layer", LAYERS)
async def test_a_failure_in_any_layer_is_reported_once_after_the_last_attempt(
    layer: str,
    runtime: Runtime,
    api: str,
    redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a failure injected in one layer, for the boom runs only
    inject(layer, runtime, monkeypatch)
    queue = Queue(runtime.settings.queue, {"connection": REDIS_URL})
    try:
        await runtime.execlog.startup()
        runtime.cancels.start()
        await runtime.worker.start()
        # When a boom job with one attempt, one with three, then a normal job run
        await queue.add("workflow_run", job("boom_once", api), {"jobId": "boom_once"})
        await queue.add(
            "workflow_run", job("boom_thrice", api), {"jobId": "boom_thrice", "attempts": 3}
        )
        jobs = await settle(queue, ["boom_once", "boom_thrice"])
        await queue.add("workflow_run", job("fine", api), {"jobId": "fine"})
        jobs.update(await settle(queue, ["fine"]))
    finally:
        await queue.close()
    events = await read_stream(redis, runtime.settings.stream_key)

    # Then each boom job failed in BullMQ with INTERNAL naming only the error's type
    for run_id, attempts in (("boom_once", 1), ("boom_thrice", 3)):
        state, bull_job = jobs[run_id]
        assert state == "failed", (run_id, state)
        assert bull_job.failedReason == "INTERNAL: TypeError", bull_job.failedReason
        assert bull_job.attemptsMade == attempts
        # and its run has exactly one terminal event, FAILED with that code: none was
        # written for the attempts that were retried
        ends = [e for e in run_events(events, run_id) if e["status"] in TERMINAL]
        assert [(e["status"], e["errorCode"]) for e in ends] == [("FAILED", "INTERNAL")], ends
        # and is its last event, after its RUNNING one (unless that write is what failed),
        # with seq rising
        statuses = [e["status"] for e in run_events(events, run_id)]
        assert statuses[-1] == "FAILED", statuses
        assert layer == "reporting" or "RUNNING" in statuses, statuses
        seqs = [e["seq"] for e in events if e.get("workflowRunId") == run_id]
        assert seqs == sorted(set(seqs)), seqs
    # and the worker still serves the next job
    assert jobs["fine"][0] == "completed", jobs["fine"]
    assert [e["status"] for e in run_events(events, "fine")] == ["RUNNING", "SUCCESS"]
    # and the injected message appears nowhere a user reads
    assert SECRET_LOOKING not in json.dumps(events)
    assert SECRET_LOOKING not in json.dumps([j.failedReason for _, j in jobs.values()])


async def test_a_job_whose_data_does_not_decode_names_no_run_and_reports_none(
    runtime: Runtime, api: str, redis: aioredis.Redis
) -> None:
    # Given job data that is not a run (the decode layer refuses it)
    queue = Queue(runtime.settings.queue, {"connection": REDIS_URL})
    try:
        await runtime.worker.start()
        await queue.add("workflow_run", {"workflowRunId": "no_run"}, {"jobId": "no_run"})
        jobs = await settle(queue, ["no_run"])
    finally:
        await queue.close()
    # Then it fails INVALID_PAYLOAD once, and nothing was RUNNING, so nothing is left to end
    state, bull_job = jobs["no_run"]
    assert state == "failed"
    assert bull_job.failedReason.startswith("INVALID_PAYLOAD: ")
    assert await read_stream(redis, runtime.settings.stream_key) == []
