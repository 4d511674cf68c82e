"""Never lose or repeat a step: crash and resume, shutdown hand-back, long waits, cancel, Redis
restarts. Real runner processes, real Redis, a real HTTP target that records every call."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tests.conftest import RedisServer, node_peer, read_stream
from tests.workflows import job_data

pytestmark = pytest.mark.integration


class Target:
    """A target API whose endpoints follow scripts: each call takes the next behaviour."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.scripts: dict[str, list[Any]] = {}
        self.release = asyncio.Event()
        self.arrived: dict[str, asyncio.Event] = {}
        self.closed_after_s: list[float] = []
        self.closed_at: list[float] = []

    def arrival(self, path: str) -> asyncio.Event:
        return self.arrived.setdefault(path, asyncio.Event())

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.calls.append(
            {
                "path": path,
                "method": request.method,
                "key": request.headers.get("Idempotency-Key"),
                "at": time.monotonic(),
            }
        )
        self.arrival(path).set()
        script = self.scripts.get(path, [])
        behaviour = script.pop(0) if script else "ok"
        if behaviour == "hang":
            # Wait until released, or until the client goes away (then record how soon).
            started = time.monotonic()
            while not self.release.is_set():
                transport = request.transport
                if transport is None or transport.is_closing():
                    self.closed_after_s.append(time.monotonic() - started)
                    self.closed_at.append(time.monotonic())
                    break
                await asyncio.sleep(0.02)
        elif isinstance(behaviour, tuple):
            status, headers = behaviour
            return web.json_response({"error": "scripted"}, status=status, headers=headers)
        return web.json_response({"id": "x1", "path": path})

    def count(self, path: str) -> int:
        return sum(1 for c in self.calls if c["path"] == path)


def linear_version(
    base: str, version_id: str, *, retry: dict[str, Any] | None = None
) -> dict[str, Any]:
    steps = [
        {"key": "one", "actionId": "get_one", "connectionId": "c"},
        {
            "key": "two",
            "actionId": "post_two",
            "connectionId": "c",
            "input": {"body": {"from": "{{ steps.one.output.body.id }}"}},
        },
        {"key": "three", "actionId": "get_three", "connectionId": "c"},
    ]
    actions = {
        "get_one": {"id": "get_one", "method": "GET", "endpointTemplate": "/one"},
        "post_two": {
            "id": "post_two",
            "method": "POST",
            "endpointTemplate": "/two",
            "idempotencyHeader": "Idempotency-Key",
            "timeoutMs": 30000,
            **(retry or {}),
        },
        "get_three": {"id": "get_three", "method": "GET", "endpointTemplate": "/three"},
    }
    return {
        "id": version_id,
        "graph": {"steps": steps},
        "actions": actions,
        "connections": {"c": {"id": "c", "type": "NONE", "config": {"baseUrl": base}}},
        "timeoutMs": 120_000,
    }


async def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def job_state(redis: aioredis.Redis, queue: str, job_id: str) -> str:
    for state in ("completed", "failed", "delayed"):
        if await redis.zscore(f"bull:{queue}:{state}", job_id) is not None:
            return state
    if job_id.encode() in await redis.lrange(f"bull:{queue}:active", 0, -1):
        return "active"
    return "waiting"


async def run_events(redis: aioredis.Redis, queue: str, run_id: str) -> list[dict[str, Any]]:
    return [
        e for e in await read_stream(redis, f"bull:{queue}:status") if e["workflowRunId"] == run_id
    ]


async def test_sigkill_mid_step_resumes_on_another_runner_without_repeating_finished_steps(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    target = Target()
    target.scripts["/two"] = ["hang"]
    base = await serve(target.app())
    fast_locks = {
        "RUNNER_LOCK_DURATION_MS": "1500",
        "RUNNER_STALLED_INTERVAL_MS": "500",
        "RUNNER_CHECKPOINT_RETENTION_S": "3600",
    }
    first = await runner_process(**fast_locks)
    run_id = "run_kill"
    data = job_data(run_id, linear_version(base, "wfv_kill"))
    await node_peer(
        "add", {"queue": clean_queue, "jobs": [{"data": data, "opts": {"jobId": run_id}}]}
    )

    # When the first runner dies while step two is in flight
    await asyncio.wait_for(target.arrival("/two").wait(), 15)
    first.terminate(signal.SIGKILL)
    await runner_process(**fast_locks)

    # Then a second runner finishes the run
    async def done() -> bool:
        return await job_state(redis, clean_queue, run_id) == "completed"

    await wait_for(done, 20, "the run to complete on the second runner")
    assert target.count("/one") == 1
    assert target.count("/two") == 2
    assert target.count("/three") == 1
    keys = {c["key"] for c in target.calls if c["path"] == "/two"}
    assert keys == {f"{run_id}:two"}
    events = await run_events(redis, clean_queue, run_id)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    assert events[-1]["kind"] == "run" and events[-1]["status"] == "SUCCESS"
    assert [e["status"] for e in events if e.get("stepKey") == "one"] == ["RUNNING", "SUCCESS"]
    # The checkpoint is kept for the retention, counted from the last delivery's start.
    assert 3500 < await redis.ttl(f"bull:{clean_queue}:run:{run_id}") <= 3600


async def test_sigterm_hands_the_run_back_and_another_runner_finishes_it(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    target = Target()
    target.scripts["/two"] = ["hang"]
    base = await serve(target.app())
    first = await runner_process(RUNNER_SHUTDOWN_GRACE_S="0.5")
    run_id = "run_term"
    data = job_data(run_id, linear_version(base, "wfv_term"))
    await node_peer(
        "add", {"queue": clean_queue, "jobs": [{"data": data, "opts": {"jobId": run_id}}]}
    )
    await asyncio.wait_for(target.arrival("/two").wait(), 15)

    # When the first runner is told to stop while step two hangs past the grace period
    await runner_process()  # the second runner: default 30 s locks, so only a hand-back is fast
    first.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(first.proc.wait, 20) == 0

    async def done() -> bool:
        return await job_state(redis, clean_queue, run_id) == "completed"

    await wait_for(done, 15, "the handed-back run to complete elsewhere")
    assert any(e.get("event") == "run.handed_back" for e in first.log_events())
    assert (target.count("/one"), target.count("/two"), target.count("/three")) == (1, 2, 1)
    assert {c["key"] for c in target.calls if c["path"] == "/two"} == {f"{run_id}:two"}

    async def closed() -> bool:
        return bool(target.closed_after_s)

    # The hand-back cancels the request (about 20 ms after the grace period here, before the
    # process exits), but the run may complete elsewhere before this server's next look at
    # the connection.
    await wait_for(closed, 5, "the interrupted request to be closed")
    events = await run_events(redis, clean_queue, run_id)
    assert not [e for e in events if e["status"] == "CANCELED"], "a hand-back is not a cancel"
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))


async def test_long_retry_after_frees_the_slot_as_a_delayed_job(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    target = Target()
    target.scripts["/two"] = [(503, {"Retry-After": "60"})]
    base = await serve(target.app())
    retry = {
        "retryStrategy": "FIXED",
        "maxAttempts": 3,
        "initialDelayMs": 100,
        "maxDelayMs": 120_000,
    }
    await runner_process(RUNNER_LONG_WAIT_S="1")
    run_id = "run_long_wait"
    data = job_data(run_id, linear_version(base, "wfv_wait", retry=retry))
    await node_peer(
        "add", {"queue": clean_queue, "jobs": [{"data": data, "opts": {"jobId": run_id}}]}
    )

    async def delayed() -> bool:
        return await job_state(redis, clean_queue, run_id) == "delayed"

    await wait_for(delayed, 15, "the job to wait as delayed")
    score = await redis.zscore(f"bull:{clean_queue}:delayed", run_id)
    assert score is not None
    # BullMQ's delayed score packs the due time in ms above 12 bits.
    due_in_s = (int(score) >> 12) / 1000 - time.time()
    assert 50 < due_in_s <= 61, due_in_s
    # Rather than wait a minute, promote it as an operator would; the run resumes at attempt 2.
    await node_peer("promote", {"queue": clean_queue, "jobIds": [run_id]})

    async def done() -> bool:
        return await job_state(redis, clean_queue, run_id) == "completed"

    await wait_for(done, 15, "the promoted run to complete")
    assert (target.count("/one"), target.count("/two"), target.count("/three")) == (1, 2, 1)
    events = await run_events(redis, clean_queue, run_id)
    assert [
        e["attempt"] for e in events if e.get("stepKey") == "two" and e["status"] == "RUNNING"
    ] == [1, 2]


async def test_cancel_aborts_the_request_in_flight_and_fails_the_job_as_canceled(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    target = Target()
    target.scripts["/two"] = ["hang"]
    base = await serve(target.app())
    await runner_process()
    run_id = "run_cancel"
    data = job_data(run_id, linear_version(base, "wfv_cancel"))
    await node_peer(
        "add",
        {"queue": clean_queue, "jobs": [{"data": data, "opts": {"jobId": run_id, "attempts": 3}}]},
    )
    await asyncio.wait_for(target.arrival("/two").wait(), 15)

    await node_peer("cancel", {"queue": clean_queue, "runId": run_id, "reason": "user asked"})
    published_at = time.monotonic()  # the peer publishes just before it exits

    async def failed() -> bool:
        return await job_state(redis, clean_queue, run_id) == "failed"

    await wait_for(failed, 10, "the canceled job to fail")

    async def aborted() -> bool:
        # The server sees the hang-up when its handler next polls the transport, which under
        # load can come after the job has already failed.
        return bool(target.closed_at)

    await wait_for(aborted, 2, "the request in flight to be aborted")
    assert target.closed_at[0] - published_at < 1.0
    job = await redis.hgetall(f"bull:{clean_queue}:{run_id}")
    assert job[b"failedReason"] == b"CANCELED: user asked"
    assert job[b"atm"] == b"1"  # attemptsMade: not retried
    events = await run_events(redis, clean_queue, run_id)
    final = {e.get("stepKey"): e["status"] for e in events}
    assert final == {None: "CANCELED", "one": "SUCCESS", "two": "CANCELED", "three": "CANCELED"}
    assert target.count("/three") == 0


async def test_cancel_before_start_sends_no_request(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    target = Target()
    base = await serve(target.app())
    await runner_process()
    run_id = "run_cancel_early"
    await node_peer("cancel", {"queue": clean_queue, "runId": run_id, "reason": "changed my mind"})
    data = job_data(run_id, linear_version(base, "wfv_cancel2"))
    await node_peer(
        "add", {"queue": clean_queue, "jobs": [{"data": data, "opts": {"jobId": run_id}}]}
    )

    async def failed() -> bool:
        return await job_state(redis, clean_queue, run_id) == "failed"

    await wait_for(failed, 10, "the canceled job to fail")
    assert target.calls == []
    assert (
        await redis.hget(f"bull:{clean_queue}:{run_id}", "failedReason")
        == b"CANCELED: changed my mind"
    )


def own_redis(directory: Path) -> RedisServer:
    """A Redis of this test's own, with an append-only file so a restart keeps the queue."""
    return RedisServer(directory, "--appendonly", "yes", "--appendfsync", "always")


async def test_redis_restart_in_the_middle_of_a_batch_loses_no_run(
    serve: Any, runner_process: Any, queue_name: str, tmp_path: Path
) -> None:
    own = own_redis(tmp_path)
    own.start()
    try:
        target = Target()
        base = await serve(target.app())

        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(0.3)
            return web.json_response({"id": "x1"})

        slow_app = web.Application()
        slow_app.router.add_route("*", "/{tail:.*}", slow)
        slow_base = await serve(slow_app)
        await runner_process(RUNNER_REDIS_URL=own.url, RUNNER_CONCURRENCY="5")
        runs = [f"run_r{i}" for i in range(15)]
        jobs = [
            {
                "data": job_data(r, linear_version(slow_base if i % 2 else base, "wfv_restart")),
                "opts": {"jobId": r, "attempts": 5},
            }
            for i, r in enumerate(runs)
        ]
        await node_peer("add", {"redis": own.url, "queue": queue_name, "jobs": jobs})
        client = aioredis.Redis.from_url(own.url)

        async def some_done() -> bool:
            return await client.zcard(f"bull:{queue_name}:completed") >= 2

        await wait_for(some_done, 20, "the first runs to complete")
        await client.aclose()
        own.stop()
        await asyncio.sleep(1.0)
        own.start()
        client = aioredis.Redis.from_url(own.url)

        async def all_done() -> bool:
            finished = await client.zcard(f"bull:{queue_name}:completed") + await client.zcard(
                f"bull:{queue_name}:failed"
            )
            return finished >= len(runs)

        await wait_for(all_done, 60, "every run to finish after the restart")
        completed = {m.decode() for m in await client.zrange(f"bull:{queue_name}:completed", 0, -1)}
        assert completed == set(runs), await client.zrange(f"bull:{queue_name}:failed", 0, -1)
        finals = {}
        for entry in await read_stream(client, f"bull:{queue_name}:status"):
            if entry["kind"] == "run" and entry["status"] != "RUNNING":
                finals[entry["workflowRunId"]] = entry["status"]
        assert finals == dict.fromkeys(runs, "SUCCESS")
        await client.aclose()
    finally:
        own.stop()
