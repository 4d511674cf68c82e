"""Burst mode (``RUNNER_BURST``): process what is queued, then stop, as arq's ``--burst`` does.

The queue is drained when it holds no job this worker could still take or is still running:
nothing waiting, prioritized, active or delayed (a delayed job, a retry's or a deferred run's,
comes back). Jobs waiting for children in another queue are not counted; a paused queue with
jobs keeps the worker running, as it would keep any worker waiting. Checked twice in a row, a
poll apart, so that a job moving between lists (active to delayed) is not missed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from runner.queue.keys import Keys


async def queued(redis: Any, keys: Keys) -> int:
    """Jobs in the lists a worker takes from or holds: wait, prioritized, active, delayed."""
    base = keys.base
    pipe = redis.pipeline(transaction=False)
    pipe.llen(f"{base}:wait")
    pipe.zcard(f"{base}:prioritized")
    pipe.llen(f"{base}:active")
    pipe.zcard(f"{base}:delayed")
    return sum(int(n) for n in await pipe.execute())


async def until_drained(redis: Any, keys: Keys, *, poll_s: float = 0.1) -> None:
    """Return once the queue has been found empty twice in a row."""
    empty_polls = 0
    while empty_polls < 2:
        await asyncio.sleep(poll_s)
        empty_polls = empty_polls + 1 if await queued(redis, keys) == 0 else 0
