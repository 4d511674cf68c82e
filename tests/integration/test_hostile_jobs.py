"""Hostile jobs and definitions, end to end: Node BullMQ sends them to a real ``python -m runner``.

- Job data over ``RUNNER_MAX_JOB_BYTES`` is refused with ``INVALID_PAYLOAD`` and the worker goes
  on to the next job.
- Templates reach only the run's context: anything else is ``DEFINITION_INVALID`` when the
  definition compiles, naming the location, and nothing is sent.
- CR LF rendered into a header fails the step with ``TEMPLATE_ERROR`` before anything is sent.
- A path parameter such as ``../../admin`` reaches the API as one encoded segment.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.conftest import node_peer
from tests.integration.harness import Api, reply

pytestmark = pytest.mark.integration

MAX_JOB_BYTES = 20_000


def one_step(version_id: str, base_url: str, step_input: dict[str, Any]) -> dict[str, Any]:
    """One GET to ``{base}/items/{id}/detail``, the step's input as given."""
    return {
        "id": version_id,
        "workflowId": "wf_hostile",
        "version": 1,
        "timeoutMs": 30_000,
        "graph": {
            "steps": [
                {"key": "call", "actionId": "act", "connectionId": "conn", "input": step_input}
            ]
        },
        "actions": {
            "act": {
                "id": "act",
                "name": "call",
                "method": "GET",
                "endpointTemplate": "/items/{id}/detail",
            }
        },
        "connections": {"conn": {"id": "conn", "type": "NONE", "config": {"baseUrl": base_url}}},
    }


def job(run_id: str, definition: dict[str, Any], run_input: dict[str, Any]) -> dict[str, Any]:
    data = {
        "workflowRunId": run_id,
        "workflowVersionId": definition["id"],
        "tenantId": "ten_hostile",
        "input": run_input,
        "workflowVersion": definition,
    }
    # attempts: 3, so that "not retried" below means the runner marked the failure final.
    return {"data": data, "opts": {"jobId": run_id, "attempts": 3}}


async def send_and_settle(
    redis: aioredis.Redis, queue: str, jobs: list[dict[str, Any]], timeout_s: float = 20
) -> dict[str, dict[str, Any]]:
    """Node adds ``jobs``; then wait until BullMQ has settled each one and read what it holds.

    Read from the job hashes rather than from Node's QueueEvents: a job refused within a few
    milliseconds of being added can finish before QueueEvents' first read of the event stream,
    and the peer would then wait its full timeout for an event it will never see.
    """
    await node_peer("add", {"queue": queue, "jobs": jobs})
    return await settled(redis, queue, [j["opts"]["jobId"] for j in jobs], timeout_s)


async def settled(
    redis: aioredis.Redis, queue: str, ids: list[str], timeout_s: float = 20
) -> dict[str, dict[str, Any]]:
    """Wait until BullMQ has settled each job of ``ids``; what each holds then."""
    done: dict[str, dict[str, Any]] = {}
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(done) < len(ids):
        assert asyncio.get_running_loop().time() < deadline, f"unsettled: {set(ids) - set(done)}"
        for job_id in ids:
            if job_id in done:
                continue
            for state in ("completed", "failed"):
                if await redis.zscore(f"bull:{queue}:{state}", job_id) is not None:
                    raw = await redis.hgetall(f"bull:{queue}:{job_id}")
                    fields = {k.decode(): v.decode() for k, v in raw.items()}
                    done[job_id] = {
                        "state": state,
                        "failedReason": fields.get("failedReason"),
                        "returnvalue": json.loads(fields.get("returnvalue") or "null"),
                        "attemptsMade": int(fields.get("atm") or fields.get("attemptsMade") or 0),
                    }
        await asyncio.sleep(0.05)
    return done


async def test_job_data_over_the_size_limit_is_refused_and_the_next_job_runs(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given a runner with a 20,000-byte job limit
    api = Api(reply(200, {"ok": True}))
    base = await serve(api.app())
    await runner_process(RUNNER_MAX_JOB_BYTES=str(MAX_JOB_BYTES))
    definition = one_step("wfv_size", base, {"path": {"id": "{{ input.id }}"}})
    big = job("run_big", definition, {"id": "1", "blob": "x" * 50_000})
    small = job("run_small", definition, {"id": "2"})
    # The size the runner measures: the job's data as compact JSON, as Node's JSON.stringify
    # writes it (ASCII only here, so characters are bytes).
    big_bytes = len(json.dumps(big["data"], separators=(",", ":")))

    # When Node sends the oversized job, then a normal one
    jobs = await send_and_settle(redis, clean_queue, [big, small])

    # Then the first fails at once, saying how big it was against which limit, not retried
    assert jobs["run_big"]["state"] == "failed", jobs["run_big"]
    assert jobs["run_big"]["failedReason"] == (
        f"INVALID_PAYLOAD: $: job data is {big_bytes} bytes, over the {MAX_JOB_BYTES}-byte limit"
    )
    assert jobs["run_big"]["attemptsMade"] == 1
    # and the next one runs normally, and only it reached the API
    assert jobs["run_small"]["state"] == "completed", jobs["run_small"]
    assert jobs["run_small"]["returnvalue"]["status"] == "SUCCESS"
    assert [hit.path for hit in api.hits] == ["/items/2/detail"]


async def test_job_data_with_a_lone_surrogate_is_refused_and_the_next_job_runs(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given a runner, and a job whose data holds a lone surrogate (Node's JSON.stringify
    # writes one as "\udc80", which Python's json module decodes), then a job holding
    # characters that are valid however unusual
    api = Api(reply(200, {"ok": True}))
    base = await serve(api.app())
    await runner_process()
    definition = one_step("wfv_parse", base, {"path": {"id": "{{ input.id }}"}})
    surrogate = job("run_surrogate", definition, {"id": "1", "note": "\udc80"})
    plain = job("run_plain", definition, {"id": "2", "note": "ü \u2028 \ud83d\ude00"})

    # When Node sends both
    jobs = await send_and_settle(redis, clean_queue, [surrogate, plain])

    # Then the first is refused as bad payload, not retried
    assert jobs["run_surrogate"]["state"] == "failed", jobs["run_surrogate"]
    assert jobs["run_surrogate"]["failedReason"] == (
        "INVALID_PAYLOAD: $: job data is not valid JSON text (unpaired surrogate?)"
    )
    assert jobs["run_surrogate"]["attemptsMade"] == 1
    # and the other runs with its data as sent, and only it reached the API
    assert jobs["run_plain"]["state"] == "completed", jobs["run_plain"]
    assert [hit.path for hit in api.hits] == ["/items/2/detail"]


async def test_job_data_that_is_not_json_fails_its_job_and_the_next_job_runs(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given two jobs added while no runner is up, the first's data then cut short in Redis
    # (as a producer other than BullMQ, or a bad migration, could leave it)
    api = Api(reply(200, {"ok": True}))
    base = await serve(api.app())
    definition = one_step("wfv_cut", base, {"path": {"id": "{{ input.id }}"}})
    await node_peer(
        "add",
        {
            "queue": clean_queue,
            "jobs": [
                job("run_cut", definition, {"id": "1"}),
                job("run_whole", definition, {"id": "2"}),
            ],
        },
    )
    await redis.hset(f"bull:{clean_queue}:run_cut", "data", '{"workflowRunId": "run_cut", "inp')

    # When a runner starts
    await runner_process()
    jobs = await settled(redis, clean_queue, ["run_cut", "run_whole"])

    # Then the cut job fails as bad payload, saying where the JSON broke, and is not retried
    assert jobs["run_cut"]["state"] == "failed", jobs["run_cut"]
    assert jobs["run_cut"]["failedReason"].startswith("INVALID_PAYLOAD: $: not valid JSON ("), jobs[
        "run_cut"
    ]
    assert jobs["run_cut"]["attemptsMade"] == 1
    # and the other runs, and only it reached the API
    assert jobs["run_whole"]["state"] == "completed", jobs["run_whole"]
    assert [hit.path for hit in api.hits] == ["/items/2/detail"]


# Each reaches past the run's context; the message names where it is and what is wrong.
# The expression compiler names the functions it knows when it meets another.
KNOWN_FUNCTIONS = (
    "(known: abs, avg, ceil, concat, contains, default, ends_with, floor, format, format_date, "
    "join, keys, length, lower, map, max, max_by, merge, min, min_by, not_null, now, replace, "
    "reverse, sort, sort_by, split, starts_with, sum, to_array, to_number, to_string, trim, "
    "type, upper, values)"
)
ESCAPES = [
    (
        {"body": {"cmd": "{{ __import__('os') }}"}},
        "$.graph.steps[0].input.body.cmd: cannot parse '{{ __import__('os') }}': unknown "
        f"function __import__() {KNOWN_FUNCTIONS}",
    ),
    (
        {"query": {"q": "{{ steps['x'] }}"}},
        "$.graph.steps[0].input.query.q: cannot parse '{{ steps['x'] }}' at '['x']'",
    ),
    (
        {"headers": {"X-Config": "value {{ config }}"}},
        "$.graph.steps[0].input.headers.X-Config: '{{ config }}' must start with one of "
        "env, input, run, secrets, steps",
    ),
    (
        {"path": {"id": "{{ input.id.__globals__() }}"}},
        "$.graph.steps[0].input.path.id: cannot parse '{{ input.id.__globals__() }}': unknown "
        f"function __globals__() {KNOWN_FUNCTIONS} at '()'",
    ),
]


async def test_templates_cannot_reach_outside_the_run_or_inject_headers_or_paths(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given an API that records the raw request target, and a runner
    api = Api(reply(200, {"ok": True}))
    base = await serve(api.app())
    await runner_process()
    jobs_out: list[dict[str, Any]] = []
    for i, (step_input, _) in enumerate(ESCAPES):
        definition = one_step(f"wfv_escape_{i}", base, {"path": {"id": "1"}, **step_input})
        jobs_out.append(job(f"run_escape_{i}", definition, {"id": "1"}))
    # a key lookup named like an attribute finds only data: the input's own "__class__" key
    attribute = one_step("wfv_attr", base, {"path": {"id": "{{ input.__class__ }}"}})
    jobs_out.append(job("run_attr_missing", attribute, {"id": "1"}))
    jobs_out.append(job("run_attr_data", attribute, {"__class__": "plain-data"}))
    crlf = one_step(
        "wfv_crlf", base, {"path": {"id": "1"}, "headers": {"X-Note": "{{ input.note }}"}}
    )
    jobs_out.append(job("run_crlf", crlf, {"note": "x\r\nInjected: 1"}))
    traversal = one_step("wfv_traversal", base, {"path": {"id": "{{ input.id }}"}})
    jobs_out.append(job("run_traversal", traversal, {"id": "../../admin"}))

    # When Node sends them all
    jobs = await send_and_settle(redis, clean_queue, jobs_out)

    # Then each escape fails the run as DEFINITION_INVALID naming the location, not retried
    for i, (_, message) in enumerate(ESCAPES):
        escaped = jobs[f"run_escape_{i}"]
        assert escaped["state"] == "failed", escaped
        assert escaped["failedReason"] == f"DEFINITION_INVALID: {message}"
        assert escaped["attemptsMade"] == 1
    # and "__class__" is looked up as a key of the input, never as an attribute
    assert jobs["run_attr_missing"]["failedReason"] == (
        "TEMPLATE_ERROR: $.graph.steps[0].input.path.id: '{{ input.__class__ }}' has no value: "
        "'input' has no '__class__'"
    )
    assert jobs["run_attr_data"]["state"] == "completed", jobs["run_attr_data"]
    # and CR LF in a rendered header fails the step before it is sent
    assert jobs["run_crlf"]["state"] == "failed", jobs["run_crlf"]
    assert jobs["run_crlf"]["failedReason"] == (
        "TEMPLATE_ERROR: $.graph.steps[0].input: header 'X-Note' contains CR, LF or NUL"
    )
    assert jobs["run_crlf"]["attemptsMade"] == 1
    # and the traversal arrives as one encoded segment in its place
    assert jobs["run_traversal"]["state"] == "completed", jobs["run_traversal"]
    # So the API saw exactly two requests: the data-only lookup and the encoded traversal.
    assert sorted(hit.raw_path for hit in api.hits) == [
        "/items/..%2F..%2Fadmin/detail",
        "/items/plain-data/detail",
    ]
    assert not any("Injected" in name for hit in api.hits for name in hit.headers)


async def test_a_password_in_a_base_url_fails_the_run_before_any_request(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given an API, and a connection whose baseUrl carries a user and password (aiohttp would
    # send them as Basic auth; the runner would remember the URL after the run)
    api = Api(reply(200, {"ok": True}))
    base = await serve(api.app())
    await runner_process()
    with_password = base.replace("://", "://svc:hunter2-pw@", 1)
    jobs_out = [
        job("run_userinfo", one_step("wfv_userinfo", with_password, {"path": {"id": "1"}}), {}),
        job("run_after", one_step("wfv_after", base, {"path": {"id": "2"}}), {}),
    ]

    # When Node sends it, then a good one
    jobs = await send_and_settle(redis, clean_queue, jobs_out)

    # Then the run fails as DEFINITION_INVALID, naming the connection and not the password,
    # and is not retried
    failed = jobs["run_userinfo"]
    assert failed["state"] == "failed", failed
    assert failed["failedReason"] == (
        "DEFINITION_INVALID: $.connections.conn.config: baseUrl may not carry a user or password "
        "(user:password@): use a BASIC connection"
    )
    assert failed["attemptsMade"] == 1
    # and the next job runs; only its request reached the API
    assert jobs["run_after"]["state"] == "completed", jobs["run_after"]
    assert [hit.path for hit in api.hits] == ["/items/2/detail"]
