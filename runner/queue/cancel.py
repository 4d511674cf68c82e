"""Cancellation across processes (CONTRACT §8).

The control plane sets ``{prefix}:{queue}:cancel:{runId}`` (the reason, with an expiry) and
publishes a ``cancel-job`` event on the queue's event stream. The key covers a cancel that
arrives before the run starts or while no worker listens: it is read with the run's checkpoint
before the first request (``RedisStatusSink.run_state``).
The event makes a running run stop at once: one reader per process follows the event stream
(``XREAD BLOCK`` on its own connection) and resolves the future of the run it names.

The stream carries every BullMQ event of the queue, some ten per run, of which cancels are a
rare few: replies are parsed by hiredis and scanned without building a dict per entry, and
while the stream is busy the reader waits ``min_interval_s`` between reads so that one read
takes many events (a cancel takes effect that much later, at most).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from runner.log import log
from runner.queue.keys import Keys
from runner.resp import ReplyError, RespConnection

CancelFuture = Callable[[], "asyncio.Future[str]"]


class CancelWatch:
    def __init__(
        self,
        connection: RespConnection,
        keys: Keys,
        *,
        block_ms: int = 5000,
        min_interval_s: float = 0.02,
    ) -> None:
        self.connection = connection
        self.keys = keys
        self.block_ms = block_ms
        self.min_interval_s = min_interval_s
        self._waiting: dict[str, asyncio.Future[str]] = {}
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def watch(self, run_id: str, job_id: str | None = None) -> Iterator[CancelFuture]:
        """A run's cancel, asked for by its run id or, when that differs (a job BullMQ made,
        CONTRACT "Run identity"), by its BullMQ job id."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        names = {run_id} if job_id is None else {run_id, job_id}
        for name in names:
            self._waiting[name] = future
        try:
            yield lambda: future
        finally:
            for name in names:
                if self._waiting.get(name) is future:
                    del self._waiting[name]

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
        self.connection.close()

    async def _follow(self) -> None:
        stream = self.keys.events()
        last_id: bytes = b"$"
        delay_s = 0.1
        while True:
            try:
                (reply,) = await self.connection.execute(
                    [
                        (
                            b"XREAD",
                            b"COUNT",
                            1000,
                            b"BLOCK",
                            self.block_ms,
                            b"STREAMS",
                            stream,
                            last_id,
                        )
                    ]
                )
                if isinstance(reply, ReplyError):
                    raise ConnectionError(str(reply))
                delay_s = 0.1
            except OSError as err:
                log.warning("cancel.reader_error", error=type(err).__name__)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 5.0)
                continue
            if not reply:
                continue  # the block ran out with nothing new
            for _stream, entries in reply:
                for entry_id, fields in entries:
                    last_id = entry_id
                    if b"cancel-job" in fields:
                        self._on_event(fields)
            await asyncio.sleep(self.min_interval_s)

    def _on_event(self, flat: list[bytes]) -> None:
        fields = dict(zip(flat[::2], flat[1::2], strict=False))
        if fields.get(b"event") != b"cancel-job":
            return
        job_id = fields.get(b"jobId", b"").decode("utf-8", "replace")
        reason = fields.get(b"reason", b"").decode("utf-8", "replace")
        if self.cancel(job_id, reason):
            log.info("run.cancel_requested", runId=job_id)
