"""The process log: one JSON object per line on stdout.

Every line passes through the scrubber the composition root installs (``runner.redact``'s
process-wide registry of the secrets of runs in flight), so no secret reaches stdout even when a
message quotes a URL or an exception.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import msgspec

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}

_encode = msgspec.json.Encoder(order="deterministic").encode


class Log:
    def __init__(self) -> None:
        self.threshold = LEVELS["info"]
        self.scrub: Callable[[str], str] = lambda text: text
        self.stream: TextIO = sys.stdout
        self.static: dict[str, Any] = {}

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
        record = {"ts": round(time.time() * 1000), "level": level, "event": event}
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


log = Log()
