"""DAG steps, conditions and data contracts against a real local API (issue 8).

The engine and the HTTP transport are the real ones (``tests/integration/harness.py``); the
schema failures that end a job are checked through a real runner process and the Node peer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import node_peer
from tests.integration.harness import action, run_workflow, step, version

pytestmark = pytest.mark.integration


class Branches:
    """An API whose ``/slow/*`` endpoints take ``delay_s`` and which records overlap."""

    def __init__(self, delay_s: float = 1.0) -> None:
        self.delay_s = delay_s
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls: list[tuple[str, float, float]] = []
        self.disconnected: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{name}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        start = time.monotonic()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if name.startswith("slow"):
                deadline = start + self.delay_s
                while time.monotonic() < deadline:
                    if request.transport is None or request.transport.is_closing():
                        self.disconnected.append(name)
                        break
                    await asyncio.sleep(0.01)
            if name == "fail":
                return web.json_response({"error": "bad"}, status=400)
            return web.json_response({"name": name, "n": len(self.calls) + 1})
        finally:
            self.in_flight -= 1
            self.calls.append((name, start, time.monotonic()))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


def endpoint(base: str, name: str, action_id: str | None = None, **fields: Any) -> dict[str, Any]:
    return action(f"{base}/{name}", action_id=action_id or name, **fields)


async def test_diamond_runs_its_two_branches_at_once(serve: Any) -> None:
    api = Branches(delay_s=1.0)
    base = await serve(api.app())
    definition = version(
        [
            step("a", "a"),
            step("b", "slow_b", dependsOn=["a"]),
            step("c", "slow_c", dependsOn=["a"]),
            step(
                "d",
                "d",
                dependsOn=["b", "c"],
                input={
                    "query": {
                        "b": "{{ steps.b.output.body.name }}",
                        "c": "{{ steps.c.output.body.name }}",
                    }
                },
            ),
        ],
        [endpoint(base, n) for n in ("a", "slow_b", "slow_c", "d")],
    )
    record = await run_workflow(definition)

    assert record.outcome.status == "SUCCESS"
    # b and c were in flight together: the run took about one slow call, not two.
    assert api.max_in_flight == 2
    by_name = {c[0]: c for c in api.calls}
    assert (
        by_name["slow_b"][1] < by_name["slow_c"][2] and by_name["slow_c"][1] < by_name["slow_b"][2]
    )
    assert record.elapsed_s < 1.8
    # a before both branches, d after both.
    assert by_name["a"][2] <= min(by_name["slow_b"][1], by_name["slow_c"][1])
    assert by_name["d"][1] >= max(by_name["slow_b"][2], by_name["slow_c"][2])
    assert record.outcome.steps["d"].output["body"]["name"] == "d"


async def test_false_when_skips_and_sends_nothing_and_later_steps_still_run(serve: Any) -> None:
    api = Branches()
    base = await serve(api.app())
    definition = version(
        [
            step("first", "first"),
            step("maybe", "maybe", when="{{ input.send }}"),
            step("after", "after"),
            step(
                "reads_skipped",
                "reads",
                dependsOn=["maybe"],
                input={"query": {"x": "{{ steps.maybe.output.body.name }}"}},
            ),
            step("guarded", "guarded", dependsOn=["maybe"], when="{{ input.send }}"),
        ],
        [endpoint(base, n) for n in ("first", "maybe", "after", "reads", "guarded")],
    )
    definition["graph"]["steps"][3]["onFailure"] = "CONTINUE"
    record = await run_workflow(definition, run_input={"send": False})

    assert api.names() == ["first", "after"]
    statuses = {k: s.status for k, s in record.outcome.steps.items()}
    assert statuses == {
        "first": "SUCCESS",
        "maybe": "SKIPPED",
        "after": "SUCCESS",
        "reads_skipped": "FAILED",
        "guarded": "SKIPPED",
    }
    assert record.error_code("reads_skipped") == "TEMPLATE_ERROR"
    assert [e["status"] for e in record.step_events("maybe")] == ["SKIPPED"]
    assert record.outcome.status == "SUCCESS"


async def test_continue_keeps_the_run_going_and_its_output_is_a_template_error_later(
    serve: Any,
) -> None:
    api = Branches()
    base = await serve(api.app())
    definition = version(
        [
            step("boom", "fail", onFailure="CONTINUE"),
            step("next", "next"),
            step(
                "needs_boom",
                "needs",
                onFailure="CONTINUE",
                input={"body": {"v": "{{ steps.boom.output.body }}"}},
            ),
            step(
                "by_status",
                "status",
                when="{{ steps.boom.status }}",
                input={"query": {"s": "{{ steps.boom.status }}"}},
            ),
        ],
        [endpoint(base, n) for n in ("fail", "next", "needs", "status")],
    )
    record = await run_workflow(definition)

    assert record.outcome.status == "SUCCESS"
    assert api.names() == ["fail", "next", "status"]
    assert record.error_code("boom") == "HTTP_ERROR"
    assert record.error_code("needs_boom") == "TEMPLATE_ERROR"
    assert "steps.boom.output" in str(record.outcome.steps["needs_boom"].error)
    assert record.outcome.steps["by_status"].status == "SUCCESS"


async def test_fail_run_failure_cancels_a_running_sibling(serve: Any) -> None:
    api = Branches(delay_s=5.0)
    base = await serve(api.app())
    definition = version(
        [
            step("root", "root"),
            step("slow", "slow_sibling", dependsOn=["root"]),
            step("boom", "fail", dependsOn=["root"]),
            step("after", "after", dependsOn=["slow", "boom"]),
        ],
        [endpoint(base, n) for n in ("root", "slow_sibling", "fail", "after")],
    )
    record = await run_workflow(definition)

    assert record.outcome.status == "FAILED"
    assert record.outcome.error is not None and record.outcome.error.code == "HTTP_ERROR"
    statuses = {k: s.status for k, s in record.outcome.steps.items()}
    assert statuses == {
        "root": "SUCCESS",
        "slow": "CANCELED",
        "boom": "FAILED",
        "after": "CANCELED",
    }
    assert record.elapsed_s < 4.0, "the sibling was not cancelled"
    for _ in range(100):
        if api.disconnected:
            break
        await asyncio.sleep(0.02)
    assert api.disconnected == ["slow_sibling"]
    assert "after" not in api.names()


async def test_step_parallelism_bounds_the_branches_in_flight(serve: Any) -> None:
    api = Branches(delay_s=0.3)
    base = await serve(api.app())
    definition = version(
        [step(f"s{i}", "slow", dependsOn=[]) for i in range(6)],
        [endpoint(base, "slow")],
    )
    record = await run_workflow(definition, step_parallelism=2)
    assert record.outcome.status == "SUCCESS"
    assert api.max_in_flight == 2


async def test_schema_failures_end_the_job_with_their_code_and_field(
    serve: Any, runner_process: Any, clean_queue: str
) -> None:
    api = Branches()
    base = await serve(api.app())
    good_body = {"priority": "{{ input.priority }}"}
    definition = version(
        [
            step("create", "create", input={"body": good_body}),
            step("check", "check"),
        ],
        [
            endpoint(
                base,
                "create",
                method="POST",
                bodySchema={"type": "object", "properties": {"priority": {"type": "integer"}}},
            ),
            endpoint(
                base,
                "check",
                outputSchema={"type": "object", "properties": {"name": {"type": "integer"}}},
            ),
        ],
        version_id="wfv_schemas",
    )
    definition["parameterSchema"] = {
        "type": "object",
        "required": ["priority"],
        "properties": {"priority": {}},
    }
    await runner_process()

    def job(run_id: str, run_input: dict[str, Any]) -> dict[str, Any]:
        return {
            "data": {
                "workflowRunId": run_id,
                "workflowVersionId": "wfv_schemas",
                "tenantId": "ten",
                "input": run_input,
                "workflowVersion": definition,
            },
            "opts": {"jobId": run_id, "attempts": 2},
        }

    report = await node_peer(
        "run",
        {
            "queue": clean_queue,
            "jobs": [
                job("run_no_input", {}),
                job("run_bad_body", {"priority": "high"}),
                job("run_bad_output", {"priority": 1}),
            ],
        },
    )
    reasons = {jid: j["failedReason"] for jid, j in report["jobs"].items()}
    assert reasons["run_no_input"] == "INVALID_INPUT: $.input: must contain ['priority'] properties"
    assert reasons["run_bad_body"] == "SCHEMA_VALIDATION: create: body.priority must be integer"
    assert (
        reasons["run_bad_output"] == "SCHEMA_VALIDATION: check: response body.name must be integer"
    )
    assert all(report["jobs"][j]["attemptsMade"] == 1 for j in reasons)
    # Nothing was sent for a run whose input or body was refused.
    assert api.names().count("create") == 1  # only run_bad_output's create went out
