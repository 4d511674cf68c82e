"""What the worker measures beside the spans: BullMQ's job outcomes, the runs in flight, the free
slots and the queue's depth per state, for ``/metrics`` (runner.health) and OTLP alike.

``RunnerMetrics.wrap`` wraps the job handler: how a delivery ends (returned, or which exception
it raised) is what BullMQ records for it, so it is counted there as Node's worker counts it
(``bullmq.jobs.completed|failed|delayed|retried``). The queue's depth is read from Redis in one
pipelined round trip (``LLEN``/``ZCARD`` of the state keys, as BullMQ's ``getJobCounts``), on
each scrape and on a timer for the OTLP export, never in a metric collection callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bullmq.custom_errors import DelayedError, UnrecoverableError

from runner.contract import JOB_NAME
from runner.log import log
from runner.telemetry import Telemetry

Handler = Callable[[Any, str], Awaitable[Any]]

# state → (BullMQ key suffixes, the command that counts it); "waiting" sums wait and paused, as
# Bull Board's count does.
QUEUE_STATES: dict[str, tuple[tuple[str, ...], str]] = {
    "waiting": (("wait", "paused"), "LLEN"),
    "active": (("active",), "LLEN"),
    "delayed": (("delayed",), "ZCARD"),
    "prioritized": (("prioritized",), "ZCARD"),
    "failed": (("failed",), "ZCARD"),
    "completed": (("completed",), "ZCARD"),
}
REFRESH_INTERVAL_S = 15.0


class RunnerMetrics:
    def __init__(
        self,
        telemetry: Telemetry,
        redis: Any,
        *,
        queue_base: str,
        concurrency: int,
        refresh_interval_s: float = REFRESH_INTERVAL_S,
    ) -> None:
        self.telemetry = telemetry
        self.redis = redis
        self.queue_base = queue_base
        self.concurrency = concurrency
        self.refresh_interval_s = refresh_interval_s
        self.in_flight = 0
        self.queue_counts: dict[str, int] = {}
        self._timer: asyncio.Task[None] | None = None
        telemetry.bind_gauges(self.queue_counts, lambda: self.in_flight, lambda: self.free_slots)

    @property
    def free_slots(self) -> int:
        return max(self.concurrency - self.in_flight, 0)

    def wrap(self, handler: Handler) -> Handler:
        """``handler`` counted: runs in flight while it runs, its outcome as BullMQ's."""
        if not self.telemetry.enabled:
            return handler
        telemetry = self.telemetry

        async def counted(job: Any, token: str) -> Any:
            started = time.monotonic()
            self.in_flight += 1
            state = "failed"
            try:
                result = await handler(job, token)
                state = "completed"
                return result
            except DelayedError:
                state = "delayed"
                raise
            except UnrecoverableError:
                raise
            except BaseException:
                state = "retried" if _attempts_left(job) else "failed"
                raise
            finally:
                self.in_flight -= 1
                telemetry.job_finished(
                    state, str(job.name or JOB_NAME), round((time.monotonic() - started) * 1000)
                )

        return counted

    async def refresh(self) -> None:
        """Read the queue's depth per state; on a Redis error keep the last values (a scrape
        must answer, and ``/readyz`` is what reports Redis down)."""
        pipe = self.redis.pipeline(transaction=False)
        order: list[str] = []
        for state, (suffixes, command) in QUEUE_STATES.items():
            for suffix in suffixes:
                pipe.execute_command(command, f"{self.queue_base}:{suffix}")
                order.append(state)
        try:
            async with asyncio.timeout(2):
                replies = await pipe.execute()
        except Exception as err:
            log.warning("metrics.queue_counts_failed", error=type(err).__name__)
            return
        counts = dict.fromkeys(QUEUE_STATES, 0)
        for state, reply in zip(order, replies, strict=True):
            counts[state] += int(reply or 0)
        self.queue_counts.update(counts)

    def start(self) -> None:
        """Refresh on a timer, for exporters that collect without a scrape (OTLP)."""
        if self.telemetry.enabled and self._timer is None:
            self._timer = asyncio.ensure_future(self._tick())

    async def _tick(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_interval_s)

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
            self._timer = None

    async def scrape(self) -> tuple[bytes, str] | None:
        """The Prometheus text of every instrument, the queue's depth read just now."""
        await self.refresh()
        return self.telemetry.prometheus_text()


def _attempts_left(job: Any) -> bool:
    try:
        return int(job.attemptsMade) + 1 < int((job.opts or {}).get("attempts", 1) or 1)
    except (TypeError, ValueError, AttributeError):
        return False


__all__ = ["QUEUE_STATES", "RunnerMetrics"]
