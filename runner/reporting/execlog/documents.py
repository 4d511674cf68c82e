"""What an execution log line is, and the CONTRACT §7 document it becomes.

This module owns ``LogLine`` (what the engine emits), ``ExecutionLog`` (what it writes lines to),
and the pure shaping of a line into a document: normalised to JSON-like builtins, redacted,
its context and message truncated to a byte limit, its ``_id`` fixed when it is built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

import msgspec
from bson import ObjectId

Level = Literal["debug", "info", "warning", "error"]
LEVELS: tuple[Level, ...] = ("debug", "info", "warning", "error")
LEVEL_RANK: dict[str, int] = {level: rank for rank, level in enumerate(LEVELS)}

DEFAULT_CONTEXT_LIMIT_BYTES = 16_384
PREVIEW_CHARS = 1024
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Document = dict[str, Any]
Redact = Callable[[Any], Any]


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
    # (trace_id, span_id) of the span current when the line was made, when tracing is on.
    trace_ids: tuple[str, str] | None = None


class ExecutionLog(Protocol):
    """What the engine writes log lines to."""

    async def startup(self) -> None: ...

    def write(self, line: LogLine, redact: Redact | None = None) -> None:
        """Never blocks, never raises. ``redact``: the run's own redaction, for a run's line, in
        place of the log's own (which masks the secrets of every run in flight)."""

    def wants(self, level: Level) -> bool:
        """Whether a line of ``level`` would be kept: a writer skips building one that would
        not (the stdout log drops ``info`` lines at its default level)."""

    async def flush(self, timeout_s: float) -> None:
        """Best effort: returns when everything buffered is written or the timeout passed."""

    async def shutdown(self, timeout_s: float = 5.0) -> None: ...

    @property
    def stats(self) -> dict[str, int]: ...


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
    # Each entry kept takes at least 2 bytes ("1,"): a container with more entries than half
    # the limit cannot fit, and fitting its 80,000 items one by one held the loop for a second.
    if isinstance(value, dict | list) and value and len(value) <= limit_bytes // 2:
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
    document: Document = {
        "_id": ObjectId(),
        "tenantId": line.tenant_id,
        "workflowRunId": line.workflow_run_id,
        "stepRunId": line.step_run_id,
        "stepKey": line.step_key,
        "attempt": line.attempt,
        "level": line.level if line.level in LEVEL_RANK else "info",
        "message": message,
        "context": context,
        "timestamp": timestamp_of(line.timestamp_ms),
        "jobId": line.job_id,
        "workerId": line.worker_id,
    }
    if line.trace_ids is not None:
        document["traceId"], document["spanId"] = line.trace_ids
    return document
