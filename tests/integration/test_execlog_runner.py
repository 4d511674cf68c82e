"""Execution logs through a real runner process into the MongoDB wire server (CONTRACT §7)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import web
from pymongo import AsyncMongoClient

from tests.conftest import node_peer

pytestmark = pytest.mark.integration


async def test_a_runs_lines_arrive_once_each_with_a_large_response_as_a_preview(
    serve: Any, runner_process: Any, clean_queue: str, mongo_db_url: str
) -> None:
    # Given an API with a small answer and a 5 MB one, and a runner logging to MongoDB
    big = "x" * (5 * 1024 * 1024)
    calls = {"flaky": 0}

    async def small(request: web.Request) -> web.Response:
        calls["flaky"] += 1
        return web.json_response({"ok": True}, status=503 if calls["flaky"] == 1 else 200)

    async def large(request: web.Request) -> web.Response:
        return web.json_response({"blob": big})

    app = web.Application(client_max_size=1024)
    app.router.add_get("/small", small)
    app.router.add_get("/large", large)
    base = await serve(app)
    runner = await runner_process(RUNNER_MONGODB_URL=mongo_db_url)
    version = {
        "id": "wfv_logs",
        "graph": {
            "steps": [{"key": "flaky", "actionId": "small"}, {"key": "huge", "actionId": "large"}]
        },
        "actions": {
            "small": {
                "id": "small",
                "endpointTemplate": f"{base}/small",
                "retryStrategy": "FIXED",
                "maxAttempts": 2,
                "initialDelayMs": 10,
            },
            "large": {"id": "large", "endpointTemplate": f"{base}/large"},
        },
    }
    run_id = "run_logs"
    data = {
        "workflowRunId": run_id,
        "workflowVersionId": "wfv_logs",
        "tenantId": "ten_logs",
        "input": {},
        "workflowVersion": version,
    }

    # When the run completes
    report = await node_peer(
        "run", {"queue": clean_queue, "jobs": [{"data": data, "opts": {"jobId": run_id}}]}
    )
    assert report["jobs"][run_id]["state"] == "completed", report["jobs"][run_id]

    # Then every line of the run is in execution_logs once, with the contract's fields
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongo_db_url, serverSelectionTimeoutMS=5000
    )
    try:
        collection = client.get_default_database()["execution_logs"]
        deadline = time.monotonic() + 15
        docs: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            docs = await collection.find({"workflowRunId": run_id}).sort("timestamp", 1).to_list()
            if any(d["message"] == "run SUCCESS" for d in docs):
                break
            await asyncio.sleep(0.1)
        messages = [(d["stepKey"], d["attempt"], d["message"]) for d in docs]
        attempts = [(k, n, m.split(" in ")[0]) for k, n, m in messages if m.startswith("attempt")]
        assert attempts == [
            ("flaky", 1, "attempt 1 HTTP_ERROR 503"),
            ("flaky", 2, "attempt 2 200"),
            ("huge", 1, "attempt 1 200"),
        ]
        assert [m for m in messages if m[2].startswith("step ")] == [
            ("flaky", 2, "step SUCCESS"),
            ("huge", 1, "step SUCCESS"),
        ]
        assert messages[0] == (None, None, "run started") and messages[-1] == (
            None,
            None,
            "run SUCCESS",
        )
        assert len(messages) == len(set(d["_id"] for d in docs)) == 7
        for doc in docs:
            assert doc["tenantId"] == "ten_logs" and doc["jobId"] == run_id
            assert doc["workerId"] == "test-runner-0"
            assert doc["stepRunId"] == (f"{run_id}:{doc['stepKey']}" if doc["stepKey"] else None)
            assert doc["level"] in ("info", "warning", "error")
            assert hasattr(doc["timestamp"], "year"), "timestamp must be a BSON date"
        retry = next(d for d in docs if d["stepKey"] == "flaky" and d["attempt"] == 1)
        assert retry["context"]["method"] == "GET"
        assert retry["context"]["status"] == 503
        assert retry["context"]["reason"] == "backoff" and retry["context"]["delayMs"] == 10
        # and the 5 MB response is a preview with its size, not the payload
        huge = next(d for d in docs if d["stepKey"] == "huge" and d["message"] == "step SUCCESS")
        # (previewed whole, from its redacted JSON: walking 5 MB for the one large leaf held
        # the event loop, issue 21)
        blob = huge["context"]["output"]
        assert blob["truncated"] is True
        assert blob["sizeBytes"] >= 5 * 1024 * 1024
        assert len(blob["preview"]) < 4096
        indexes = await collection.index_information()
        assert any(
            [tuple(k) for k in spec["key"]]
            == [("tenantId", 1), ("workflowRunId", 1), ("timestamp", 1)]
            for spec in indexes.values()
        )
    finally:
        await client.close()
    assert runner.proc.poll() is None
