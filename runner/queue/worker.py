"""The BullMQ boundary: a Python ``bullmq`` Worker configured so its known traps cannot bite.

FIELD-NOTES lists them; each has its answer here:
- redis-py's default 5 s socket timeout is below BullMQ's 10 s blocking read: idle workers
  picked jobs up late. The connection gets ``socket_timeout`` above the longest block.
- A ``CancelledError`` (or anything else) escaping the processor ends the worker's loop
  silently. The processor is wrapped: nothing but ``UnrecoverableError`` (a run that failed by
  its own logic) or a plain ``Exception`` (an infrastructure failure, which BullMQ may retry
  under the job's ``attempts``) leaves it.
- If the loop dies anyway, a watchdog notices ``worker.running`` went false while we were not
  closing, and the process exits non-zero so that its supervisor restarts it.
- Bull Board lists workers by client name ``{prefix}:{base64(queue)}:w:{name}`` and shows
  ``processedBy``, which the stock Python worker does not send: both are set as Node does
  (``runner.queue.naming``).
- The stock worker completes a job and then asks for the next in a second round trip, and its
  loop is quadratic in the slots: ``runner.queue.fetch_next`` does as Node does. Completions go
  out in batches (``runner.queue.finish``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bullmq import Worker
from bullmq.custom_errors import DelayedError, UnrecoverableError

from runner.errors import RetryLater
from runner.log import log
from runner.queue.fetch_next import FetchNextWorker
from runner.queue.finish import FinishBatches, finish_in_batches
from runner.queue.naming import (
    name_in_finished_opts,
    name_only_the_blocking_connection,
    node_client_name,
    queue_client_name,
    with_processed_by,
)
from runner.redis_connect import bullmq_connection
from runner.resp import RespConnection
from runner.settings import Settings

Handler = Callable[[Any, str], Awaitable[Any]]


def redis_options(url: str, socket_timeout_s: float) -> Any:
    """Connection options for BullMQ's clients from ``RUNNER_REDIS_URL``: the keywords of a
    ``redis.asyncio.Redis`` (single node, Sentinel) or a ``RedisCluster``
    (``runner.redis_connect``)."""
    return bullmq_connection(url, socket_timeout_s)


class QueueWorker:
    """Owns the bullmq Worker: start, the wrapped processor, the watchdog, a clean stop."""

    def __init__(self, settings: Settings, handler: Handler) -> None:
        self.settings = settings
        self.handler = handler
        self.name = settings.name
        self.worker: Worker | None = None
        self.closing = False
        self.loop_died = asyncio.Event()
        self._run_task: asyncio.Task[Any] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        # The last error BullMQ's loop reported (monotonic time, one line): /readyz reads it.
        self.last_error_at: float | None = None
        self.last_error = ""
        # Completions go out in batches on a connection of their own (runner.queue.finish),
        # decoded as bullmq's client decodes.
        self._finish_connection = RespConnection(
            settings.redis_url, timeout_s=settings.redis_socket_timeout_s, decode=True
        )

    def build(self) -> Worker:
        s = self.settings
        worker = FetchNextWorker(
            s.queue,
            self._process,
            {
                "connection": redis_options(s.redis_url, s.redis_socket_timeout_s),
                "prefix": s.queue_prefix,
                "concurrency": s.concurrency,
                "autorun": False,
                "name": self.name,
                "lockDuration": s.lock_duration_ms,
                "stalledInterval": s.stalled_interval_ms,
                "maxStalledCount": s.max_stalled_count,
                "runRetryDelay": 1000,
            },
        )
        worker.clientName = node_client_name(s.queue_prefix, s.queue, self.name)
        with_processed_by(worker, self.name)
        name_in_finished_opts(worker, self.name)
        self.finishes = FinishBatches(
            self._finish_connection, worker.scripts.commands["moveToFinished"].script
        )
        finish_in_batches(worker, self.finishes)
        name_only_the_blocking_connection(worker, queue_client_name(s.queue_prefix, s.queue))
        worker.on("error", self._on_error)
        self.worker = worker
        return worker

    async def start(self) -> None:
        worker = self.worker or self.build()
        self._run_task = asyncio.ensure_future(worker.run())
        self._watchdog = asyncio.ensure_future(self._watch())

    @property
    def alive(self) -> bool:
        return self.worker is not None and bool(self.worker.running) and not self.loop_died.is_set()

    async def _watch(self) -> None:
        assert self.worker is not None
        while not self.closing:
            await asyncio.sleep(0.5)
            task = self._run_task
            died = task is not None and task.done()
            if (died or not self.worker.running) and not self.closing:
                # One grace tick: run() sets running=True only after its first await.
                await asyncio.sleep(0.5)
                if self.closing or (self.worker.running and not (task and task.done())):
                    continue
                log.error("worker.loop_died", detail="the BullMQ worker loop stopped")
                self.loop_died.set()
                return

    async def _process(self, job: Any, token: str) -> Any:
        try:
            return await self.handler(job, token)
        except UnrecoverableError:
            # A run that failed by its own logic: the reason says it all, and a Python
            # traceback of the runner's internals would only bury it in Bull Board.
            job.updateStacktrace = lambda: None
            raise
        except DelayedError:
            raise
        except RetryLater:
            # An infrastructure failure BullMQ retries: its message is the failedReason.
            raise
        except asyncio.CancelledError:
            # Never let a cancellation reach the worker loop: it would end it silently.
            raise RuntimeError("INTERNAL: the run was interrupted") from None
        except Exception as err:
            log.internal_error("job.internal_error", err, jobId=job.id)
            raise RuntimeError(f"INTERNAL: {type(err).__name__}") from None

    def _on_error(self, err: Any, *args: Any) -> None:
        self.last_error_at = time.monotonic()
        self.last_error = f"{type(err).__name__}: {str(err)[:200]}"
        log.warning("worker.error", error=type(err).__name__, detail=str(err)[:300])

    async def close(
        self, grace_s: float, on_grace_expired: Callable[[], int] | None = None
    ) -> None:
        """Take no new jobs; let runs in flight finish within ``grace_s``. Past it, ask the
        runs to hand themselves back to the queue (``on_grace_expired``) so they continue on
        another worker at once instead of waiting for the stalled check; force only what
        still does not stop."""
        self.closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        worker = self.worker
        if worker is None:
            return
        closing = asyncio.ensure_future(worker.close())
        done, _ = await asyncio.wait({closing}, timeout=grace_s)
        if not done and on_grace_expired is not None:
            count = on_grace_expired()
            log.warning("worker.grace_expired", graceS=grace_s, handedBack=count)
            done, _ = await asyncio.wait({closing}, timeout=10)
        if not done:
            # Their tasks are cancelled and their locks no longer renewed: each job stays
            # active until its lock expires and a stalled check delivers it again.
            log.warning("worker.force_close", inFlight=len(worker.jobs), to="stalled-check")
            await worker.close(force=True)
            closing.cancel()
        if self._run_task is not None:
            await asyncio.wait({self._run_task}, timeout=5)
        self._finish_connection.close()
