"""The process log: one JSON object per line on stdout.

Every line passes through the scrubber the composition root installs (``runner.redact``'s
process-wide registry of the secrets of runs in flight), so no secret reaches stdout even when a
message quotes a URL or an exception.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}

_encode = msgspec.json.Encoder(order="deterministic").encode


def no_trace_ids() -> tuple[str, str] | None:
    return None


def iso_timestamp(epoch_s: float) -> str:
    """ISO-8601 in UTC with milliseconds: ``2026-12-04T18:55:00.123Z``."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


class Log:
    def __init__(self) -> None:
        self.threshold = LEVELS["info"]
        self.scrub: Callable[[str], str] = lambda text: text
        self.stream: TextIO = sys.stdout
        self.static: dict[str, Any] = {}
        # The current span's (trace_id, span_id): installed by telemetry when tracing is on.
        self.trace_ids: Callable[[], tuple[str, str] | None] = no_trace_ids

    def configure(
        self,
        *,
        level: str = "info",
        scrub: Callable[[str], str] | None = None,
        stream: TextIO | None = None,
        **static: Any,
    ) -> None:
        self.threshold = LEVELS.get(level, LEVELS["info"])
        if scrub is not None:
            self.scrub = scrub
        if stream is not None:
            self.stream = stream
        self.static = static

    def event(self, event: str, level: str = "info", **fields: Any) -> None:
        if LEVELS.get(level, 20) < self.threshold:
            return
        record: dict[str, Any] = {"ts": iso_timestamp(time.time()), "level": level, "event": event}
        ids = self.trace_ids()
        if ids is not None:
            record["trace_id"], record["span_id"] = ids
        record.update(self.static)
        record.update(fields)
        try:
            line = _encode(record).decode()
        except (TypeError, ValueError):
            line = _encode({k: str(v) for k, v in record.items()}).decode()
        try:
            self.stream.write(self.scrub(line) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stdout closed (a supervisor went away): logging must never break a run

    def debug(self, event: str, **fields: Any) -> None:
        self.event(event, "debug", **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.event(event, "info", **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.event(event, "warning", **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.event(event, "error", **fields)

    def internal_error(self, event: str, err: BaseException, **fields: Any) -> None:
        """An error the runner did not expect: its type, its message and its traceback, all
        through the scrubber (the secrets of the runs in flight) and a URL redactor (userinfo,
        sensitive query parameters), so the message says what failed without leaking."""
        from runner.redact import Redactor

        redactor = Redactor()
        self.event(
            event,
            "error",
            **fields,
            error=type(err).__name__,
            message=redactor.text(str(err))[:2000],
            traceback=redactor.exception_text(err, with_traceback=True)[-8000:],
        )


log = Log()
