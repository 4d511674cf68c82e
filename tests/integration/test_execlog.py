"""Execution logs against a MongoDB wire server (nx-27017, or ``MONGODB_URI``)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection

from runner.reporting.execlog import (
    COLLECTION,
    INDEX_KEYS,
    TTL_KEYS,
    Level,
    LogLine,
    MongoBatchWriter,
    MongoExecutionLog,
    build_document,
    timestamp_of,
)
from tests.mongo_server import MongoServer, with_database

# Fixtures mongo_db_url and restartable_mongo come from tests.mongo_server (tests/conftest.py).
pytestmark = pytest.mark.integration

T0_MS = 1_795_639_999_001


def make_line(run_id: str, n: int, level: Level = "info", **overrides: Any) -> LogLine:
    fields: dict[str, Any] = {
        "tenant_id": "ten_acme",
        "workflow_run_id": run_id,
        "job_id": run_id,
        "worker_id": "worker-1",
        "level": level,
        "message": f"line {n}",
        "context": {"n": n},
        "timestamp_ms": T0_MS + n,
    }
    fields.update(overrides)
    return LogLine(**fields)


@pytest.fixture
async def collection(mongo_db_url: str) -> AsyncIterator[AsyncCollection[dict[str, Any]]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongo_db_url, serverSelectionTimeoutMS=5000, tz_aware=True
    )
    try:
        yield client.get_default_database()[COLLECTION]
    finally:
        await client.close()


async def read_run(
    collection: AsyncCollection[dict[str, Any]], run_id: str
) -> list[dict[str, Any]]:
    cursor = collection.find({"tenantId": "ten_acme", "workflowRunId": run_id})
    return [doc async for doc in cursor]


async def test_startup_creates_the_index(
    mongo_db_url: str, collection: AsyncCollection[dict[str, Any]]
) -> None:
    sink = MongoExecutionLog(mongo_db_url)

    await sink.startup()
    await sink.shutdown()

    indexes = await collection.index_information()
    # nx-27017 does not keep index names, so look the index up by its keys.
    keys = [[(name, int(order)) for name, order in info["key"]] for info in indexes.values()]
    assert INDEX_KEYS in keys


async def test_every_line_of_a_run_is_stored_once_with_its_fields(
    mongo_db_url: str, collection: AsyncCollection[dict[str, Any]]
) -> None:
    # Given a run of three steps with a few attempts, logged through the sink
    sink = MongoExecutionLog(mongo_db_url, batch_size=4, flush_interval_s=0.01)
    await sink.startup()
    lines = [make_line("run_a", 0, message="run started")]
    for i, step in enumerate(["fetch", "transform", "notify"], start=1):
        for attempt in (1, 2):
            n = i * 10 + attempt
            lines.append(
                make_line(
                    "run_a",
                    n,
                    "error" if attempt == 1 else "info",
                    step_key=step,
                    step_run_id=f"run_a:{step}",
                    attempt=attempt,
                )
            )
    lines.append(make_line("run_b", 99))  # another run, must not leak into run_a's logs

    # When every line is written and the sink flushed
    for line in lines:
        sink.write(line)
    await sink.flush(10)
    await sink.shutdown()

    # Then each line of run_a is there once, with the §7 fields and a BSON date
    docs = await read_run(collection, "run_a")
    assert sorted(doc["message"] for doc in docs) == sorted(
        line.message for line in lines if line.workflow_run_id == "run_a"
    )
    by_message = {doc["message"]: doc for doc in docs}
    for line in lines[:-1]:
        doc = by_message[line.message]
        assert isinstance(doc.pop("_id"), ObjectId)
        assert isinstance(doc["timestamp"], datetime)  # only a BSON date decodes to one
        assert doc == {
            "tenantId": "ten_acme",
            "workflowRunId": "run_a",
            "stepRunId": line.step_run_id,
            "stepKey": line.step_key,
            "attempt": line.attempt,
            "level": line.level,
            "message": line.message,
            "context": line.context,
            "timestamp": timestamp_of(line.timestamp_ms),
            "jobId": "run_a",
            "workerId": "worker-1",
        }
    assert sink.stats == {"written": 8, "dropped": 0, "buffered": 0, "failures": 0, "rejected": 0}


async def test_a_5mb_context_value_is_stored_as_a_preview_with_its_size(
    mongo_db_url: str, collection: AsyncCollection[dict[str, Any]]
) -> None:
    sink = MongoExecutionLog(mongo_db_url, flush_interval_s=0.01)
    await sink.startup()
    body = "y" * (5 * 1024 * 1024)

    sink.write(make_line("run_big", 1, context={"response": {"status": 200, "body": body}}))
    await sink.flush(10)
    await sink.shutdown()

    [doc] = await read_run(collection, "run_big")
    assert doc["context"] == {
        "response": {
            "status": 200,
            "body": {"preview": "y" * 1024, "sizeBytes": 5_242_880, "truncated": True},
        }
    }


async def test_reinserting_a_batch_that_partly_landed_writes_each_line_once(
    mongo_db_url: str, collection: AsyncCollection[dict[str, Any]]
) -> None:
    # Given a batch whose first attempt landed in part before its reply was lost
    docs = [build_document(make_line("run_dup", n)) for n in range(5)]
    await collection.insert_many([dict(doc) for doc in docs[:3]])
    writer = MongoBatchWriter(mongo_db_url)

    # When the writer sends the whole batch again
    rejected = await writer.insert([dict(doc) for doc in docs])
    await writer.close()

    # Then the duplicates count as written and nothing is doubled
    assert rejected == []
    stored = await read_run(collection, "run_dup")
    assert sorted(doc["message"] for doc in stored) == [f"line {n}" for n in range(5)]


async def test_lines_survive_a_server_outage_without_loss_or_duplicates(
    restartable_mongo: MongoServer,
) -> None:
    url = with_database(restartable_mongo.uri, "runner")
    unavailable = asyncio.Event()
    recovered = asyncio.Event()

    def on_warning(message: str, fields: dict[str, Any]) -> None:
        if "unavailable" in message:
            unavailable.set()
        if "available again" in message:
            recovered.set()

    sink = MongoExecutionLog(
        url,
        batch_size=7,
        flush_interval_s=0.01,
        server_selection_timeout_ms=300,
        retry_initial_delay_s=0.05,
        retry_max_delay_s=0.3,
        on_warning=on_warning,
    )
    await sink.startup()

    # Given a run whose first lines are written
    for n in range(10):
        sink.write(make_line("run_out", n))
    await sink.flush(10)
    assert sink.stats["written"] == 10

    # When the server goes away mid-run, the run goes on and its lines wait in the buffer
    await asyncio.to_thread(restartable_mongo.stop)
    for n in range(10, 30):
        sink.write(make_line("run_out", n, "debug" if n % 2 else "error"))
    await asyncio.wait_for(unavailable.wait(), 10)
    assert sink.stats["written"] == 10
    assert sink.stats["buffered"] == 20

    # And it comes back on the same port while more lines arrive
    await asyncio.to_thread(restartable_mongo.start)
    for n in range(30, 35):
        sink.write(make_line("run_out", n))
    await sink.flush(15)
    await sink.shutdown()

    # Then every line is stored exactly once
    assert recovered.is_set()
    assert sink.stats["buffered"] == 0
    assert sink.stats["written"] == 35
    assert sink.stats["failures"] >= 1
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url, serverSelectionTimeoutMS=5000)
    try:
        docs = await read_run(client.get_default_database()[COLLECTION], "run_out")
    finally:
        await client.close()
    counts = Counter(doc["message"] for doc in docs)
    assert counts == Counter(f"line {n}" for n in range(35))


def _ttl_of(indexes: dict[str, Any]) -> list[Any]:
    """The expireAfterSeconds of each index on ``timestamp`` alone."""
    return [
        info.get("expireAfterSeconds")
        for info in indexes.values()
        if [(name, int(order)) for name, order in info["key"]] == TTL_KEYS
    ]


async def test_retention_is_a_ttl_index_on_the_timestamp_changed_and_dropped_with_the_setting(
    mongo_db_url: str, collection: AsyncCollection[dict[str, Any]]
) -> None:
    # Given a retention of one day, When the log starts, Then a TTL index expires lines after it
    for retention_s, expected in [(86_400, [86_400]), (3_600, [3_600]), (3_600, [3_600]), (0, [])]:
        sink = MongoExecutionLog(mongo_db_url, retention_s=retention_s)
        await sink.startup()
        await sink.shutdown()
        # a changed retention replaces the old one, the same one is left as it is, 0 drops it
        assert _ttl_of(await collection.index_information()) == expected, retention_s
    # and the run-and-time index the readers use is still there
    keys = [
        [(name, int(order)) for name, order in info["key"]]
        for info in (await collection.index_information()).values()
    ]
    assert INDEX_KEYS in keys
