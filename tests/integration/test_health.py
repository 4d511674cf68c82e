"""The runner's probes on ``RUNNER_HEALTH_PORT``: ``/healthz`` (the worker loop is alive) and
``/readyz`` (Redis answers), against a real runner process.

Losing Redis must make the runner unready but not dead: Kubernetes should stop routing to it, not
restart it. That test stops a Redis of its own on a spare port, never the shared one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import RedisServer, free_port, node_peer

pytestmark = pytest.mark.integration


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, which it stops and starts."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def health_port() -> int:
    # RUNNER_HEALTH_PORT=0 means "off", so the probes need a concrete port chosen up front.
    return free_port()


async def probe(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as response:
        return response.status, await response.json()


async def wait_for_probe(
    http: aiohttp.ClientSession, url: str, status: int, timeout_s: float = 15
) -> Any:
    """Poll a probe until it answers ``status``: a probe is polled, as Kubernetes does."""
    seen: object = "nothing"
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        try:
            got, body = await probe(http, url)
            if got == status:
                return body
            seen = (got, body)
        except aiohttp.ClientConnectionError as err:
            seen = err  # the health server is not listening yet
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered {status}; last: {seen!r}")


async def test_probes_answer_when_the_runner_is_alive_and_redis_answers(
    runner_process: Any, health_port: int
) -> None:
    # Given a runner serving its probes
    runner = await runner_process(RUNNER_HEALTH_PORT=str(health_port))
    base = f"http://127.0.0.1:{health_port}"
    async with aiohttp.ClientSession() as http:
        # When a probe asks, Then both answer 200
        assert await wait_for_probe(http, f"{base}/healthz", 200) == {"alive": True}
        assert await probe(http, f"{base}/readyz") == (200, {"redis": "ok"})
    assert runner.proc.poll() is None


async def test_losing_redis_makes_the_runner_unready_not_dead_until_redis_returns(
    runner_process: Any, private_redis: RedisServer, health_port: int, queue_name: str
) -> None:
    # Given a runner on its own Redis, ready
    runner = await runner_process(
        RUNNER_HEALTH_PORT=str(health_port), RUNNER_REDIS_URL=private_redis.url
    )
    base = f"http://127.0.0.1:{health_port}"
    async with aiohttp.ClientSession() as http:
        await wait_for_probe(http, f"{base}/readyz", 200)

        # When Redis goes away
        private_redis.stop()

        # Then the runner is not ready, but it is alive and still running
        status, body = await probe(http, f"{base}/readyz")
        assert status == 503, body
        assert body["redis"] != "ok"
        assert await probe(http, f"{base}/healthz") == (200, {"alive": True})
        assert runner.proc.poll() is None, runner.stderr()

        # When Redis comes back, Then the runner is ready again and still alive
        private_redis.start()
        assert await wait_for_probe(http, f"{base}/readyz", 200) == {"redis": "ok"}
        assert await probe(http, f"{base}/healthz") == (200, {"alive": True})

    # and its worker loop really is alive: it takes and settles a job from the new Redis
    report = await node_peer(
        "run",
        {
            "redis": private_redis.url,
            "queue": queue_name,
            "timeoutMs": 20000,
            "jobs": [{"name": "not_a_workflow", "data": {}, "opts": {"jobId": "after_outage"}}],
        },
    )
    job = report["jobs"]["after_outage"]
    assert job["state"] == "failed", (job, runner.stdout())
    assert job["failedReason"].startswith("INVALID_PAYLOAD: "), job
    assert runner.proc.poll() is None
