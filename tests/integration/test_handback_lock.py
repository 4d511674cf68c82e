"""A SIGTERM hand-back never leaves an active job without its lock (issue 21, item 4).

The incident: a run in flight past the shutdown grace, in a process with telemetry on and a
custom worker name; at the hand-back ``job.internal_error TypeError`` (bullmq's "Missing lock
for job ... moveToDelayed") then "Missing lock ... retryJob", and the job stayed active with no
lock until another worker's stalled check took it. The cause: the worker loop closed the lock
manager as soon as it stopped taking jobs, so no lock was renewed during the grace; a grace
longer than the lock's duration (the defaults: 30 s and 30 s) always lost it. Here the lock
lasts 1 s and the grace 3 s.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from bullmq import Job, Queue
from bullmq.custom_errors import DelayedError

from runner.engine.ports import StepResult, SystemClock
from runner.engine.run import RunOutcome
from runner.log import log
from runner.queue.keys import Keys
from runner.reporting.stream import RedisStatusSink
from runner.resp import RespConnection
from runner.runs import RunService
from tests.conftest import REDIS_URL, node_peer
from tests.integration.test_resilience import Target, job_state, linear_version, wait_for
from tests.workflows import job_data

pytestmark = pytest.mark.integration


async def test_a_run_past_the_grace_is_handed_back_to_delayed_under_its_still_renewed_lock(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given a runner with telemetry on, a custom worker name, 1 s locks and a 3 s grace
    async def otlp(_: web.Request) -> web.Response:
        return web.Response(status=200)

    collector = web.Application()
    collector.router.add_post("/{tail:.*}", otlp)
    otlp_base = await serve(collector)
    target = Target()
    target.scripts["/two"] = ["hang"]
    base = await serve(target.app())
    runner = await runner_process(
        RUNNER_WORKER_NAME="handback-worker-7",
        RUNNER_LOCK_DURATION_MS="1000",
        RUNNER_SHUTDOWN_GRACE_S="3",
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_base,
        OTEL_METRIC_EXPORT_INTERVAL="500",
    )
    run_id = "run_handback"
    data = job_data(run_id, linear_version(base, "wfv_handback"))
    await node_peer(
        "add", {"queue": clean_queue, "jobs": [{"data": data, "opts": {"jobId": run_id}}]}
    )
    await asyncio.wait_for(target.arrival("/two").wait(), 15)
    lock = f"bull:{clean_queue}:{run_id}:lock"

    # When it is told to stop while a step hangs past the grace
    runner.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(2)  # twice the lock's duration into the grace
    # Then the lock is still held (renewed while the run is in flight)
    assert await redis.exists(lock) == 1, "the lock expired during the shutdown grace"
    assert await asyncio.to_thread(runner.proc.wait, 20) == 0

    # and the job was handed back to delayed, not left active (with or without a lock)
    async def handed_back() -> bool:
        return await job_state(redis, clean_queue, run_id) in ("delayed", "waiting")

    await wait_for(handed_back, 5, "the job to leave the active list")
    assert await redis.exists(lock) == 0
    events = runner.log_events()
    back = [e for e in events if e.get("event") == "run.handed_back"]
    assert [(e["to"], e["steps"]) for e in back] == [("delayed", ["two"])], back
    assert not [e for e in events if e.get("event") in ("job.internal_error", "worker.error")]
    job = await redis.hgetall(f"bull:{clean_queue}:{run_id}")
    assert b"failedReason" not in job, job


async def test_a_hand_back_that_finds_its_lock_gone_leaves_the_job_to_the_stalled_check(
    clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given a real BullMQ job this delivery does not hold the lock of (bullmq's moveToDelayed
    # then raises its TypeError "Missing lock for job ... moveToDelayed")
    queue = Queue(clean_queue, {"connection": REDIS_URL})
    connection = RespConnection(REDIS_URL, timeout_s=10)
    try:
        await queue.add("workflow_run", {}, {"jobId": "run_lost"})
        job = await Job.fromId(queue, "run_lost")
        keys = Keys("bull", clean_queue)
        service = RunService(
            definitions=None,  # type: ignore[arg-type]  # _defer needs none of these
            credentials=None,  # type: ignore[arg-type]
            engine=None,  # type: ignore[arg-type]
            sink=RedisStatusSink(connection, stream=f"bull:{clean_queue}:status", keys=keys),
            execlog=None,  # type: ignore[arg-type]
            clock=SystemClock(),
            cancels=None,  # type: ignore[arg-type]
            worker_id="w",
            max_job_bytes=1,
        )
        deferred = {"two": StepResult("two", "DEFERRED", next_attempt=2)}
        out = io.StringIO()
        log.configure(level="info", stream=out)

        # When the run is handed back with a token that holds no lock
        with pytest.raises(DelayedError):
            await service._defer(
                job, "not-the-lock", "run_lost", RunOutcome("DEFERRED", None, {}, deferred)
            )
    finally:
        await queue.close()
        connection.close()

    # Then nothing but DelayedError left (BullMQ does nothing more with the job), and the log
    # says the job is left to the stalled check, and why
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    back = [e for e in lines if e["event"] == "run.handed_back"]
    assert [(e["to"], e["steps"]) for e in back] == [("stalled-check", ["two"])], back
    assert back[0]["reason"].startswith("TypeError: "), back
    # and the resume point is kept for whichever delivery comes next
    assert await redis.hget(f"bull:{clean_queue}:run:run_lost", "resume:two") == b"2"
