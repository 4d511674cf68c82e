"""Execution logs (CONTRACT §7): one MongoDB document per log line, written off the step's path.

This module owns the shape of a log document, the redaction/truncation applied before a line is
buffered, the bounded buffer and its drop policy, and the writer task that drains it in batches.

    write(line) ──redact, normalise, truncate──▶ _LogBuffer (bounded, lowest level dropped first)
                                                     │ writer task: take a batch
                                                     ▼
                                        BatchWriter.insert(docs)   (MongoBatchWriter: insert_many,
                                                     │              ordered=False, E11000 = written)
                              failure ◀──────────────┘
                              put the batch back, back off, retry

Every document gets its ``_id`` when it is buffered, so re-inserting a batch whose first attempt
may have landed (a reply lost to a dropped connection) cannot duplicate a line: MongoDB answers
the duplicates with E11000, which counts as written. ``MemoryExecutionLog`` is the in-memory twin
for tests and dry runs; with no ``RUNNER_MONGODB_URL`` the composition root logs to stdout instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

import bson
import msgspec
from bson import ObjectId
from bson.errors import InvalidDocument
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, ConfigurationError

Level = Literal["debug", "info", "warning", "error"]
LEVELS: tuple[Level, ...] = ("debug", "info", "warning", "error")
_RANK: dict[str, int] = {level: rank for rank, level in enumerate(LEVELS)}

COLLECTION = "execution_logs"
DEFAULT_DATABASE = "runner"
INDEX_KEYS: list[tuple[str, int]] = [("tenantId", 1), ("workflowRunId", 1), ("timestamp", 1)]
DEFAULT_CONTEXT_LIMIT_BYTES = 16_384
PREVIEW_CHARS = 1024
# A BSON document may not exceed 16 MiB; one that does can never be written, only rejected.
_MAX_BSON_BYTES = 16 * 1024 * 1024
_DUPLICATE_KEY = 11000
# Per-document write errors that a server reports while it steps down or shuts down: the batch
# is retried (ids make that safe) instead of the line being rejected as permanently bad.
_TRANSIENT_CODES = frozenset(
    {6, 7, 50, 64, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436}
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Document = dict[str, Any]
Redact = Callable[[Any], Any]
OnWarning = Callable[[str, dict[str, Any]], None]

_log = logging.getLogger(__name__)


class LogLine(msgspec.Struct, kw_only=True, frozen=True):
    """One line as the engine emits it; ``timestamp_ms`` is epoch milliseconds."""

    tenant_id: str
    workflow_run_id: str
    job_id: str
    worker_id: str
    level: Level
    message: str
    context: dict[str, Any] = {}
    timestamp_ms: int
    step_key: str | None = None
    step_run_id: str | None = None
    attempt: int | None = None


class ExecutionLog(Protocol):
    """What the engine writes log lines to."""

    async def startup(self) -> None: ...

    def write(self, line: LogLine) -> None:
        """Never blocks, never raises."""

    async def flush(self, timeout_s: float) -> None:
        """Best effort: returns when everything buffered is written or the timeout passed."""

    async def shutdown(self, timeout_s: float = 5.0) -> None: ...

    @property
    def stats(self) -> dict[str, int]: ...


# --- pure: the document ---------------------------------------------------------------------


def truncate_context(
    context: Mapping[str, Any], limit_bytes: int, *, preview_chars: int = PREVIEW_CHARS
) -> dict[str, Any]:
    """Bound ``context`` (JSON-like) to about ``limit_bytes`` of JSON.

    Each value too large on its own becomes ``{"preview", "sizeBytes", "truncated": true}``
    (size in UTF-8 bytes for a string, JSON bytes otherwise), so small fields stay intact; if
    many medium values still add up past the limit, the largest are previewed first.
    """
    chars = max(0, min(preview_chars, limit_bytes // 8))
    fitted, _ = _fit(dict(context), limit_bytes, chars)
    return fitted if isinstance(fitted, dict) else {"value": fitted}


def _payload_bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    return len(msgspec.json.encode(value))


def _json_bytes(value: Any) -> int:
    return len(msgspec.json.encode(value))


def _marker(value: Any, size_bytes: int, chars: int) -> dict[str, Any]:
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    return {"preview": text[:chars], "sizeBytes": size_bytes, "truncated": True}


def _is_marker(value: Any) -> bool:
    return isinstance(value, dict) and value.get("truncated") is True and "sizeBytes" in value


def _fit(value: Any, limit_bytes: int, chars: int) -> tuple[Any, int]:
    """Return (value bounded to the limit, the original's payload size)."""
    size = _payload_bytes(value)
    if size <= limit_bytes:
        return value, size
    if isinstance(value, dict | list) and value:
        keys: list[Any] = list(value.keys()) if isinstance(value, dict) else list(range(len(value)))
        parts = {k: _fit(value[k], limit_bytes, chars) for k in keys}
        out_items = {k: part[0] for k, part in parts.items()}
        out: Any = out_items if isinstance(value, dict) else [out_items[k] for k in keys]
        total = _json_bytes(out)
        sizes = {k: _json_bytes(v) for k, v in out_items.items()}
        for k in sorted(keys, key=sizes.__getitem__, reverse=True):
            if total <= limit_bytes:
                break
            if _is_marker(out[k]):
                continue
            out[k] = _marker(value[k], parts[k][1], chars)
            # Replacing one value changes the container's JSON by exactly the difference.
            total += _json_bytes(out[k]) - sizes[k]
        if total <= limit_bytes:
            return out, size
    return _marker(value, size, chars), size


def _fallback_encoding(obj: Any) -> Any:
    # Objects msgspec cannot express (a socket, a custom class) are logged as their type only:
    # their repr could hold anything, including a secret that redaction is not told about.
    return f"<{type(obj).__name__}>"


def _normalise(value: Any) -> Any:
    """JSON-like builtins only, so sizes are measurable and BSON encoding cannot surprise."""
    return msgspec.to_builtins(value, str_keys=True, enc_hook=_fallback_encoding)


def _bound_message(message: str, limit_bytes: int) -> str:
    size = len(message.encode("utf-8", "surrogatepass"))
    if size <= limit_bytes:
        return message
    return f"{message[: max(0, limit_bytes // 4)]}… [truncated, {size} bytes]"


def timestamp_of(timestamp_ms: int) -> datetime:
    """Epoch ms as an aware UTC datetime, which PyMongo stores as a BSON date."""
    return _EPOCH + timedelta(milliseconds=timestamp_ms)


def build_document(
    line: LogLine,
    *,
    context_limit_bytes: int = DEFAULT_CONTEXT_LIMIT_BYTES,
    redact: Redact | None = None,
) -> Document:
    """The §7 document for ``line``: redacted, truncated, with its ``_id`` fixed now."""
    try:
        context = _normalise(line.context)
        message: Any = line.message
        if redact is not None:
            context = redact(context)
            message = redact(message)
        if not isinstance(context, dict):
            context = {"value": context}
        context = truncate_context(context, context_limit_bytes)
        message = _bound_message(str(message), context_limit_bytes)
    except Exception as exc:
        # Never log what could not be redacted; say so instead.
        context = {"contextError": type(exc).__name__}
        message = "<log line could not be redacted or encoded>"
    return {
        "_id": ObjectId(),
        "tenantId": line.tenant_id,
        "workflowRunId": line.workflow_run_id,
        "stepRunId": line.step_run_id,
        "stepKey": line.step_key,
        "attempt": line.attempt,
        "level": line.level if line.level in _RANK else "info",
        "message": message,
        "context": context,
        "timestamp": timestamp_of(line.timestamp_ms),
        "jobId": line.job_id,
        "workerId": line.worker_id,
    }


def retry_delay_s(failures: int, *, initial_s: float = 0.1, max_s: float = 5.0) -> float:
    """Exponential backoff after ``failures`` consecutive failed writes (1 = the first)."""
    exponent = min(max(failures - 1, 0), 32)  # bounded so the float never overflows
    return float(min(max_s, initial_s * (2**exponent)))


# --- the bounded buffer ---------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    seq: int
    rank: int
    doc: Document


@dataclass(slots=True)
class _Drops:
    by_level: dict[str, int] = field(default_factory=dict)
    last_doc: Document | None = None


class _LogBuffer:
    """FIFO of documents, at most ``limit``; when full, the oldest line of the lowest level goes.

    Drops are counted per run; the next ``take`` turns each run's count into one warning line,
    so whoever reads that run's logs sees that lines are missing and how many.
    """

    def __init__(self, limit: int) -> None:
        self._limit = max(1, limit)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        # Per level, the seqs of its entries in the same order as ``_entries``.
        self._by_rank: list[deque[int]] = [deque() for _ in LEVELS]
        self._seq = 0
        self._drops: dict[tuple[str, str], _Drops] = {}
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries) or bool(self._drops)

    def add(self, doc: Document) -> None:
        self._seq += 1
        entry = _Entry(self._seq, _RANK.get(doc["level"], 1), doc)
        if len(self._entries) >= self._limit:
            lowest = self._lowest_rank()
            if lowest is None or entry.rank < lowest:
                self._count_drop(entry.doc)
                return
            self._drop_oldest(lowest)
        self._entries[entry.seq] = entry
        self._by_rank[entry.rank].append(entry.seq)

    def take(self, count: int) -> list[_Entry]:
        batch = self._drop_warnings()
        while self._entries and len(batch) < count:
            _, entry = self._entries.popitem(last=False)
            self._by_rank[entry.rank].popleft()
            batch.append(entry)
        return batch

    def put_back(self, batch: list[_Entry]) -> None:
        """Return a batch that was not written to the front, then enforce the limit again."""
        for entry in reversed(batch):
            self._entries[entry.seq] = entry
            self._entries.move_to_end(entry.seq, last=False)
            self._by_rank[entry.rank].appendleft(entry.seq)
        while len(self._entries) > self._limit:
            lowest = self._lowest_rank()
            assert lowest is not None  # non-empty buffer
            self._drop_oldest(lowest)

    def documents(self) -> list[Document]:
        return [entry.doc for entry in self._entries.values()]

    def _lowest_rank(self) -> int | None:
        return next((rank for rank, seqs in enumerate(self._by_rank) if seqs), None)

    def _drop_oldest(self, rank: int) -> None:
        entry = self._entries.pop(self._by_rank[rank].popleft())
        self._count_drop(entry.doc)

    def _count_drop(self, doc: Document) -> None:
        self.dropped += 1
        drops = self._drops.setdefault((doc["tenantId"], doc["workflowRunId"]), _Drops())
        drops.by_level[doc["level"]] = drops.by_level.get(doc["level"], 0) + 1
        if drops.last_doc is None or doc["timestamp"] >= drops.last_doc["timestamp"]:
            drops.last_doc = doc

    def _drop_warnings(self) -> list[_Entry]:
        batch: list[_Entry] = []
        for drops in self._drops.values():
            last = drops.last_doc
            assert last is not None  # set with the first count
            total = sum(drops.by_level.values())
            self._seq += 1
            doc: Document = {
                "_id": ObjectId(),
                "tenantId": last["tenantId"],
                "workflowRunId": last["workflowRunId"],
                "stepRunId": None,
                "stepKey": None,
                "attempt": None,
                "level": "warning",
                "message": f"{total} log lines dropped: execution log buffer full",
                "context": {"dropped": total, "byLevel": dict(drops.by_level)},
                # Placed where the loss happened in the run's timeline.
                "timestamp": last["timestamp"],
                "jobId": last["jobId"],
                "workerId": last["workerId"],
            }
            batch.append(_Entry(self._seq, _RANK["warning"], doc))
        self._drops.clear()
        return batch


# --- the writer side ------------------------------------------------------------------------


class BatchWriter(Protocol):
    """Where batches go. ``insert`` raises when the whole batch should be retried."""

    async def open(self) -> None:
        """Connect and ensure the index; raises while the store is unavailable."""

    async def insert(self, documents: list[Document]) -> list[int]:
        """Write ``documents``; return the indexes of those rejected for good."""

    async def close(self) -> None: ...


class MongoBatchWriter:
    """``insert_many(ordered=False)`` into ``execution_logs``; a duplicate ``_id`` is a success."""

    def __init__(
        self,
        url: str,
        *,
        server_selection_timeout_ms: int = 2000,
        socket_timeout_ms: int = 10_000,
    ) -> None:
        self._url = url
        self._server_selection_timeout_ms = server_selection_timeout_ms
        self._socket_timeout_ms = socket_timeout_ms
        self._client: AsyncMongoClient[Document] | None = None
        self._collection: AsyncCollection[Document] | None = None

    def _ensure_client(self) -> AsyncCollection[Document]:
        if self._collection is None:
            try:
                self._client = AsyncMongoClient(
                    self._url,
                    serverSelectionTimeoutMS=self._server_selection_timeout_ms,
                    connectTimeoutMS=self._server_selection_timeout_ms,
                    socketTimeoutMS=self._socket_timeout_ms,
                    appname="runner-execution-logs",
                )
                database = self._client.get_default_database(DEFAULT_DATABASE)
            except ConfigurationError as exc:
                # The URL may carry a password, and PyMongo may quote it: name the type only.
                raise ValueError(
                    f"RUNNER_MONGODB_URL is not a usable MongoDB URL ({type(exc).__name__})"
                ) from None
            self._collection = database[COLLECTION]
        return self._collection

    async def open(self) -> None:
        await self._ensure_client().create_index(INDEX_KEYS)

    async def insert(self, documents: list[Document]) -> list[int]:
        collection = self._ensure_client()
        try:
            await collection.insert_many(documents, ordered=False)
        except BulkWriteError as exc:
            return _rejected_indexes(exc.details)
        except (InvalidDocument, OverflowError, ValueError, TypeError):
            # Encoded client-side before anything is sent: find the bad ones, write the rest.
            bad = [i for i, doc in enumerate(documents) if not _encodes(doc)]
            good = [doc for i, doc in enumerate(documents) if i not in set(bad)]
            if not bad or not good:
                return bad or list(range(len(documents)))
            rejected_good = await self.insert(good)
            good_index = [i for i in range(len(documents)) if i not in set(bad)]
            return sorted(bad + [good_index[i] for i in rejected_good])
        return []

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
            self._collection = None


def _encodes(doc: Document) -> bool:
    try:
        return len(bson.encode(doc)) <= _MAX_BSON_BYTES
    except Exception:
        return False


def _rejected_indexes(details: Mapping[str, Any]) -> list[int]:
    """Sort a BulkWriteError: duplicates were written before; transient errors retry the batch."""
    if details.get("writeConcernErrors"):
        raise RuntimeError("write concern not satisfied")
    rejected: list[int] = []
    for error in details.get("writeErrors", []):
        code = error.get("code")
        if code == _DUPLICATE_KEY:
            continue
        if code in _TRANSIENT_CODES:
            raise RuntimeError(f"transient write error {code}")
        rejected.append(int(error["index"]))
    return rejected


def _log_warning(message: str, fields: dict[str, Any]) -> None:
    _log.warning("%s %s", message, fields)


class BufferedExecutionLog:
    """The buffer and its writer task over any ``BatchWriter``."""

    def __init__(
        self,
        writer: BatchWriter,
        *,
        buffer_limit: int = 10_000,
        batch_size: int = 500,
        flush_interval_s: float = 0.2,
        context_limit_bytes: int = DEFAULT_CONTEXT_LIMIT_BYTES,
        redact: Redact | None = None,
        on_warning: OnWarning | None = None,
        retry_initial_delay_s: float = 0.1,
        retry_max_delay_s: float = 5.0,
    ) -> None:
        self._writer = writer
        self._buffer = _LogBuffer(buffer_limit)
        self._batch_size = max(1, batch_size)
        self._flush_interval_s = flush_interval_s
        self._context_limit_bytes = context_limit_bytes
        self._redact = redact
        self._notify = on_warning or _log_warning
        self._retry_initial_delay_s = retry_initial_delay_s
        self._retry_max_delay_s = retry_max_delay_s
        self._ready = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._has_data = asyncio.Event()
        self._urgent = asyncio.Event()
        self._retry_now = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._flushing = 0
        self._in_flight = 0
        self._written = 0
        self._rejected = 0
        self._failures = 0
        self._dropped_after_close = 0
        self._reported_drops = 0

    # -- the ExecutionLog interface

    async def startup(self) -> None:
        """Create the index and start the writer. A store that is down is only a warning: the
        lines wait in the buffer, and the index is created once the store answers."""
        try:
            await self._writer.open()
            self._ready = True
        except ValueError:
            raise
        except Exception as exc:
            self._warn("execution log store unavailable at startup; buffering", exc)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="execution-log-writer")

    def write(self, line: LogLine) -> None:
        try:
            if self._closed:
                self._dropped_after_close += 1
                return
            doc = build_document(
                line, context_limit_bytes=self._context_limit_bytes, redact=self._redact
            )
            self._buffer.add(doc)
            self._idle.clear()
            self._has_data.set()
            if len(self._buffer) >= self._batch_size:
                self._urgent.set()
            if self._buffer.dropped > self._reported_drops:
                self._report_drops()
        except Exception as exc:  # a log line must never fail a step
            self._warn("execution log line lost", exc)

    async def flush(self, timeout_s: float) -> None:
        if self._idle.is_set():
            return
        self._flushing += 1
        self._urgent.set()
        self._retry_now.set()
        try:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)
        finally:
            self._flushing -= 1

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        self._closed = True
        await self.flush(timeout_s)
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        left = len(self._buffer)
        if left:
            self._on_warning("execution log lines not written at shutdown", {"lines": left})
        with suppress(Exception):
            await self._writer.close()

    @property
    def stats(self) -> dict[str, int]:
        return {
            "written": self._written,
            "dropped": self._buffer.dropped + self._dropped_after_close,
            "buffered": len(self._buffer) + self._in_flight,
            "failures": self._failures,
            "rejected": self._rejected,
        }

    def pending_documents(self) -> list[Document]:
        """The documents waiting in the buffer (not the batch in flight), oldest first."""
        return self._buffer.documents()

    # -- the writer task

    async def _run(self) -> None:
        failures_in_row = 0
        while True:
            if not self._buffer:
                self._idle.set()
                self._has_data.clear()
                await self._has_data.wait()
                continue
            if not self._flushing and len(self._buffer) < self._batch_size:
                # Give a trickle of lines the interval to become a batch.
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), self._flush_interval_s)
            self._urgent.clear()
            batch = self._buffer.take(self._batch_size)
            outcome = await self._attempt(batch)
            if isinstance(outcome, Exception):
                self._failures += 1
                failures_in_row += 1
                if failures_in_row == 1:
                    self._warn("execution log store unavailable; buffering and retrying", outcome)
                await self._back_off(failures_in_row)
                continue
            rejected = outcome
            if failures_in_row:
                self._on_warning(
                    "execution log store available again",
                    {"failedAttempts": failures_in_row, "buffered": len(self._buffer)},
                )
                failures_in_row = 0
            self._written += len(batch) - len(rejected)
            if rejected:
                self._rejected += len(rejected)
                self._on_warning(
                    "execution log lines rejected by the store", {"lines": len(rejected)}
                )

    async def _attempt(self, batch: list[_Entry]) -> list[int] | Exception:
        """Write one batch; on failure (or cancellation) it goes back to the buffer's front."""
        self._in_flight = len(batch)
        try:
            if not self._ready:
                await self._writer.open()
                self._ready = True
            rejected = await self._writer.insert([entry.doc for entry in batch])
        except BaseException as exc:
            self._in_flight = 0
            self._buffer.put_back(batch)
            if isinstance(exc, Exception):
                return exc
            raise
        self._in_flight = 0
        return rejected

    async def _back_off(self, failures_in_row: int) -> None:
        delay_s = retry_delay_s(
            failures_in_row, initial_s=self._retry_initial_delay_s, max_s=self._retry_max_delay_s
        )
        # A flush asks for an attempt now rather than after the delay.
        if self._flushing:
            delay_s = min(delay_s, self._retry_initial_delay_s)
        self._retry_now.clear()
        with suppress(TimeoutError):
            await asyncio.wait_for(self._retry_now.wait(), delay_s)

    def _report_drops(self) -> None:
        # The first drop, then one report per thousand, to the process log; each run's own log
        # gets its exact count as a warning line.
        if self._reported_drops == 0 or self._buffer.dropped - self._reported_drops >= 1000:
            self._on_warning(
                "execution log buffer full; dropping lowest-level lines",
                {"dropped": self._buffer.dropped, "buffered": len(self._buffer)},
            )
            self._reported_drops = self._buffer.dropped

    def _on_warning(self, message: str, fields: dict[str, Any]) -> None:
        # The callback is the caller's: if it fails, the writer task must still live.
        with suppress(Exception):
            self._notify(message, fields)

    def _warn(self, message: str, exc: BaseException) -> None:
        self._on_warning(message, {"error": type(exc).__name__, "detail": str(exc)[:200]})


class MongoExecutionLog(BufferedExecutionLog):
    """Execution logs in MongoDB, through PyMongo's ``AsyncMongoClient``."""

    def __init__(
        self,
        url: str,
        *,
        buffer_limit: int = 10_000,
        batch_size: int = 500,
        flush_interval_s: float = 0.2,
        context_limit_bytes: int = DEFAULT_CONTEXT_LIMIT_BYTES,
        redact: Redact | None = None,
        on_warning: OnWarning | None = None,
        server_selection_timeout_ms: int = 2000,
        retry_initial_delay_s: float = 0.1,
        retry_max_delay_s: float = 5.0,
    ) -> None:
        super().__init__(
            MongoBatchWriter(url, server_selection_timeout_ms=server_selection_timeout_ms),
            buffer_limit=buffer_limit,
            batch_size=batch_size,
            flush_interval_s=flush_interval_s,
            context_limit_bytes=context_limit_bytes,
            redact=redact,
            on_warning=on_warning,
            retry_initial_delay_s=retry_initial_delay_s,
            retry_max_delay_s=retry_max_delay_s,
        )


class MemoryExecutionLog:
    """The in-memory twin: documents built exactly as for MongoDB, kept in ``documents``."""

    def __init__(
        self,
        *,
        context_limit_bytes: int = DEFAULT_CONTEXT_LIMIT_BYTES,
        redact: Redact | None = None,
    ) -> None:
        self.documents: list[Document] = []
        self._context_limit_bytes = context_limit_bytes
        self._redact = redact

    async def startup(self) -> None:
        return None

    def write(self, line: LogLine) -> None:
        self.documents.append(
            build_document(line, context_limit_bytes=self._context_limit_bytes, redact=self._redact)
        )

    async def flush(self, timeout_s: float) -> None:
        return None

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        return None

    @property
    def stats(self) -> dict[str, int]:
        return {
            "written": len(self.documents),
            "dropped": 0,
            "buffered": 0,
            "failures": 0,
            "rejected": 0,
        }

    def for_run(self, workflow_run_id: str) -> list[Document]:
        return [doc for doc in self.documents if doc["workflowRunId"] == workflow_run_id]
