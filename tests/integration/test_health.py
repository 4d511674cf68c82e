"""The runner's probes on ``RUNNER_HEALTH_PORT``: ``/healthz`` (the worker loop is alive) and
``/readyz`` (Redis answers), against a real runner process.

Losing Redis must make the runner unready but not dead: Kubernetes should stop routing to it, not
restart it. That test stops a Redis of its own on a spare port, never the shared one.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tests.conftest import node_peer

pytestmark = pytest.mark.integration


def free_port() -> int:
    # RUNNER_HEALTH_PORT=0 means "off", so the probes need a concrete port chosen up front.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A ``redis-server`` of this test's own, on a spare port, that the test may stop and start."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._workdir = workdir
        self._proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        argv += ["--dir", str(self._workdir)]
        with (self._workdir / f"redis-{self.port}.log").open("ab") as log:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        # No client-side retries: each PING answers at once, so the loop below sets the pace.
        client = aioredis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0))
        try:
            # redis-server gives no readiness signal but its port: ask until it answers.
            for _ in range(200):
                assert self._proc.poll() is None, "redis-server exited at start"
                try:
                    await client.ping()
                    return
                except aioredis.ConnectionError:
                    await asyncio.sleep(0.025)
            raise AssertionError(f"redis-server on {self.port} never answered PING")
        finally:
            await client.aclose()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        self._proc = None


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    await server.start()
    yield server
    server.stop()


@pytest.fixture
def health_port() -> int:
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
    runner_process: Any, private_redis: PrivateRedis, health_port: int, queue_name: str
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
        await private_redis.start()
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
