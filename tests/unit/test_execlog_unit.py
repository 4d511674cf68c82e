"""Execution-log sink without sockets: documents, truncation, the buffer's drop policy, retries."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import msgspec
from bson import ObjectId
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.reporting.execlog import (
    BufferedExecutionLog,
    Document,
    Level,
    LogLine,
    MemoryExecutionLog,
    build_document,
    retry_delay_s,
    truncate_context,
)


def make_line(message: str, level: Level = "info", **overrides: Any) -> LogLine:
    fields: dict[str, Any] = {
        "tenant_id": "ten_acme",
        "workflow_run_id": "run_1",
        "job_id": "run_1",
        "worker_id": "w1",
        "level": level,
        "message": message,
        "context": {},
        "timestamp_ms": 1_795_639_999_123,
    }
    fields.update(overrides)
    return LogLine(**fields)


class FakeStore:
    """A store whose inserts can be held at a gate or made to fail: the MongoDB side, faked."""

    def __init__(self) -> None:
        self.documents: dict[Any, Document] = {}
        self.attempts: list[list[Any]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()
        self.failures_left = 0

    async def open(self) -> None:
        return None

    async def insert(self, documents: list[Document]) -> list[int]:
        self.attempts.append([doc["_id"] for doc in documents])
        self.entered.set()
        await self.gate.wait()
        if self.failures_left:
            self.failures_left -= 1
            # Ambiguous: half the batch landed before the connection dropped.
            for doc in documents[: len(documents) // 2]:
                self.documents.setdefault(doc["_id"], doc)
            raise ConnectionError("store went away")
        for doc in documents:
            self.documents.setdefault(doc["_id"], doc)
        return []

    async def close(self) -> None:
        return None


# --- the document ---------------------------------------------------------------------------


def test_document_has_the_contract_fields_and_a_fixed_id() -> None:
    line = make_line(
        "calling API",
        "warning",
        step_key="fetch",
        step_run_id="run_1:fetch",
        attempt=2,
        context={"status": 200},
    )

    doc = build_document(line)

    assert isinstance(doc.pop("_id"), ObjectId)
    assert doc == {
        "tenantId": "ten_acme",
        "workflowRunId": "run_1",
        "stepRunId": "run_1:fetch",
        "stepKey": "fetch",
        "attempt": 2,
        "level": "warning",
        "message": "calling API",
        "context": {"status": 200},
        "timestamp": datetime(2026, 11, 25, 20, 53, 19, 123_000, tzinfo=UTC),
        "jobId": "run_1",
        "workerId": "w1",
    }


def test_redaction_applies_to_message_and_context_before_truncation() -> None:
    def redact(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("s3cret", "[REDACTED]")
        if isinstance(value, dict):
            return {k: redact(v) for k, v in value.items()}
        return value

    line = make_line("token s3cret used", context={"auth": "s3cret", "body": "s3cret" * 10_000})

    doc = build_document(line, context_limit_bytes=1024, redact=redact)

    assert doc["message"] == "token [REDACTED] used"
    assert doc["context"]["auth"] == "[REDACTED]"
    assert "s3cret" not in msgspec.json.encode(doc["context"]).decode()
    assert doc["context"]["body"]["truncated"] is True


def test_a_failing_redactor_never_lets_the_raw_line_through() -> None:
    def redact(value: Any) -> Any:
        raise RuntimeError("boom")

    doc = build_document(make_line("password=hunter2", context={"p": "hunter2"}), redact=redact)

    assert "hunter2" not in repr(doc)
    assert doc["context"] == {"contextError": "RuntimeError"}


def test_objects_json_cannot_express_are_logged_as_their_type_only() -> None:
    class Opaque:
        def __repr__(self) -> str:
            return "Opaque(secret=hunter2)"

    doc = build_document(make_line("x", context={"client": Opaque(), "at": datetime(2026, 1, 1)}))

    assert doc["context"] == {"client": "<Opaque>", "at": "2026-01-01T00:00:00"}


# --- truncation -----------------------------------------------------------------------------


def test_small_context_is_kept_as_is() -> None:
    context = {"status": 200, "headers": {"content-type": "application/json"}, "ids": [1, 2]}

    assert truncate_context(context, 16_384) == context


def test_a_5mb_value_becomes_a_preview_with_its_size_and_small_fields_stay() -> None:
    body = "x" * (5 * 1024 * 1024)
    context = {"request": {"method": "GET"}, "response": {"status": 200, "body": body}}

    out = truncate_context(context, 16_384)

    assert out["request"] == {"method": "GET"}
    assert out["response"]["status"] == 200
    assert out["response"]["body"] == {
        "preview": "x" * 1024,
        "sizeBytes": 5 * 1024 * 1024,
        "truncated": True,
    }


def test_size_is_utf8_bytes_for_strings_and_json_bytes_otherwise() -> None:
    text = "é" * 2000  # 4000 bytes in UTF-8
    items = list(range(1000))

    out = truncate_context({"text": text, "items": items}, 1024)

    assert out["text"]["sizeBytes"] == 4000
    assert out["items"]["sizeBytes"] == len(msgspec.json.encode(items))
    assert out["items"]["preview"] == msgspec.json.encode(items).decode()[:128]


def test_many_medium_values_are_previewed_largest_first_until_the_whole_fits() -> None:
    context = {"big": "b" * 900, "medium": "m" * 600, "small": "s" * 10}

    out = truncate_context(context, 1024)

    assert out["big"]["truncated"] is True
    assert out["medium"] == "m" * 600
    assert out["small"] == "s" * 10


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=200),
    lambda inner: (
        st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=8), inner, max_size=8)
    ),
    max_leaves=30,
)


@settings(max_examples=40, deadline=None)
@given(
    context=st.dictionaries(st.text(max_size=8), json_values, max_size=10),
    limit=st.integers(256, 4096),
)
def test_truncated_context_always_fits_the_limit(context: dict[str, Any], limit: int) -> None:
    out = truncate_context(context, limit)

    assert len(msgspec.json.encode(out)) <= limit
    if len(msgspec.json.encode(context)) <= limit:
        assert out == context


# --- the buffer and the writer --------------------------------------------------------------


async def test_buffer_full_drops_lowest_levels_first_and_counts_them() -> None:
    # Given a sink whose writer is stalled on its first line
    store = FakeStore()
    store.gate.clear()
    warnings: list[str] = []
    sink = BufferedExecutionLog(
        store,
        buffer_limit=4,
        batch_size=1,
        flush_interval_s=0,
        on_warning=lambda message, fields: warnings.append(message),
    )
    await sink.startup()
    sink.write(make_line("first"))
    await store.entered.wait()

    # When more lines arrive than the buffer holds
    for level, message in [
        ("error", "e1"),
        ("debug", "d1"),
        ("info", "i1"),
        ("warning", "w1"),
        ("debug", "d2"),  # full: the oldest debug (d1) goes
        ("error", "e2"),  # d2 goes
        ("info", "i2"),  # no debug left: the oldest info (i1) goes
    ]:
        sink.write(make_line(message, level))  # type: ignore[arg-type]

    # Then the lowest levels were dropped, counted, and reported once
    assert sink.stats["dropped"] == 3
    assert sink.stats["buffered"] == 5  # four waiting, one in flight
    assert [doc["message"] for doc in sink.pending_documents()] == ["e1", "w1", "e2", "i2"]
    assert warnings == ["execution log buffer full; dropping lowest-level lines"]

    # And once the store answers, the survivors and a counted warning line are written
    store.gate.set()
    await sink.flush(5)
    await sink.shutdown()
    written = sorted(doc["message"] for doc in store.documents.values())
    assert written == sorted(
        ["first", "e1", "w1", "e2", "i2", "3 log lines dropped: execution log buffer full"]
    )
    warning = next(d for d in store.documents.values() if d["message"].startswith("3 log"))
    assert warning["level"] == "warning"
    assert warning["workflowRunId"] == "run_1"
    assert warning["context"] == {"dropped": 3, "byLevel": {"debug": 2, "info": 1}}
    assert sink.stats == {"written": 6, "dropped": 3, "buffered": 0, "failures": 0, "rejected": 0}


async def test_a_line_below_everything_buffered_is_itself_dropped() -> None:
    store = FakeStore()
    store.gate.clear()
    sink = BufferedExecutionLog(store, buffer_limit=2, batch_size=1, flush_interval_s=0)
    await sink.startup()
    sink.write(make_line("in flight", "error"))
    await store.entered.wait()

    sink.write(make_line("e1", "error"))
    sink.write(make_line("e2", "error"))
    sink.write(make_line("chatter", "debug"))

    assert [doc["message"] for doc in sink.pending_documents()] == ["e1", "e2"]
    assert sink.stats["dropped"] == 1
    store.gate.set()
    await sink.shutdown(5)


async def test_a_failed_batch_is_retried_with_the_same_ids_and_nothing_is_lost() -> None:
    store = FakeStore()
    store.failures_left = 2
    sink = BufferedExecutionLog(
        store, batch_size=100, flush_interval_s=0, retry_initial_delay_s=0.001
    )
    await sink.startup()

    for i in range(6):
        sink.write(make_line(f"line {i}"))
    await sink.flush(5)
    await sink.shutdown()

    assert len(store.attempts) == 3
    assert store.attempts[0] == store.attempts[1] == store.attempts[2]
    assert sorted(doc["message"] for doc in store.documents.values()) == [
        f"line {i}" for i in range(6)
    ]
    assert sink.stats == {"written": 6, "dropped": 0, "buffered": 0, "failures": 2, "rejected": 0}


async def test_write_after_shutdown_is_counted_not_raised() -> None:
    sink = BufferedExecutionLog(FakeStore(), flush_interval_s=0)
    await sink.startup()
    await sink.shutdown()

    sink.write(make_line("late"))

    assert sink.stats["dropped"] == 1


async def test_shutdown_reports_lines_it_could_not_write() -> None:
    store = FakeStore()
    store.gate.clear()
    warnings: list[tuple[str, dict[str, Any]]] = []
    sink = BufferedExecutionLog(
        store, flush_interval_s=0, on_warning=lambda m, f: warnings.append((m, f))
    )
    await sink.startup()
    sink.write(make_line("stuck"))
    await store.entered.wait()

    await sink.shutdown(timeout_s=0.01)

    assert warnings == [("execution log lines not written at shutdown", {"lines": 1})]
    assert sink.stats["buffered"] == 1


def test_retry_delay_grows_and_is_capped() -> None:
    delays = [retry_delay_s(n, initial_s=0.1, max_s=5.0) for n in (1, 2, 3, 10, 10_000)]

    assert delays == [0.1, 0.2, 0.4, 5.0, 5.0]


async def test_memory_twin_keeps_the_same_documents() -> None:
    log = MemoryExecutionLog(context_limit_bytes=1024)
    await log.startup()

    log.write(make_line("hello", context={"body": "z" * 5000}))
    log.write(make_line("other run", workflow_run_id="run_2"))
    await log.shutdown()

    [doc] = log.for_run("run_1")
    assert doc["message"] == "hello"
    assert doc["context"]["body"]["sizeBytes"] == 5000
    assert log.stats["written"] == 2
