"""Production Redis (issue 25): Sentinel and Cluster, against servers and sentinels these tests
start themselves (``tests.redis_topologies``), and a wrong endpoint failing loudly at start.

The failover tests run 300 one-step runs through a real runner process and fail over in the
middle of the batch: no run may be lost, no finished step may run again (the local API counts
its calls per idempotency key), and the time to resume is reported.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from bullmq import Queue

from runner import redis_connect
from runner.queue.worker import redis_options
from tests.conftest import RedisServer, free_port, node_peer
from tests.integration import test_status_sink
from tests.integration.test_bull_board import BULL_BOARD, _drain, _read_until, _stop
from tests.integration.test_health import wait_for_probe
from tests.integration.test_status_sink import Sink, count_rows
from tests.redis_topologies import ClusterSet, SentinelSet
from tests.workflows import job_data

pytestmark = pytest.mark.integration

RUNS = 300
# A PostgreSQL database of the test's own for the status sink (the sink tests' fixture).
database_url = test_status_sink.database_url


@pytest.fixture(scope="module")
def sentinel_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    topology = SentinelSet(tmp_path_factory.mktemp("sentinel"))
    topology.start()
    yield topology
    topology.stop()


@pytest.fixture(scope="module")
def cluster_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSet]:
    topology = ClusterSet(tmp_path_factory.mktemp("cluster"))
    topology.start()
    yield topology
    topology.stop()


async def _fails_at_start(runner_process: Any, **env: str) -> str:
    """Start a runner that must refuse to run: exit 1 with one ``redis.unusable`` line and no
    traceback. Returns that line's ``detail``."""
    runner = await runner_process(wait_ready=False, **env)
    code = await asyncio.to_thread(runner.proc.wait, 30)
    assert code == 1, runner.stdout() + runner.stderr()
    assert "Traceback" not in runner.stderr() + runner.stdout(), runner.stderr()
    [line] = [e for e in runner.log_events() if e.get("event") == "redis.unusable"]
    assert all(e.get("event") != "runner.started" for e in runner.log_events())
    return str(line["detail"])


async def test_a_sentinel_port_given_as_a_server_is_named_at_start(
    runner_process: Any, sentinel_set: SentinelSet
) -> None:
    url = f"redis://127.0.0.1:{sentinel_set.sentinels[0].port}/0"
    detail = await _fails_at_start(runner_process, RUNNER_REDIS_URL=url)
    assert "is a Sentinel" in detail and "redis+sentinel://" in detail


async def test_a_replica_is_named_at_start(runner_process: Any, sentinel_set: SentinelSet) -> None:
    replica = next(s for s in sentinel_set.servers() if s.port != sentinel_set.master_port())
    detail = await _fails_at_start(runner_process, RUNNER_REDIS_URL=replica.url)
    assert "read-only replica" in detail


async def test_a_cluster_node_given_as_a_server_is_named_at_start(
    runner_process: Any, cluster_set: ClusterSet
) -> None:
    # Given a node that does not own the {bull} slot (it would answer MOVED for ever)
    owner = cluster_set.owner_port("{bull}")
    other = next(n for n in cluster_set.nodes if n.port != owner)
    detail = await _fails_at_start(runner_process, RUNNER_REDIS_URL=other.url)
    assert "Redis Cluster node" in detail and "redis+cluster://" in detail


async def test_a_cluster_without_a_hash_tagged_prefix_is_refused_at_start(
    runner_process: Any, cluster_set: ClusterSet
) -> None:
    detail = await _fails_at_start(
        runner_process, RUNNER_REDIS_URL=cluster_set.url, RUNNER_QUEUE_PREFIX="bull"
    )
    assert "RUNNER_QUEUE_PREFIX" in detail and "{bull}" in detail


async def test_an_evicting_redis_is_named_at_start(runner_process: Any, tmp_path: Path) -> None:
    server = RedisServer(tmp_path, "--maxmemory-policy", "allkeys-lru")
    server.start()
    try:
        detail = await _fails_at_start(runner_process, RUNNER_REDIS_URL=server.url)
    finally:
        server.stop()
    assert "maxmemory-policy allkeys-lru" in detail and "noeviction" in detail


async def test_a_bad_scheme_and_a_refused_connection_are_one_line(runner_process: Any) -> None:
    detail = await _fails_at_start(runner_process, RUNNER_REDIS_URL="http://127.0.0.1:6379")
    assert "unknown scheme 'http'" in detail
    port = free_port()
    detail = await _fails_at_start(runner_process, RUNNER_REDIS_URL=f"redis://127.0.0.1:{port}")
    assert detail.endswith("connection refused"), detail


async def test_a_replica_at_run_time_makes_readyz_false(
    runner_process: Any, tmp_path: Path
) -> None:
    # Given a runner ready on its own Redis
    server = RedisServer(tmp_path)
    server.start()
    other = RedisServer(tmp_path)
    other.start()
    port = free_port()
    try:
        await runner_process(RUNNER_REDIS_URL=server.url, RUNNER_HEALTH_PORT=str(port))
        async with aiohttp.ClientSession() as http:
            await wait_for_probe(http, f"http://127.0.0.1:{port}/readyz", 200)
            # When the node becomes a replica (the socket stays open, PING still answers)
            client = redis_connect.client(server.url, 5)
            await client.execute_command("REPLICAOF", "127.0.0.1", str(other.port))
            await client.aclose()
            # Then /readyz says so
            body = await wait_for_probe(http, f"http://127.0.0.1:{port}/readyz", 503)
            assert "read-only replica" in body["redis"]
    finally:
        server.stop()
        other.stop()


async def _node_side_sees_the_batch(
    url: str, prefix: str, queue_name: str, tmp_path: Path, database_url: str
) -> None:
    """The status sink and Bull Board on the same URL: the sink writes every run to
    PostgreSQL, the board counts every completed job."""
    sink = Sink(
        tmp_path / "sink.log",
        {
            **os.environ,
            "REDIS_URL": url,
            "DATABASE_URL": database_url,
            "STATUS_STREAM": f"{prefix}:{queue_name}:status",
            "BLOCK_MS": "100",
        },
    )
    try:
        await asyncio.to_thread(sink.wait_started)
        await asyncio.to_thread(
            sink.wait, lambda: count_rows(database_url, "workflow_runs") == RUNS, "the sink", 30
        )
    finally:
        sink.close()
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(BULL_BOARD),
        env={
            **os.environ,
            "REDIS_URL": url,
            "QUEUE_PREFIX": prefix,
            "QUEUE_NAMES": queue_name,
            "PORT": "0",
            "HOST": "127.0.0.1",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    drain = None
    try:
        match = await _read_until(
            proc.stdout, re.compile(r"bull-board: (http://\S+?)/? "), seen, 20
        )
        drain = asyncio.ensure_future(_drain(proc.stdout, seen))
        async with aiohttp.ClientSession() as http:
            listing_url = f"{match.group(1)}/api/queues?activeQueue={queue_name}&status=completed"
            async with http.get(listing_url) as response:
                listing = await response.json()
        (queue,) = [q for q in listing["queues"] if q["name"] == queue_name]
        assert queue["counts"]["completed"] == RUNS, queue["counts"]
    finally:
        await _stop(proc, drain)


# --- failover mid-batch -----------------------------------------------------------------------


class CountingApi:
    """One endpoint; counts calls per idempotency key."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.calls[request.headers.get("Idempotency-Key", "")] += 1
        # Slow enough that the batch is still going when the failover comes.
        await asyncio.sleep(0.15)
        return web.json_response({"ok": True})


def one_step_version(base: str) -> dict[str, Any]:
    return {
        "id": "wfv_one",
        "graph": {"steps": [{"key": "call", "actionId": "post", "connectionId": "c"}]},
        "actions": {
            "post": {
                "id": "post",
                "method": "POST",
                "endpointTemplate": "/call",
                "idempotencyHeader": "Idempotency-Key",
                "timeoutMs": 30000,
            }
        },
        "connections": {"c": {"id": "c", "type": "NONE", "config": {"baseUrl": base}}},
        "timeoutMs": 120_000,
    }


async def _batch_through_failover(
    url: str,
    prefix: str,
    queue_name: str,
    serve: Any,
    runner_process: Any,
    failovers: list[Any],
    produce: Any,
) -> dict[str, Any]:
    """300 runs; each of ``failovers`` (blocking callables) runs after another third of them
    completed. Returns the figures: lost, repeated, the longest stall after a failover."""
    api = CountingApi()
    base = await serve(api.app())
    await runner_process(
        RUNNER_REDIS_URL=url,
        RUNNER_QUEUE_PREFIX=prefix,
        RUNNER_CONCURRENCY="20",
        RUNNER_REDIS_SOCKET_TIMEOUT_S="5",
    )
    await produce(base)
    client = redis_connect.client(url, 5)
    completed_key = f"{prefix}:{queue_name}:completed"

    async def completed() -> int:
        try:
            return int(await client.zcard(completed_key))
        except Exception:
            return -1  # Redis is failing over: ask again

    resumes: list[float] = []
    try:
        for i, failover in enumerate(failovers):
            threshold = RUNS * (i + 1) // (len(failovers) + 1)
            deadline = time.monotonic() + 60
            while await completed() < threshold:
                assert time.monotonic() < deadline, f"stuck below {threshold} completed runs"
                await asyncio.sleep(0.02)
            started = time.monotonic()
            before = await completed()
            await asyncio.to_thread(failover)
            while before < RUNS and await completed() <= before:
                assert time.monotonic() - started < 60, "no run completed after the failover"
                await asyncio.sleep(0.02)
            resumes.append(round(time.monotonic() - started, 2))
        deadline = time.monotonic() + 60
        while await completed() < RUNS:
            assert time.monotonic() < deadline, f"{RUNS - await completed()} runs never completed"
            await asyncio.sleep(0.05)
        failed = int(await client.zcard(f"{prefix}:{queue_name}:failed"))
        done = int(await client.zcard(completed_key))
    finally:
        await client.aclose()
    repeated = {key: n for key, n in api.calls.items() if n > 1}
    figures = {
        "lost": RUNS - done,
        "called": len(api.calls),
        "failed": failed,
        "repeated": len(repeated),
        "resume_s": resumes,
    }
    print(f"\nfailover figures ({url.split('://')[0]}): {figures}")
    return figures


async def _python_producer(url: str, prefix: str, queue_name: str, base: str) -> None:
    queue = Queue(queue_name, {"connection": redis_options(url, 10), "prefix": prefix})
    try:
        version = one_step_version(base)
        for start in range(0, RUNS, 50):
            await asyncio.gather(
                *(
                    queue.add("workflow_run", job_data(f"run_{i}", version), {"jobId": f"run_{i}"})
                    for i in range(start, start + 50)
                )
            )
    finally:
        await queue.close()


async def test_sentinel_failover_and_a_killed_master_lose_no_run_and_repeat_no_step(
    sentinel_set: SentinelSet,
    queue_name: str,
    serve: Any,
    runner_process: Any,
    tmp_path: Path,
    database_url: str,
) -> None:
    url = sentinel_set.url

    async def produce(base: str) -> None:
        await _python_producer(url, "bull", queue_name, base)

    figures = await _batch_through_failover(
        url,
        "bull",
        queue_name,
        serve,
        runner_process,
        [sentinel_set.failover, sentinel_set.kill_master],
        produce,
    )
    assert figures["lost"] == 0 and figures["failed"] == 0 and figures["called"] == RUNS
    assert figures["repeated"] == 0
    await _node_side_sees_the_batch(url, "bull", queue_name, tmp_path, database_url)


async def test_cluster_failover_of_the_slot_owner_loses_no_run_and_repeats_no_step(
    cluster_set: ClusterSet,
    queue_name: str,
    serve: Any,
    runner_process: Any,
    tmp_path: Path,
    database_url: str,
) -> None:
    url = cluster_set.url

    async def produce(base: str) -> None:
        # A Node producer on ioredis' Cluster, prefix {bull}
        version = one_step_version(base)
        await node_peer(
            "add",
            {
                "redis": url,
                "prefix": "{bull}",
                "queue": queue_name,
                "jobs": [
                    {
                        "name": "workflow_run",
                        "data": job_data(f"run_{i}", version),
                        "opts": {"jobId": f"run_{i}"},
                    }
                    for i in range(RUNS)
                ],
            },
        )

    figures = await _batch_through_failover(
        url,
        "{bull}",
        queue_name,
        serve,
        runner_process,
        [lambda: cluster_set.failover("{bull}")],
        produce,
    )
    assert figures["lost"] == 0 and figures["failed"] == 0 and figures["called"] == RUNS
    assert figures["repeated"] == 0
    await _node_side_sees_the_batch(url, "{bull}", queue_name, tmp_path, database_url)
