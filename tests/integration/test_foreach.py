"""forEach and expressions end to end: real runner processes, real Redis, a Node producer, and
a real local API that records every call and how many were in flight at once."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tests.conftest import node_peer
from tests.integration.test_resilience import job_state, run_events, wait_for
from tests.workflows import job_data

pytestmark = pytest.mark.integration


class ItemsApi:
    """``/items/{id}``: answers after ``delay_s``, counts requests in flight; an id in
    ``fail`` answers 500, an id in ``hang`` waits until the client goes away."""

    def __init__(self, *, delay_s: float = 0.05) -> None:
        self.delay_s = delay_s
        self.calls: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.fail: set[str] = set()
        self.hang: set[str] = set()
        self.hung = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/items/{id}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        item_id = request.match_info["id"]
        body = await request.read()
        self.calls.append(
            {
                "id": item_id,
                "key": request.headers.get("Idempotency-Key"),
                "label": request.headers.get("X-Label"),
                "body": json.loads(body) if body else None,
            }
        )
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if item_id in self.hang:
                self.hang.discard(item_id)  # only the first time
                self.hung.set()
                while request.transport is not None and not request.transport.is_closing():
                    await asyncio.sleep(0.02)
            await asyncio.sleep(self.delay_s)
            if item_id in self.fail:
                return web.json_response({"error": "no"}, status=500)
            return web.json_response({"id": item_id, "ok": True})
        finally:
            self.in_flight -= 1

    def ids(self) -> list[str]:
        return [c["id"] for c in self.calls]


def map_version(
    base: str, version_id: str, *, max_parallel: int = 3, **step_fields: Any
) -> dict[str, Any]:
    return {
        "id": version_id,
        "timeoutMs": 120_000,
        "graph": {
            "steps": [
                {
                    "key": "each",
                    "actionId": "put_item",
                    "connectionId": "c",
                    "forEach": "input.items[?enabled]",
                    "maxParallel": max_parallel,
                    "when": "{{ length(input.items) > `0` }}",
                    "input": {
                        "path": {"id": "{{ item.id }}"},
                        "headers": {"X-Label": "{{ upper(item.name) || 'NONE' }}"},
                        "body": {
                            "position": "{{ index }}",
                            "label": "{{ format('{}#{}', item.name, index) }}",
                        },
                    },
                    **step_fields,
                },
                {
                    "key": "after",
                    "actionId": "put_item",
                    "connectionId": "c",
                    "input": {
                        "path": {"id": "summary"},
                        "body": {"ok": "{{ length(steps.each.output[?body.ok]) }}"},
                    },
                },
            ]
        },
        "actions": {
            "put_item": {
                "id": "put_item",
                "method": "PUT",
                "endpointTemplate": "/items/{id}",
                "idempotencyHeader": "Idempotency-Key",
            }
        },
        "connections": {"c": {"id": "c", "type": "NONE", "config": {"baseUrl": base}}},
    }


def items(n: int, *, disabled: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    return [{"id": f"i{i}", "name": f"n{i}", "enabled": i not in disabled} for i in range(n)]


async def add(queue: str, run_id: str, version: dict[str, Any], run_input: Any) -> None:
    data = job_data(run_id, version, input=run_input)
    await node_peer("add", {"queue": queue, "jobs": [{"data": data, "opts": {"jobId": run_id}}]})


async def until_state(redis: aioredis.Redis, queue: str, run_id: str, state: str) -> None:
    async def reached() -> bool:
        return await job_state(redis, queue, run_id) == state

    await wait_for(reached, 30, f"job {run_id} {state}")


async def failed_reason(redis: aioredis.Redis, queue: str, run_id: str) -> str:
    raw = await redis.hget(f"bull:{queue}:{run_id}", "failedReason")
    return raw.decode() if raw else ""


async def test_a_map_runs_each_item_at_most_max_parallel_at_once_with_its_own_key(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given 12 items, one disabled, and maxParallel 3
    api = ItemsApi(delay_s=0.1)
    base = await serve(api.app())
    await runner_process()
    run_id = "run_map"
    await add(
        clean_queue, run_id, map_version(base, "wfv_map"), {"items": items(12, disabled=(4,))}
    )

    # When the run completes
    await until_state(redis, clean_queue, run_id, "completed")

    # Then 11 items were called, never more than 3 at once, each with its own stable key
    each = [c for c in api.calls if c["id"] != "summary"]
    assert sorted(c["id"] for c in each) == sorted(f"i{i}" for i in range(12) if i != 4)
    assert api.max_in_flight == 3
    assert {c["key"] for c in each} == {f"{run_id}:each:{i}" for i in range(11)}
    # ... with expressions rendered in headers and body, per item
    by_id = {c["id"]: c for c in each}
    assert by_id["i5"]["label"] == "N5"
    assert by_id["i5"]["body"] == {"position": 4, "label": "n5#4"}  # index among the enabled
    # ... and the next step read the list of outputs through an expression
    summary = next(c for c in api.calls if c["id"] == "summary")
    assert summary["body"] == {"ok": 11}
    # One RUNNING and one SUCCESS event for the map, with item counts: no event per item
    events = await run_events(redis, clean_queue, run_id)
    map_events = [e for e in events if e.get("stepKey") == "each"]
    assert [e["status"] for e in map_events] == ["RUNNING", "SUCCESS"]
    assert map_events[0]["items"] == {"total": 11, "succeeded": 0, "failed": 0}
    assert map_events[1]["items"] == {"total": 11, "succeeded": 11, "failed": 0}
    assert map_events[1]["stepRunId"] == f"{run_id}:each"
    assert [e["attempt"] for e in map_events] == [1, 1]
    assert len(events) == 6  # run RUNNING, each x2, after x2, run SUCCESS


async def test_a_killed_map_resumes_with_only_the_unfinished_items_and_the_same_keys(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given a map, one item at a time, whose item 5 hangs the first time
    api = ItemsApi(delay_s=0.0)
    api.hang.add("i5")
    base = await serve(api.app())
    fast_locks = {
        "RUNNER_LOCK_DURATION_MS": "1500",
        "RUNNER_STALLED_INTERVAL_MS": "500",
    }
    first = await runner_process(**fast_locks)
    run_id = "run_map_kill"
    version = map_version(base, "wfv_map_kill", max_parallel=1)
    await add(clean_queue, run_id, version, {"items": items(8)})

    # When the runner dies while item 5 is in flight, and another takes the job
    await asyncio.wait_for(api.hung.wait(), 20)
    first.terminate(signal.SIGKILL)
    await runner_process(**fast_locks)
    await until_state(redis, clean_queue, run_id, "completed")

    # Then items 0-4 were called once, item 5 again with the same key, the rest once
    ids = [c["id"] for c in api.calls if c["id"] != "summary"]
    assert sorted(ids) == sorted([f"i{i}" for i in range(8)] + ["i5"])
    keys = [c["key"] for c in api.calls if c["id"] == "i5"]
    assert keys == [f"{run_id}:each:5", f"{run_id}:each:5"]
    summary = next(c for c in api.calls if c["id"] == "summary")
    assert summary["body"] == {"ok": 8}  # restored items' outputs count too


async def test_continue_collects_item_errors_and_fail_fails_the_run_naming_the_item(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    api = ItemsApi(delay_s=0.0)
    api.fail.add("i2")
    base = await serve(api.app())
    await runner_process()

    # Given onItemError continue, when item 2 answers 500
    version = map_version(base, "wfv_map_cont", onItemError="continue")
    version["graph"]["steps"][1]["input"]["body"] = {
        "errors": "{{ steps.each.output[?errorCode].errorMessage }}"
    }
    await add(clean_queue, "run_cont", version, {"items": items(4)})
    await until_state(redis, clean_queue, "run_cont", "completed")

    # Then the run succeeds and the error is in the step's output, in its place
    summary = next(c for c in api.calls if c["id"] == "summary")
    assert summary["body"] == {"errors": ["each: item 2: PUT answered 500"]}
    events = await run_events(redis, clean_queue, "run_cont")
    done = [e for e in events if e.get("stepKey") == "each" and e["status"] == "SUCCESS"]
    assert done[0]["items"] == {"total": 4, "succeeded": 3, "failed": 1}

    # Given onItemError fail (the default), the run fails with the item's error
    await add(clean_queue, "run_fail", map_version(base, "wfv_map_fail"), {"items": items(4)})
    await until_state(redis, clean_queue, "run_fail", "failed")
    assert await failed_reason(redis, clean_queue, "run_fail") == (
        "HTTP_ERROR: each: item 2: PUT answered 500"
    )


async def test_a_map_over_more_items_than_the_cap_fails_before_any_request(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    api = ItemsApi(delay_s=0.0)
    base = await serve(api.app())
    await runner_process(RUNNER_MAX_FOREACH_ITEMS="5")

    await add(clean_queue, "run_cap", map_version(base, "wfv_map_cap"), {"items": items(6)})
    await until_state(redis, clean_queue, "run_cap", "failed")

    assert await failed_reason(redis, clean_queue, "run_cap") == (
        "TEMPLATE_ERROR: $.graph.steps[0].forEach: yields 6 items, more than "
        "RUNNER_MAX_FOREACH_ITEMS (5)"
    )
    assert api.calls == []


async def test_a_bad_expression_fails_the_run_as_definition_invalid_with_its_path(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    api = ItemsApi(delay_s=0.0)
    base = await serve(api.app())
    await runner_process()
    version = map_version(base, "wfv_bad_expr")
    version["graph"]["steps"][0]["input"]["headers"]["X-Label"] = "{{ uper(item.name) }}"

    await add(clean_queue, "run_bad_expr", version, {"items": items(2)})
    await until_state(redis, clean_queue, "run_bad_expr", "failed")

    reason = await failed_reason(redis, clean_queue, "run_bad_expr")
    assert reason.startswith(
        "DEFINITION_INVALID: $.graph.steps[0].input.headers.X-Label: cannot parse "
        "'{{ uper(item.name) }}': unknown function uper()"
    )
    assert api.calls == []


async def test_an_expression_over_its_budget_fails_the_step_as_template_error_not_internal(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given a small budget and a header that walks 1,000 values
    api = ItemsApi(delay_s=0.0)
    base = await serve(api.app())
    await runner_process(RUNNER_EXPRESSION_BUDGET="200")
    version = map_version(base, "wfv_budget")
    version["graph"]["steps"][0]["input"]["headers"]["X-Label"] = (
        "{{ join(',', input.big[*].name) }}"
    )
    run_input = {"items": items(2), "big": [{"name": f"n{i}"} for i in range(1000)]}

    await add(clean_queue, "run_budget", version, run_input)
    await until_state(redis, clean_queue, "run_budget", "failed")

    # Then the run fails with TEMPLATE_ERROR naming the setting, before any request
    assert await failed_reason(redis, clean_queue, "run_budget") == (
        "TEMPLATE_ERROR: $.graph.steps[0].input.headers.X-Label: "
        "'{{ join(',', input.big[*].name) }}' cannot be evaluated: it needs more than "
        "RUNNER_EXPRESSION_BUDGET (200) steps (item 0)"
    )
    assert api.calls == []


async def test_a_false_when_expression_skips_the_map_and_the_next_step_reads_its_status(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    api = ItemsApi(delay_s=0.0)
    base = await serve(api.app())
    await runner_process()
    version = map_version(base, "wfv_when")
    version["graph"]["steps"][1]["input"]["body"] = {
        "each": "{{ steps.each.status }}",
        "n": "{{ length(input.items) }}",
    }

    await add(clean_queue, "run_when", version, {"items": []})
    await until_state(redis, clean_queue, "run_when", "completed")

    assert [c["id"] for c in api.calls] == ["summary"]
    assert api.calls[0]["body"] == {"each": "SKIPPED", "n": 0}


async def test_a_map_handed_back_at_shutdown_finishes_elsewhere_without_repeating_items(
    serve: Any, runner_process: Any, clean_queue: str, redis: aioredis.Redis
) -> None:
    # Given a map, two at a time, whose item 3 hangs the first time
    api = ItemsApi(delay_s=0.0)
    api.hang.add("i3")
    base = await serve(api.app())
    first = await runner_process(RUNNER_SHUTDOWN_GRACE_S="0.5")
    run_id = "run_map_term"
    await add(
        clean_queue, run_id, map_version(base, "wfv_map_term", max_parallel=2), {"items": items(6)}
    )
    await asyncio.wait_for(api.hung.wait(), 20)

    # When the runner is told to stop past its grace period, and another one runs
    await runner_process()
    first.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(first.proc.wait, 20) == 0
    await until_state(redis, clean_queue, run_id, "completed")

    # Then every item ended once, only the interrupted one was sent again (same key)
    ids = [c["id"] for c in api.calls if c["id"] != "summary"]
    assert sorted(set(ids)) == [f"i{i}" for i in range(6)]
    repeated = sorted(i for i in set(ids) if ids.count(i) > 1)
    assert "i3" in repeated
    for item_id in repeated:
        keys = {c["key"] for c in api.calls if c["id"] == item_id}
        assert keys == {f"{run_id}:each:{int(item_id[1:])}"}
    summary = next(c for c in api.calls if c["id"] == "summary")
    assert summary["body"] == {"ok": 6}
    events = await run_events(redis, clean_queue, run_id)
    assert not [e for e in events if e["status"] == "CANCELED"], "a hand-back is not a cancel"
