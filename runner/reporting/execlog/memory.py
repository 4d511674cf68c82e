"""``MemoryExecutionLog``: the in-memory twin of the execution log, for tests and dry runs."""

from __future__ import annotations

from runner.reporting.execlog.documents import (
    DEFAULT_CONTEXT_LIMIT_BYTES,
    Document,
    Level,
    LogLine,
    Redact,
    build_document,
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

    def wants(self, level: Level) -> bool:
        return True

    def write(self, line: LogLine, redact: Redact | None = None) -> None:
        self.documents.append(
            build_document(
                line,
                context_limit_bytes=self._context_limit_bytes,
                redact=redact or self._redact,
            )
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
