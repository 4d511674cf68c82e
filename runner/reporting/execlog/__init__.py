"""Execution logs (CONTRACT §7): one MongoDB document per log line, written off the step's path.

    write(line) ──redact, normalise, truncate──▶ LogBuffer (bounded, lowest level dropped first)
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

The package, by concern: ``documents`` (the line, the interface, the document it becomes),
``buffer`` (the bounded buffer and its drop policy), ``writer`` (the batching writer task and its
backoff), ``mongo`` (the MongoDB writer), ``memory`` (the twin). Import from here.
"""

from runner.reporting.execlog.documents import (
    DEFAULT_CONTEXT_LIMIT_BYTES,
    LEVELS,
    PREVIEW_CHARS,
    Document,
    ExecutionLog,
    Level,
    LogLine,
    Redact,
    build_document,
    timestamp_of,
    truncate_context,
)
from runner.reporting.execlog.memory import MemoryExecutionLog
from runner.reporting.execlog.mongo import (
    COLLECTION,
    DEFAULT_DATABASE,
    INDEX_KEYS,
    TTL_KEYS,
    MongoBatchWriter,
    MongoExecutionLog,
)
from runner.reporting.execlog.writer import (
    BatchWriter,
    BufferedExecutionLog,
    OnWarning,
    retry_delay_s,
)

__all__ = [
    "COLLECTION",
    "DEFAULT_CONTEXT_LIMIT_BYTES",
    "DEFAULT_DATABASE",
    "INDEX_KEYS",
    "LEVELS",
    "PREVIEW_CHARS",
    "TTL_KEYS",
    "BatchWriter",
    "BufferedExecutionLog",
    "Document",
    "ExecutionLog",
    "Level",
    "LogLine",
    "MemoryExecutionLog",
    "MongoBatchWriter",
    "MongoExecutionLog",
    "OnWarning",
    "Redact",
    "build_document",
    "retry_delay_s",
    "timestamp_of",
    "truncate_context",
]
