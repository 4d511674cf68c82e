"""RUNNER_REDIS_URL in its other forms: ``unix://`` (a socket path) and ``rediss://`` (TLS with
a private CA), each against its own ``redis-server``. A job added through the same URL runs end
to end; every connection of the runner (BullMQ's, the status writer's, the cancel reader's) has
to reach a server that speaks nothing else."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from bullmq import Queue

from runner.queue.worker import redis_options
from tests.conftest import RedisServer, read_stream
from tests.integration.test_resilience import linear_version, wait_for
from tests.integration.test_tls import Pki
from tests.workflows import job_data

pytestmark = pytest.mark.integration


@pytest.fixture
def unix_redis(tmp_path: Path) -> Iterator[str]:
    server = RedisServer(tmp_path, unixsocket=tmp_path / "redis.sock")
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[str]:
    pki = Pki.create()
    cert, key = pki.server_files(tmp_path, "127.0.0.1")
    ca = tmp_path / "ca.pem"
    ca.write_text(pki.ca_pem)
    server = RedisServer(tmp_path, tls=(cert, key, ca))
    server.start()
    yield server.url
    server.stop()


async def _runs_end_to_end(url: str, serve: Any, runner_process: Any, queue_name: str) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"id": "x1"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    base = await serve(app)
    await runner_process(RUNNER_REDIS_URL=url)
    options = redis_options(url, 10)
    queue = Queue(queue_name, {"connection": options})
    client = aioredis.Redis(**options)
    try:
        run_id = "run_url"
        await queue.add(
            "workflow_run", job_data(run_id, linear_version(base, "wfv_url")), {"jobId": run_id}
        )

        async def completed() -> bool:
            return await client.zscore(f"bull:{queue_name}:completed", run_id) is not None

        await wait_for(completed, 30, "the run to complete")
        events = await read_stream(client, f"bull:{queue_name}:status")
        assert [(e["kind"], e.get("stepKey"), e["status"]) for e in events] == [
            ("run", None, "RUNNING"),
            *[
                (kind, key, s)
                for key in ("one", "two", "three")
                for kind, s in (("step", "RUNNING"), ("step", "SUCCESS"))
            ],
            ("run", None, "SUCCESS"),
        ]
    finally:
        await queue.close()
        await client.aclose()


async def test_a_unix_socket_url_runs_end_to_end(
    unix_redis: str, serve: Any, runner_process: Any, queue_name: str
) -> None:
    await _runs_end_to_end(unix_redis, serve, runner_process, queue_name)


async def test_a_tls_url_with_a_private_ca_runs_end_to_end(
    tls_redis: str, serve: Any, runner_process: Any, queue_name: str
) -> None:
    await _runs_end_to_end(tls_redis, serve, runner_process, queue_name)


async def test_a_tls_url_without_the_ca_is_refused_not_sent_in_the_clear(tls_redis: str) -> None:
    url = tls_redis.split("?")[0]
    client = aioredis.Redis(**redis_options(url, 5), retry=None)
    try:
        with pytest.raises(Exception, match=r"(?i)certificate"):
            await client.ping()
    finally:
        await client.aclose()
