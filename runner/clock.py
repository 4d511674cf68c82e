"""The system clock: milliseconds since the epoch, sleeps and jitter. The engine and the
reporter read it some twenty times per W3 run."""

from __future__ import annotations

import asyncio
import random
import time


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    async def sleep(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)

    def random(self) -> float:
        return random.random()
