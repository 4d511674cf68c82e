"""Job completions through BullMQ's moveToFinished on the runner's raw connection: in batches,
through a lost script cache, with bullmq's own error for a job that lost its lock. In process,
on a Redis of the test's own (it flushes the script cache)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from bullmq import Queue

from runner.queue.worker import QueueWorker, redis_options
from runner.settings import Settings
from tests.integration.test_resilience import own_redis as own_redis_server
from tests.integration.test_resilience import wait_for

pytestmark = pytest.mark.integration

QUEUE = "finish-test"


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[str]:
    own = own_redis_server(tmp_path)
    own.start()
    yield own.url
    own.stop()


async def completed(client: aioredis.Redis) -> int:
    return int(await client.zcard(f"bull:{QUEUE}:completed"))


async def run_worker(
    url: str, handler: Any, jobs: int, concurrency: int
) -> tuple[QueueWorker, aioredis.Redis, Queue]:
    settings = Settings(redis_url=url, queue=QUEUE, concurrency=concurrency, worker_name="t1")
    worker = QueueWorker(settings, handler)
    await worker.start()
    queue = Queue(QUEUE, {"connection": redis_options(url, 10)})
    for i in range(jobs):
        await queue.add("workflow_run", {"n": i}, {"jobId": f"j{i}"})
    return worker, aioredis.Redis.from_url(url), queue


async def test_completions_that_arrive_together_share_a_round_trip(own_redis: str) -> None:
    release = asyncio.Event()
    started: list[str] = []

    async def handler(job: Any, token: str) -> dict[str, Any]:
        started.append(job.id)
        await release.wait()
        return {"ok": job.id, "name": "Zoë ✓"}

    worker, client, queue = await run_worker(own_redis, handler, jobs=20, concurrency=20)
    try:

        async def all_started() -> bool:
            return len(started) == 20

        await wait_for(all_started, 20, "20 jobs to start")
        before = worker.finishes.sent
        release.set()

        async def all_completed() -> bool:
            return await completed(client) == 20

        await wait_for(all_completed, 20, "20 completions")
        assert worker.finishes.sent - before <= 3, "20 completions released together"
        job = await client.hgetall(f"bull:{QUEUE}:j7")
        assert json.loads(job[b"returnvalue"]) == {"ok": "j7", "name": "Zoë ✓"}
        # Encoded by msgspec, not bullmq's json.dumps (which escapes to ASCII).
        assert "Zoë ✓".encode() in job[b"returnvalue"]
        assert job[b"pb"] == b"t1"  # processedBy: the name rides in the packed options
    finally:
        await worker.close(5)
        await queue.close()
        await client.aclose()


async def test_a_lost_script_cache_is_reloaded_and_no_completion_is_lost(own_redis: str) -> None:
    admin = aioredis.Redis.from_url(own_redis)

    async def handler(job: Any, token: str) -> dict[str, Any]:
        await admin.script_flush()  # as after a Redis restart without persistence of scripts
        return {"ok": job.id}

    worker, client, queue = await run_worker(own_redis, handler, jobs=5, concurrency=2)
    try:

        async def all_completed() -> bool:
            return await completed(client) == 5

        await wait_for(all_completed, 20, "5 completions through flushed script caches")
        assert await client.zcard(f"bull:{QUEUE}:failed") == 0
    finally:
        await worker.close(5)
        await queue.close()
        await client.aclose()
        await admin.aclose()


async def test_a_job_whose_lock_is_gone_gets_bullmqs_own_error(own_redis: str) -> None:
    admin = aioredis.Redis.from_url(own_redis)
    errors: list[str] = []

    async def handler(job: Any, token: str) -> str:
        await admin.delete(f"bull:{QUEUE}:{job.id}:lock")  # as if it had stalled away
        return "done"

    worker, client, queue = await run_worker(own_redis, handler, jobs=1, concurrency=1)
    assert worker.worker is not None
    worker.worker.on("error", lambda err, *args: errors.append(str(err)))
    try:

        async def reported() -> bool:
            return bool(errors)

        await wait_for(reported, 20, "the worker to report the failed completion")
        assert errors[0] == "Missing lock for job j0. moveToFinished"
        assert await completed(client) == 0
    finally:
        await worker.close(5)
        await queue.close()
        await client.aclose()
        await admin.aclose()
