"""The writer task: ``BufferedExecutionLog`` drains the buffer in batches into a ``BatchWriter``.

A line is shaped and buffered on ``write`` (never blocking, never raising); the task takes a batch
once it is full or the flush interval passed, and on failure puts the batch back at the front of
the buffer and backs off exponentially. A flush asks for an attempt now. Warnings (store down,
store back, lines rejected or dropped) go to the ``on_warning`` hook, never to the step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import suppress
from typing import Any, Protocol

from runner.reporting.execlog.buffer import Entry, LogBuffer
from runner.reporting.execlog.documents import (
    DEFAULT_CONTEXT_LIMIT_BYTES,
    Document,
    Level,
    LogLine,
    Redact,
    build_document,
)

OnWarning = Callable[[str, dict[str, Any]], None]

_log = logging.getLogger(__name__)


class BatchWriter(Protocol):
    """Where batches go. ``insert`` raises when the whole batch should be retried."""

    async def open(self) -> None:
        """Connect and ensure the index; raises while the store is unavailable."""

    async def insert(self, documents: list[Document]) -> list[int]:
        """Write ``documents``; return the indexes of those rejected for good."""

    async def close(self) -> None: ...


def retry_delay_s(failures: int, *, initial_s: float = 0.1, max_s: float = 5.0) -> float:
    """Exponential backoff after ``failures`` consecutive failed writes (1 = the first)."""
    exponent = min(max(failures - 1, 0), 32)  # bounded so the float never overflows
    return float(min(max_s, initial_s * (2**exponent)))


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
        self._buffer = LogBuffer(buffer_limit)
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

    def wants(self, level: Level) -> bool:
        return True

    def write(self, line: LogLine, redact: Redact | None = None) -> None:
        try:
            if self._closed:
                self._dropped_after_close += 1
                return
            doc = build_document(
                line, context_limit_bytes=self._context_limit_bytes, redact=redact or self._redact
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

    async def _attempt(self, batch: list[Entry]) -> list[int] | Exception:
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
