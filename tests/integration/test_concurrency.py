"""Many runs at once in one runner process: the slots are all used, never exceeded, and free up
as runs finish. Real Redis, a real runner, a local API that holds requests until released."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tests.conftest import node_peer
from tests.integration.test_resilience import linear_version, wait_for
from tests.workflows import job_data

pytestmark = pytest.mark.integration


class HoldingApi:
    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1
        return web.json_response({"id": "x1"})


async def test_every_slot_is_used_none_is_exceeded_and_the_rest_follow(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given a runner with 300 slots and 400 runs whose first request is held
    api = HoldingApi()
    base = await serve(api.app())
    await runner_process(RUNNER_CONCURRENCY="300")
    version = linear_version(base, "wfv_slots")
    jobs = [
        {"data": job_data(f"run_slot_{i}", version), "opts": {"jobId": f"run_slot_{i}"}}
        for i in range(400)
    ]
    await node_peer("add", {"queue": clean_queue, "jobs": jobs})

    # When the slots fill up, then all 300 runs are in flight, and no 301st starts
    async def all_slots_busy() -> bool:
        return api.in_flight >= 300

    await wait_for(all_slots_busy, 60, "300 requests in flight")
    await asyncio.sleep(1.0)
    assert api.in_flight == 300
    assert await redis.llen(f"bull:{clean_queue}:wait") == 100

    # And when the API answers, every run completes and the slots were never exceeded
    api.release.set()

    async def all_completed() -> bool:
        return await redis.zcard(f"bull:{clean_queue}:completed") == 400

    await wait_for(all_completed, 90, "all 400 runs to complete")
    assert api.peak == 300
    assert await redis.zcard(f"bull:{clean_queue}:failed") == 0
