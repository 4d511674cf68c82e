"""Execution logs on stdout: what the runner does when ``RUNNER_MONGODB_URL`` is unset.

Same interface as the MongoDB sink; each line becomes one JSON line of the process log
(event ``exec``), redacted and truncated the same way.
"""

from __future__ import annotations

from typing import Any

from runner.log import LEVELS, log
from runner.reporting.execlog import (
    DEFAULT_CONTEXT_LIMIT_BYTES,
    Level,
    LogLine,
    Redact,
    truncate_context,
)


class StdoutExecutionLog:
    def __init__(
        self,
        *,
        context_limit_bytes: int = DEFAULT_CONTEXT_LIMIT_BYTES,
        redact: Redact | None = None,
    ) -> None:
        self.context_limit_bytes = context_limit_bytes
        self.redact = redact
        self.written = 0

    async def startup(self) -> None:
        log.info(
            "execlog.stdout",
            detail="RUNNER_MONGODB_URL is not set: execution logs go to stdout only",
        )

    def wants(self, level: Level) -> bool:
        return LEVELS[_process_level(level)] >= log.threshold

    def write(self, line: LogLine, redact: Redact | None = None) -> None:
        level = _process_level(line.level)
        if LEVELS[level] < log.threshold:
            return  # filtered anyway: spare the hot path the redaction and truncation
        context: Any = line.context
        message = line.message
        redact = redact or self.redact
        if redact is not None:
            context, message = redact(context), redact(message)
        log.event(
            "exec",
            # Warnings and errors show at the default level; the rest with RUNNER_LOG_LEVEL=debug.
            level,
            runId=line.workflow_run_id,
            tenantId=line.tenant_id,
            stepKey=line.step_key,
            attempt=line.attempt,
            lineLevel=line.level,
            message=message,
            context=truncate_context(context, self.context_limit_bytes),
        )
        self.written += 1

    async def flush(self, timeout_s: float) -> None:
        return None

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        return None

    @property
    def stats(self) -> dict[str, int]:
        return {"written": self.written, "dropped": 0, "buffered": 0, "failures": 0}


def _process_level(level: str) -> str:
    """The process log's level of an execution-log line: warnings and errors as they are,
    the rest ``debug``."""
    return level if level in ("warning", "error") else "debug"
