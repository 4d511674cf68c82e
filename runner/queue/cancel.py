"""Cancellation across processes (CONTRACT §8).

The control plane sets ``{prefix}:{queue}:cancel:{runId}`` (the reason, with an expiry) and
publishes a ``cancel-job`` event on the queue's event stream. The key covers a cancel that
arrives before the run starts or while no worker listens: it is read with the run's checkpoint
before the first request (``RedisStatusSink.run_state``).
The event makes a running run stop at once: one reader per process follows the event stream
(``XREAD BLOCK`` on its own connection) and resolves the future of the run it names.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from runner.log import log
from runner.queue.keys import Keys

CancelFuture = Callable[[], "asyncio.Future[str]"]


class CancelWatch:
    def __init__(self, client: aioredis.Redis, keys: Keys, *, block_ms: int = 5000) -> None:
        self.client = client
        self.keys = keys
        self.block_ms = block_ms
        self._waiting: dict[str, asyncio.Future[str]] = {}
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def watch(self, run_id: str) -> Iterator[CancelFuture]:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting[run_id] = future
        try:
            yield lambda: future
        finally:
            if self._waiting.get(run_id) is future:
                del self._waiting[run_id]

    def cancel(self, run_id: str, reason: str) -> bool:
        future = self._waiting.get(run_id)
        if future is None or future.done():
            return False
        future.set_result(reason or "canceled")
        return True

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self) -> None:
        stream = self.keys.events()
        last_id = "$"
        delay_s = 0.1
        while True:
            try:
                reply: Any = await self.client.xread(
                    {stream: last_id}, block=self.block_ms, count=100
                )
                delay_s = 0.1
            except (RedisError, OSError) as err:
                log.warning("cancel.reader_error", error=type(err).__name__)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 5.0)
                continue
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    self._on_event(fields)

    def _on_event(self, fields: dict[bytes, bytes]) -> None:
        if fields.get(b"event") != b"cancel-job":
            return
        job_id = fields.get(b"jobId", b"").decode("utf-8", "replace")
        reason = fields.get(b"reason", b"").decode("utf-8", "replace")
        if self.cancel(job_id, reason):
            log.info("run.cancel_requested", runId=job_id)
