"""Hostile inputs end to end: what a job, a definition or an API sends cannot freeze the worker,
end as ``INTERNAL``, or go unreported.

A real ``python -m runner`` takes jobs from Node BullMQ (or raw data written into Redis, for
what Node cannot write); the APIs are local aiohttp servers. Each case is followed by a normal
job that must still complete: the worker keeps serving.

- A catastrophic ``pattern`` (``^(a+)+$``) in ``parameterSchema`` fails its run INVALID_INPUT
  at once (RE2); before, it held the process for 26 s and every job beside it waited.
- A pattern RE2 cannot run (lookahead) is DEFINITION_INVALID naming its JSON path.
- Job data nested 1,000 and 100,000 deep, or repeating ``workflowRunId``, is INVALID_PAYLOAD.
- A response nested 200,000 deep fails its step RESPONSE_INVALID once (a POST is not sent
  again), the job fails, and the status stream has the FAILED run event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tests.conftest import node_peer, read_stream
from tests.integration.harness import Api, action, reply, run_workflow, step, version
from tests.integration.test_hostile_jobs import job, one_step, send_and_settle, settled

pytestmark = pytest.mark.integration

EVIL = "^(a+)+$"
EVIL_INPUT = "a" * 30 + "!"  # 26 s on Python's re; each character doubles it


def with_parameter_schema(definition: dict[str, Any], pattern: str) -> dict[str, Any]:
    return {
        **definition,
        "parameterSchema": {
            "type": "object",
            "properties": {"id": {"type": "string"}, "x": {"type": "string", "pattern": pattern}},
        },
    }


async def test_a_catastrophic_pattern_fails_invalid_input_at_once_and_the_next_job_runs(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given a runner, a definition whose parameterSchema holds ^(a+)+$, and a normal job
    api = Api(reply(200, {"ok": True}))
    base = await serve(api.app())
    await runner_process()
    plain = one_step("wfv_plain", base, {"path": {"id": "{{ input.id }}"}})
    evil = with_parameter_schema(one_step("wfv_evil", base, {"path": {"id": "x"}}), EVIL)

    # When Node sends the hostile job, then the normal one
    jobs = await send_and_settle(
        redis,
        clean_queue,
        [job("run_evil", evil, {"id": "1", "x": EVIL_INPUT}), job("run_ok", plain, {"id": "2"})],
        timeout_s=15,
    )

    # Then the hostile run fails INVALID_INPUT, not retried, and the normal one completes (the
    # settle timeout is below the 26 s the backtracking engine took)
    assert jobs["run_evil"]["state"] == "failed", jobs["run_evil"]
    assert jobs["run_evil"]["failedReason"] == (
        f"INVALID_INPUT: $.input.x: must match pattern {EVIL}"
    )
    assert jobs["run_evil"]["attemptsMade"] == 1
    assert jobs["run_ok"]["state"] == "completed", jobs["run_ok"]
    assert [hit.path for hit in api.hits] == ["/items/2/detail"]


async def test_a_pattern_re2_cannot_run_is_definition_invalid_naming_its_path(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given a definition whose parameterSchema pattern uses a lookahead
    api = Api(reply(200, {"ok": True}))
    base = await serve(api.app())
    await runner_process()
    looking = with_parameter_schema(one_step("wfv_look", base, {"path": {"id": "x"}}), "^(?=a)")

    # When Node sends a job of it
    jobs = await send_and_settle(redis, clean_queue, [job("run_look", looking, {"x": "a"})])

    # Then the run fails DEFINITION_INVALID at the pattern's path, and nothing is sent
    reason = jobs["run_look"]["failedReason"]
    assert jobs["run_look"]["state"] == "failed", jobs["run_look"]
    assert reason.startswith(
        "DEFINITION_INVALID: $.parameterSchema.properties.x.pattern: "
        "pattern '^(?=a)' cannot run in linear time"
    ), reason
    assert api.hits == []


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


HOSTILE_DATA = {
    "run_deep_1k": (
        lambda rid, version: (
            json.dumps(
                {
                    "workflowRunId": rid,
                    "workflowVersionId": version,
                    "tenantId": "t",
                    "input": {"id": "1"},
                }
            )[:-1]
            + ', "deep": '
            + nested(1_000)
            + "}"
        ),
        "INVALID_PAYLOAD: $: nested deeper than 128 levels (RUNNER_MAX_JSON_DEPTH)",
    ),
    "run_deep_100k": (
        lambda rid, version: (
            f'{{"workflowRunId": "{rid}", "workflowVersionId": "{version}", '
            f'"tenantId": "t", "input": {nested(100_000)}}}'
        ),
        "INVALID_PAYLOAD: $: nested deeper than 128 levels (RUNNER_MAX_JSON_DEPTH)",
    ),
    "run_twice": (
        lambda rid, version: (
            f'{{"workflowRunId": "{rid}", "workflowRunId": "other", '
            f'"workflowVersionId": "{version}", "tenantId": "t", "input": {{"id": "1"}}}}'
        ),
        'INVALID_PAYLOAD: $: duplicate key "workflowRunId"',
    ),
}


async def test_deep_or_ambiguous_job_data_is_invalid_payload_and_the_next_job_runs(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given jobs added while no runner is up, whose data is then replaced in Redis by JSON
    # nested 1,000 and 100,000 deep, or naming workflowRunId twice (no Node object can)
    api = Api(reply(200, {"ok": True}))
    base = await serve(api.app())
    definition = one_step("wfv_data", base, {"path": {"id": "{{ input.id }}"}})
    ids = [*HOSTILE_DATA, "run_fine"]
    await node_peer(
        "add", {"queue": clean_queue, "jobs": [job(rid, definition, {"id": "2"}) for rid in ids]}
    )
    for rid, (make, _) in HOSTILE_DATA.items():
        await redis.hset(f"bull:{clean_queue}:{rid}", "data", make(rid, "wfv_data"))

    # When a runner starts
    await runner_process()
    jobs = await settled(redis, clean_queue, ids)

    # Then each hostile job fails INVALID_PAYLOAD saying what is wrong, not retried
    for rid, (_, reason) in HOSTILE_DATA.items():
        assert jobs[rid]["state"] == "failed", (rid, jobs[rid])
        assert jobs[rid]["failedReason"] == reason, (rid, jobs[rid])
        assert jobs[rid]["attemptsMade"] == 1, (rid, jobs[rid])
    # and the normal one runs, the only one to reach the API
    assert jobs["run_fine"]["state"] == "completed", jobs["run_fine"]
    assert [hit.path for hit in api.hits] == ["/items/2/detail"]


async def test_a_deep_response_to_a_post_fails_once_and_the_run_is_reported_failed(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given an API answering a POST with JSON nested 200,000 deep, and a job with 3 attempts
    deep = "[" * 200_000 + "]" * 200_000

    async def deep_reply(request: web.Request) -> web.StreamResponse:
        return web.Response(text=deep, content_type="application/json")

    api = Api(deep_reply)
    base = await serve(api.app())
    await runner_process()
    definition = one_step("wfv_deep", base, {"path": {"id": "1"}})
    definition["actions"]["act"]["method"] = "POST"

    # When Node sends it
    jobs = await send_and_settle(redis, clean_queue, [job("run_deep", definition, {})])

    # Then the step fails RESPONSE_INVALID, the POST sent once, and the job fails for good
    assert jobs["run_deep"]["state"] == "failed", jobs["run_deep"]
    assert jobs["run_deep"]["failedReason"] == (
        "RESPONSE_INVALID: call: the response body is nested deeper than 128 levels "
        "(RUNNER_MAX_JSON_DEPTH)"
    )
    assert jobs["run_deep"]["attemptsMade"] == 1
    assert len(api.hits) == 1
    # and the status stream holds the run's FAILED event
    events = await read_stream(redis, f"bull:{clean_queue}:status")
    runs = [(e["status"], e.get("errorCode")) for e in events if e["kind"] == "run"]
    assert runs[-1] == ("FAILED", "RESPONSE_INVALID"), runs


# --- in process: one run beside another, the event loop watched ------------------------------


class LagProbe:
    """The worst lateness of a 10 ms timer while the block runs: how long the loop was held."""

    def __init__(self) -> None:
        self.max_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LagProbe:
        self._task = asyncio.get_running_loop().create_task(self._watch())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            self.max_s = max(self.max_s, loop.time() - before - 0.01)


# Generous: the old code held the loop for seconds; a healthy loop is late by milliseconds.
MAX_LAG_S = 1.0


def fetch(url: str, **action_fields: Any) -> dict[str, Any]:
    return version([step("fetch")], [action(url, **action_fields)])


async def test_a_catastrophic_output_pattern_fails_the_step_and_the_run_beside_it_is_not_held(
    serve: Any,
) -> None:
    # Given an API whose answer meets an outputSchema pattern of ^(a+)+$ at its worst, and
    # another run calling a normal API
    evil_api = Api(reply(200, {"x": "a" * 28 + "!"}))
    fine_api = Api(reply(200, {"ok": True}))
    evil_base, fine_base = await serve(evil_api.app()), await serve(fine_api.app())
    schema = {"type": "object", "properties": {"x": {"type": "string", "pattern": EVIL}}}
    evil = fetch(f"{evil_base}/thing", outputSchema=schema)

    # When both run side by side, the loop watched
    async with LagProbe() as probe:
        hostile, normal = await asyncio.gather(
            run_workflow(evil, run_id="run_evil"),
            run_workflow(fetch(f"{fine_base}/thing"), run_id="run_fine"),
        )

    # Then the hostile step fails SCHEMA_VALIDATION, the other succeeds, the loop was not held
    assert hostile.error_code("fetch") == "SCHEMA_VALIDATION"
    assert normal.outcome.status == "SUCCESS"
    assert probe.max_s < MAX_LAG_S, probe.max_s


async def test_a_large_body_is_worked_on_off_the_loop(serve: Any) -> None:
    # Given an API answering 8 MB of JSON that an outputSchema checks item by item
    items = [{"id": str(i), "name": "n" * 40, "tags": ["a", "b"]} for i in range(80_000)]
    big_api = Api(reply(200, {"items": items}))
    base = await serve(big_api.app())
    schema = {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"id": {"type": "string", "pattern": "^[0-9]+$"}},
                    "required": ["id"],
                },
            }
        },
    }

    # When it runs, the loop watched
    async with LagProbe() as probe:
        record = await run_workflow(
            fetch(f"{base}/big", outputSchema=schema),
            max_response_bytes=32 * 1024 * 1024,
        )

    # Then it succeeds and the loop was never held long
    assert record.outcome.status == "SUCCESS", record.outcome.error
    assert probe.max_s < MAX_LAG_S, probe.max_s


async def test_a_deep_response_is_response_invalid_under_the_retry_policy(serve: Any) -> None:
    # Given an API answering JSON nested 200,000 deep, with a policy that retries what may be
    deep = "[" * 200_000 + "]" * 200_000
    api = Api(reply(200, text=deep, content_type="application/json"))
    base = await serve(api.app())
    retrying = {"retryStrategy": "FIXED", "maxAttempts": 3, "initialDelayMs": 10}

    # When a step calls it
    record = await run_workflow(fetch(f"{base}/deep", **retrying))

    # Then the step fails RESPONSE_INVALID on its only attempt, and the run is reported FAILED
    assert record.error_code("fetch") == "RESPONSE_INVALID"
    assert len(api.hits) == 1
    last = record.events[-1]
    assert (last["kind"], last["status"], last["errorCode"]) == (
        "run",
        "FAILED",
        "RESPONSE_INVALID",
    )
