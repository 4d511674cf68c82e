"""The MongoDB side of execution logs: ``MongoBatchWriter`` over PyMongo's ``AsyncMongoClient``.

This module owns the collection, its index, and how a failed ``insert_many`` is sorted: a
duplicate ``_id`` (E11000) is a line written by an earlier attempt whose reply was lost; a
transient server error retries the whole batch; any other per-document error rejects that
line for good. ``MongoExecutionLog`` is the buffered writer task over it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import bson
from bson.errors import InvalidDocument
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, ConfigurationError, OperationFailure

from runner.reporting.execlog.documents import DEFAULT_CONTEXT_LIMIT_BYTES, Document, Redact
from runner.reporting.execlog.writer import BufferedExecutionLog, OnWarning

COLLECTION = "execution_logs"
DEFAULT_DATABASE = "runner"
INDEX_KEYS: list[tuple[str, int]] = [("tenantId", 1), ("workflowRunId", 1), ("timestamp", 1)]
# Retention (RUNNER_EXECUTION_LOG_RETENTION_S): a TTL index must be on a single date field.
TTL_KEYS: list[tuple[str, int]] = [("timestamp", 1)]
# A BSON document may not exceed 16 MiB; one that does can never be written, only rejected.
_MAX_BSON_BYTES = 16 * 1024 * 1024
_DUPLICATE_KEY = 11000
# Per-document write errors that a server reports while it steps down or shuts down: the batch
# is retried (ids make that safe) instead of the line being rejected as permanently bad.
_TRANSIENT_CODES = frozenset(
    {6, 7, 50, 64, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436}
)


class MongoBatchWriter:
    """``insert_many(ordered=False)`` into ``execution_logs``; a duplicate ``_id`` is a success."""

    def __init__(
        self,
        url: str,
        *,
        server_selection_timeout_ms: int = 2000,
        socket_timeout_ms: int = 10_000,
        retention_s: int = 0,
    ) -> None:
        self._url = url
        self._retention_s = retention_s
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
        collection = self._ensure_client()
        await collection.create_index(INDEX_KEYS)
        await self._apply_retention(collection)

    async def _apply_retention(self, collection: AsyncCollection[Document]) -> None:
        """A TTL index on ``timestamp`` expiring lines after ``retention_s``: created, changed
        to a new retention (``collMod``, else dropped and made again), or dropped for 0."""
        existing = await _ttl_index(collection)
        if self._retention_s <= 0:
            if existing is not None and existing[1] is not None:
                await collection.drop_index(existing[0])
            return
        if existing is not None:
            if existing[1] is not None and int(existing[1]) == self._retention_s:
                return
            try:
                await collection.database.command(
                    "collMod",
                    collection.name,
                    index={"keyPattern": dict(TTL_KEYS), "expireAfterSeconds": self._retention_s},
                )
            except OperationFailure:
                pass
            changed = await _ttl_index(collection)
            if changed is not None and changed[1] is not None:
                if int(changed[1]) == self._retention_s:
                    return
            # A server that does not change TTLs in place: the index is made again.
            await collection.drop_index(existing[0])
        await collection.create_index(TTL_KEYS, expireAfterSeconds=self._retention_s)

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


async def _ttl_index(collection: AsyncCollection[Document]) -> tuple[str, Any] | None:
    """(name, expireAfterSeconds) of the index on ``timestamp`` alone, if there is one."""
    for name, info in (await collection.index_information()).items():
        if [(field, int(order)) for field, order in info["key"]] == TTL_KEYS:
            return name, info.get("expireAfterSeconds")
    return None


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
        retention_s: int = 0,
    ) -> None:
        super().__init__(
            MongoBatchWriter(
                url,
                server_selection_timeout_ms=server_selection_timeout_ms,
                retention_s=retention_s,
            ),
            buffer_limit=buffer_limit,
            batch_size=batch_size,
            flush_interval_s=flush_interval_s,
            context_limit_bytes=context_limit_bytes,
            redact=redact,
            on_warning=on_warning,
            retry_initial_delay_s=retry_initial_delay_s,
            retry_max_delay_s=retry_max_delay_s,
        )
