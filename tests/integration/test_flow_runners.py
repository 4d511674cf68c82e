"""Flow control across two runner processes: real Redis, a real local API that enforces its
own budget, and two ``python -m runner`` sharing one connection's budget and breaker.

Each test would fail on a runner without flow control: the API's 429s (or 503s) are counted
on the server, where they happen."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tests.conftest import node_peer, read_stream
from tests.integration.test_resilience import wait_for
from tests.workflows import job_data

pytestmark = pytest.mark.integration


class BudgetApi:
    """Allows ``per_window`` requests per fixed window of ``window_s``; 429 beyond. With
    ``headers`` every answer says what is left (``RateLimit-Remaining``/``-Reset``) and a 429
    says ``Retry-After``; without, a 429 is all it says. ``down``: every request gets a 503."""

    def __init__(self, per_window: int, window_s: float = 1.0, *, headers: bool = True) -> None:
        self.per_window = per_window
        self.window_s = window_s
        self.headers = headers
        self.down = False
        self.ok_at: list[float] = []
        self.rejected = 0
        self.unavailable = 0
        self._window = -1
        self._used = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        if self.down:
            self.unavailable += 1
            return web.json_response({"error": "down"}, status=503)
        now = time.monotonic()
        window = int(now // self.window_s)
        if window != self._window:
            self._window, self._used = window, 0
        reset_s = max(1, math.ceil((window + 1) * self.window_s - now))
        if self._used >= self.per_window:
            self.rejected += 1
            headers = {}
            if self.headers:
                headers = {
                    "Retry-After": str(reset_s),
                    "RateLimit-Remaining": "0",
                    "RateLimit-Reset": str(reset_s),
                }
            return web.json_response({"error": "slow down"}, status=429, headers=headers)
        self._used += 1
        self.ok_at.append(now)
        headers = {}
        if self.headers:
            headers = {
                "RateLimit-Remaining": str(self.per_window - self._used),
                "RateLimit-Reset": str(reset_s),
            }
        return web.json_response({"id": "x"}, headers=headers)


def one_step_version(base: str, config: dict[str, Any], **action: Any) -> dict[str, Any]:
    return {
        "id": "wfv_flow",
        "graph": {"steps": [{"key": "call", "actionId": "get", "connectionId": "c"}]},
        "actions": {"get": {"id": "get", "method": "GET", "endpointTemplate": "/x", **action}},
        "connections": {"c": {"id": "c", "type": "NONE", "config": {"baseUrl": base, **config}}},
        "timeoutMs": 120_000,
    }


async def run_all(
    redis: aioredis.Redis, queue: str, version: dict[str, Any], n: int, timeout_s: float = 60
) -> None:
    jobs = [
        {"data": job_data(f"run_{i}", version), "opts": {"jobId": f"run_{i}"}} for i in range(n)
    ]
    await node_peer("add", {"queue": queue, "jobs": jobs})

    async def finished() -> bool:
        done = await redis.zcard(f"bull:{queue}:completed")
        failed = await redis.zcard(f"bull:{queue}:failed")
        return done + failed >= n

    await wait_for(finished, timeout_s, f"{n} runs to finish")


async def two_runners(runner_process: Any, **env: str) -> None:
    await asyncio.gather(
        runner_process(RUNNER_CONCURRENCY="20", **env),
        runner_process(RUNNER_CONCURRENCY="20", **env),
    )


async def test_two_runners_share_one_rate_limit_and_the_api_never_says_429(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given an API allowing 10 requests a second with no retries on the step, and a connection
    # limited to the same rate, and two runners of 20 slots each
    api = BudgetApi(10, headers=False)
    base = await serve(api.app())
    await two_runners(runner_process)
    version = one_step_version(base, {"rateLimit": {"requests": 10, "perMs": 1000}})

    # When 30 runs go at once
    await run_all(redis, clean_queue, version, 30)

    # Then every one succeeded and the API refused none
    assert await redis.zcard(f"bull:{clean_queue}:completed") == 30
    assert api.rejected == 0
    # and no second held more than the budget allows (10, plus one at its edge)
    for t in api.ok_at:
        assert sum(1 for u in api.ok_at if t <= u < t + 1.0) <= 11
    # and the runs that waited said why in their status events
    events = await read_stream(redis, f"bull:{clean_queue}:status")
    reasons = {e.get("waitReason") for e in events if e.get("kind") == "step"}
    assert "rate" in reasons


async def test_an_api_that_says_its_budget_pauses_every_runner_before_it_must_refuse(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given an API allowing 5 a second that tells what is left, a connection whose own limit is
    # far too generous, and steps that retry
    api = BudgetApi(5, headers=True)
    base = await serve(api.app())
    await two_runners(runner_process)
    version = one_step_version(
        base,
        {"rateLimit": {"requests": 100, "perMs": 1000, "burst": 2}},
        retryStrategy="FIXED",
        maxAttempts=10,
        initialDelayMs=200,
    )

    # When 20 runs go at once
    await run_all(redis, clean_queue, version, 20)

    # Then all succeed, and the API's "0 remaining" paused both runners: few 429s at all
    # (without flow control every request beyond 5 a window is refused, dozens of them)
    assert await redis.zcard(f"bull:{clean_queue}:completed") == 20
    assert api.rejected <= 4, api.rejected


async def test_429s_without_headers_back_the_shared_budget_off(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given an API allowing 5 a second that says nothing but 429, and a connection set to 20
    api = BudgetApi(5, headers=False)
    base = await serve(api.app())
    await two_runners(runner_process)
    version = one_step_version(
        base,
        {"rateLimit": {"requests": 20, "perMs": 1000}},
        retryStrategy="FIXED",
        maxAttempts=20,
        initialDelayMs=300,
    )

    # When 30 runs go
    await run_all(redis, clean_queue, version, 30, timeout_s=90)

    # Then all succeed, and the shared budget was backed off: the scope records when it was
    # last cut (its factor itself may have recovered by now, as successes give it back)
    assert await redis.zcard(f"bull:{clean_queue}:completed") == 30
    cut = await redis.hget(f"bull:{clean_queue}:flow:c", "cut")
    assert cut is not None and int(float(cut)) > 0


async def test_an_api_that_is_down_is_probed_not_hammered_and_runs_recover(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given an API that is down, a breaker that opens after 3 failures for 1 s, and steps that
    # retry every 100 ms
    api = BudgetApi(1000, headers=False)
    api.down = True
    base = await serve(api.app())
    await two_runners(runner_process)
    version = one_step_version(
        base,
        {"circuitBreaker": {"failures": 3, "windowMs": 10_000, "coolDownMs": 1000}},
        retryStrategy="FIXED",
        maxAttempts=50,
        initialDelayMs=100,
    )
    jobs = [
        {"data": job_data(f"run_{i}", version), "opts": {"jobId": f"run_{i}"}} for i in range(10)
    ]
    await node_peer("add", {"queue": clean_queue, "jobs": jobs})

    # When it stays down for 3 s, then comes back
    await asyncio.sleep(3.0)
    down_hits = api.unavailable
    api.down = False
    await wait_for(
        lambda: _completed(redis, clean_queue, 10), 30, "10 runs to complete after recovery"
    )

    # Then while open only a probe per cool-down got through (3 to open, then about one a
    # second for 3 s, plus the requests already in flight when it opened); without the
    # breaker, 10 runs retrying every 100 ms make some 300 requests in those 3 s
    assert down_hits <= 3 + 20 + 4, down_hits
    assert await redis.zcard(f"bull:{clean_queue}:failed") == 0


async def _completed(redis: aioredis.Redis, queue: str, n: int) -> bool:
    return await redis.zcard(f"bull:{queue}:completed") >= n


class TenantLog:
    def __init__(self) -> None:
        self.order: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.order.append(request.query.get("t", "?"))
        return web.json_response({"id": "x"})


async def test_one_tenants_flood_does_not_starve_another_tenant_on_a_shared_connection(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given a connection of 10 requests/s shared fairly between tenants, and two runners
    api = TenantLog()
    base = await serve(api.app())
    await two_runners(runner_process)
    version = one_step_version(
        base,
        {"rateLimit": {"requests": 10, "perMs": 1000}, "tenantLimits": {"fairShare": True}},
    )
    version["graph"]["steps"][0]["input"] = {"query": {"t": "{{ run.tenantId }}"}}

    # When tenant A floods it with 40 runs, and tenant B then asks for 5
    flood = [
        {"data": job_data(f"a_{i}", version, tenantId="A"), "opts": {"jobId": f"a_{i}"}}
        for i in range(40)
    ]
    await node_peer("add", {"queue": clean_queue, "jobs": flood})
    await wait_for(_served(api, 3), 10, "the flood to start")
    few = [
        {"data": job_data(f"b_{i}", version, tenantId="B"), "opts": {"jobId": f"b_{i}"}}
        for i in range(5)
    ]
    await node_peer("add", {"queue": clean_queue, "jobs": few})
    await wait_for(lambda: _completed(redis, clean_queue, 45), 60, "all 45 runs")

    # Then B's five were served beside A's, not after the flood: within 15 requests of B's
    # arrival, where a first-come queue would have served A's 40 first
    first_b = api.order.index("B")
    last_b = len(api.order) - 1 - api.order[::-1].index("B")
    assert api.order.count("B") == 5
    assert last_b < 30, api.order
    assert last_b - first_b <= 15, api.order


def _served(api: TenantLog, n: int) -> Any:
    async def check() -> bool:
        return len(api.order) >= n

    return check


class SlowApi:
    """Answers after ``delay_s``; counts requests in flight and their peak."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.in_flight = 0
        self.peak = 0
        self.served = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        self.served += 1
        return web.json_response({"id": "x"})


async def test_two_runners_share_one_max_concurrency(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given an API that takes 200 ms, a connection allowing 3 requests in flight, two runners
    # of 20 slots each
    api = SlowApi(0.2)
    base = await serve(api.app())
    await two_runners(runner_process)
    version = one_step_version(base, {"maxConcurrency": 3})

    # When 15 runs go at once
    await run_all(redis, clean_queue, version, 15)

    # Then all complete and never more than 3 requests were in flight, across both runners
    assert await redis.zcard(f"bull:{clean_queue}:completed") == 15
    assert api.peak == 3
    # and every lease was given back
    assert await redis.zcard(f"bull:{clean_queue}:flow:c:leases") == 0


async def test_a_killed_runners_leases_expire_and_the_other_runner_goes_on(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given a connection allowing 1 request in flight, an API that hangs for 10 s, and the
    # action's timeout of 1 s (so a lease lives 1 s + 5 s)
    api = SlowApi(10.0)
    base = await serve(api.app())
    first = await runner_process(RUNNER_CONCURRENCY="5")
    version = one_step_version(base, {"maxConcurrency": 1}, timeoutMs=1000)
    await node_peer(
        "add",
        {
            "queue": clean_queue,
            "jobs": [{"data": job_data("run_0", version), "opts": {"jobId": "run_0"}}],
        },
    )
    await wait_for(_served_slow(api, 1), 10, "the first request")
    # When that runner is killed while it holds the only slot
    first.proc.kill()
    first.proc.wait()
    api.delay_s = 0.0
    killed_at = time.monotonic()
    await runner_process(RUNNER_CONCURRENCY="5")
    await node_peer(
        "add",
        {
            "queue": clean_queue,
            "jobs": [{"data": job_data("run_1", version), "opts": {"jobId": "run_1"}}],
        },
    )
    # Then the other runner's run completes once the dead runner's lease expired
    await wait_for(lambda: _job_completed(redis, clean_queue, "run_1"), 20, "run_1 to complete")
    assert time.monotonic() - killed_at >= 3.0  # it had to wait for the lease


def _served_slow(api: SlowApi, n: int) -> Any:
    async def check() -> bool:
        return api.in_flight >= n

    return check


async def _job_completed(redis: aioredis.Redis, queue: str, job_id: str) -> bool:
    return await redis.zscore(f"bull:{queue}:completed", job_id) is not None
