"""The backbone end to end: Node BullMQ produces, ``python -m runner`` runs, Node watches.

Real Redis, a real runner process, a real local HTTP API, the Node peer as the control plane.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from aiohttp import web
from sample_api import SampleApi

from runner.credentials import seal
from tests.conftest import b64key, node_peer, read_stream
from tests.workflows import job_data, three_step_version

pytestmark = pytest.mark.integration

API_KEY = "k-backbone-0001"


def sealed_for(run_id: str, key: bytes, api_key: str = API_KEY) -> str:
    creds = {"connections": {}, "secrets": {}}
    creds["connections"]["conn_api"] = {
        "id": "conn_api",
        "type": "API_KEY",
        "config": {},
        "secrets": {"apiKey": api_key},
    }
    return seal(msgspec.json.encode(creds), key, run_id)


async def test_three_step_workflow_runs_to_success_and_node_sees_everything(
    serve: Any, runner_process: Any, clean_queue: str, redis: Any, credentials_key: bytes
) -> None:
    # Given a sample API behind an API key and a runner with the credentials key
    api = SampleApi(API_KEY)
    base = await serve(api.app())
    version = three_step_version(base)
    # The definition names the connection without secrets; the job carries them sealed.
    version["connections"]["conn_api"]["config"]["baseUrl"] = base
    await runner_process(RUNNER_CREDENTIALS_KEY=b64key(credentials_key))

    # When Node adds a workflow_run job
    run_id = "run_backbone_1"
    data = job_data(run_id, version, sealedCredentials=sealed_for(run_id, credentials_key))
    report = await node_peer(
        "run",
        {"queue": clean_queue, "jobs": [{"data": data, "opts": {"jobId": run_id}}]},
    )

    # Then the run completes with the summary as returnvalue
    job = report["jobs"][run_id]
    assert job["state"] == "completed", job
    summary = job["returnvalue"]
    assert summary["workflowRunId"] == run_id
    assert summary["status"] == "SUCCESS"
    assert list(summary["steps"]) == ["fetch_customer", "create_ticket", "get_ticket"]
    assert all(
        s == {"status": "SUCCESS", "attempts": 1, "durationMs": s["durationMs"]}
        for s in summary["steps"].values()
    )
    assert job["processedBy"] == "test-runner-0"

    # and the API saw data flow between the steps through the templates
    paths = [(r["method"], r["path"]) for r in api.requests]
    assert paths == [
        ("GET", "/customers/c%2042%2F%C3%A9%3F%23"),
        ("POST", "/tickets"),
        ("GET", "/tickets/t_1"),
    ]
    ticket = api.tickets["t_1"]
    assert ticket == {
        "id": "t_1",
        "requester": "c 42/é?#@example.com",
        "region": "eu",
        "subject": "Order 7 for Customer c 42/é?#",
        "priority": 2,
    }
    post = api.requests[1]["headers"]
    assert post["Idempotency-Key"] == f"{run_id}:create_ticket"
    assert post["X-Region"] == "eu"
    assert post["X-API-Key"] == API_KEY

    # and Node's QueueEvents saw progress and completion
    progress = [e["data"] for e in report["events"] if e["event"] == "progress"]
    assert [p["completedSteps"] for p in progress] == [1, 2, 3]
    assert progress[-1] == {
        "progress": 100,
        "stepKey": "get_ticket",
        "status": "SUCCESS",
        "completedSteps": 3,
        "totalSteps": 3,
    }
    completed = [e for e in report["events"] if e["event"] == "completed"]
    assert len(completed) == 1
    returned = completed[0]["returnvalue"]
    assert (json.loads(returned) if isinstance(returned, str) else returned) == summary

    # and the job log has one line per transition
    logs = job["logs"]
    assert any("fetch_customer RUNNING attempt 1" in line for line in logs)
    assert any("get_ticket SUCCESS" in line for line in logs)
    assert any(line.endswith("run SUCCESS") for line in logs)
    assert not any(API_KEY in line for line in logs)

    # and the stream holds the run's events in seq order with the contract's fields
    events = [
        e
        for e in await read_stream(redis, f"bull:{clean_queue}:status")
        if e["workflowRunId"] == run_id
    ]
    assert [e["seq"] for e in events] == list(range(1, 9))
    assert [(e["kind"], e.get("stepKey"), e["status"]) for e in events] == [
        ("run", None, "RUNNING"),
        ("step", "fetch_customer", "RUNNING"),
        ("step", "fetch_customer", "SUCCESS"),
        ("step", "create_ticket", "RUNNING"),
        ("step", "create_ticket", "SUCCESS"),
        ("step", "get_ticket", "RUNNING"),
        ("step", "get_ticket", "SUCCESS"),
        ("run", None, "SUCCESS"),
    ]
    step_done = events[2]
    for name in (
        "v",
        "seq",
        "kind",
        "workflowRunId",
        "tenantId",
        "workflowVersionId",
        "jobId",
        "stepKey",
        "stepRunId",
        "status",
        "attempt",
        "at",
        "startedAt",
        "finishedAt",
        "output",
        "errorCode",
        "errorMessage",
    ):
        assert name in step_done, name
    assert step_done["stepRunId"] == f"{run_id}:fetch_customer"
    assert step_done["output"]["email"] == "c 42/é?#@example.com"
    assert step_done["output"]["status"] == 200
    assert "stepKey" not in events[0]
    raw_stream = json.dumps(events)
    assert API_KEY not in raw_stream


async def test_malformed_job_fails_with_its_error_code_and_the_next_job_still_succeeds(
    serve: Any, runner_process: Any, clean_queue: str, credentials_key: bytes
) -> None:
    api = SampleApi(API_KEY)
    base = await serve(api.app())
    runner = await runner_process(RUNNER_CREDENTIALS_KEY=b64key(credentials_key))
    good = job_data(
        "run_good",
        three_step_version(base),
        sealedCredentials=sealed_for("run_good", credentials_key),
    )
    bad_input = {**job_data("run_bad", None), "input": "not an object"}
    missing = {"workflowRunId": "run_missing", "tenantId": "t", "input": {}}
    report = await node_peer(
        "run",
        {
            "queue": clean_queue,
            "jobs": [
                {"data": bad_input, "opts": {"jobId": "run_bad", "attempts": 3}},
                {"data": missing, "opts": {"jobId": "run_missing"}},
                {"name": "other_job", "data": good, "opts": {"jobId": "wrong_name"}},
                {"data": good, "opts": {"jobId": "run_good"}},
            ],
        },
    )
    jobs = report["jobs"]
    assert jobs["run_bad"]["state"] == "failed"
    assert jobs["run_bad"]["failedReason"] == "INVALID_PAYLOAD: $.input: expected object, got str"
    assert jobs["run_bad"]["attemptsMade"] == 1  # UnrecoverableError: not retried
    assert jobs["run_missing"]["failedReason"] == (
        "INVALID_PAYLOAD: $: object missing required field workflowVersionId"
    )
    assert jobs["wrong_name"]["failedReason"] == (
        "INVALID_PAYLOAD: $: job name 'other_job' is not 'workflow_run'"
    )
    assert jobs["run_good"]["state"] == "completed"
    assert jobs["run_good"]["returnvalue"]["status"] == "SUCCESS"
    # Whether a job came from the loop's fetch or from the previous job's moveToFinished,
    # Bull Board can tell which worker ran it.
    assert {j["processedBy"] for j in jobs.values()} == {"test-runner-0"}
    # and the worker itself never stumbled (a failed job is not a worker error)
    assert [e for e in runner.log_events() if e.get("event") == "worker.error"] == []


async def test_definition_is_fetched_once_from_the_control_plane_for_many_runs(
    serve: Any, runner_process: Any, clean_queue: str
) -> None:
    # Given a control plane that serves the definition and the run credentials
    api = SampleApi(API_KEY)
    base = await serve(api.app())
    version = three_step_version(base, version_id="wfv_fetched")
    calls: dict[str, list[Any]] = {"versions": [], "credentials": []}

    async def get_version(request: web.Request) -> web.Response:
        calls["versions"].append(
            (request.headers.get("Authorization"), request.headers.get("X-Tenant-Id"))
        )
        if request.match_info["id"] != "wfv_fetched":
            return web.json_response({"error": "not found"}, status=404)
        return web.json_response(version)

    async def credentials(request: web.Request) -> web.Response:
        body = await request.json()
        calls["credentials"].append(body)
        conn = {**version["connections"]["conn_api"], "secrets": {"apiKey": API_KEY}}
        return web.json_response({"connections": {"conn_api": conn}, "secrets": {}})

    app = web.Application()
    app.router.add_get("/runner/v1/workflow-versions/{id}", get_version)
    app.router.add_post("/runner/v1/runs/{run}/credentials", credentials)
    control_plane = await serve(app)
    await runner_process(
        RUNNER_CONTROL_PLANE_URL=control_plane, RUNNER_CONTROL_PLANE_TOKEN="cp-token-xyz"
    )

    # When twenty runs of the version and one of an unknown version are added
    jobs = [
        {
            "data": job_data(f"run_f{i}", None, version_id="wfv_fetched"),
            "opts": {"jobId": f"run_f{i}"},
        }
        for i in range(20)
    ]
    jobs.append(
        {"data": job_data("run_nf", None, version_id="wfv_unknown"), "opts": {"jobId": "run_nf"}}
    )
    report = await node_peer("run", {"queue": clean_queue, "jobs": jobs})

    # Then every run succeeds, the definition was fetched once, credentials once per run
    states = {jid: j["state"] for jid, j in report["jobs"].items()}
    assert all(states[f"run_f{i}"] == "completed" for i in range(20)), states
    ok_fetches = [c for c in calls["versions"]]
    assert len(ok_fetches) == 2  # wfv_fetched once, wfv_unknown once
    assert ok_fetches[0] == ("Bearer cp-token-xyz", "ten_acme")
    assert len(calls["credentials"]) == 20
    assert calls["credentials"][0] == {
        "tenantId": "ten_acme",
        "connectionIds": ["conn_api"],
        "secretRefs": [],
    }
    assert report["jobs"]["run_nf"]["failedReason"] == (
        "DEFINITION_NOT_FOUND: workflow version 'wfv_unknown' does not exist"
    )
