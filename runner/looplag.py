"""How late the event loop runs: the worst delay seen by a timer that should fire every 50 ms.

One run's CPU-heavy work on the loop (decoding, validating, redacting a large body) delays
every other run by as long; this is the measure of it. ``runner.stopped`` logs the worst
(``maxLoopLagMs``), and ``scripts/bench`` reports it.
"""

from __future__ import annotations

import asyncio
import contextlib

INTERVAL_S = 0.05


class LoopLag:
    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.max_ms = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval_s)
            late_ms = (loop.time() - before - self.interval_s) * 1000
            self.max_ms = max(self.max_ms, late_ms)
